"""``livemig experiment paper``: the paper's evaluation (§6), on this test bed, beside QEMU.

Four workloads, as in the paper: a web server with 100 clients fetching a 512 KB file, a
SPECweb99-like mix of static and dynamic pages, a game server with 6 players, and
MMuncher; and an idle guest, the floor of every figure. Each workload gets one VM, booted
once; then every engine migrates it in turn, to the other host and back (a boot costs
more than a migration here), run by run, so that the machine's drift hits all alike:

    ours               our pre-copy, 100-500 Mbit/s (§5.3)
    floor              no migration: the VM paused in place for our median downtime
    qemu-precopy       QEMU's pre-copy at its defaults (downtime-limit 300 ms), the link
                       deciding the bandwidth
    stop-and-copy      ours, no pre-copy: everything while the VM is stopped
    qemu-precopy-30    QEMU's pre-copy, downtime-limit 30 ms
    qemu-multifd       QEMU's pre-copy over 2 multifd channels
    qemu-autoconverge  QEMU's pre-copy with auto-converge
    qemu-postcopy      QEMU's postcopy with postcopy-preempt

The same client probes measure all of them (``scenario.measure``). A mode that fails, or
a QEMU pre-copy that does not converge, is a result in the table, not a crash.

What comes out, in ``--out DIR``: ``results.json`` (every table number and every
figure's data), ``results.md`` (the tables), and PNG figures (``paper_plots``).

The table and ratio computations here are pure functions of scenario results, so the
unit tests feed them synthetic ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livemig import argtypes
from livemig.errors import LivemigError
from livemig.experiments import baselines, bed, scenario
from livemig.image import builder
from livemig.lab import launch
from livemig.net import shaping, testbed
from livemig.probes.timeseries import bucketize, service_impact, throughput_per_s
from livemig.units import PAGE_SIZE
from livemig.vm import qemu
from livemig.vm.spec import Workload
from livemig.wire.messages import DEFAULT_OPTIONS

SCHEMA = "livemig-paper/1"
HOSTS = ("hostA", "hostB")


# -- what is measured -------------------------------------------------------------------


@dataclass(frozen=True)
class PaperWorkload:
    key: str
    title: str
    workload: Workload
    options: tuple[tuple[str, str], ...] = ()
    http_clients: int = 100
    http_mix: str | None = None
    game_players: int = 6
    # More time before the migration: 100 clients that start together complete their
    # first 512 KB files only seconds later, and "throughput before" needs the steady state.
    warmup_s: float = 0.0
    service_by_requests: bool = False  # HTTP throughput in requests/s, not MB/s


def specweb_mix() -> str:
    """A SPECweb99-like request mix for ``probe http --mix``.

    70 % static GETs over SPECweb99's four file classes (35/50/14/1 % of them, the nine
    files of a class equally often); 25.2 % dynamic GETs of the guest's CGI, which does
    real work per request, with sizes from the same classes; and 4.8 % POSTs of a small
    form, which the guest's CGI appends to its post log, as SPECweb99's mix has them.
    """
    class_share = (0.35, 0.50, 0.14, 0.01)
    items = [f"/sw/c{c}_{k}:{0.70 * share / 9:.5f}"
             for c, share in enumerate(class_share) for k in range(1, 10)]
    # The CGI counts in KiB: class 0 rounds up to 1 KiB.
    items += [f"/cgi-bin/dyn?kb={kb}:{0.252 * share:.5f}"
              for kb, share in ((1, 0.35), (5, 0.50), (50, 0.14), (500, 0.01))]
    items.append("POST /cgi-bin/post:0.048")
    return ",".join(items)


WORKLOADS = (
    PaperWorkload("idle", "idle guest (the echo only)", Workload.IDLE),
    PaperWorkload("web", "web server, 100 clients fetching a 512 KB file", Workload.WEB,
                  options=(("web_kb", "512"),), warmup_s=2.5),
    # The CGI forks a shell per request, which TCG makes dear: 10 clients already keep
    # the guest's one vCPU busy (measured: 10, 25, 50 and 100 clients all got 40-80
    # requests/s), and more would measure a queue, not a service.
    PaperWorkload("specweb", "SPECweb99-like mix, 10 clients, 70 % static, 25 % dynamic, "
                  "5 % POST",
                  Workload.WEB, options=(("web_specweb", "1"),), http_mix=specweb_mix(),
                  http_clients=10, warmup_s=1.0, service_by_requests=True),
    PaperWorkload("game", "game server (Quake-3-like, 20 Hz), 6 players", Workload.GAME),
    # As bench/migration.py: a region written without pause; 64 MiB at 100 MiB/s keeps
    # the guest write-heavy while TCG can still keep up.
    PaperWorkload("mmuncher", "MMuncher, 64 MiB written at 100 MiB/s", Workload.MMUNCHER,
                  options=(("mm_mib", "64"), ("mm_rate", "100"))),
)


@dataclass(frozen=True)
class Engine:
    key: str
    label: str
    mode: str  # scenario.Scenario.mode: ours, scenario.FLOOR or a key of baselines.MODES
    rates: str = "auto"  # ours: the downtime target (its default, 100 ms) or the paper's
    downtime_ms: float = DEFAULT_OPTIONS.downtime_ms  # ours, rates=auto: the target
    default: bool = True  # run unless engines are named (the others: bench/downtime_target)

    @property
    def is_ours(self) -> bool:
        return not self.mode.startswith("qemu-") and self.mode != scenario.FLOOR


OURS = "ours"
FLOOR = "floor"
ENGINES = (  # in the tables' order
    Engine(OURS, "ours (pre-copy, target 100 ms)", "precopy"),
    Engine("ours-paper", "ours, the paper's rates", "precopy", rates="paper"),
    Engine("stop-and-copy", "ours, stop-and-copy", "stop-and-copy"),
    Engine("qemu-precopy", "QEMU pre-copy, limit 300 ms", "qemu-precopy"),
    Engine("qemu-precopy-30", "QEMU pre-copy, limit 30 ms", "qemu-precopy-30"),
    Engine("qemu-multifd", "QEMU multifd, 2 channels", "qemu-multifd"),
    Engine("qemu-autoconverge", "QEMU auto-converge", "qemu-autoconverge"),
    Engine("qemu-postcopy", "QEMU postcopy, preempt", "qemu-postcopy"),
    Engine(FLOOR, "floor: paused in place", scenario.FLOOR),
    # The downtime-target bench's: ours and QEMU at the same targets (100 ms and QEMU's
    # 300 ms and 30 ms limits are above).
    Engine("ours-30", "ours, target 30 ms", "precopy", downtime_ms=30, default=False),
    Engine("ours-300", "ours, target 300 ms", "precopy", downtime_ms=300, default=False),
    Engine("qemu-precopy-100", "QEMU pre-copy, limit 100 ms", "qemu-precopy-100",
           default=False),
)


# The order the engines take the VM in, in every run. Ours comes first so that the floor
# can pause the VM for the median of our downtimes so far. Every QEMU mode sets all its
# capabilities on both sides, so the engine before leaves nothing behind that matters to
# QEMU. It does matter to ours: a QEMU that was a postcopy destination holds its RAM's
# userfaultfd, our shim yields it, and our engine falls back to the shadow compare. Run
# right after postcopy (as it once was), ours took 29 rounds and 9.4 s where it takes 5
# and 7.6 s. So a QEMU pre-copy always comes between postcopy and either of ours.
RUN_ORDER = (OURS, FLOOR, "qemu-precopy", "ours-paper", "stop-and-copy", "qemu-postcopy",
             "qemu-precopy-30", "qemu-multifd", "qemu-autoconverge", "ours-30",
             "qemu-precopy-100", "ours-300")


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    # From when the probes measure to the migration: "throughput before" is its end.
    baseline_s: float = 5.0
    after_s: float = 3.0
    mem_mib: int = 256
    max_rate_mbps: float = DEFAULT_OPTIONS.max_rate_mbps
    min_rate_mbps: float = DEFAULT_OPTIONS.min_rate_mbps
    qemu_timeout_s: float = 60.0
    link: str = "1gbit"  # the test bed's LAN: ``testbed up --link``
    workloads: tuple[str, ...] = tuple(w.key for w in WORKLOADS)
    engines: tuple[str, ...] = tuple(e.key for e in ENGINES if e.default)

    @classmethod
    def quick(cls) -> Settings:
        return cls(runs=1, baseline_s=3.0, after_s=1.5, qemu_timeout_s=30.0)

    def choose(self, runs: int | None, workloads: str, engines: str) -> Settings:
        """These settings for ``runs`` (None: as they are) and the comma-separated
        workload and engine keys; a LivemigError names any that do not exist."""
        chosen_w, chosen_e = tuple(workloads.split(",")), tuple(engines.split(","))
        unknown = (set(chosen_w) - {w.key for w in WORKLOADS}) | (
            set(chosen_e) - {e.key for e in ENGINES})
        if unknown:
            raise LivemigError(f"unknown workload or engine: {', '.join(sorted(unknown))}")
        runs = self.runs if runs is None else runs
        if runs < 1:
            raise LivemigError(f"--runs must be at least 1, not {runs}")
        return dataclasses.replace(self, runs=runs, workloads=chosen_w, engines=chosen_e)


# -- one row of a table from one scenario result -----------------------------------------

# Every number a results table shows, in its order: (key, header, unit).
COLUMNS = (
    ("client_downtime_ms", "client downtime", "ms"),
    ("downtime_ms", "engine downtime", "ms"),
    ("tcp_stall_ms", "TCP stall", "ms"),
    ("echo_gap_before_ms", "echo gap before", "ms"),
    ("total_time_s", "total time", "s"),
    ("data_sent_ratio", "data sent", "x RAM"),
    ("throughput_before", "throughput before", ""),
    ("throughput_during", "throughput during", ""),
    ("service_impact", "during/before", ""),
)
# Ours over each baseline, for these (all: lower is better).
RATIO_KEYS = ("client_downtime_ms", "downtime_ms", "tcp_stall_ms", "total_time_s",
              "bytes_sent")
# The floor moves nothing: only the outage compares with it.
FLOOR_RATIO_KEYS = ("client_downtime_ms", "tcp_stall_ms")
# Which way a figure gets worse, for the worst run: these are better higher; every other
# column but the throughput before (the load, not a result) is better lower.
HIGHER_IS_BETTER = ("throughput_during", "service_impact")
NO_WORST = ("throughput_before",)


def service_scale(unit: str) -> tuple[str, float]:
    """The table's unit for a service and the factor from per-second events to it."""
    if unit.startswith("HTTP"):
        return "MB/s", 1e-6
    return unit.removesuffix("/s") + "/s", 1.0


