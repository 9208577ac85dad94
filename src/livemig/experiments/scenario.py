"""One measured live migration: a VM under its workload, probes on the client, a move.

    boot the VM on the source            (not measured)
    start the probes                     echo every 1 ms, one TCP flow, the workload's own
    wait `baseline_s`                    "throughput before"
    migrate through the source daemon    the engine's report
    wait `after_s`, stop the probes      "throughput during" is over the migration itself
    check the guest on the destination   mmuncher's integrity check, the console counter

The result has the keys the demo promises (``downtime_ms``, ``client_downtime_ms``,
``tcp_stall_ms``, ``total_time_s``, ``bytes_sent``, ``ram_bytes``, ``rounds``,
``verified``, ``service_impact``) plus the raw probe results for plots.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.daemon import control
from livemig.errors import LivemigError
from livemig.experiments import baselines
from livemig.experiments.probing import ProbeRun, wait_measuring
from livemig.image import builder
from livemig.net import testbed
from livemig.probes.timeseries import service_impact
from livemig.vm import qemu
from livemig.vm.spec import VMSpec, Workload

ProgressPrinter = Callable[[dict[str, Any]], None] | None
BEFORE_WINDOW_S = 1.0  # "throughput before": this long, just before the migration


@dataclass(frozen=True)
class Scenario:
    workload: Workload
    source: str = "hostA"
    target: str = "hostB"
    mem_mib: int = 256
    mode: str = "precopy"
    min_rate_mbps: float = 100.0
    max_rate_mbps: float = 500.0
    tracker: str = "auto"
    verify: bool = True
    baseline_s: float = 3.0  # at least BEFORE_WINDOW_S plus the probes' start-up
    after_s: float = 2.0
    options: tuple[tuple[str, str], ...] = ()
    http_clients: int = 4
    http_mix: str | None = None  # weighted paths (``probe http --mix``) instead of file.bin
    game_players: int = 6
    vm_name: str = "demo"
    qemu_timeout_s: float = 120.0  # for the qemu-* modes (baselines.MODES)
    extra_request: dict[str, Any] = field(default_factory=dict)


def _workload_probe(s: Scenario, ip: str) -> ProbeRun | None:
    if s.workload is Workload.WEB:
        mix = ("--mix", s.http_mix) if s.http_mix else ()
        return ProbeRun(testbed.CLIENT, "http", f"http://{ip}/file.bin", "--clients",
                        str(s.http_clients), *mix)
    if s.workload is Workload.GAME:
        return ProbeRun(testbed.CLIENT, "game", ip, "--players", str(s.game_players))
    return None


def service_events(workload: Workload, probes: dict[str, Any]) -> tuple[str, Any, Any]:
    """(unit, event times in ns, weights) of the service's useful work."""
    own = probes.get(str(workload))
    if workload is Workload.WEB and own is not None:
        rows = own["completions"]
        times = np.array([r[0] for r in rows], dtype=np.int64)
        return "HTTP MB/s", times, np.array([r[1] for r in rows], dtype=np.int64)
    if workload is Workload.GAME and own is not None:
        arrivals = [t for p in own["players"] for t in p["arrivals_ns"]]
        return "snapshots/s", np.sort(np.array(arrivals, dtype=np.int64)), None
    replies = np.asarray(probes["echo"]["replies"], dtype=np.int64).reshape(-1, 3)
    return "echo replies/s", replies[:, 2], None


async def run(s: Scenario, on_progress: ProgressPrinter = None) -> dict[str, Any]:
    """Run the scenario on a test bed that is up with its daemons; the VM is stopped after."""
    await boot(s)
    try:
        return await measure(s, on_progress)
    finally:
        with contextlib.suppress(LivemigError):  # gone already: a failed start, say
            await qemu.stop(s.vm_name)


async def boot(s: Scenario) -> VMSpec:
    """Start the scenario's VM on ``s.source`` and wait for its workload."""
    image = builder.Image.load()
    spec = qemu.new_spec(s.vm_name, image, mem_mib=s.mem_mib, workload=s.workload,
                         options=s.options)
    vm = await qemu.VM.start(spec, s.source)
    await vm.close()  # the source daemon takes hold of it for the migration
    return spec


