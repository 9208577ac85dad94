"""``livemig trace record|info``, ``livemig wws`` and ``livemig simulate``: the shell.

Arguments in, library calls, tables and JSON out; the work is in ``record``, ``wws`` and
``simulate``. ``register()`` adds the commands to the main parser.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from livemig import argtypes
from livemig.analysis import record, simulate, wws
from livemig.analysis.trace import Trace
from livemig.errors import LivemigError
from livemig.migration.planner import Mode, PlannerConfig, RateLimits
from livemig.net import testbed
from livemig.units import MBIT, PAGE_SIZE
from livemig.vm import qemu
from livemig.wire.messages import DEFAULT_OPTIONS

_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6,
               "mib": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*"


def parse_size(text: str) -> int:
    """Bytes: '1GiB', '16MiB', '512k', '4096'."""
    match = re.fullmatch(_NUMBER + r"([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1GiB, 16MiB, 4096)")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not math.isfinite(value):  # '1e400': int() of it would raise OverflowError
        raise argparse.ArgumentTypeError(f"{text!r} is too large a size")
    return int(value)


def parse_duration(text: str) -> float:
    """Seconds: '50ms', '60s', '2m', '0.5'."""
    match = re.fullmatch(_NUMBER + r"([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _TIME_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 50ms, 60s)")
    seconds = float(match.group(1)) * _TIME_UNITS[match.group(2)]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, not {text!r}")
    return seconds


def parse_byte_rate(text: str) -> float:
    """Bytes per second: '50MiB/s', '1GiB/s', '0'."""
    return float(parse_size(text.lower().removesuffix("/s")))


def parse_list(parse: Any) -> Any:
    def parse_all(text: str) -> list[Any]:
        try:
            return [parse(part) for part in text.split(",") if part.strip()]
        except ValueError:  # int('x'): argparse would only say "invalid parse_all value"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of numbers") from None

    return parse_all


def _output(text: str) -> Path:
    """'-' (stdout) or a file that can be written, checked before the work."""
    return Path(text) if text == "-" else argtypes.writable_file(text)


def _write_json(target: Path, value: Any) -> None:
    text = json.dumps(value, indent=2) + "\n"
    if str(target) == "-":
        sys.stdout.write(text)
    else:
        target.write_text(text)


def _say(message: str, *, end: str = "\n") -> None:
    print(message, file=sys.stderr, end=end, flush=True)


# -- trace ------------------------------------------------------------------------------


def cmd_trace_record(args: argparse.Namespace) -> int:
    vm = qemu.find(args.name)
    testbed.require_host(vm.host)
    record.check_recordable(vm, qemu.records())
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(p: record.RecordProgress) -> None:
        if args.quiet or (p.elapsed_s - last[0] < 0.5 and p.interval * args.interval
                          < args.duration):
            return
        last[0] = p.elapsed_s
        line = (f"recording {vm.spec.name}: {p.elapsed_s:5.1f}/{p.duration_s:.0f} s  "
                f"{p.pages:>7} pages in the last interval  {p.distinct:>8} distinct "
                f"({p.distinct * 100 / p.npages:.1f}% of RAM)")
        _say(("\r" + line) if tty else line, end="" if tty else "\n")

    _say(f"recording {vm.spec.name} on {vm.host} every {args.interval * 1000:g} ms "
         f"for {args.duration:g} s (Ctrl-C ends early and keeps what was recorded)")
    trace = record.record(vm, interval_s=args.interval, duration_s=args.duration,
                          tracker=args.tracker, on_progress=progress)
    if tty and not args.quiet:
        _say("")
    trace.save(args.output)
    print(_trace_line(trace, args.output))
    return 0


def _trace_line(trace: Trace, path: Path) -> str:
    meta = trace.meta
    rate = trace.counts.sum() * meta.page_size * 8 / max(trace.duration_s, 1e-9) / MBIT
    return (f"{path}: {trace.n_intervals} intervals of {meta.interval_s * 1000:g} ms "
            f"({trace.duration_s:.1f} s) of {meta.vm} ({meta.workload}, "
            f"{meta.ram_bytes >> 20} MiB, {meta.tracker} tracker), "
            f"{int(trace.counts.sum())} page writes ({rate:.1f} Mbit/s), "
            f"{path.stat().st_size / 1e6:.2f} MB")


def cmd_trace_info(args: argparse.Namespace) -> int:
    trace = Trace.load(args.trace)
    if args.json:
        _write_json(Path("-"), {**trace.meta.__dict__, "intervals": trace.n_intervals,
                                "duration_s": trace.duration_s,
                                "page_writes": int(trace.counts.sum()),
                                "zero_pages": int(trace.zero_pages.size)})
    else:
        print(_trace_line(trace, args.trace))
    return 0


# -- wws --------------------------------------------------------------------------------


def cmd_wws(args: argparse.Namespace) -> int:
    trace = Trace.load(args.trace)
    curves = wws.expected_downtimes(trace, [r * MBIT for r in args.rates], rounds=args.rounds,
                                    loop=args.loop)
    result = wws.summary(trace, args.rates, windows=args.windows,
                         hot_fraction=args.hot_fraction, curves=curves)
    print(wws_text(result))
    if args.plot:
        hot = wws.hot_set(trace, args.hot_fraction)
        from livemig.analysis import plots  # here: matplotlib costs every command 0.4 s

        plots.wws_figure(args.plot, trace, curves, wws.wws_sizes(trace, args.windows),
                         args.windows, hot.pages, looped=args.loop)
        _say(f"figure: {args.plot}")
    if args.json:
        _write_json(args.json, result)
    return 0


def wws_text(s: dict[str, Any]) -> str:
    rounds = len(s["rates"][0]["median_downtime_ms"]) if s["rates"] else 0
    lines = [
        f"{s['vm']} ({s['workload']}, {s['ram_bytes'] >> 20} MiB, {s['tracker']} tracker): "
        f"{s['intervals']} intervals of {s['interval_ms']:g} ms, {s['duration_s']:.1f} s",
        f"  dirtying          {s['dirty_pages_per_s']:.0f} pages/s = "
        f"{s['dirty_rate_mbps']:.1f} Mbit/s; {s['distinct_pages']} distinct pages written",
        f"  hot set           {s['hot_set']['pages']} pages = {s['hot_set']['mib']:.2f} MiB "
        f"(written in >= {s['hot_set']['fraction']:.0%} of intervals)",
        "  WWS (pages)       " + "   ".join(
            f"{window}: median {_n(v['median'])}, max {_n(v['max'])}"
            for window, v in s["wws_pages"].items()),
        f"  {'Mbit/s':>8} {'hot floor ms':>12} " + " ".join(
            f"{f'after {k + 1} rounds':>15}" for k in range(rounds))
        + "   (median expected downtime, ms)",
    ]
    for r in s["rates"]:
        lines.append(f"  {r['rate_mbps']:>8g} {r['hot_set_floor_ms']:>12.1f} " + " ".join(
            f"{_n(m, '.1f'):>15}" for m in r["median_downtime_ms"]))
    return "\n".join(lines)


def _n(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


# -- simulate ---------------------------------------------------------------------------


def _guest(
    args: argparse.Namespace,
) -> tuple[Callable[[], simulate.Dirtier], simulate.Int64s, str]:
    """(a function making a fresh dirtier, zero pages, a description)."""
    if args.trace:
        trace = Trace.load(args.trace)
        dirtier = simulate.TraceDirtier(trace)
        zeros = trace.zero_pages.astype(np.int64)
        meta = trace.meta
        return (lambda: dirtier), zeros, (
            f"trace {args.trace} ({meta.workload}, {meta.ram_bytes >> 20} MiB, "
            f"{trace.duration_s:.1f} s, looped)")
    if args.ram % PAGE_SIZE:
        raise LivemigError(f"--ram must be a whole number of pages, not {args.ram} bytes")
    hot = args.hot_set // PAGE_SIZE if args.model == "hotset" else 0
    try:
        model = simulate.Model(
            npages=args.ram // PAGE_SIZE, write_rate=args.dirty_rate / PAGE_SIZE,
            hot_pages=hot, skew=args.skew if args.model == "hotset" else 0.0,
            zero_fraction=args.zero_fraction, seed=args.seed)
    except ValueError as exc:
        raise LivemigError(f"the model's parameters do not fit together: {exc} (see --ram, "
                           f"--dirty-rate, --hot-set, --skew, --zero-fraction)") from exc
    zeros = simulate.ModelDirtier(model).zero_pages()
    what = (f"{args.model} model: {args.ram / 2**20:g} MiB, writes {args.dirty_rate / 2**20:g} "
            f"MiB/s" + (f", {args.skew:.0%} of them into a {args.hot_set / 2**20:g} MiB hot set"
                        if hot else ""))
    return (lambda: simulate.ModelDirtier(model)), zeros, what


def _costs(args: argparse.Namespace) -> simulate.Costs:
    return simulate.Costs(setup_s=args.setup_ms / 1000, round_s=args.round_ms / 1000,
                          pause_s=args.pause_ms / 1000, stop_s=args.stop_ms / 1000,
                          release_s=args.release_ms / 1000)


def cmd_simulate(args: argparse.Namespace) -> int:
    make, zeros, what = _guest(args)
    costs = _costs(args)
    if args.sweep:
        cells = [
            {"min_rate_mbps": c.min_rate_mbps, "max_rate_mbps": c.max_rate_mbps,
             **{k: v for k, v in c.result.to_json().items() if k not in ("rounds", "costs")},
             "rounds": len(c.result.rounds)}
            for c in simulate.sweep(make, args.sweep_min, args.sweep_max,
                                    increment_mbps=args.increment, costs=costs,
                                    base=PlannerConfig(seed=args.seed), zero_pages=zeros)
        ]
        print(sweep_text(cells, what))
        if args.plot:
            from livemig.analysis import plots  # here: matplotlib costs every command 0.4 s

            plots.sweep_figure(args.plot, cells, f"Simulated pre-copy of the {what}")
            _say(f"figure: {args.plot}")
        if args.json:
            _write_json(args.json, {"guest": what, "costs": costs.__dict__, "cells": cells})
        return 0
    if args.min_rate > args.max_rate:
        raise LivemigError(f"--min-rate {args.min_rate:g} is above --max-rate {args.max_rate:g}")
    config = PlannerConfig(
        limits=RateLimits(args.min_rate * MBIT, args.max_rate * MBIT, args.increment * MBIT),
        mode=Mode(args.mode), seed=args.seed, hold_hot=args.hold_hot)
    result = simulate.simulate(make(), config, costs, zero_pages=zeros, start_s=args.start)
    print(result_text(result, what))
    if args.json:
        _write_json(args.json, {"guest": what, **result.to_json()})
    return 0


def result_text(r: simulate.Result, what: str) -> str:
    lines = [
        f"simulated {r.mode} of the {what}",
        f"  rates              {r.limits.min_bps / MBIT:g} to {r.limits.max_bps / MBIT:g} "
        f"Mbit/s, +{r.limits.increment_bps / MBIT:g} per round",
        f"  downtime (engine)  {r.downtime_s * 1000:.1f} ms   ({r.final_pages} final pages, "
        f"{r.final_data_pages} with data; fixed stop cost {r.costs.stop_s * 1000:g} ms)",
        f"  total time         {r.total_time_s:.2f} s",
        f"  data sent          {r.bytes_sent:,} bytes = {r.data_sent_ratio:.3f} x RAM "
        f"({r.ram_bytes >> 20} MiB)",
        f"  pre-copy ended     {r.stop_reason}",
        f"  {'round':>5} {'sent':>8} {'skipped':>8} {'zero':>8} {'dirtied':>8} {'Mbit/s':>8} "
        f"{'dirty Mbit/s':>12} {'seconds':>8}",
    ]
    for s in r.rounds:
        lines.append(
            f"  {s.number:>5} {s.pages_sent:>8} {s.pages_skipped:>8} {s.pages_zero:>8} "
            f"{s.pages_dirtied:>8} {s.rate_bps / MBIT:>8.1f} {s.dirty_rate_bps / MBIT:>12.1f} "
            f"{s.duration_s:>8.3f}")
    return "\n".join(lines)


def sweep_text(cells: list[dict[str, Any]], what: str) -> str:
    lines = [f"simulated pre-copy of the {what}",
             f"  {'min':>6} {'max':>6} {'downtime ms':>12} {'total s':>8} {'x RAM':>6} "
             f"{'rounds':>6}  ended"]
    for c in cells:
        lines.append(f"  {c['min_rate_mbps']:>6g} {c['max_rate_mbps']:>6g} "
                     f"{c['downtime_ms']:>12.1f} {c['total_time_s']:>8.2f} "
                     f"{c['data_sent_ratio']:>6.2f} {c['rounds']:>6}  {c['stop_reason']}")
    if cells:
        best = min(cells, key=lambda c: (round(c["downtime_ms"], 1), c["total_time_s"]))
        fastest = min(cells, key=lambda c: (c["total_time_s"], c["downtime_ms"]))
        lines.append(f"lowest downtime: --min-rate {best['min_rate_mbps']:g} --max-rate "
                     f"{best['max_rate_mbps']:g} ({best['downtime_ms']:.1f} ms, "
                     f"{best['total_time_s']:.2f} s)")
        lines.append(f"shortest total:  --min-rate {fastest['min_rate_mbps']:g} --max-rate "
                     f"{fastest['max_rate_mbps']:g} ({fastest['downtime_ms']:.1f} ms, "
                     f"{fastest['total_time_s']:.2f} s)")
    return "\n".join(lines)


# -- the parser -------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``trace``, ``wws`` and ``simulate`` to the main CLI."""
    trace = commands.add_parser("trace", help="dirty-page traces of running VMs").add_subparsers(
        dest="action", required=True)
    rec = trace.add_parser("record", help="record a VM's dirty pages over time")
    rec.add_argument("name")
    rec.add_argument("--interval", type=parse_duration, default=0.05, metavar="T",
                     help="how often to collect the dirty log (default 50ms)")
    rec.add_argument("--duration", type=parse_duration, default=60.0, metavar="T",
                     help="how long to record (default 60s)")
    rec.add_argument("--tracker", choices=["auto", "uffd", "shadow"], default="auto")
    rec.add_argument("-o", "--output", type=argtypes.writable_file, required=True,
                     metavar="FILE.npz")
    rec.add_argument("--quiet", action="store_true", help="no live progress")
    rec.set_defaults(func=cmd_trace_record)
    info = trace.add_parser("info", help="what a trace file holds")
    info.add_argument("trace", type=Path)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_trace_info)

    w = commands.add_parser("wws", help="writable working set analysis of a trace")
    w.add_argument("trace", type=Path)
    w.add_argument("--rates", type=parse_list(argtypes.rate), default=list(wws.DEFAULT_RATES_MBPS),
                   metavar="R,R,...", help="bandwidths in Mbit/s (default 128,256,512)")
    w.add_argument("--rounds", type=int, default=wws.DEFAULT_ROUNDS)
    w.add_argument("--windows", type=parse_list(int), default=list(wws.DEFAULT_WINDOWS),
                   metavar="M,M,...", help="WWS window lengths in intervals (default 1,2,4,8)")
    w.add_argument("--hot-fraction", type=float, default=wws.HOT_FRACTION, metavar="F",
                   help="a page is hot if written in at least this fraction of intervals")
    w.add_argument("--loop", action="store_true",
                   help="repeat the trace when the rounds outlast it (default: leave them out)")
    w.add_argument("--plot", type=argtypes.writable_file, metavar="FILE.png")
    w.add_argument("--json", type=_output, metavar="FILE", help="the summary as JSON ('-': stdout)")
    w.set_defaults(func=cmd_wws)

    s = commands.add_parser("simulate", help="predict a migration: the planner on virtual time")
    guest = s.add_mutually_exclusive_group(required=True)
    guest.add_argument("--trace", type=Path, metavar="FILE.npz", help="replay a recorded trace")
    guest.add_argument("--model", choices=["uniform", "hotset"], help="a parametric guest")
    s.add_argument("--ram", type=parse_size, default=2**30, metavar="SIZE")
    s.add_argument("--dirty-rate", type=parse_byte_rate, default=50 * 2**20, metavar="RATE",
                   help="page writes per second as bytes, e.g. 50MiB/s")
    s.add_argument("--hot-set", type=parse_size, default=16 * 2**20, metavar="SIZE")
    s.add_argument("--skew", type=float, default=0.9, help="fraction of writes into the hot set")
    s.add_argument("--zero-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of RAM that reads as zero at the start")
    # The migrate command's defaults, so that a simulation predicts a plain migrate.
    rates = DEFAULT_OPTIONS
    s.add_argument("--min-rate", type=argtypes.rate, default=rates.min_rate_mbps, metavar="R")
    s.add_argument("--max-rate", type=argtypes.rate, default=rates.max_rate_mbps, metavar="R")
    s.add_argument("--increment", type=argtypes.rate, default=rates.increment_mbps, metavar="R")
    s.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.PRECOPY.value)
    s.add_argument("--start", type=float, default=0.0, metavar="SECONDS",
                   help="where in the trace the migration starts")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--hold-hot", type=argtypes.hold_rounds, default=0, metavar="K",
                   help="hold back pages dirtied in each of the last K rounds (0: off)")
    costs = simulate.DEFAULT_COSTS
    for name, value, text in (
        ("setup", costs.setup_s, "reservation before round 1"),
        ("round", costs.round_s, "per round: collect and plan"),
        ("pause", costs.pause_s, "QMP stop"),
        ("stop", costs.stop_s, "stop window beyond the final pages: device state, commit"),
        ("release", costs.release_s, "source released after commitment"),
    ):
        s.add_argument(f"--{name}-ms", type=float, default=value * 1000, metavar="MS",
                       help=f"{text} (default {value * 1000:g})")
    s.add_argument("--sweep", action="store_true", help="a grid of min and max rates")
    s.add_argument("--sweep-min", type=parse_list(argtypes.rate), default=[50, 100, 200, 300],
                   metavar="R,R,...")
    s.add_argument("--sweep-max", type=parse_list(argtypes.rate),
                   default=[200, 300, 500, 750, 1000], metavar="R,R,...")
    s.add_argument("--plot", type=argtypes.writable_file, metavar="FILE.png",
                   help="heat maps of a sweep")
    s.add_argument("--json", type=_output, metavar="FILE", help="the result as JSON ('-': stdout)")
    s.set_defaults(func=cmd_simulate)