def service_events(result: dict[str, Any], by_requests: bool) -> tuple[str, Any, Any]:
    """(table unit, event times, weights) of the service; ``by_requests`` counts HTTP
    requests instead of their bytes (a mix where a few large files would drown out the
    many small pages and the dynamic ones)."""
    unit, times, weights = scenario.service_events(Workload(result["workload"]),
                                                   result["probes"])
    if by_requests and unit.startswith("HTTP"):
        return "requests/s", times, None
    return service_scale(unit)[0], times, weights


def _unit_scale(unit: str) -> float:
    return 1e-6 if unit == "MB/s" else 1.0


BEFORE_S = 2.0  # "throughput before": at most this long, just before the migration
RAMP_S = 0.5  # a service's first events after its probe starts are its ramp, not its rate


def service_rates(result: dict[str, Any], by_requests: bool = False
                  ) -> tuple[float | None, float | None]:
    """(before, during) in events (or bytes) per second of the service.

    "Before" is the last ``BEFORE_S`` before the migration, but never the probe's own
    start: on a loaded machine a probe process can take seconds to get going, and its
    ramp is not the service's rate. None when less than half a second of it is left.
    """
    _, times, weights = service_events(result, by_requests)
    start, _ = scenario.migration_window_ns(result)
    end = start + max(int(result["total_time_s"] * 1e9), 1)
    if len(times) == 0:
        return None, None
    before_start = max(start - int(BEFORE_S * 1e9), int(times.min()) + int(RAMP_S * 1e9))
    if start - before_start < int(0.5e9):
        return None, throughput_per_s(times, start_ns=start, end_ns=end, weights=weights)
    impact = service_impact(times, before_start_ns=before_start, during_start_ns=start,
                            during_end_ns=end, weights=weights)
    return impact.before_per_s, impact.during_per_s


