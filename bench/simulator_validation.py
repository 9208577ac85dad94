"""The simulator against reality: record a VM's trace, migrate the same VM, compare.

For each workload: boot a 256 MiB guest on hostA with its load (4 HTTP clients for
``web``, 6 players for ``game``), record its dirty pages for ``--trace-s`` seconds with
the migration's own tracker, then migrate it live to hostB at the default rates, load
still on. The recorded trace then drives ``livemig.analysis.simulate`` (the same planner,
the same seed, so the same round-1 order) with the default fixed costs, and the
prediction is compared with the engine's report: total time, data sent, and engine
downtime. The target is an error within 20% on each.

Usage (root, after ``make setup``; builds its own test bed, instance ``s`` by default, and
tears it down at the end):

    LIVEMIG_INSTANCE=s .venv/bin/python bench/simulator_validation.py \
        [--workloads idle,web,game,mmuncher] [--trace-s 15] [--interval-ms 50]
        [--json out.json]
        [--keep-traces DIR]
    .venv/bin/python bench/simulator_validation.py --replay out.json --keep-traces DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.analysis import record, simulate
from livemig.analysis.trace import Trace
from livemig.daemon import control
from livemig.experiments import bed
from livemig.experiments.probing import ProbeRun
from livemig.image import builder
from livemig.lab import launch
from livemig.migration.planner import MBIT, PlannerConfig, RateLimits
from livemig.net import testbed
from livemig.vm import qemu
from livemig.vm.spec import Workload
from livemig.wire.messages import Migrate, MigrateOptions

os.environ.setdefault("LIVEMIG_INSTANCE", "s")
WORKLOAD_OPTIONS = {
    # As bench/migration.py: a 64 MiB region written at 100 MiB/s.
    Workload.MMUNCHER: (("mm_mib", "64"), ("mm_rate", "100")),
}
OPTIONS = MigrateOptions()  # the migrate command's defaults, simulated and run


def _load(workload: Workload, ip: str) -> ProbeRun | None:
    if workload is Workload.WEB:
        return ProbeRun(testbed.CLIENT, "http", f"http://{ip}/file.bin", "--clients", "4")
    if workload is Workload.GAME:
        return ProbeRun(testbed.CLIENT, "game", ip, "--players", "6")
    return None


def _say(message: str) -> None:
    print(f"[validation] {message}", file=sys.stderr, flush=True)


async def one(workload: Workload, trace_s: float, warmup_s: float, interval_s: float,
              out: Path) -> dict[str, Any]:
    image = builder.Image.load()
    name = f"val{workload.value[:3]}"
    vm = await bed.start_vm(name, image, "hostA", mem_mib=256, workload=workload,
                            options=WORKLOAD_OPTIONS.get(workload, ()))
    await vm.close()
    spec = vm.record.spec
    try:
        load = _load(workload, str(spec.ip))
        with load if load is not None else contextlib.nullcontext():
            await asyncio.sleep(warmup_s)
            _say(f"{workload}: recording {trace_s:g} s")
            trace = await asyncio.to_thread(record.record, qemu.find(name),
                                            interval_s=interval_s, duration_s=trace_s)
            trace.save(out / f"{workload}.npz")
            _say(f"{workload}: migrating")
            request = Migrate(vm=name, to="hostB", options=OPTIONS)
            report = (await control.migrate("hostA", request, None)).to_json()
            if load is not None:
                load.stop()
    finally:
        with contextlib.suppress(Exception):
            await bed.stop_vm(name)

    real = {"total_time_s": report["total_time_s"], "bytes_sent": report["bytes_sent"],
            "downtime_ms": report["downtime_ms"], "rounds": len(report["rounds"]),
            "stop_reason": report["stop_reason"], "final_pages": report["final_pages"]}
    return {**compare(workload, trace, real), "real_rounds": report["rounds"],
            "stop_window_ms": report["stop_window_ms"]}


def compare(workload: Workload, trace: Trace, real: dict[str, Any]) -> dict[str, Any]:
    """The prediction from ``trace`` against the ``real`` figures, and the errors."""
    config = PlannerConfig(limits=RateLimits.of(OPTIONS))
    started = time.perf_counter()
    predicted = simulate.simulate(simulate.TraceDirtier(trace), config,
                                  zero_pages=trace.zero_pages.astype("int64"))
    sim_ms = (time.perf_counter() - started) * 1000
    pred = {"total_time_s": predicted.total_time_s, "bytes_sent": predicted.bytes_sent,
            "downtime_ms": predicted.downtime_s * 1000, "rounds": len(predicted.rounds),
            "stop_reason": predicted.stop_reason, "final_pages": predicted.final_pages}
    errors = {k: (pred[k] - real[k]) / real[k] for k in ("total_time_s", "bytes_sent",
                                                        "downtime_ms") if real[k]}
    dirty = trace.counts.sum() * 32768 / trace.duration_s / MBIT
    return {"workload": str(workload), "trace_s": trace.duration_s,
            "trace_dirty_mbps": round(float(dirty), 1), "real": real, "predicted": pred,
            "errors": errors, "simulation_ms": round(sim_ms, 1),
            "predicted_rounds": predicted.to_json()["rounds"]}


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'workload':<9} {'measure':<13} {'real':>12} {'predicted':>12} {'error':>8}"]
    for r in results:
        for key, fmt in (("total_time_s", "{:.2f}"), ("bytes_sent", "{:,}"),
                         ("downtime_ms", "{:.1f}"), ("rounds", "{}"), ("final_pages", "{}")):
            err = r["errors"].get(key)
            real, predicted = fmt.format(r["real"][key]), fmt.format(r["predicted"][key])
            lines.append(f"{r['workload']:<9} {key:<13} {real:>12} {predicted:>12} "
                         f"{'' if err is None else f'{err:+.0%}':>8}")
        lines.append(f"{r['workload']:<9} {'ended':<13} {r['real']['stop_reason']:>12} "
                     f"{r['predicted']['stop_reason']:>12}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="idle,web,game,mmuncher")
    parser.add_argument("--trace-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--interval-ms", type=float, default=50.0,
                        help="the trace's interval (default 50, the paper's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-traces", type=Path, help="directory for the traces")
    parser.add_argument("--replay", type=Path, metavar="RESULTS.json",
                        help="no VMs: predict again from the traces in --keep-traces and "
                        "compare with the real figures of an earlier --json")
    args = parser.parse_args()
    if args.replay:
        results = [
            {**old, **compare(Workload(old["workload"]),
                              Trace.load(args.keep_traces / f"{old['workload']}.npz"),
                              old["real"])}
            for old in json.loads(args.replay.read_text())
        ]
        print(table(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    out = args.keep_traces or Path(tempfile.mkdtemp(prefix="livemig-validation-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        testbed.up(3)
        launch.ensure_daemons()
        builder.build(log=_say)
        for name in args.workloads.split(","):
            results.append(asyncio.run(one(Workload(name), args.trace_s, args.warmup_s,
                                           args.interval_ms / 1000, out)))
            print(table(results[-1:]), flush=True)
    finally:  # the bed is ours alone: nothing of it may outlive the benchmark
        asyncio.run(bed.stop_all_vms())
        testbed.down()
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
