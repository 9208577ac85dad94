"""Measure a test bed link as a user would: TCP throughput and ping's RTT between nodes.

The receiver and the sender are this module run inside each node's namespace (``python
-m livemig.net.linkcheck``), so nothing leaves the test bed's LAN. The receiver times
the stream after its first ``WARMUP_S`` (slow start is over by then) and prints one JSON
line. tbf counts frames and TCP counts payload, so the frame rate (what the link's rate
bounds) is the payload rate scaled by the segment's headers.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from livemig.errors import TestbedError
from livemig.net.shaping import FRAME_OVERHEAD_BYTES
from livemig.net.testbed import Node

PORT = 5399
WARMUP_S = 0.3
CHUNK = 1 << 20


@dataclass(frozen=True)
class Throughput:
    payload_bps: float
    mss: int

    @property
    def frame_bps(self) -> float:
        """The rate at the link layer: payload plus each full segment's headers."""
        return self.payload_bps * (self.mss + FRAME_OVERHEAD_BYTES) / self.mss


def _receive(ip: str, port: int, seconds: float) -> None:
    with socket.create_server((ip, port)) as server:
        server.settimeout(5.0)
        print("ready", flush=True)
        conn, _ = server.accept()
    with conn:
        conn.settimeout(seconds + 5.0)
        buf = bytearray(CHUNK)
        total, first, start = 0, 0.0, None
        while n := conn.recv_into(buf):
            now = time.monotonic()
            first = first or now
            total += n
            if start is None and now - first >= WARMUP_S:
                start = (now, total)
        end = (time.monotonic(), total)
        mss = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    if start is None or end[0] <= start[0]:
        raise SystemExit("the stream ended before the warm-up did")
    rate = (end[1] - start[1]) * 8 / (end[0] - start[0])
    print(json.dumps({"payload_bps": rate, "mss": mss}), flush=True)


def _send(ip: str, port: int, seconds: float) -> None:
    data = bytes(CHUNK)
    with socket.create_connection((ip, port), timeout=5.0) as conn:
        conn.settimeout(seconds + 5.0)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(data)


def _module(role: str, ip: str, seconds: float) -> list[str]:
    return [sys.executable, "-m", "livemig.net.linkcheck", role, ip, str(PORT), str(seconds)]


def tcp_throughput(src: Node, dst: Node, seconds: float = 2.0) -> Throughput:
    """One TCP stream from ``src`` to ``dst`` for ``seconds``, measured at ``dst``."""
    limit = seconds + 15.0
    with subprocess.Popen(dst.exec_argv(_module("receive", str(dst.ip), seconds)),
                          stdout=subprocess.PIPE, text=True) as receiver:
        try:
            assert receiver.stdout is not None
            if receiver.stdout.readline().strip() != "ready":
                raise TestbedError(f"the receiver on {dst.name} did not start")
            subprocess.run(src.exec_argv(_module("send", str(dst.ip), seconds)),
                           check=True, timeout=limit)
            out, _ = receiver.communicate(timeout=limit)
        finally:
            if receiver.poll() is None:
                receiver.kill()
    if receiver.returncode != 0:
        raise TestbedError(f"the receiver on {dst.name} failed ({receiver.returncode})")
    found = json.loads(out.strip().splitlines()[-1])
    return Throughput(float(found["payload_bps"]), int(found["mss"]))


_RTT = re.compile(r"= (?P<min>[\d.]+)/(?P<avg>[\d.]+)/(?P<max>[\d.]+)/")


def ping_rtt_ms(src: Node, dst: Node, count: int = 50) -> dict[str, float]:
    """ping's round-trip times (min, avg, max) in ms, ``count`` pings 20 ms apart."""
    done = subprocess.run(src.exec_argv(["ping", "-q", "-n", "-c", str(count), "-i", "0.02",
                                         "-W", "1", str(dst.ip)]),
                          capture_output=True, text=True, timeout=count * 0.02 + 10)
    found = _RTT.search(done.stdout)
    if found is None:
        raise TestbedError(f"ping from {src.name} to {dst.name} failed: {done.stdout.strip()}")
    return {k: float(v) for k, v in found.groupdict().items()}


if __name__ == "__main__":
    role, ip_arg, port_arg, seconds_arg = sys.argv[1:5]
    (_receive if role == "receive" else _send)(ip_arg, int(port_arg), float(seconds_arg))