def paused_ms(report: dict[str, Any]) -> float | None:
    """The VM's paused time, measured alike for every engine: QEMU's STOP event on the
    source to its RESUME event on the target (ours report it as vcpus_stopped_ms; the
    baselines' stopped_at and cont_returned_at are those events). None for the floor."""
    if report.get("vcpus_stopped_ms") is not None:
        return float(report["vcpus_stopped_ms"])
    stopped, resumed = report.get("stopped_at"), report.get("cont_returned_at")
    if stopped is None or resumed is None or not str(report.get("mode", "")).startswith("qemu"):
        return None
    return (float(resumed) - float(stopped)) * 1000


def summarize(result: dict[str, Any], by_requests: bool = False) -> dict[str, Any]:
    """The table row of one completed scenario result."""
    unit = service_events(result, by_requests)[0]
    scale = _unit_scale(unit)
    before, during = service_rates(result, by_requests)
    game = result["probes"].get("game")
    gaps = scenario.client_gaps(result)
    return {
        # A migration that completed but left a guest that never answered the echo again
        # is no success, whatever the engine says.
        "status": "ok" if gaps["answered_after"] else "guest-unresponsive",
        "error": None if gaps["answered_after"] else "no echo reply after the switchover",
        "client_downtime_ms": gaps["client_downtime_ms"],
        "echo_gap_before_ms": gaps["echo_gap_before_ms"],
        # The probes' own figures, over their whole run, migration or not.
        "client_downtime_whole_run_ms": result["client_downtime_ms"],
        "tcp_stall_whole_run_ms": result["tcp_stall_ms"],
        "downtime_ms": result["downtime_ms"],
        "tcp_stall_ms": gaps["tcp_stall_ms"],
        "tcp_survived": result["tcp_survived"],
        "total_time_s": result["total_time_s"],
        "bytes_sent": result["bytes_sent"],
        "ram_bytes": result["ram_bytes"],
        "data_sent_ratio": result["bytes_sent"] / result["ram_bytes"],
        "throughput_unit": unit,
        "throughput_before": None if before is None else before * scale,
        "throughput_during": None if during is None else during * scale,
        "service_impact": during / before if before and during is not None else None,
        "rounds": len(result["rounds"]),
        "stop_reason": result["report"].get("stop_reason"),
        # Where the engine's downtime went (ours only; QEMU reports none of it).
        "stop_window_ms": result["report"].get("stop_window_ms") or None,
        "tracker": result["report"].get("tracker"),
        "vcpus_stopped_ms": result["report"].get("vcpus_stopped_ms"),
        "paused_ms": paused_ms(result["report"]),
        "predicted_downtime_ms": result["report"].get("predicted_downtime_ms"),
        "downtime_target_ms": result["report"].get("downtime_target_ms"),
        "device_state_bytes": result["report"].get("device_state_bytes"),
        "cont_ms": result["report"].get("cont_ms"),
        "game_max_gap_ms": None if game is None else game["summary"]["max_gap_ms"],
        "integrity_errors": (None if result.get("integrity") is None
                             else result["integrity"].get("errors")),
    }