async def measure(s: Scenario, on_progress: ProgressPrinter = None) -> dict[str, Any]:
    """Migrate the running VM ``s.vm_name`` from ``s.source`` to ``s.target`` under the
    probes. The VM keeps running wherever it ends up, so that the next measurement can
    take it back (a boot costs more than a migration here)."""
    ip = str(qemu.find(s.vm_name).spec.ip)
    probes: dict[str, Any] = {}
    with ProbeRun(testbed.CLIENT, "echo", ip) as echo, \
            ProbeRun(testbed.CLIENT, "tcp", ip) as tcp:
        workload_probe = _workload_probe(s, ip)
        try:
            # The baseline counts from when the probes measure, not from their launch.
            await wait_measuring([p for p in (echo, tcp, workload_probe) if p is not None])
            await asyncio.sleep(s.baseline_s)
            request = {"op": "migrate", "vm": s.vm_name, "to": s.target, "mode": s.mode,
                       "min_rate_mbps": s.min_rate_mbps, "max_rate_mbps": s.max_rate_mbps,
                       "tracker": s.tracker, "verify": s.verify, **s.extra_request}
            started_ns = time.monotonic_ns()
            if s.mode.startswith("qemu-"):
                # QEMU's modes carry their own limits; the link decides their rate.
                report = await baselines.migrate(s.vm_name, s.target, baselines.mode(
                    s.mode, timeout_s=s.qemu_timeout_s))
            else:
                report = await control.migrate(s.source, request, on_progress)
            ended_ns = time.monotonic_ns()
            await asyncio.sleep(s.after_s)
        finally:
            if workload_probe is not None:
                with workload_probe:
                    probes[str(s.workload)] = workload_probe.stop()
        probes["echo"] = echo.stop()
        probes["tcp"] = tcp.stop()
    moved = qemu.find(s.vm_name)
    guest = await qemu.VM.attach(moved)
    try:
        integrity = None
        if s.workload is Workload.MMUNCHER:
            integrity = (await guest.agent.verify()).get("stats", {}).get("mmuncher")
        console_ticks = _ticks(guest.console())
    finally:
        await guest.close()

    unit, times, weights = service_events(s.workload, probes)
    # "Before" is the last second before the migration: the probes' own start-up (a
    # process each, players joining, a guest that just booted) must not count as the
    # service's normal rate.
    before_start = started_ns - int(BEFORE_WINDOW_S * 1e9)
    impact = service_impact(times, before_start_ns=before_start, during_start_ns=started_ns,
                            during_end_ns=max(ended_ns, started_ns + 1), weights=weights)
    echo_summary = probes["echo"]["summary"]
    tcp_summary = probes["tcp"]["summary"]
    # Where the client's outage went: before the stop, the engine's stop..cont, after it.
    breakdown = None
    if report.get("stopped_at") and echo_summary.get("gap_start_ns"):
        breakdown = {
            "before_stop_ms": report["stopped_at"] * 1e3 - echo_summary["gap_start_ns"] / 1e6,
            "stop_to_cont_ms": (report["cont_returned_at"] - report["stopped_at"]) * 1e3,
            "after_cont_ms": echo_summary["gap_end_ns"] / 1e6 - report["cont_returned_at"] * 1e3,
        }
    return {
        "workload": str(s.workload),
        "mode": s.mode,
        "downtime_ms": report["downtime_ms"],
        "client_downtime_ms": echo_summary["downtime_ms"],
        "client_downtime_breakdown": breakdown,
        "tcp_stall_ms": tcp_summary["stall_ms"],
        "tcp_survived": tcp_summary["survived"],
        "total_time_s": report["total_time_s"],
        "bytes_sent": report["bytes_sent"],
        "ram_bytes": report["ram_bytes"],
        "data_sent_ratio": report["data_sent_ratio"],
        "rounds": report["rounds"],
        "verified": report["verified"],
        "service_impact": impact.ratio,
        "service_unit": unit,
        "service_before_per_s": impact.before_per_s,
        "service_during_per_s": impact.during_per_s,
        "integrity": integrity,
        "console_ticks_on_destination": console_ticks,
        "migration_started_s": (started_ns - probes["echo"]["started_ns"]) / 1e9,
        "report": report,
        "probes": probes,
    }


def _ticks(console: str) -> list[int]:
    """The guest's console heartbeat ('lm: tick N') as the destination logged it."""
    return [int(line.split()[-1]) for line in console.splitlines()
            if line.startswith("lm: tick ") and line.split()[-1].isdigit()]
