"""A tiny ``experiment paper`` on real guests: one workload, ours and QEMU's pre-copy on
the same VM, there and back, with every output written."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from livemig.experiments import bed as bed_
from livemig.experiments import paper
from livemig.image import builder
from livemig.net import testbed
from livemig.vm import qemu


# A QEMU outlives the Popen that started it by design: the VM runs on after the code
# that booted or moved it lets go, and is stopped (and reaped) by PID later. Python warns
# when such a Popen is collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_one_workload_two_engines_on_one_vm(
    bed: list[testbed.Node], image: builder.Image, loop: asyncio.AbstractEventLoop,
    tmp_path: Path,
) -> None:
    # 128 MiB and short windows keep this under a minute; the numbers are not the point.
    settings = dataclasses.replace(
        paper.Settings.quick(), mem_mib=128, baseline_s=2.5, after_s=1.0,
        workloads=("game",), engines=("ours", "qemu-precopy"))
    lines: list[str] = []
    clock = paper.Clock(lines.append)
    try:
        measured, figures = loop.run_until_complete(paper.measure_all(settings, clock))
    finally:
        loop.run_until_complete(bed_.stop_all_vms())
    assert not [r for r in qemu.records() if r.spec.name.startswith("p-")]
    results = paper.write_outputs(settings, measured, figures, tmp_path, clock)

    written = json.loads((tmp_path / "results.json").read_text())
    paper.check_results(written)
    game = written["workloads"]["game"]
    for engine in ("ours", "qemu-precopy"):
        row = game["table"][engine]
        assert row["status"] == "ok", row
        assert 0 < row["client_downtime_ms"] < 5000
        assert row["throughput_before"] > 0
    # Ours moved it to hostB, QEMU's brought it back: the progress says so, step by step.
    assert any("hostA->hostB" in line and "ours" in line for line in lines)
    assert any("hostB->hostA" in line and "QEMU" in line for line in lines)
    assert game["figures"]["ours"]["rounds"]["rounds"]
    assert game["figures"]["qemu-precopy"]["game_interarrival"]["gap_ms"]
    assert game["ratios_ours_over"]["qemu-precopy"]["client_downtime_ms"] > 0
    assert set(results["figures_files"]) == {"rounds-game.png", "throughput-game.png",
                                             "game-interarrival.png", "downtime.png"}
    assert (tmp_path / "results.md").read_text().count("| ours (pre-copy, target 100 ms)") == 1