def failed_row(exc: BaseException, ram_bytes: int) -> dict[str, Any]:
    """The row of a migration that did not complete: which way, and what it had done."""
    did_not_converge = isinstance(exc, baselines.DidNotConverge)
    sent = exc.bytes_sent if isinstance(exc, baselines.DidNotConverge) else None
    row: dict[str, Any] = {key: None for key, _, _ in COLUMNS}
    row |= {
        "status": "did-not-converge" if did_not_converge else "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "tcp_survived": None, "bytes_sent": sent, "ram_bytes": ram_bytes,
        "data_sent_ratio": None if sent is None else sent / ram_bytes,
        # How long QEMU tried before it gave up: a lower bound of what it would have taken.
        "total_time_s": exc.elapsed_s if isinstance(exc, baselines.DidNotConverge) else None,
        "throughput_unit": None, "rounds": None, "stop_reason": None,
        "client_downtime_whole_run_ms": None, "tcp_stall_whole_run_ms": None,
        "game_max_gap_ms": None, "integrity_errors": None,
    }
    return row


def _median(values: Sequence[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def worst(values: Sequence[Any], key: str) -> Any:
    """The worst of the runs' ``key``: the highest, or the lowest where higher is better."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return min(present) if key in HIGHER_IS_BETTER else max(present)


def median_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the completed runs; ``status`` says how many completed."""
    done = [r for r in rows if r["status"] == "ok"]
    keys = [k for k, _, _ in COLUMNS] + ["bytes_sent", "game_max_gap_ms", "rounds",
                                         "client_downtime_whole_run_ms",
                                         "tcp_stall_whole_run_ms"]
    if done:
        row = {k: _median([r[k] for r in done]) for k in keys}
        row["throughput_unit"] = done[0]["throughput_unit"]
        row["worst"] = {k: worst([r[k] for r in done], k) for k, _, _ in COLUMNS
                        if k not in NO_WORST}
    else:  # what the failed runs had done, for the table's "did not converge" line
        row = {k: _median([r.get(k) for r in rows]) for k in keys}
        row["throughput_unit"] = None
        row["worst"] = {}
    statuses = sorted({r["status"] for r in rows if r["status"] != "ok"})
    row["status"] = "ok" if len(done) == len(rows) else (
        f"{len(done)}/{len(rows)} ok, " + ", ".join(statuses) if done else statuses[0])
    row["runs"] = len(rows)
    row["completed"] = len(done)
    row["guest_kernel_trouble"] = [r["guest_kernel_trouble"] for r in rows
                                   if r.get("guest_kernel_trouble")]
    row["tcp_survived"] = all(r["tcp_survived"] for r in done) if done else None
    return row


def ratios(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Ours over each other engine, per figure in ``RATIO_KEYS`` (below 1: ours is better);
    over the floor only the outage (above 1: what the migration adds to a pause).

    A ratio is None where either side has no figure; a baseline that never completed is
    noted by its status instead."""
    ours = table.get(OURS)
    out: dict[str, dict[str, Any]] = {}
    if ours is None:
        return out
    for key, other in table.items():
        if key == OURS:
            continue
        entry: dict[str, Any] = {"baseline_status": other["status"]}
        for figure in RATIO_KEYS:
            a, b = ours.get(figure), other.get(figure)
            usable = (other["completed"] > 0 and ours["completed"] > 0
                      and (key != FLOOR or figure in FLOOR_RATIO_KEYS))
            entry[figure] = a / b if usable and a is not None and b else None
        out[key] = entry
    return out


# -- figure data from one scenario result ---------------------------------------------


def _bucket_s(workload: Workload) -> float:
    # Completions of 512 KB files make 100 ms buckets a comb; the game's 120 snapshots/s
    # need wider ones still to be more than a count of a dozen.
    return 0.2 if workload is Workload.WEB else 0.25


def figure_series(result: dict[str, Any], by_requests: bool = False) -> dict[str, Any]:
    """What the figures draw for one migration; times in s from the migration's start."""
    workload = Workload(result["workload"])
    probes = result["probes"]
    echo_start = probes["echo"]["started_ns"]
    start_ns = echo_start + int(result["migration_started_s"] * 1e9)
    table_unit, times, weights = service_events(result, by_requests)
    scale = _unit_scale(table_unit)
    width_s = _bucket_s(workload)
    end_ns = max(int(times.max()) + 1 if len(times) else echo_start + 1,
                 probes["echo"].get("stopped_ns") or 0, echo_start + 1)
    buckets = bucketize(times, start_ns=echo_start, end_ns=end_ns,
                        width_ns=int(width_s * 1e9), weights=weights)
    per_s = buckets.total_rates_per_s() * scale
    t_s = (buckets.starts_ns() - start_ns) / 1e9
    if len(buckets) > 1 and buckets.durations_s()[-1] < width_s / 2:
        per_s, t_s = per_s[:-1], t_s[:-1]  # a sliver of a bucket is all noise
    report = result["report"]
    series: dict[str, Any] = {
        "throughput": {"unit": table_unit, "bucket_s": width_s,
                       "t_s": np.round(t_s, 4).tolist(), "values": np.round(per_s, 4).tolist()},
        "total_time_s": result["total_time_s"],
        "data_sent_ratio": result["bytes_sent"] / result["ram_bytes"],
        "stages": [{"name": name, "t_s": t} for name, t in report.get("stages", [])],
        "client_gap": None,
        "switchover": None,
        "rounds": rounds_series(report) if report.get("rounds") else None,
        "game_interarrival": None,
    }
    if report.get("stopped_at") and report.get("cont_returned_at"):
        stop_ns, running_ns = scenario.switchover_ns(result)
        series["switchover"] = {"stop_s": (stop_ns - start_ns) / 1e9,
                                "running_s": (running_ns - start_ns) / 1e9}
    gap = scenario.client_gaps(result)["client_gap_ns"]
    if gap is not None:
        series["client_gap"] = {"start_s": (gap[0] - start_ns) / 1e9,
                                "end_s": (gap[1] - start_ns) / 1e9,
                                "ms": (gap[1] - gap[0]) / 1e6}
    game = probes.get("game")
    if game is not None:
        at, gaps = [], []
        for player in game["players"]:
            arrivals = np.asarray(player["arrivals_ns"], dtype=np.int64)
            if arrivals.size > 1:
                at.append((arrivals[1:] - start_ns) / 1e9)
                gaps.append(np.diff(arrivals) / 1e6)
        if at:
            order = np.argsort(np.concatenate(at))
            series["game_interarrival"] = {
                "t_s": np.round(np.concatenate(at)[order], 4).tolist(),
                "gap_ms": np.round(np.concatenate(gaps)[order], 3).tolist(),
                "players": len(game["players"]),
            }
    return series


def rounds_series(report: dict[str, Any]) -> dict[str, Any]:
    """Our rounds as the paper's Figures 8-10 draw them: per round its start, length,
    achieved transfer rate, paced limit and dirty rate; then the stop-and-copy."""
    start = next((t for name, t in report["stages"] if name == "iterative pre-copy"), 0.0)
    rounds = []
    t = start
    for r in report["rounds"]:
        duration = max(r["duration_s"], 1e-6)
        sent_bytes = r["pages_sent"] * PAGE_SIZE
        rounds.append({
            "number": r["number"], "start_s": t, "duration_s": r["duration_s"],
            "transfer_mbps": sent_bytes * 8 / duration / 1e6,
            "limit_mbps": r["rate_bps"] / 1e6, "dirty_mbps": r["dirty_rate_bps"] / 1e6,
            "mb_sent": sent_bytes / 1e6, "pages_zero": r.get("pages_zero", 0),
        })
        t += r["duration_s"]
    stop_at = next((t for name, t in report["stages"] if name == "stop-and-copy"), t)
    final_bytes = report["final_pages"] * PAGE_SIZE
    final_s = report.get("stop_window_ms", {}).get("final_pages", 0.0) / 1e3
    return {
        "rounds": rounds,
        "stop_and_copy": {
            "start_s": stop_at, "downtime_ms": report["downtime_ms"],
            "mb_sent": final_bytes / 1e6,
            "transfer_mbps": final_bytes * 8 / final_s / 1e6 if final_s > 0 else None,
        },
        "stop_reason": report["stop_reason"],
    }


# -- the whole results document ---------------------------------------------------------


def build_results(settings: Settings, measured: dict[str, dict[str, list[dict[str, Any]]]],
                  figures: dict[str, dict[str, dict[str, Any]]],
                  elapsed_s: float) -> dict[str, Any]:
    """results.json: ``measured[workload][engine]`` holds the rows of the runs, and
    ``figures[workload][engine]`` the figure series of the run that the figures show."""
    titles = {w.key: w.title for w in WORKLOADS}
    labels = {e.key: e.label for e in ENGINES}
    workloads = {}
    for key, by_engine in measured.items():
        table = {engine: median_row(rows) for engine, rows in by_engine.items()}
        workloads[key] = {
            "title": titles.get(key, key),
            "runs": by_engine,
            "table": table,
            "ratios_ours_over": ratios(table),
            "figures": figures.get(key, {}),
        }
    return {
        "schema": SCHEMA,
        "settings": {
            "runs": settings.runs, "baseline_s": settings.baseline_s,
            "after_s": settings.after_s, "mem_mib": settings.mem_mib,
            "min_rate_mbps": settings.min_rate_mbps, "max_rate_mbps": settings.max_rate_mbps,
            "qemu_timeout_s": settings.qemu_timeout_s, "link": settings.link,
        },
        "engines": {e.key: {"label": e.label, "mode": e.mode}
                    for e in ENGINES if e.key in settings.engines},
        "columns": [{"key": k, "header": h, "unit": u} for k, h, u in COLUMNS],
        "engine_labels": labels,
        "workloads": workloads,
        "elapsed_s": elapsed_s,
    }


def check_results(results: dict[str, Any]) -> None:
    """Raise ValueError unless ``results`` has the shape results.json promises."""
    if results.get("schema") != SCHEMA:
        raise ValueError(f"schema is {results.get('schema')!r}, not {SCHEMA!r}")
    for name in ("settings", "engines", "columns", "workloads", "elapsed_s"):
        if name not in results:
            raise ValueError(f"results lack {name!r}")
    for key, workload in results["workloads"].items():
        for part in ("title", "runs", "table", "ratios_ours_over", "figures"):
            if part not in workload:
                raise ValueError(f"workload {key!r} lacks {part!r}")
        for engine, row in workload["table"].items():
            missing = [c["key"] for c in results["columns"] if c["key"] not in row]
            if missing or "status" not in row:
                raise ValueError(f"{key}/{engine} lacks {missing or ['status']}")


# -- tables -----------------------------------------------------------------------------


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_ms"):
        return f"{value:.0f}"
    if key in ("data_sent_ratio", "service_impact"):
        return f"{value:.2f}"
    if key.startswith("throughput"):
        return f"{value:.3g}"
    return f"{value:.2f}"


def _headers(unit: str | None) -> list[str]:
    heads = []
    for key, header, column_unit in COLUMNS:
        shown = unit if key.startswith("throughput") else column_unit
        heads.append(f"{header} ({shown})" if shown else header)
    return heads


def table_rows(workload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of a workload's results table."""
    table = workload["table"]
    unit = next((r["throughput_unit"] for r in table.values() if r["throughput_unit"]), None)
    labels = {e.key: e.label for e in ENGINES}
    rows = []
    for engine, row in table.items():
        status = "" if row["status"] == "ok" else f" [{row['status']}]"
        if row.get("guest_kernel_trouble"):
            status += f" [guest kernel trouble x{len(row['guest_kernel_trouble'])}]"
        cells = [labels.get(engine, engine) + status]
        for k, _, _ in COLUMNS:
            cell = _fmt(row[k], k)
            bad = row.get("worst", {}).get(k)
            if row.get("runs", 1) > 1 and bad is not None and _fmt(bad, k) != cell:
                cell += f" ({_fmt(bad, k)})"
            cells.append(cell)
        rows.append(cells)
    return ["engine", *_headers(unit)], rows


def ratio_rows(workload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    labels = {e.key: e.label for e in ENGINES}
    heads = ["ours over", "client downtime", "engine downtime", "TCP stall", "total time",
             "data sent"]
    rows = []
    for engine, entry in workload["ratios_ours_over"].items():
        note = "" if entry["baseline_status"] == "ok" else f" [{entry['baseline_status']}]"
        rows.append([labels.get(engine, engine) + note] + [
            "-" if entry[k] is None else f"{entry[k]:.2f}" for k in RATIO_KEYS])
    return heads, rows


def _text_table(heads: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(heads, widths, strict=True)))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def _markdown_table(heads: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(heads) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(heads))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _caption(results: dict[str, Any]) -> str:
    s = results["settings"]
    runs = "1 run" if s["runs"] == 1 else f"medians of {s['runs']} runs"
    worst = "" if s["runs"] == 1 else " Cells: median (worst run, where it differs)."
    return (f"{s['mem_mib']} MiB guest on a {s.get('link', '?')} LAN that the migration "
            f"shares with the VM's own traffic; ours with no rate set (the link measured, "
            f"a 100 ms downtime target), ours with the paper's rates at "
            f"{s['min_rate_mbps']:g}-{s['max_rate_mbps']:g} Mbit/s, QEMU's bandwidth left "
            f"to the link; {runs}, "
            f"engines interleaved run by run.{worst} Client downtime: "
            f"the longest gap of a 1 ms UDP echo that overlaps the switchover (the VM's stop "
            f"to its running again on the target); TCP stall: the same for one established "
            f"flow; engine downtime: ours from the stop to the target's cont, QEMU's its own "
            f"'downtime' figure; echo gap before: "
            f"the echo's longest gap before the migration, the noise floor of a loaded guest; "
            f"throughput during: over the migration itself; floor: the same VM paused in "
            f"place for our median engine downtime and resumed, probed the same way, so "
            f"ours over the floor is what the migration adds to a pause.")


def text_report(results: dict[str, Any]) -> str:
    parts = [_caption(results)]
    for key, workload in results["workloads"].items():
        parts.append(f"\n== {key}: {workload['title']}")
        parts.append(_text_table(*table_rows(workload)))
        if workload["ratios_ours_over"]:
            parts.append("")
            parts.append(_text_table(*ratio_rows(workload)))
    parts.append(f"\nexperiment wall time {results['elapsed_s']:.0f} s")
    return "\n".join(parts)


def markdown_report(results: dict[str, Any], figures: Sequence[str] = ()) -> str:
    parts = ["# Live migration, the paper's experiments on this test bed", "",
             _caption(results), ""]
    for key, workload in results["workloads"].items():
        parts += [f"## {key}: {workload['title']}", "", _markdown_table(*table_rows(workload)),
                  ""]
        if workload["ratios_ours_over"]:
            parts += ["Ours over each baseline (below 1: ours is better):", "",
                      _markdown_table(*ratio_rows(workload)), ""]
    if figures:
        parts += ["## Figures", ""] + [f"- ![{name}]({name})" for name in figures] + [""]
    parts.append(f"Experiment wall time: {results['elapsed_s']:.0f} s.")
    return "\n".join(parts) + "\n"


# -- running it -------------------------------------------------------------------------


class Clock:
    """Progress lines with the experiment's elapsed time."""

    def __init__(self, out: Callable[[str], None] | None = None) -> None:
        self.started = time.monotonic()
        self._out = out or (lambda line: print(line, file=sys.stderr, flush=True))

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        self._out(f"[paper {self.elapsed_s:6.1f}s] {message}")


def _vm_name(workload: PaperWorkload) -> str:
    return f"p-{workload.key}"[:15]


def _scenario(w: PaperWorkload, engine: Engine, settings: Settings, source: str,
              target: str, floor_pause_ms: float = 0.0) -> scenario.Scenario:
    return scenario.Scenario(
        workload=w.workload, source=source, target=target, mem_mib=settings.mem_mib,
        mode=engine.mode, rates=engine.rates, downtime_ms=engine.downtime_ms,
        min_rate_mbps=settings.min_rate_mbps,
        max_rate_mbps=settings.max_rate_mbps,
        # The checksum of both images costs downtime; the tests check correctness.
        verify=False,
        baseline_s=settings.baseline_s + w.warmup_s, after_s=settings.after_s,
        options=w.options,
        http_clients=w.http_clients, http_mix=w.http_mix, game_players=w.game_players,
        vm_name=_vm_name(w), qemu_timeout_s=settings.qemu_timeout_s,
        floor_pause_ms=floor_pause_ms)


# What a guest kernel prints when its memory or state went bad: after a migration that
# is the loudest sign that something was lost or torn on the way.
GUEST_KERNEL_TROUBLE = re.compile(
    r"Kernel panic|BUG:|Oops|list_(add|del) corruption|general protection fault")


def guest_kernel_trouble(console: str) -> str | None:
    """The first line of a guest console that shows kernel trouble, if any."""
    return next((line.strip() for line in console.splitlines()
                 if GUEST_KERNEL_TROUBLE.search(line)), None)


def _console_trouble(name: str) -> str | None:
    for record in [r for r in qemu.records() if r.spec.name == name]:
        with contextlib.suppress(OSError):
            trouble = guest_kernel_trouble(record.console_log.read_text(errors="replace"))
            if trouble:
                return f"{record.host}: {trouble}"
    return None


async def _healthy_host(name: str) -> str | None:
    """Where the VM runs, if it runs in exactly one copy; else None."""
    copies = [r for r in qemu.records() if r.spec.name == name]
    if len(copies) != 1:
        return None
    try:
        vm = await qemu.VM.attach(copies[0])
    except (LivemigError, OSError, EOFError):
        return None
    try:
        return copies[0].host if await vm.status() == "running" else None
    except (LivemigError, OSError, EOFError):
        return None
    finally:
        await vm.close()


async def _fresh_vm(w: PaperWorkload, settings: Settings) -> str:
    name = _vm_name(w)
    if any(r.spec.name == name for r in qemu.records()):
        with contextlib.suppress(LivemigError):
            await bed.stop_vm(name)
    await scenario.boot(_scenario(w, ENGINES[0], settings, HOSTS[0], HOSTS[1]))
    return HOSTS[0]


def _one_line(row: dict[str, Any]) -> str:
    trouble = (f"; GUEST KERNEL TROUBLE: {row['guest_kernel_trouble']}"
               if row.get("guest_kernel_trouble") and row["error"] != row["guest_kernel_trouble"]
               else "")
    if row["status"] != "ok":
        return f"{row['status'].upper()}: {row['error']}{trouble}"
    return (f"client {_fmt(row['client_downtime_ms'], '_ms')} ms, engine "
            f"{_fmt(row['downtime_ms'], '_ms')} ms, TCP stall {_fmt(row['tcp_stall_ms'], '_ms')}"
            f" ms, total {row['total_time_s']:.2f} s, {row['data_sent_ratio']:.2f} x RAM"
            + trouble)


# The floor's pause before ours has a downtime to copy (ours not among the engines): a
# typical one of ours on this machine.
FLOOR_DEFAULT_MS = 30.0


def _floor_pause_ms(ours: Sequence[dict[str, Any]]) -> float:
    """The median of our engine downtimes so far, for the floor's pause."""
    downtime = _median([r["downtime_ms"] for r in ours if r["status"] == "ok"])
    return FLOOR_DEFAULT_MS if downtime is None else float(downtime)


async def run_workload(w: PaperWorkload, settings: Settings, clock: Clock
                       ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Every engine on one VM of workload ``w``, ``settings.runs`` times; rows and the
    figure series of each engine's first completed run."""
    by_key = {e.key: e for e in ENGINES}
    engines = [by_key[key] for key in RUN_ORDER if key in settings.engines]
    # The tables keep ENGINES' order whatever the order of the runs.
    rows: dict[str, list[dict[str, Any]]] = {e.key: [] for e in ENGINES
                                              if e.key in settings.engines}
    series: dict[str, dict[str, Any]] = {}
    clock.say(f"{w.key}: booting a {settings.mem_mib} MiB VM on {HOSTS[0]} ({w.title})")
    host = await _fresh_vm(w, settings)
    ram_bytes = settings.mem_mib << 20
    try:
        for run in range(settings.runs):
            for engine in engines:
                target = HOSTS[1] if host == HOSTS[0] else HOSTS[0]
                s = _scenario(w, engine, settings, host, target,
                              floor_pause_ms=_floor_pause_ms(rows.get(OURS, [])))
                try:
                    result = await scenario.measure(s)
                except Exception as exc:  # a failed mode is a result; Ctrl-C still ends all
                    row = failed_row(exc, ram_bytes)
                else:
                    row = summarize(result, w.service_by_requests)
                    if engine.key not in series:
                        series[engine.key] = figure_series(result, w.service_by_requests)
                # The guest's kernel is the witness of a migration that lost or tore
                # memory; a VM that complained is not migrated again.
                row["guest_kernel_trouble"] = _console_trouble(s.vm_name)
                if row["guest_kernel_trouble"] and row["status"] == "ok":
                    # The console was clean before (a VM that complained is replaced), so
                    # this migration broke the guest: its figures compare with nothing.
                    row["status"] = "guest-kernel-trouble"
                    row["error"] = row["guest_kernel_trouble"]
                rows[engine.key].append(row)
                clock.say(f"{w.key} run {run + 1}/{settings.runs}: {engine.label:<27} "
                          f"{host}->{target}: {_one_line(row)}")
                where = await _healthy_host(s.vm_name)
                # (A pre-copy that did not converge left the VM running as it was.)
                broken = row["status"] in ("failed", "guest-unresponsive",
                                           "guest-kernel-trouble")
                if where is None or row["guest_kernel_trouble"] or broken:
                    why = (row["guest_kernel_trouble"] or row["error"]
                           or "the VM is not running in one copy")
                    clock.say(f"{w.key}: {why}; booting it again")
                    where = await _fresh_vm(w, settings)
                host = where
    finally:
        with contextlib.suppress(LivemigError):
            await bed.stop_vm(_vm_name(w))
    return rows, series


async def measure_all(settings: Settings, clock: Clock
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every chosen workload under every chosen engine, on a test bed that is up with its
    daemons: ``measured[workload][engine]`` (rows) and ``figures[workload][engine]``."""
    measured: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    for w in WORKLOADS:
        if w.key in settings.workloads:
            measured[w.key], figures[w.key] = await run_workload(w, settings, clock)
    return measured, figures


def write_outputs(settings: Settings, measured: dict[str, Any], figures: dict[str, Any],
                  out: Path, clock: Clock) -> dict[str, Any]:
    """results.json, results.md and the figures into ``out``; returns the results."""
    from livemig.experiments import paper_plots  # matplotlib is slow to import

    out.mkdir(parents=True, exist_ok=True)
    results = build_results(settings, measured, figures, clock.elapsed_s)
    check_results(results)
    results["figures_files"] = []

    def save() -> None:
        results["elapsed_s"] = clock.elapsed_s
        (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False)
                                          + "\n")
        (out / "results.md").write_text(markdown_report(results, results["figures_files"]))

    save()  # the measurements are safe on disk before any figure is drawn
    results["figures_files"] = paper_plots.draw_all(results, out)
    clock.say(f"{len(results['figures_files'])} figures drawn")
    save()
    return results


def run(settings: Settings, out: Path, clock: Clock | None = None) -> dict[str, Any]:
    """The whole experiment on a fresh test bed (of this ``LIVEMIG_INSTANCE``), torn down
    after, also on failure or Ctrl-C. Writes results.json, results.md and the figures
    into ``out``."""
    clock = clock or Clock()
    out.mkdir(parents=True, exist_ok=True)
    clock.say(f"test bed up ({', '.join(HOSTS)}, client) and the guest image")
    testbed.up(len(HOSTS), shaping.Link.parse(settings.link))
    try:
        launch.ensure_daemons()
        builder.build(log=clock.say)
        measured, figures = asyncio.run(measure_all(settings, clock))
    finally:
        clock.say("tearing down the VMs and the test bed")
        asyncio.run(bed.stop_all_vms())
        testbed.down()
    return write_outputs(settings, measured, figures, out, clock)


def add_experiment_command(commands: Any) -> None:
    """``livemig experiment paper [--quick] [--out DIR]``."""
    experiment = commands.add_parser("experiment", help="the paper's experiments").add_subparsers(
        dest="experiment", required=True)
    paper = experiment.add_parser(
        "paper", help="four workloads, ours against QEMU's migration: tables and figures")
    paper.add_argument("--quick", action="store_true",
                       help="one run per engine and shorter load windows (under 10 minutes)")
    paper.add_argument("--out", type=Path, default=Path("paper-results"), metavar="DIR")
    paper.add_argument("--runs", type=int, default=None, help="runs per engine (default 3; "
                       "1 with --quick)")
    paper.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS))
    paper.add_argument("--engines", default=",".join(e.key for e in ENGINES if e.default))
    add_link_argument(paper)
    paper.set_defaults(func=_command)


def _link_label(text: str) -> str:
    """'1gbit', 'unlimited', ...: checked now, kept as text for the results' settings."""
    return shaping.format_rate(argtypes.link_rate(text))


def add_link_argument(parser: Any) -> None:
    parser.add_argument("--link", type=_link_label, default=shaping.DEFAULT_RATE, metavar="RATE",
                        help=f"the test bed's LAN (default {shaping.DEFAULT_RATE}): 100mbit, "
                        "1gbit, 10gbit or unlimited; the bed is reshaped to it")


def _command(args: Any) -> int:
    settings = dataclasses.replace(Settings.quick() if args.quick else Settings(),
                                   link=args.link).choose(args.runs, args.workloads, args.engines)
    results = run(settings, args.out)
    print(text_report(results))
    print(f"\nresults: {args.out / 'results.json'}, {args.out / 'results.md'}, "
          f"{len(results['figures_files'])} figures in {args.out}")
    return 0
