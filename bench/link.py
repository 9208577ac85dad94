"""The test bed's LAN at each speed: TCP throughput host->host and host->client, and RTT.

For each rate (100mbit, 1gbit, 10gbit by default) the bench shapes its own bed's links
(``testbed.up(link=...)``), runs ``--runs`` two-second TCP streams hostA->hostB and
hostA->client, and pings hostA->hostB. Figures are the frame rate at the receiver (TCP's
payload plus each segment's headers: what the token bucket counts), its median and worst
run, and their ratio to the set rate; the target is within 5 %. Payload (goodput) is
printed beside it. A rate the machine cannot reach is reported as such, not hidden: on
a 2-core machine one TCP stream through two veth pairs and bridges tops out below 10 Gbit/s.

The bed is its own (``LIVEMIG_INSTANCE``, default ``lbench``), refused if in use, and torn
down at the end whatever happens. Only the bed's addresses are used.

Usage: ``.venv/bin/python bench/link.py [--runs 3] [--rates 100mbit,1gbit,10gbit]
[--seconds 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

os.environ.setdefault("LIVEMIG_INSTANCE", "lbench")

from livemig import argtypes  # after the instance is chosen
from livemig.experiments.bed import exclusive_test_bed
from livemig.net import linkcheck, shaping, testbed

TARGET = 0.05
NO_NETEM = " (no netem in this kernel: the veths' own latency only)"


def _figures(bps: list[float], rate_bps: int) -> dict[str, Any]:
    median, worst = statistics.median(bps), min(bps)
    return {"runs_mbps": [round(b / 1e6, 1) for b in bps], "median_mbps": round(median / 1e6, 1),
            "worst_mbps": round(worst / 1e6, 1), "median_ratio": round(median / rate_bps, 4),
            "worst_ratio": round(worst / rate_bps, 4),
            "within_target": abs(median / rate_bps - 1) <= TARGET}


def measure(rate_bps: int, runs: int, seconds: float) -> dict[str, Any]:
    link = shaping.Link.of(rate_bps)
    testbed.up(2, link)
    a, b = testbed.host_node("hostA"), testbed.host_node("hostB")
    result: dict[str, Any] = {"rate": shaping.format_rate(rate_bps), "rate_bps": rate_bps,
                              "latency_ms_set": link.latency_us / 1000,
                              "latency_added": testbed.netem_available()}
    for label, dst in (("host_to_host", b), ("host_to_client", testbed.CLIENT)):
        got = [linkcheck.tcp_throughput(a, dst, seconds) for _ in range(runs)]
        result[label] = _figures([t.frame_bps for t in got], rate_bps)
        result[label]["payload_median_mbps"] = round(
            statistics.median(t.payload_bps for t in got) / 1e6, 1)
    result["ping_rtt_ms"] = linkcheck.ping_rtt_ms(a, b, count=50)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=argtypes.whole_number(1, 20), default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rates", default="100mbit,1gbit,10gbit")
    parser.add_argument("--json", type=argtypes.writable_file, metavar="FILE")
    args = parser.parse_args()
    rates = [argtypes.link_rate(r) for r in args.rates.split(",")]
    if None in rates or not 0.5 <= args.seconds <= 30:
        parser.error("rates must be limited (not 'unlimited'); --seconds from 0.5 to 30")
    results = []
    with exclusive_test_bed(2, daemons=False):
        for rate in rates:
            assert rate is not None
            r = measure(rate, args.runs, args.seconds)
            results.append(r)
            for label in ("host_to_host", "host_to_client"):
                f = r[label]
                print(f"{r['rate']:>8} {label:<15} median {f['median_mbps']:8.1f} Mbit/s "
                      f"({f['median_ratio']:.3f} of the rate), worst {f['worst_mbps']:8.1f} "
                      f"({f['worst_ratio']:.3f}); payload {f['payload_median_mbps']:.1f}"
                      f"{'' if f['within_target'] else '  OUTSIDE 5 %'}")
            rtt = r["ping_rtt_ms"]
            print(f"{r['rate']:>8} ping RTT hostA->hostB min/avg/max "
                  f"{rtt['min']:.3f}/{rtt['avg']:.3f}/{rtt['max']:.3f} ms"
                  f"{'' if r['latency_added'] else NO_NETEM}")
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "seconds": args.seconds,
                                         "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
