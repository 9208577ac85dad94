"""Live migration benchmark: ours against QEMU 10's best modes, same VMs, link, probes, run.

Every workload (idle, web, specweb, game, mmuncher) gets one 256 MiB VM; then, run by
run, every engine migrates it in turn between hostA and hostB, so that the machine's
drift hits all engines alike: ours (pre-copy and stop-and-copy), QEMU's pre-copy at its
defaults and at a 30 ms limit, with multifd, with auto-converge, its postcopy with
preempt, and the floor (the VM paused in place for our median downtime). It is the
machinery of ``livemig experiment paper`` with five runs and the idle guest, so the two
print the same tables: the median and the worst run of client and engine downtime, TCP
stall, total time, data sent, service impact and the echo's gap before the migration,
and ours over every baseline and over the floor.

    .venv/bin/python bench/migration.py [--runs 5] [--out bench-results]
        [--workloads idle,web,specweb,game,mmuncher] [--engines ours,qemu-precopy,...]

Run it alone on the machine: it measures time. Verification (a checksum of both images,
which costs downtime) is off here; the tests check correctness.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from livemig.errors import LivemigError
from livemig.experiments import paper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(w.key for w in paper.WORKLOADS))
    parser.add_argument("--engines", default=",".join(e.key for e in paper.ENGINES))
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="results.json, results.md and the figures (default bench-results)")
    paper.add_link_argument(parser)
    args = parser.parse_args()
    # Shorter load windows than the paper's: five runs of eight engines on five workloads.
    settings = dataclasses.replace(
        paper.Settings(), baseline_s=3.0, after_s=1.5, qemu_timeout_s=30.0, link=args.link,
    ).choose(args.runs, args.workloads, args.engines)
    try:
        results = paper.run(settings, args.out)
    except LivemigError as exc:
        print(f"bench/migration.py: {exc}", file=sys.stderr)
        return 1
    print(paper.text_report(results))
    print(f"\nresults: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
