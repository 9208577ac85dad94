"""Unthrottled throughput of Pages frames over loopback TCP, between two processes.

The sender gathers 1024 pages per frame from a 256 MiB array in pseudo-random order (as
the planner sends them) and sends them with ``Channel.send_pages``; the receiver, in
another process, writes each frame into its own 256 MiB array by fancy-index assignment,
as the destination writes guest RAM. A run is timed at the sender from its first frame
to the Reply to a ``done`` request, which the receiver sends only after it has written
every page; so the figure is end to end. After the runs the receiver's array is hashed
and compared with the sender's.

With ``--tls`` both ends speak mutual TLS 1.3 with certificates from ``livemig keys``, as
the daemons do: the figure then includes encryption on one side, decryption on the other.

Usage: ``.venv/bin/python bench/wire_throughput.py [--runs 5] [--mib 256] [--order random]
[--tls]``
Prints one line per run, the median, and JSON of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from livemig import keys
from livemig.wire import tls
from livemig.wire.channel import Channel, connect, serve
from livemig.wire.frames import MAX_PAGES_PER_FRAME, PAGE_SIZE, Pages, Reply, Request

ME_SENDER = "sender"
ME_RECEIVER = "receiver"


def populated(npages: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A page array whose memory is already faulted in, as a MAP_POPULATE mapping is."""
    ram = np.empty((npages, PAGE_SIZE), np.uint8)
    ram.fill(0)
    return ram


def contexts(tls_dir: Path | None, me: str) -> tuple[ssl.SSLContext | None, ...]:
    """(server, client) contexts for ``me`` from ``tls_dir``; (None, None) without TLS."""
    if tls_dir is None:
        return None, None
    files = keys.HostFiles.in_dir(tls_dir, me)
    return tls.server_context(files), tls.client_context(files)


async def receiver(key: bytes, npages: int, tls_dir: Path | None) -> None:
    """Serve one sender: write its pages into ``ram``; answer ``done`` and ``hash``."""
    ram = populated(npages)
    finished = asyncio.Event()

    async def handle(channel: Channel) -> None:
        channel.connection.npages = npages
        try:
            while True:
                msg = await channel.recv(timeout=60)
                if isinstance(msg, Pages):
                    if msg.indexes.size:
                        ram[msg.indexes] = np.frombuffer(msg.data, np.uint8).reshape(
                            -1, PAGE_SIZE)
                    if msg.zero_indexes.size:
                        ram[msg.zero_indexes] = 0
                elif isinstance(msg, Request) and msg.kind == "hash":
                    digest = hashlib.blake2b(ram.data).hexdigest()
                    await channel.send(Reply(True, {"blake2b": digest}))
                elif isinstance(msg, Request) and msg.kind == "bye":
                    await channel.send(Reply(True, {}))
                    return
                elif isinstance(msg, Request):
                    await channel.send(Reply(True, {}))
        finally:
            finished.set()

    server = await serve("127.0.0.1", 0, key=key, me=ME_RECEIVER, handler=handle,
                         ssl=contexts(tls_dir, ME_RECEIVER)[0])
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await finished.wait()
    server.close()
    await server.wait_closed()


async def sender(port: int, key: bytes, npages: int, runs: int, order: str,
                 tls_dir: Path | None) -> dict[str, Any]:
    ram = np.random.default_rng(1).integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
    buf = np.empty((MAX_PAGES_PER_FRAME, PAGE_SIZE), np.uint8)
    none = np.empty(0, np.uint32)
    client_ssl = contexts(tls_dir, ME_SENDER)[1]
    channel = await connect("127.0.0.1", port, key=key, me=ME_SENDER, npages=npages,
                            ssl=client_ssl, peer_name=ME_RECEIVER if client_ssl else None)
    figures: list[float] = []
    async with channel:
        for run in range(runs):
            if order == "random":
                pages = np.random.default_rng(run).permutation(npages).astype(np.uint32)
            else:
                pages = np.arange(npages, dtype=np.uint32)
            await channel.request("start", {"run": run}, timeout=30)
            started = time.perf_counter()
            for first in range(0, npages, MAX_PAGES_PER_FRAME):
                idx = pages[first:first + MAX_PAGES_PER_FRAME]
                out = buf[:idx.size]
                np.take(ram, idx, axis=0, out=out)
                await channel.send_pages(Pages(run, idx, none, out.data.cast("B")))
            await channel.request("done", timeout=60)
            seconds = time.perf_counter() - started
            rate = npages * PAGE_SIZE / seconds / 1e9
            figures.append(rate)
            print(f"run {run + 1}: {rate:.2f} GB/s ({seconds * 1e3:.0f} ms for "
                  f"{npages * PAGE_SIZE >> 20} MiB)", flush=True)
        reply = await channel.request("hash", timeout=60)
        ok = reply.body["blake2b"] == hashlib.blake2b(ram.data).hexdigest()
        await channel.request("bye", timeout=30)
    return {
        "median_GBps": round(statistics.median(figures), 3),
        "min_GBps": round(min(figures), 3),
        "max_GBps": round(max(figures), 3),
        "runs_GBps": [round(f, 3) for f in figures],
        "MiB_per_run": npages * PAGE_SIZE >> 20,
        "pages_per_frame": MAX_PAGES_PER_FRAME,
        "order": order,
        "tls": tls_dir is not None,
        "content_matches": ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--order", choices=("random", "sequential"), default="random")
    parser.add_argument("--tls", action="store_true", help="mutual TLS, as the daemons")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    npages = args.mib * (1 << 20) // PAGE_SIZE
    if args.receiver:
        asyncio.run(receiver(bytes.fromhex(sys.stdin.readline().strip()), npages,
                             args.tls_dir))
        return 0
    key = secrets.token_bytes(32)
    scratch = tempfile.TemporaryDirectory()
    tls_dir = Path(scratch.name) if args.tls else None
    if tls_dir is not None:
        keys.init_ca(tls_dir)
        for me in (ME_SENDER, ME_RECEIVER):
            keys.issue_host(tls_dir, me, ["127.0.0.1"])
    child = subprocess.Popen(
        [sys.executable, __file__, "--receiver", "--mib", str(args.mib),
         *(["--tls-dir", str(tls_dir)] if tls_dir else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(key.hex() + "\n")
        child.stdin.close()
        port = int(child.stdout.readline())
        result = asyncio.run(sender(port, key, npages, args.runs, args.order, tls_dir))
    finally:
        scratch.cleanup()
        if child.wait(timeout=60) != 0:
            print(f"receiver exited with status {child.returncode}", file=sys.stderr)
        if child.stdout is not None:
            child.stdout.close()
    print(f"median {result['median_GBps']:.2f} GB/s over {args.runs} runs "
          f"(content matches: {result['content_matches']})")
    print(json.dumps(result, indent=2))
    return 0 if result["content_matches"] else 1


if __name__ == "__main__":
    sys.exit(main())
