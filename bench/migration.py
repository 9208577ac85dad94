"""Live migration benchmark: ours against QEMU's own, same VMs, same probes, same run.

For each workload and mode, N migrations of a 256 MiB guest from hostA to hostB at the
default rates (100-500 Mbit/s); prints the medians of engine and client downtime, the TCP
stall, total time, data sent over RAM and service impact, then our figure over QEMU's.

    .venv/bin/python bench/migration.py [--runs 5] [--workloads idle,web,game,mmuncher]
        [--modes precopy,stop-and-copy,qemu-precopy] [--json out.json]

Verification (a checksum of both images, which costs downtime) is off here: the tests
check correctness, this measures speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from typing import Any

from livemig.daemon import launch
from livemig.errors import LivemigError
from livemig.experiments import scenario
from livemig.image import builder
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import Workload

FIGURES = ("client_downtime_ms", "downtime_ms", "tcp_stall_ms", "total_time_s",
           "data_sent_ratio", "service_impact")
WORKLOAD_OPTIONS = {
    # MMuncher as in the paper: a region written without pause. 64 MiB at 100 MiB/s keeps
    # the guest write-heavy while TCG can still keep up.
    Workload.MMUNCHER: (("mm_mib", "64"), ("mm_rate", "100")),
}


def median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workloads", default="idle,web,game,mmuncher")
    parser.add_argument("--modes", default="precopy,stop-and-copy,qemu-precopy")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    builder.build(log=lambda m: print(m, file=sys.stderr))
    testbed.up(3)
    launch.ensure_daemons()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in args.workloads.split(","):
            workload = Workload(name)
            for mode in args.modes.split(","):
                runs = []
                for i in range(args.runs):
                    s = scenario.Scenario(workload=workload, mode=mode, verify=False,
                                          baseline_s=2.5, after_s=1.5, vm_name=f"b{i}",
                                          qemu_timeout_s=30.0,
                                          options=WORKLOAD_OPTIONS.get(workload, ()))
                    try:
                        r = asyncio.run(scenario.run(s))
                    except LivemigError as exc:
                        # QEMU's pre-copy never converges on a write-heavy guest: a result.
                        print(f"  {name:<9} {mode:<14} run {i + 1}: FAILED: {exc}", flush=True)
                        asyncio.run(qemu.stop_all())
                        runs.append({k: None for k in FIGURES} | {"error": str(exc)})
                        continue
                    runs.append({k: r[k] for k in FIGURES})
                    print(f"  {name:<9} {mode:<14} run {i + 1}: " + ", ".join(
                        f"{k}={r[k]:.3g}" for k in FIGURES if r[k] is not None), flush=True)
                key = f"{name}/{mode}"
                results[key] = {k: median([run[k] for run in runs]) for k in FIGURES}
                results[key]["runs"] = runs
    finally:
        asyncio.run(qemu.stop_all())
        testbed.down()

    print(f"\nmedians of {args.runs} runs, 256 MiB guest, 100-500 Mbit/s")
    print(f"{'workload/mode':<26}" + "".join(f"{k:>20}" for k in FIGURES))
    for key, figures in results.items():
        print(f"{key:<26}" + "".join(
            f"{figures[k]:>20.3f}" if figures[k] is not None else f"{'n/a':>20}"
            for k in FIGURES))
    print("\nours (precopy) over QEMU's pre-copy, per figure (below 1 is better except "
          "service_impact)")
    for name in args.workloads.split(","):
        ours, peer = results.get(f"{name}/precopy"), results.get(f"{name}/qemu-precopy")
        if ours and peer:
            ratios = {k: (ours[k] / peer[k] if ours[k] is not None and peer[k] else None)
                      for k in FIGURES}
            print(f"{name:<26}" + "".join(
                f"{v:>20.2f}" if v is not None else f"{'n/a':>20}" for v in ratios.values()))
            results[f"{name}/ratio-ours-over-qemu"] = ratios
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
