"""Time from ``livemig vm start`` to the workload serving, as the CLI user sees it.

Runs the real command N times per workload on the test bed and prints the median and
the spread. Usage: ``.venv/bin/python bench/boot_time.py [--runs 5] [--workloads web,idle]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LIVEMIG = str(Path(sys.executable).with_name("livemig"))


def livemig(*args: str) -> str:
    done = subprocess.run([LIVEMIG, *args], capture_output=True, text=True, check=True)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workloads", default="web,idle,game,mmuncher")
    parser.add_argument("--mem", type=int, default=256)
    args = parser.parse_args()
    livemig("image", "build")
    livemig("testbed", "up")
    results = {}
    try:
        for workload in args.workloads.split(","):
            times = []
            for run in range(args.runs):
                name = f"boot{run}"
                started = time.monotonic()
                livemig("vm", "start", name, "--host", "hostA", "--workload", workload,
                        "--mem", str(args.mem))
                times.append(time.monotonic() - started)
                livemig("vm", "stop", name)
            results[workload] = {
                "median_s": round(statistics.median(times), 2),
                "min_s": round(min(times), 2),
                "max_s": round(max(times), 2),
                "runs": [round(t, 2) for t in times],
            }
            print(f"{workload:<9} vm start -> ready: median {results[workload]['median_s']} s "
                  f"(min {results[workload]['min_s']}, max {results[workload]['max_s']}, "
                  f"{args.runs} runs, {args.mem} MiB)", flush=True)
    finally:
        livemig("testbed", "down")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
