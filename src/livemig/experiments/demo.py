"""``livemig demo``: the main job, end to end on the built-in test bed.

It brings up the test bed (hosts, client, a daemon per host), boots a VM with the chosen
workload on hostA, starts the client probes, migrates the VM live to hostB, prints the
report and saves a chart of the rounds and the probes' timeline. Everything is torn down
afterwards, also when something fails.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from livemig import argtypes, reporting
from livemig.errors import LivemigError
from livemig.experiments import bed, scenario
from livemig.image import builder
from livemig.lab import launch
from livemig.net import testbed
from livemig.probes.timeseries import bucketize
from livemig.vm.spec import Workload, workload_misfit
from livemig.wire import messages

SUMMARY_KEYS = ("downtime_ms", "client_downtime_ms", "tcp_stall_ms", "total_time_s",
                "bytes_sent", "ram_bytes", "data_sent_ratio", "verified", "service_impact")


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _progress(update: messages.Progress) -> None:
    print(f"[demo] {reporting.progress_line(update)}", file=sys.stderr, flush=True)


def throughput_series(result: dict[str, Any]) -> tuple[str, Any, Any]:
    unit, times, weights = scenario.service_events(Workload(result["workload"]),
                                                    result["probes"])
    start = result["probes"]["echo"]["started_ns"]
    end = int(times.max()) + 1 if len(times) else start + 1
    buckets = bucketize(times, start_ns=start, end_ns=end, width_ns=100_000_000,
                        weights=weights)
    per_s = buckets.totals * 10.0
    if unit.startswith("HTTP"):
        per_s = per_s / 1e6
    return unit, np.arange(len(per_s)) * 0.1, per_s


# The demo's web load leaves the guest headroom: 4 clients, each reading a page for
# 200 ms between requests, as people do. Back to back, 4 clients of a 512 KB file keep
# the guest's one TCG vCPU busy, and its echo round trip reached 10-800 ms before any
# migration: the client's "downtime" then measured the queue, not the switchover.
DEMO_HTTP_CLIENTS = 4
DEMO_HTTP_THINK_MS = 200.0


def demo_scenario(workload: Workload, mem_mib: int) -> scenario.Scenario:
    return scenario.Scenario(workload=workload, mem_mib=mem_mib,
                             http_clients=DEMO_HTTP_CLIENTS, http_think_ms=DEMO_HTTP_THINK_MS)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def client_lines(result: dict[str, Any]) -> list[str]:
    """What the client felt, each figure with what it means, beside its noise floor."""
    gaps = scenario.client_gaps(result)
    rtt_median, rtt_p99 = gaps["echo_rtt_before_ms"]
    stall = gaps["tcp_stall_ms"]
    impact = result["service_impact"]
    return [
        f"  client downtime    {_ms(gaps['client_downtime_ms'])}   the longest silence of a "
        f"UDP echo sent every 1 ms, across the switchover",
        f"  noise floor        {_ms(gaps['echo_gap_before_ms'])}   the echo's longest "
        f"silence before the migration; its round trip then: median {_ms(rtt_median)}, "
        f"99th percentile {_ms(rtt_p99)}",
        f"  TCP stall          {_ms(stall)}   the longest wait of one established TCP flow "
        f"across the switchover (survived: {'yes' if result['tcp_survived'] else 'NO'})",
        "  service impact     " + (f"{impact:.2f}" if impact is not None else "n/a")
        + f"   the workload's {result['service_unit']} during the migration over before",
    ]


def run(workload: Workload, mem_mib: int, json_file: Path | None, plot: Path) -> int:
    if problem := workload_misfit(workload, (), mem_mib):
        raise LivemigError(problem)
    _say("bringing up the test bed (hostA, hostB, hostC, client) and its daemons")
    testbed.up(3)
    try:
        launch.ensure_daemons()
        builder.build(log=_say)
        _say(f"booting {workload} VM on hostA, probing from the client, then migrating "
             f"it live to hostB")
        result = asyncio.run(scenario.run(demo_scenario(workload, mem_mib),
                                          on_progress=_progress))
    finally:
        _say("tearing down")
        asyncio.run(bed.stop_all_vms())
        testbed.down()
    print(reporting.report_text(messages.MigrationReport.from_json(result["report"])))
    for line in client_lines(result):
        print(line)
    if result["integrity"] is not None:
        print(f"  mmuncher           {result['integrity']['errors']} integrity errors after "
              f"{result['integrity']['full_verifies']} full verifications")
    # Imported here: matplotlib costs every other command of the CLI 0.4 s to import,
    # and without a writable home it warns on stderr.
    from livemig.experiments import plots

    try:
        plots.migration_figure(plot, result["report"], echo=result["probes"]["echo"],
                               throughput=throughput_series(result),
                               migration_started_s=result["migration_started_s"])
        print(f"  chart              {plot}")
        if json_file is not None:
            summary = {k: result[k] for k in SUMMARY_KEYS} | {
                "rounds": result["rounds"], "workload": result["workload"],
                "tcp_survived": result["tcp_survived"], "integrity": result["integrity"],
                "report": result["report"],
            }
            json_file.write_text(json.dumps(summary, indent=2) + "\n")
            print(f"  JSON               {json_file}")
    except OSError as exc:
        # Checked before the run; a disk that filled up meanwhile still gets one sentence.
        raise LivemigError(f"the demo ran (report above), but {exc.filename or 'its output'} "
                           f"could not be written: {exc.strerror}") from exc
    return 0 if result["verified"] is not False else 1


def add_demo_command(commands: Any) -> None:
    parser = commands.add_parser("demo", help="the main job: a live migration on the test bed")
    parser.add_argument("--workload", default="web",
                        choices=[w.value for w in Workload if w not in (Workload.CUSTOM,
                                                                       Workload.ECHO)])
    parser.add_argument("--mem", type=argtypes.mem_mib, default=256, metavar="MiB")
    parser.add_argument("--json", type=argtypes.writable_file, metavar="FILE",
                        help="also write the report here")
    # A string default goes through the type too: an unwritable working directory is
    # found before the demo, not after it.
    parser.add_argument("--plot", type=argtypes.writable_file, metavar="FILE.png",
                        default="demo.png",
                        help="chart of the rounds and the probes (default demo.png)")
    parser.set_defaults(
        func=lambda args: run(Workload(args.workload), args.mem, args.json, args.plot)
    )
