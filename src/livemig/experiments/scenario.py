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
from dataclasses import dataclass
from typing import Any

import numpy as np

from livemig.daemon import control
from livemig.errors import LivemigError
from livemig.experiments import baselines, bed
from livemig.experiments.probing import ProbeRun, wait_measuring
from livemig.image import builder
from livemig.net import testbed
from livemig.probes.timeseries import service_impact
from livemig.vm import qemu
from livemig.vm.spec import VMSpec, Workload
from livemig.wire import messages
from livemig.wire.messages import DEFAULT_OPTIONS

ProgressPrinter = Callable[[messages.Progress], None] | None
BEFORE_WINDOW_S = 1.0  # "throughput before": this long, just before the migration


@dataclass(frozen=True)
class Scenario:
    workload: Workload
    source: str = "hostA"
    target: str = "hostB"
    mem_mib: int = 256
    mode: str = str(DEFAULT_OPTIONS.mode)  # or a baseline's (baselines.MODES), or FLOOR
    rates: str = str(DEFAULT_OPTIONS.rates)  # ours: the downtime target, or the paper's
    downtime_ms: float = DEFAULT_OPTIONS.downtime_ms
    min_rate_mbps: float = DEFAULT_OPTIONS.min_rate_mbps  # rates=paper only
    max_rate_mbps: float = DEFAULT_OPTIONS.max_rate_mbps
    tracker: messages.Tracker = DEFAULT_OPTIONS.tracker
    verify: bool = DEFAULT_OPTIONS.verify
    baseline_s: float = 3.0  # at least BEFORE_WINDOW_S plus the probes' start-up
    after_s: float = 2.0
    options: tuple[tuple[str, str], ...] = ()
    http_clients: int = 4
    http_mix: str | None = None  # weighted paths (``probe http --mix``) instead of file.bin
    http_think_ms: float = 0.0  # each HTTP client's pause between requests
    game_players: int = 6
    vm_name: str = "demo"
    qemu_timeout_s: float = 120.0  # for the qemu-* modes (baselines.MODES)
    # For mode FLOOR: how long the VM is paused in place.
    floor_pause_ms: float = 0.0


# Not a migration: the VM paused in place for ``floor_pause_ms`` and resumed, probed the
# same way. Client downtime over this floor is what a migration itself adds to a pause.
FLOOR = "floor"


def _workload_probe(s: Scenario, ip: str) -> ProbeRun | None:
    if s.workload is Workload.WEB:
        mix = ("--mix", s.http_mix) if s.http_mix else ()
        think = ("--think-ms", f"{s.http_think_ms:g}") if s.http_think_ms else ()
        return ProbeRun(testbed.CLIENT, "http", f"http://{ip}/file.bin", "--clients",
                        str(s.http_clients), *mix, *think)
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
            await bed.stop_vm(s.vm_name)


async def boot(s: Scenario) -> VMSpec:
    """Start the scenario's VM on ``s.source`` and wait for its workload."""
    image = builder.Image.load()
    vm = await bed.start_vm(s.vm_name, image, s.source, mem_mib=s.mem_mib,
                            workload=s.workload, options=s.options)
    await vm.close()  # the source daemon takes hold of it for the migration
    return vm.record.spec


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
            started_ns = time.monotonic_ns()
            if s.mode.startswith("qemu-"):
                # QEMU's modes carry their own limits; the link decides their rate.
                report = await baselines.migrate(s.vm_name, s.target, baselines.mode(
                    s.mode, timeout_s=s.qemu_timeout_s))
            elif s.mode == FLOOR:
                report = await pause_in_place(s.vm_name, s.floor_pause_ms)
            else:
                request = messages.Migrate(
                    vm=s.vm_name, to=s.target, options=messages.MigrateOptions(
                        mode=messages.Mode(s.mode), rates=messages.Rates(s.rates),
                        downtime_ms=s.downtime_ms, min_rate_mbps=s.min_rate_mbps,
                        max_rate_mbps=s.max_rate_mbps, tracker=s.tracker, verify=s.verify))
                # A plain record, like the baselines' and the floor's reports below.
                report = (await control.migrate(s.source, request, on_progress)).to_json()
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


async def pause_in_place(name: str, pause_ms: float) -> dict[str, Any]:
    """Pause VM ``name`` where it runs for ``pause_ms`` and resume it: the physical floor
    of a switchover of that length, as a report shaped like a migration's."""
    record = qemu.find(name)
    vm = await qemu.VM.attach(record)
    try:
        started = time.monotonic()
        await vm.pause()
        stopped_at = time.monotonic()
        await asyncio.sleep(pause_ms / 1e3)
        await vm.resume()
        cont_returned_at = time.monotonic()
    finally:
        await vm.close()
    return {
        "vm": name, "source": record.host, "target": record.host, "mode": FLOOR,
        "ram_bytes": record.spec.ram_bytes, "downtime_ms": (cont_returned_at - stopped_at) * 1e3,
        "total_time_s": cont_returned_at - started, "bytes_sent": 0, "data_sent_ratio": 0.0,
        "rounds": [], "stop_reason": f"paused in place for {pause_ms:.1f} ms",
        "final_pages": 0, "verified": None, "stages": [],
        "stopped_at": stopped_at, "cont_returned_at": cont_returned_at, "stop_window_ms": {},
    }


