"""The paper experiment's tables, ratios, results.json and figures, from synthetic
scenario results: no QEMU, no test bed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from livemig.experiments import baselines, paper, paper_plots, scenario
from livemig.probes.http import parse_mix

MS = 1_000_000
S = 1_000_000_000
RAM = 256 << 20
T0 = 10 * S  # the probes' start on their monotonic clock
MIGRATION_AT = 3.0  # s after the probes' start


def _report(mode: str, downtime_ms: float, total_s: float, sent: int) -> dict[str, Any]:
    ours = not mode.startswith("qemu-")
    rounds = [
        {"number": 1, "pages_planned": 20000, "pages_sent": 20000, "pages_skipped": 0,
         "pages_dirtied": 300, "rate_bps": 100e6, "duration_s": 0.8 * total_s,
         "dirty_rate_bps": 5e6, "pages_zero": 40000},
        {"number": 2, "pages_planned": 300, "pages_sent": 290, "pages_skipped": 10,
         "pages_dirtied": 40, "rate_bps": 150e6, "duration_s": 0.1 * total_s,
         "dirty_rate_bps": 2e6, "pages_zero": 0},
    ] if ours and mode == "precopy" else []
    return {
        "vm": "p-web", "source": "hostA", "target": "hostB", "mode": mode,
        "tracker": "uffd", "ram_bytes": RAM, "downtime_ms": downtime_ms,
        "total_time_s": total_s, "bytes_sent": sent, "data_sent_ratio": sent / RAM,
        "rounds": rounds, "stop_reason": "few-pages-left" if ours else "downtime-limit 300 ms",
        "final_pages": 40 if ours else 0, "device_state_ms": 10.0, "verify_ms": 0.0,
        "verified": None, "source_checksum": None, "destination_checksum": None,
        "stages": [["reservation", 0.0], ["iterative pre-copy", 0.05],
                   ["stop-and-copy", 0.95 * total_s], ["commitment", 0.96 * total_s],
                   ["activation", 0.97 * total_s]] if ours else [],
        "stopped_at": None, "cont_returned_at": None,
        "stop_window_ms": {"final_pages": 2.0} if ours else {},
    }


def scenario_result(workload: str = "web", mode: str = "precopy", *, client_ms: float = 80.0,
                    downtime_ms: float = 40.0, stall_ms: float = 220.0, total_s: float = 4.0,
                    sent: int = RAM // 2) -> dict[str, Any]:
    """What ``scenario.measure`` returns, with probes that saw a service at 10 MB/s (web)
    or 120 snapshots/s (game) and an echo outage of ``client_ms``."""
    start_ns = T0 + int(MIGRATION_AT * S)
    gap_start = start_ns + int(0.9 * total_s * S)
    def silent(t: int, gap_ms: float) -> bool:
        # a 30 ms hiccup a second before the migration, a 500 ms one early in it (a
        # loaded guest, no switchover), and the outage at the switchover
        hiccup, loaded = start_ns - S, start_ns + int(0.1 * total_s * S)
        return (hiccup < t < hiccup + 30 * MS) or (loaded < t < loaded + 500 * MS) or (
            gap_start < t < gap_start + gap_ms * MS)

    probes: dict[str, Any] = {
        "echo": {"started_ns": T0, "stopped_ns": T0 + 20 * S,
                 # (seq, sent, received), one every 2 ms for 20 s
                 "replies": [v for i in range(0, 20000, 2) if not silent(T0 + i * MS, client_ms)
                             for v in (i, T0 + i * MS, T0 + i * MS)],
                 # the whole run's longest gap: an outage long after the migration
                 "summary": {"downtime_ms": 999.0, "gap_start_ns": T0 + 8 * S,
                             "gap_end_ns": T0 + 8 * S + 999 * MS}},
        "tcp": {"reply_ns": [T0 + i * MS for i in range(0, 20000, 5)
                             if not gap_start < T0 + i * MS < gap_start + stall_ms * MS],
                "summary": {"stall_ms": 999.0, "survived": True}},
    }
    if workload == "web":
        # 100 requests of 100 KB a second, one every 10 ms; one in ten fails during the
        # migration
        during = range(int(MIGRATION_AT * 100), int((MIGRATION_AT + total_s) * 100))
        probes["web"] = {"completions": [[T0 + i * 10 * MS, 100_000, 5 * MS, 0]
                                         for i in range(2000)
                                         if not (i in during and i % 10 == 0)]}
    if workload == "game":
        probes["game"] = {
            "players": [{"arrivals_ns": [T0 + i * 50 * MS + p * MS for i in range(180)
                                         if not 100 <= i < 102]} for p in range(6)],
            "summary": {"max_gap_ms": 150.0},
        }
    report = _report(mode, downtime_ms, total_s, sent)
    # the VM stopped 10 ms into the outage and ran again 10 ms before its end
    report["stopped_at"] = (gap_start + 10 * MS) / S
    report["cont_returned_at"] = (gap_start + int(client_ms * MS) - 10 * MS) / S
    unit = {"web": "HTTP MB/s", "game": "snapshots/s"}.get(workload, "echo replies/s")
    before = {"web": 10e6, "game": 120.0}.get(workload, 1000.0)
    return {
        "workload": workload, "mode": mode, "downtime_ms": downtime_ms,
        # the probes' whole-run figures (see the echo summary above)
        "client_downtime_ms": 999.0, "client_downtime_breakdown": None,
        "tcp_stall_ms": 999.0, "tcp_survived": True, "total_time_s": total_s,
        "bytes_sent": sent, "ram_bytes": RAM, "data_sent_ratio": sent / RAM,
        "rounds": _report(mode, downtime_ms, total_s, sent)["rounds"], "verified": None,
        "service_impact": 0.9, "service_unit": unit, "service_before_per_s": before,
        "service_during_per_s": 0.9 * before, "integrity": None,
        "console_ticks_on_destination": [], "migration_started_s": MIGRATION_AT,
        "report": report, "probes": probes,
    }


def test_a_row_holds_every_column_in_the_tables_units() -> None:
    row = paper.summarize(scenario_result("web"))
    assert row["status"] == "ok"
    assert all(key in row for key, _, _ in paper.COLUMNS)
    assert row["throughput_unit"] == "MB/s"
    assert row["throughput_before"] == pytest.approx(10.0)
    assert row["throughput_during"] == pytest.approx(9.0)
    assert row["data_sent_ratio"] == pytest.approx(0.5)
    assert row["rounds"] == 2
    # Across the switchover only, not the probes' whole run nor the 500 ms of load early
    # in the migration; and the noise floor before.
    assert row["client_downtime_ms"] == pytest.approx(80.0)
    assert row["tcp_stall_ms"] == pytest.approx(220.0)
    assert row["client_downtime_whole_run_ms"] == 999.0
    assert row["echo_gap_before_ms"] == pytest.approx(30.0)


def test_a_gap_counts_when_it_overlaps_the_window_and_silence_to_the_end_too() -> None:
    times = [0, 10, 20, 100, 110, 400]
    assert scenario.gap_across(times, 105, 120) == (110, 400)
    assert scenario.gap_across(times, 30, 40) == (20, 100)
    assert scenario.gap_across(times, 500, 600) is None
    assert scenario.gap_across(times[:4], 105, 120, stopped_ns=1000) == (100, 1000)


def test_a_qemu_precopy_that_does_not_converge_is_a_row_not_an_exception() -> None:
    exc = baselines.DidNotConverge(12.5, 3 * RAM, {"status": "active"})
    row = paper.failed_row(exc, RAM)
    assert row["status"] == "did-not-converge"
    assert row["client_downtime_ms"] is None
    assert row["data_sent_ratio"] == pytest.approx(3.0)
    assert row["total_time_s"] == pytest.approx(12.5)  # QEMU's, not the whole step's
    other = paper.failed_row(OSError("reset"), RAM)
    assert other["status"] == "failed" and other["total_time_s"] is None


def test_medians_over_completed_runs_and_a_status_that_counts_them() -> None:
    rows = [paper.summarize(scenario_result(client_ms=v)) for v in (80.0, 120.0, 90.0)]
    assert paper.median_row(rows)["client_downtime_ms"] == pytest.approx(90.0)
    assert paper.median_row(rows)["status"] == "ok"
    mixed = [*rows[:2], paper.failed_row(OSError("x"), RAM)]
    median = paper.median_row(mixed)
    assert median["client_downtime_ms"] == pytest.approx(100.0)
    assert median["status"] == "2/3 ok, failed"
    assert median["completed"] == 2 and median["runs"] == 3
    never = paper.median_row([paper.failed_row(
        baselines.DidNotConverge(13.0, 3 * RAM, {}), RAM)])
    assert never["status"] == "did-not-converge"
    assert never["data_sent_ratio"] == pytest.approx(3.0)


def test_the_worst_run_is_the_highest_outage_and_the_lowest_service() -> None:
    rows = [paper.summarize(scenario_result(client_ms=v, total_s=t))
            for v, t in ((80.0, 4.0), (150.0, 3.0), (90.0, 5.0))]
    rows[1]["service_impact"] = 0.5
    row = paper.median_row(rows)
    assert row["worst"]["client_downtime_ms"] == pytest.approx(150.0, abs=2.0)
    assert row["worst"]["total_time_s"] == pytest.approx(5.0)
    assert row["worst"]["service_impact"] == pytest.approx(0.5)
    assert "throughput_before" not in row["worst"]  # the load, not a result
    heads, cells = paper.table_rows({"table": {"ours": row}})
    client = cells[0][heads.index("client downtime (ms)")]
    assert client.startswith("9") and client.endswith("(150)")  # "median (worst)"


def test_the_floor_compares_only_the_outage() -> None:
    table = {
        "ours": paper.median_row([paper.summarize(scenario_result(client_ms=60.0))]),
        "floor": paper.median_row([paper.summarize(scenario_result(
            mode="floor", client_ms=40.0, sent=0))]),
    }
    ratios = paper.ratios(table)["floor"]
    assert ratios["client_downtime_ms"] == pytest.approx(1.5)
    assert ratios["total_time_s"] is None and ratios["bytes_sent"] is None


def test_the_floor_pauses_for_the_median_of_our_downtimes_so_far() -> None:
    ours = [paper.summarize(scenario_result(downtime_ms=v)) for v in (20.0, 50.0, 30.0)]
    assert paper._floor_pause_ms(ours) == pytest.approx(30.0)
    assert paper._floor_pause_ms([]) == paper.FLOOR_DEFAULT_MS


def test_ratios_are_ours_over_each_baseline_and_none_without_a_baseline_figure() -> None:
    table = {
        "ours": paper.median_row([paper.summarize(scenario_result(
            client_ms=60.0, stall_ms=100.0, total_s=8.0, sent=RAM // 4))]),
        "qemu-precopy": paper.median_row([paper.summarize(scenario_result(
            mode="qemu-precopy", client_ms=120.0, stall_ms=250.0, total_s=2.0,
            sent=RAM // 2))]),
        "qemu-precopy-30": paper.median_row([paper.failed_row(
            baselines.DidNotConverge(13.0, 3 * RAM, {}), RAM)]),
    }
    ratios = paper.ratios(table)
    assert ratios["qemu-precopy"]["client_downtime_ms"] == pytest.approx(0.5)
    assert ratios["qemu-precopy"]["tcp_stall_ms"] == pytest.approx(0.4)
    assert ratios["qemu-precopy"]["total_time_s"] == pytest.approx(4.0)
    assert ratios["qemu-precopy"]["bytes_sent"] == pytest.approx(0.5)
    assert ratios["qemu-precopy-30"]["baseline_status"] == "did-not-converge"
    assert all(ratios["qemu-precopy-30"][k] is None for k in paper.RATIO_KEYS)
    assert "ours" not in ratios


def test_figure_series_line_up_on_the_migrations_start() -> None:
    series = paper.figure_series(scenario_result("game"))
    gap = series["client_gap"]
    assert gap["start_s"] == pytest.approx(0.9 * 4.0)
    assert gap["end_s"] - gap["start_s"] == pytest.approx(0.080)
    throughput = series["throughput"]
    assert throughput["t_s"][0] == pytest.approx(-MIGRATION_AT)
    assert max(throughput["values"]) == pytest.approx(120.0)
    game = series["game_interarrival"]
    assert game["players"] == 6
    assert max(game["gap_ms"]) == pytest.approx(150.0)  # the two missing snapshots
    rounds = series["rounds"]["rounds"]
    assert [r["number"] for r in rounds] == [1, 2]
    assert rounds[0]["start_s"] == pytest.approx(0.05)
    assert rounds[1]["start_s"] == pytest.approx(0.05 + 3.2)
    assert rounds[0]["transfer_mbps"] == pytest.approx(20000 * 4096 * 8 / 3.2 / 1e6)


def _results(workloads: tuple[str, ...] = ("web", "game")) -> dict[str, Any]:
    settings = paper.Settings.quick()
    measured: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    for key in workloads:
        kind = "game" if key == "game" else "web"
        ours = scenario_result(kind, "precopy")
        qemu = scenario_result(kind, "qemu-precopy", client_ms=150.0)
        measured[key] = {
            "ours": [paper.summarize(ours)],
            "qemu-precopy": [paper.summarize(qemu)],
            "qemu-precopy-30": [paper.failed_row(
                baselines.DidNotConverge(13.0, 3 * RAM, {}), RAM)],
        }
        figures[key] = {"ours": paper.figure_series(ours),
                        "qemu-precopy": paper.figure_series(qemu)}
    return paper.build_results(settings, measured, figures, elapsed_s=123.0)


def test_results_json_has_the_promised_shape_and_round_trips() -> None:
    results = _results()
    paper.check_results(results)
    again = json.loads(json.dumps(results, allow_nan=False))
    paper.check_results(again)
    assert set(again["workloads"]) == {"web", "game"}
    web = again["workloads"]["web"]
    assert web["table"]["qemu-precopy-30"]["status"] == "did-not-converge"
    assert web["ratios_ours_over"]["qemu-precopy"]["client_downtime_ms"] == pytest.approx(
        80.0 / 150.0)
    broken = json.loads(json.dumps(results))
    del broken["workloads"]["web"]["table"]["ours"]["tcp_stall_ms"]
    with pytest.raises(ValueError):
        paper.check_results(broken)


def test_tables_print_every_engine_and_mark_the_one_that_did_not_converge() -> None:
    results = _results(("web",))
    text = paper.text_report(results)
    assert "did-not-converge" in text
    assert "QEMU pre-copy, limit 300 ms" in text
    markdown = paper.markdown_report(results, ["downtime.png"])
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table_lines[:5]}) == 1  # a well-formed table
    assert "![downtime.png](downtime.png)" in markdown


def test_every_figure_is_drawn_from_results_alone(tmp_path: Path) -> None:
    names = paper_plots.draw_all(_results(), tmp_path)
    assert set(names) == {"rounds-web.png", "throughput-web.png", "rounds-game.png",
                          "throughput-game.png", "game-interarrival.png", "downtime.png"}
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_specweb_mix_follows_specweb99s_shares() -> None:
    mix = parse_mix(paper.specweb_mix())  # what the probe will make of it
    weights = {p.label: p.weight for p in mix}
    static = sum(w for p, w in weights.items() if p.startswith("/sw/"))
    assert static == pytest.approx(0.70, abs=1e-3)
    dynamic = sum(w for p, w in weights.items() if p.startswith("/cgi-bin/dyn"))
    assert dynamic == pytest.approx(0.252, abs=1e-3)
    assert weights["POST /cgi-bin/post"] == pytest.approx(0.048)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(w for p, w in weights.items() if p.startswith("/sw/c1_")) == pytest.approx(
        0.35, abs=1e-3)


def test_a_guest_kernel_that_complains_is_caught_on_its_console() -> None:
    console = ("lm: tick 4\n[   28.97] list_del corruption. prev->next should be ...\n"
               "[   28.98] Kernel panic - not syncing: Fatal exception in interrupt\n")
    assert paper.guest_kernel_trouble(console) == (
        "[   28.97] list_del corruption. prev->next should be ...")
    assert paper.guest_kernel_trouble("lm: ready workload=web\nlm: tick 1\n") is None
    row = paper.summarize(scenario_result())
    row["guest_kernel_trouble"] = "hostB: Kernel panic"
    median = paper.median_row([row])
    assert median["guest_kernel_trouble"] == ["hostB: Kernel panic"]
    results = paper.build_results(paper.Settings.quick(), {"web": {"ours": [row]}}, {}, 1.0)
    assert "guest kernel trouble x1" in paper.text_report(results)


def test_a_guest_that_never_answers_again_is_no_success() -> None:
    result = scenario_result(client_ms=80.0)
    echo = result["probes"]["echo"]
    stop = result["report"]["stopped_at"] * S
    echo["replies"] = [v for i, v in enumerate(echo["replies"])
                       if echo["replies"][i - i % 3 + 2] < stop]
    row = paper.summarize(result)
    assert row["status"] == "guest-unresponsive"
    # silent from just before the stop to the end of the run
    assert row["client_downtime_ms"] > 10_000


def test_figures_are_drawn_when_a_run_lacks_a_figure(tmp_path: Path) -> None:
    results = _results(("game",))
    results["workloads"]["game"]["table"]["ours"]["client_downtime_ms"] = None
    results["workloads"]["game"]["table"]["ours"]["data_sent_ratio"] = None
    assert "throughput-game.png" in paper_plots.draw_all(results, tmp_path)


def test_a_mix_of_pages_counts_requests_not_bytes() -> None:
    row = paper.summarize(scenario_result("web"), by_requests=True)
    assert row["throughput_unit"] == "requests/s"
    assert row["throughput_before"] == pytest.approx(100.0)
    assert row["throughput_during"] == pytest.approx(90.0)
    series = paper.figure_series(scenario_result("web"), by_requests=True)
    assert series["throughput"]["unit"] == "requests/s"
