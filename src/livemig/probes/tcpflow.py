"""Established TCP flows across a migration: what a lost segment costs a user.

A VM that is paused drops the segments that reach it, and TCP then waits for its
retransmission timeout (200 ms at least on Linux) even when the outage itself was
shorter. Two probes show it:

- ``run_tcp_echo``: one connection to the guest's TCP echo (port 7), a small message
  every ``interval_ms``; the stall is the longest gap between replies. It also says
  whether the connection survived (no reset, every message echoed in order).
- ``run_download``: one HTTP download read at a fixed pace, so it is still running when
  the VM moves; it must end with every byte the server announced.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from livemig.probes.echo import StopFlag, error_kind
from livemig.probes.timeseries import longest_gap

MESSAGE = struct.Struct("!QQ")  # sequence number, send time (ns)


@dataclass(frozen=True)
class TcpEchoResult:
    target: str
    interval_ms: float
    sent: int
    echoed: int
    survived: bool  # the connection stayed up and every message came back, in order
    error: str | None
    stall_ms: float | None  # longest gap between replies
    stall_start_ns: int | None
    reply_ns: list[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "probe": "tcp-echo",
            "target": self.target,
            "interval_ms": self.interval_ms,
            "sent": self.sent,
            "echoed": self.echoed,
            "reply_ns": self.reply_ns,
            "summary": {
                "survived": self.survived,
                "error": self.error,
                "stall_ms": self.stall_ms,
                "stall_start_ns": self.stall_start_ns,
                "echoed": self.echoed,
                "sent": self.sent,
            },
        }

    def one_line(self) -> str:
        stall = f"{self.stall_ms:.1f} ms" if self.stall_ms is not None else "n/a"
        state = "survived" if self.survived else f"broke ({self.error})"
        return (f"tcp-echo {self.target}:7: {self.echoed}/{self.sent} echoed, "
                f"longest stall {stall}, connection {state}")


def run_tcp_echo(
    target: str,
    *,
    port: int = 7,
    interval_ms: float = 5.0,
    duration_s: float | None = None,
    stop: StopFlag | None = None,
    connect_timeout_s: float = 5.0,
) -> TcpEchoResult:
    sock = socket.create_connection((target, port), timeout=connect_timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    interval_ns = int(interval_ms * 1e6)
    started = time.monotonic_ns()
    end = started + int(duration_s * 1e9) if duration_s is not None else None
    next_send = started
    sent = 0
    replies: list[int] = []
    pending = bytearray()
    outgoing = bytearray()
    error: str | None = None
    in_order = True
    try:
        while (end is None or time.monotonic_ns() < end) and not (stop and stop.is_set()):
            now = time.monotonic_ns()
            if now >= next_send:
                # A full send buffer means the peer is away; the message waits its turn
                # in our own queue rather than being dropped, as an application's would.
                outgoing += MESSAGE.pack(sent, now)
                sent += 1
                next_send += interval_ns
                if next_send < now:  # we fell behind (a busy machine): do not burst
                    next_send = now + interval_ns
            if outgoing:
                with contextlib.suppress(BlockingIOError):  # full: try again next turn
                    del outgoing[:sock.send(outgoing)]
            for _ in selector.select(timeout=max(0, next_send - time.monotonic_ns()) / 1e9):
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                received = time.monotonic_ns()
                pending += data
                while len(pending) >= MESSAGE.size:
                    seq, _ = MESSAGE.unpack_from(pending)
                    del pending[:MESSAGE.size]
                    in_order &= seq == len(replies)
                    replies.append(received)
    except OSError as exc:
        error = error_kind(exc)
    finally:
        selector.close()
        sock.close()
    gap = longest_gap(replies)
    return TcpEchoResult(
        target=target,
        interval_ms=interval_ms,
        sent=sent,
        echoed=len(replies),
        # The last few may still be in flight when we stop; order and the link matter.
        survived=error is None and in_order and len(replies) >= sent - 20,
        error=error,
        stall_ms=gap.length_ms if gap is not None else None,
        stall_start_ns=gap.start_ns if gap is not None else None,
        reply_ns=replies,
    )


@dataclass(frozen=True)
class DownloadResult:
    url: str
    expected_bytes: int | None
    received_bytes: int
    complete: bool
    error: str | None
    seconds: float
    stall_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {"probe": "download", "url": self.url, "summary": {
            "expected_bytes": self.expected_bytes, "received_bytes": self.received_bytes,
            "complete": self.complete, "error": self.error, "seconds": self.seconds,
            "stall_ms": self.stall_ms,
        }}

    def one_line(self) -> str:
        state = "complete" if self.complete else f"INCOMPLETE ({self.error})"
        return (f"download {self.url}: {self.received_bytes} of {self.expected_bytes} bytes "
                f"in {self.seconds:.1f} s, {state}")


def run_download(
    host: str, path: str, *, port: int = 80, rate_kbps: float = 2000.0, timeout_s: float = 30.0
) -> DownloadResult:
    """GET ``path`` and read it at ``rate_kbps`` (kilobytes/s) until the end."""
    url = f"http://{host}:{port}{path}"
    started = time.monotonic()
    received = 0
    expected: int | None = None
    error: str | None = None
    arrivals: list[int] = []
    head = bytearray()
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            while True:
                chunk = sock.recv(16384)
                if not chunk:
                    break
                arrivals.append(time.monotonic_ns())
                if expected is None:
                    head += chunk
                    if b"\r\n\r\n" not in head:
                        continue
                    header, _, body = bytes(head).partition(b"\r\n\r\n")
                    for line in header.split(b"\r\n"):
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            expected = int(value)
                    expected = expected if expected is not None else -1
                    chunk = body
                received += len(chunk)
                # Pace the reading: the download must still run when the VM moves.
                behind = received / (rate_kbps * 1000) - (time.monotonic() - started)
                if behind > 0:
                    time.sleep(behind)
    except OSError as exc:
        error = error_kind(exc)
    gap = longest_gap(arrivals)
    known = expected if expected is not None and expected >= 0 else None
    return DownloadResult(
        url=url,
        expected_bytes=known,
        received_bytes=received,
        complete=error is None and known is not None and received == known,
        error=error,
        seconds=time.monotonic() - started,
        stall_ms=gap.length_ms if gap is not None else None,
    )
