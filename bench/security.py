"""What security costs: the TLS handshake, and the switchover with the device state
tunnelled through the daemons' channel.

1. Handshake: ``connect()`` to a ``serve()`` on 127.0.0.1, mutual TLS 1.3 with
   ``livemig keys`` certificates against plaintext (both with the HMAC handshake), median
   of ``--connects`` connections each.
2. Switchover: one idle VM ping-pongs hostA -> hostB -> hostA ... ``--runs`` times between
   the real daemons (``--no-verify``, so the stop window holds no checksum), and we print
   the engine downtime and the device-state step of the stop window, with medians.

Usage: ``.venv/bin/python bench/security.py [--runs 7] [--connects 50]``; run alone on
the machine (it measures time). Uses the test bed instance of LIVEMIG_INSTANCE, and takes
it down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig import keys
from livemig.daemon import control
from livemig.experiments import bed
from livemig.image import builder
from livemig.lab import launch
from livemig.net import testbed
from livemig.vm.spec import Workload
from livemig.wire import tls
from livemig.wire.channel import Channel, PeerLost, connect, serve
from livemig.wire.messages import Migrate, MigrateOptions

KEY = b"b" * 32


async def handshake_ms(connects: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys.init_ca(root)
        files = {h: keys.issue_host(root, h, ["127.0.0.1"]) for h in ("hostA", "hostB")}

        async def idle(channel: Channel) -> None:
            with contextlib.suppress(PeerLost):
                await channel.recv(timeout=10)

        out = {}
        for label, server_ctx, client_ctx in (
            ("plaintext", None, None),
            ("mutual-tls", tls.server_context(files["hostB"]),
             tls.client_context(files["hostA"])),
        ):
            server = await serve("127.0.0.1", 0, key=KEY, me="hostB", handler=idle,
                                 ssl=server_ctx)
            port = server.sockets[0].getsockname()[1]
            times = []
            for _ in range(connects):
                started = time.perf_counter()
                channel = await connect("127.0.0.1", port, key=KEY, me="hostA",
                                        ssl=client_ctx,
                                        peer_name="hostB" if client_ctx else None)
                times.append((time.perf_counter() - started) * 1000)
                await channel.close()
            server.close()
            await server.wait_closed()
            out[label] = statistics.median(times)
    return out


async def switchovers(runs: int) -> list[dict[str, Any]]:
    image = builder.build(log=lambda _: None).image
    vm = await bed.start_vm("bsec", image, "hostA", mem_mib=128, workload=Workload.IDLE)
    await vm.close()
    spec = vm.record.spec
    hosts = ["hostA", "hostB"]
    results = []
    try:
        for i in range(runs):
            source, target = hosts[i % 2], hosts[(i + 1) % 2]
            report = await control.migrate(source, Migrate(
                vm=spec.name, to=target, options=MigrateOptions(verify=False)))
            row = {"downtime_ms": report.downtime_ms,
                   **{f"stop.{k}": v for k, v in report.stop_window_ms.items()}}
            print(f"  run {i + 1} {source}->{target}: " + ", ".join(
                f"{k}={v:.1f}" for k, v in row.items()), flush=True)
            results.append(row)
            await asyncio.sleep(1.0)  # let the guest settle; TCG rebuilds its caches
    finally:
        await bed.stop_vm(spec.name)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--connects", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    hs = asyncio.run(handshake_ms(args.connects))
    print(f"connect + handshakes, median of {args.connects}: " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in hs.items()))
    testbed.up(2)
    try:
        launch.ensure_daemons()
        rows = asyncio.run(switchovers(args.runs))
    finally:
        testbed.down()
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"medians of {len(rows)} switchovers: " + ", ".join(
        f"{k}={v:.1f} ms" for k, v in medians.items()))
    if args.json:
        args.json.write_text(json.dumps({"handshake_ms": hs, "runs": rows,
                                         "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
