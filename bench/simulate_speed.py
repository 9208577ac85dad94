"""How fast the simulator predicts migrations: 1,000 simulated migrations of a 1 GiB VM.

Each simulation runs the real planner (``livemig.migration.planner``) on virtual time,
as ``livemig simulate --sweep`` does: the 1,000 cover a grid of minimum and maximum rates
(5 x 5 pairs, 40 seeds each), on a guest that writes 50 MiB/s, 90% of it into a 16 MiB
hot set, with a quarter of RAM reading as zero (``--model``, ``--dirty-rate`` etc. change
it; ``--trace FILE`` replays a recorded trace instead). The figure is the wall-clock time
of the 1,000, the median of ``--runs`` runs. The goal: under a minute on this machine.

Usage: ``.venv/bin/python bench/simulate_speed.py [--runs 3] [--sims 1000]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from livemig.analysis import simulate as sim
from livemig.analysis.trace import Trace
from livemig.migration.planner import MBIT, PAGE_SIZE, PlannerConfig, RateLimits

MIN_RATES = (50, 100, 200, 300, 400)
MAX_RATES = (400, 500, 750, 1000, 2000)


def one_run(args: argparse.Namespace) -> tuple[float, float, Counter[str]]:
    pairs = list(itertools.product(MIN_RATES, MAX_RATES))
    reasons: Counter[str] = Counter()
    trace = Trace.load(args.trace) if args.trace else None
    replay = sim.TraceDirtier(trace) if trace is not None else None
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(args.sims):
        lo, hi = pairs[i % len(pairs)]
        config = PlannerConfig(limits=RateLimits(lo * MBIT, hi * MBIT), seed=i)
        if replay is not None and trace is not None:
            result = sim.simulate(replay, config, zero_pages=trace.zero_pages.astype("int64"),
                                  start_s=(i * 0.37) % trace.duration_s)
        else:
            model = sim.Model(npages=args.ram_mib * 256, write_rate=args.dirty_mib * 256,
                              hot_pages=args.hot_mib * 256, skew=args.skew,
                              zero_fraction=args.zero_fraction, seed=i)
            dirtier = sim.ModelDirtier(model)
            result = sim.simulate(dirtier, config, zero_pages=dirtier.zero_pages())
        reasons[result.stop_reason] += 1
    return time.perf_counter() - started, time.process_time() - cpu, reasons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--ram-mib", type=int, default=1024)
    parser.add_argument("--dirty-mib", type=float, default=50.0, help="MiB/s of page writes")
    parser.add_argument("--hot-mib", type=int, default=16)
    parser.add_argument("--skew", type=float, default=0.9)
    parser.add_argument("--zero-fraction", type=float, default=0.25)
    parser.add_argument("--trace", type=Path, help="replay this trace instead of the model")
    args = parser.parse_args()
    times, cpus = [], []
    for run in range(args.runs):
        seconds, cpu, reasons = one_run(args)
        times.append(seconds)
        cpus.append(cpu)
        print(f"run {run + 1}: {args.sims} simulations in {seconds:.1f} s "
              f"({seconds / args.sims * 1000:.1f} ms each, {cpu:.1f} s of CPU); "
              f"ended: {dict(reasons)}", flush=True)
    median = statistics.median(times)
    guest = (f"trace {args.trace}" if args.trace else
             f"{args.ram_mib} MiB, {args.dirty_mib:g} MiB/s, {args.skew:.0%} into "
             f"{args.hot_mib} MiB, {args.zero_fraction:.0%} zero")
    print(f"median: {args.sims} simulated migrations of a {guest} guest in {median:.1f} s "
          f"({statistics.median(cpus):.1f} s of CPU; goal: 1,000 in under 60 s)")
    figures: dict[str, object] = {
               "sims": args.sims, "guest": guest, "runs_s": [round(t, 2) for t in times],
               "median_s": round(median, 2), "ms_per_sim": round(median / args.sims * 1000, 2),
               "median_cpu_s": round(statistics.median(cpus), 2),
               "page_size": PAGE_SIZE}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
