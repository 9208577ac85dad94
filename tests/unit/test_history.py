"""A source daemon's memory of its switchovers: the fixed cost it predicts with."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_messages import a_report

from livemig import cli, paths
from livemig.daemon.history import RECENT, SwitchoverHistory, measured_cost_ms
from livemig.migration.planner import DEFAULT_SWITCHOVER_COST_S


def test_the_fixed_cost_is_the_downtime_less_the_last_pages_and_the_last_collect() -> None:
    # 60 ms paused; 1,250,000 bytes at 1000 Mbit/s is 10 ms, the collect 2 ms: 48 ms.
    report = a_report(downtime_ms=60.0, final_bytes=1_250_000, link_mbps=1000.0,
                      final_collect_ms=2.0)
    assert measured_cost_ms(report) == pytest.approx(48.0)


def test_the_cost_predicted_is_the_median_of_the_last_few_of_that_vm_to_that_target(
        tmp_path: Path) -> None:
    history = SwitchoverHistory(tmp_path / "state" / "switchovers.jsonl")
    assert history.switchover_cost_s("hostB") == DEFAULT_SWITCHOVER_COST_S  # none yet
    history.record(a_report(vm="web", target="hostB", downtime_ms=90.0, final_bytes=0))
    assert history.switchover_cost_s("hostB", "game") == pytest.approx(0.090)  # all there is
    for downtime in (30.0, 31.0, 32.0, 33.0, 600.0, 600.0, 34.0, 35.0, 36.0):
        history.record(a_report(vm="game", target="hostB", downtime_ms=downtime,
                                final_bytes=0))
    history.record(a_report(vm="web", target="hostC", downtime_ms=500.0, final_bytes=0))
    # game's last RECENT to hostB, sorted: 31 .. 36, 600, 600; the median, rounded up to
    # a measured value, is 35. The slow ones do not set it; hostC's do not count here.
    assert RECENT == 8
    assert history.switchover_cost_s("hostB", "game") == pytest.approx(0.035)
    # web has fewer than SAME_VM of its own there: every VM's to hostB count.
    assert history.switchover_cost_s("hostB", "web") == pytest.approx(0.035)
    assert history.switchover_cost_s("hostC", "web") == pytest.approx(0.5)
    assert [e.target for e in history.entries()].count("hostB") == 10


def test_a_torn_line_is_skipped_and_an_unwritable_history_only_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "switchovers.jsonl"
    history = SwitchoverHistory(path)
    history.record(a_report(target="hostB", downtime_ms=40.0, final_bytes=0))
    with path.open("a") as f:
        f.write('{"at": 1, "vm": "v1", "tar')  # a crash mid-write
    assert len(history.entries()) == 1
    blocked = SwitchoverHistory(tmp_path / "a-file" / "switchovers.jsonl")
    (tmp_path / "a-file").write_text("not a directory")
    blocked.record(a_report())
    assert "could not record the switchover" in caplog.text


def test_the_switchovers_command_shows_predicted_against_actual(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path / "run"))
    history = SwitchoverHistory(paths.state_dir("hostA") / "switchovers.jsonl")
    for actual, predicted in ((44.0, 40.0), (50.0, 40.0), (36.0, 40.0)):
        history.record(a_report(vm="v1", target="hostB", downtime_ms=actual,
                                predicted_downtime_ms=predicted, downtime_target_ms=50.0))
    assert cli.main(["switchovers", "--host", "hostA"]) == 0
    out = capsys.readouterr().out
    assert out.count("v1           hostB") == 3 and "1.25" in out
    assert "actual/predicted over 3: median 1.10, worst 1.25" in out


def test_the_final_collect_is_learnt_beside_the_fixed_cost(tmp_path: Path) -> None:
    history = SwitchoverHistory(tmp_path / "switchovers.jsonl")
    assert history.final_collect_s("hostB") == 0.0
    for collect in (1.0, 22.0, 0.8):
        history.record(a_report(target="hostB", final_collect_ms=collect, final_bytes=0))
    assert history.final_collect_s("hostB") == pytest.approx(0.001)  # the median