# -- what the client felt: one definition, for the demo, the experiments and the benches --

# Where an engine does not say when it stopped the VM, the switchover lies somewhere in
# the migration or shortly after it (TCG rebuilding its code cache, the ARP announcement).
SETTLE_S = 1.0
# The probes' own start-up is not the service's: gaps before this are left out.
PROBE_STARTUP_S = 0.5


def migration_window_ns(result: dict[str, Any]) -> tuple[int, int]:
    """[start, end + SETTLE_S] of the migration on the probes' clock (ns)."""
    start = result["probes"]["echo"]["started_ns"] + int(result["migration_started_s"] * 1e9)
    return start, start + int((result["total_time_s"] + SETTLE_S) * 1e9)


def gap_across(times_ns: Any, start_ns: int, end_ns: int,
               stopped_ns: int | None = None) -> tuple[int, int] | None:
    """The longest gap between consecutive events that overlaps [start_ns, end_ns].

    With ``stopped_ns`` (the end of the run) silence up to it counts too: a flow that
    never answered again has a gap to the end, not none."""
    times = np.sort(np.asarray(times_ns, dtype=np.int64))
    if stopped_ns is not None:
        times = np.append(times[times <= stopped_ns], stopped_ns)
    if times.size < 2:
        return None
    begins, ends = times[:-1], times[1:]
    overlapping = (ends >= start_ns) & (begins <= end_ns)
    if not overlapping.any():
        return None
    lengths = np.where(overlapping, ends - begins, -1)
    i = int(np.argmax(lengths))
    return int(begins[i]), int(ends[i])


def _gap_ms(gap: tuple[int, int] | None) -> float | None:
    return None if gap is None else (gap[1] - gap[0]) / 1e6


def _echo_recv_ns(result: dict[str, Any]) -> Any:
    replies = np.asarray(result["probes"]["echo"]["replies"], dtype=np.int64).reshape(-1, 3)
    return replies[:, 2]


def switchover_ns(result: dict[str, Any]) -> tuple[int, int]:
    """The switchover, stop to running again, on the probes' clock (ns): the engines'
    own instants where they report them, else the whole migration window."""
    report = result["report"]
    if report.get("stopped_at") and report.get("cont_returned_at"):
        return int(report["stopped_at"] * 1e9), int(report["cont_returned_at"] * 1e9)
    return migration_window_ns(result)


def client_gaps(result: dict[str, Any]) -> dict[str, Any]:
    """Client downtime and TCP stall: the longest gaps that overlap the switchover (a
    loaded guest has long gaps elsewhere too, which no migration caused); and the echo's
    longest gap before the migration, the noise floor of that load."""
    start, end = switchover_ns(result)
    echo = result["probes"]["echo"]
    recv = _echo_recv_ns(result)
    tcp = result["probes"]["tcp"]
    # A guest that never answered again has a gap to the end of the run.
    echo_gap = gap_across(recv, start, end, stopped_ns=echo["stopped_ns"])
    tcp_gap = gap_across(tcp.get("reply_ns", []), start, end,
                         stopped_ns=None if tcp["summary"]["survived"] else echo["stopped_ns"])
    first = echo["started_ns"] + int(PROBE_STARTUP_S * 1e9)
    is_before = (recv >= first) & (recv < migration_window_ns(result)[0])
    before = recv[is_before]
    floor = np.diff(np.sort(before)).max() / 1e6 if before.size > 1 else None
    replies = np.asarray(echo["replies"], dtype=np.int64).reshape(-1, 3)
    rtt_before = (replies[is_before, 2] - replies[is_before, 1]) / 1e6
    return {"client_downtime_ms": _gap_ms(echo_gap), "client_gap_ns": echo_gap,
            "tcp_stall_ms": _gap_ms(tcp_gap), "echo_gap_before_ms": floor,
            # How loaded the guest was: a round trip of many ms is a queue, and a client
            # downtime then measures it as much as the switchover.
            "echo_rtt_before_ms": (float(np.median(rtt_before)) if rtt_before.size else None,
                                   float(np.percentile(rtt_before, 99))
                                   if rtt_before.size else None),
            "answered_after": bool((recv > end).any())}



def _ticks(console: str) -> list[int]:
    """The guest's console heartbeat ('lm: tick N') as the destination logged it."""
    return [int(line.split()[-1]) for line in console.splitlines()
            if line.startswith("lm: tick ") and line.split()[-1].isdigit()]
