"""UDP echo prober: client downtime as users feel it (DESIGN.md, "Measures").

The prober sends ``!QQ`` = (sequence number, send time in ns from ``time.monotonic_ns()``)
padded to 64 bytes to the guest's ``lm-echo`` (UDP port 7, docs/guest-protocols.md) every
millisecond, and records when each reply comes back. Client downtime is the longest gap
between consecutive replies.

Timing, and why the loop looks the way it does:

- Sends follow absolute deadlines ``started + k * interval``, so that scheduling delays do
  not add up into drift. When the prober itself was held up for more than an interval,
  the missed slots are skipped rather than sent in a burst, and counted
  (``skipped_slots``): a burst would paper over a stall of the prober that the reply
  timeline must show, and ``max_send_gap_ms`` reports the stall itself so that a reader
  can tell the prober's hiccup from the VM's.
- Between deadlines it waits in ``select()``, whose timeout has microsecond resolution
  (``poll``/``epoll`` round to whole milliseconds, too coarse for a 1 ms period), and
  reads replies as soon as they arrive, so receive times are not quantized to the send
  period either.
- Run it in a process of its own (the ``livemig probe echo`` CLI) when measuring: in a
  thread of a busy Python process the GIL delays sends and receives and the prober would
  measure itself.
"""

from __future__ import annotations

import array
import errno
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from livemig.errors import LivemigError
from livemig.probes.timeseries import (
    NS_PER_MS,
    NS_PER_S,
    IntArray,
    as_int_array,
    count_lost,
    distribution,
    longest_gap,
)

DEFAULT_PORT = 7
PAYLOAD_SIZE = 64
HEADER = struct.Struct("!QQ")  # (sequence number, send time in ns), big-endian

# A stop request is noticed within this time even when the next send is further away
# (a long --interval-ms), so that SIGTERM ends a run promptly.
_MAX_WAIT_S = 0.05
# Replies that arrive while the prober is descheduled must wait in the socket, not be
# dropped by it; 1 MiB holds several seconds of 1 kHz replies.
_RCVBUF_BYTES = 1 << 20
_RECV_BYTES = 2048


class StopFlag(Protocol):
    """What the probes poll to learn that they should stop: ``threading.Event`` or
    ``asyncio.Event`` both fit."""

    def is_set(self) -> bool: ...


class ProbeTargetError(LivemigError):
    """The probe's target cannot be resolved or reached at all (not a transient loss)."""

    def __init__(self, target: str, port: int, reason: str) -> None:
        super().__init__(f"cannot probe {target} port {port}: {reason}; check the address")
        self.target = target
        self.port = port
        self.reason = reason


def error_kind(exc: OSError) -> str:
    """A short, stable name for a socket error, as the probes count them.

    ``refused`` (ICMP port unreachable or TCP RST on connect), ``reset``, ``timeout``,
    ``host_unreachable``, ``net_unreachable``, else the errno name in lower case.
    """
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if exc.errno == errno.EHOSTUNREACH:
        return "host_unreachable"
    if exc.errno == errno.ENETUNREACH:
        return "net_unreachable"
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}").lower()
    return "oserror"


def resolve_udp(target: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """The first address of ``target`` for UDP, as (family, sockaddr)."""
    try:
        infos = socket.getaddrinfo(target, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ProbeTargetError(target, port, str(exc)) from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


@dataclass(frozen=True)
class EchoSummary:
    """What the echo run means for users. JSON fields:

    - ``downtime_ms``: longest gap between consecutive replies (client downtime), null
      with fewer than two replies;
    - ``gap_start_ns`` / ``gap_end_ns``: receive times of the replies around that gap;
    - ``lost``: probes sent and never answered (duplicates count once);
    - ``replies``: distinct probes answered;
    - ``rtt_median_ms`` / ``rtt_p99_ms`` / ``rtt_max_ms``: round-trip times;
    - ``max_send_gap_ms``: the prober's own longest pause between two sends; when it is
      near ``downtime_ms`` the prober, not the VM, made the gap;
    - ``silent_at_end_ms``: from the last reply to the end of sending; large when the
      target stopped answering for good, which ``downtime_ms`` cannot show.
    """

    downtime_ms: float | None
    gap_start_ns: int | None
    gap_end_ns: int | None
    lost: int
    replies: int
    rtt_median_ms: float | None
    rtt_p99_ms: float | None
    rtt_max_ms: float | None
    max_send_gap_ms: float
    silent_at_end_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "downtime_ms": self.downtime_ms,
            "gap_start_ns": self.gap_start_ns,
            "gap_end_ns": self.gap_end_ns,
            "lost": self.lost,
            "replies": self.replies,
            "rtt_median_ms": self.rtt_median_ms,
            "rtt_p99_ms": self.rtt_p99_ms,
            "rtt_max_ms": self.rtt_max_ms,
            "max_send_gap_ms": self.max_send_gap_ms,
            "silent_at_end_ms": self.silent_at_end_ms,
        }


REPLY_COLUMNS = ("seq", "sent_ns", "recv_ns")


@dataclass(frozen=True, eq=False)
class EchoResult:
    """One echo run. ``to_json()`` gives these fields (times in ns of the prober's
    ``time.monotonic_ns()`` clock):

    - ``probe``: ``"echo"``; ``target``, ``port``;
    - ``interval_ms``: the configured send period; ``payload_size``: bytes per datagram;
    - ``started_ns``: first send deadline; ``stopped_ns``: end of sending (replies were
      still collected for a short drain time after it);
    - ``sent``: probes sent, numbered 0 .. sent-1;
    - ``reply_columns``: ``["seq", "sent_ns", "recv_ns"]``; ``replies``: one
      ``[seq, sent_ns, recv_ns]`` triple per distinct reply, in order of arrival;
    - ``skipped_slots``: send deadlines skipped because the prober was late by more than
      an interval; ``duplicates``: extra copies of replies; ``invalid``: datagrams that
      were not replies to our probes; ``errors``: socket errors by kind (see
      ``error_kind``), e.g. ``{"refused": 3}`` while nothing listens on the port;
    - ``summary``: see ``EchoSummary``.
    """

    target: str
    port: int
    interval_ms: float
    payload_size: int
    started_ns: int
    stopped_ns: int
    sent: int
    seq: IntArray
    sent_ns: IntArray
    recv_ns: IntArray
    max_send_gap_ns: int
    skipped_slots: int
    duplicates: int
    invalid: int
    errors: Mapping[str, int]

    def summary(self) -> EchoSummary:
        gap = longest_gap(self.recv_ns)
        rtt = distribution(self.recv_ns - self.sent_ns)
        last_reply_ns = int(self.recv_ns.max()) if self.recv_ns.size else self.started_ns
        return EchoSummary(
            downtime_ms=None if gap is None else gap.length_ms,
            gap_start_ns=None if gap is None else gap.start_ns,
            gap_end_ns=None if gap is None else gap.end_ns,
            lost=count_lost(self.sent, self.seq),
            replies=int(self.seq.size),
            rtt_median_ms=None if rtt is None else rtt.median_ms,
            rtt_p99_ms=None if rtt is None else rtt.p99_ms,
            rtt_max_ms=None if rtt is None else rtt.max_ms,
            max_send_gap_ms=self.max_send_gap_ns / NS_PER_MS,
            silent_at_end_ms=max(0, self.stopped_ns - last_reply_ns) / NS_PER_MS,
        )

    def to_json(self) -> dict[str, Any]:
        replies = np.column_stack((self.seq, self.sent_ns, self.recv_ns)).tolist()
        return {
            "probe": "echo",
            "target": self.target,
            "port": self.port,
            "interval_ms": self.interval_ms,
            "payload_size": self.payload_size,
            "started_ns": self.started_ns,
            "stopped_ns": self.stopped_ns,
            "sent": self.sent,
            "reply_columns": list(REPLY_COLUMNS),
            "replies": replies,
            "max_send_gap_ns": self.max_send_gap_ns,
            "skipped_slots": self.skipped_slots,
            "duplicates": self.duplicates,
            "invalid": self.invalid,
            "errors": dict(self.errors),
            "summary": self.summary().to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EchoResult:
        """Read back what ``to_json()`` wrote (the summary is recomputed, not trusted)."""
        if list(data["reply_columns"]) != list(REPLY_COLUMNS):
            raise ValueError(f"unexpected reply_columns {data['reply_columns']!r}")
        replies = np.asarray(data["replies"], dtype=np.int64).reshape(-1, len(REPLY_COLUMNS))
        return cls(
            target=str(data["target"]),
            port=int(data["port"]),
            interval_ms=float(data["interval_ms"]),
            payload_size=int(data["payload_size"]),
            started_ns=int(data["started_ns"]),
            stopped_ns=int(data["stopped_ns"]),
            sent=int(data["sent"]),
            seq=replies[:, 0].copy(),
            sent_ns=replies[:, 1].copy(),
            recv_ns=replies[:, 2].copy(),
            max_send_gap_ns=int(data["max_send_gap_ns"]),
            skipped_slots=int(data["skipped_slots"]),
            duplicates=int(data["duplicates"]),
            invalid=int(data["invalid"]),
            errors={str(k): int(v) for k, v in data["errors"].items()},
        )

    def one_line(self) -> str:
        """A human summary of the run, one line."""
        s = self.summary()
        downtime = "n/a" if s.downtime_ms is None else f"{s.downtime_ms:.1f} ms"
        rtt = "n/a" if s.rtt_median_ms is None else f"{s.rtt_median_ms:.3f} ms"
        return (
            f"echo {self.target}:{self.port}: downtime {downtime}, sent {self.sent}, "
            f"lost {s.lost}, rtt median {rtt}, silent at end {s.silent_at_end_ms:.1f} ms, "
            f"prober max send gap {s.max_send_gap_ms:.1f} ms"
        )


class SendSchedule:
    """The prober's send deadlines ``started + k * interval``, without a clock of its own.

    ``due(now)`` says whether a send is owed now. Slots the prober was too late for are
    skipped, not sent in a burst, and counted; ``finish(now)`` counts the ones it missed
    at the end too, so that sends plus skipped slots are exactly the slots of the run.
    """

    def __init__(self, started_ns: int, interval_ns: int, end_ns: int | None = None) -> None:
        if interval_ns <= 0:
            raise ValueError(f"interval_ns must be > 0, not {interval_ns}")
        self.next_ns = started_ns
        self.interval_ns = interval_ns
        self.end_ns = end_ns
        self.skipped = 0

    def due(self, now_ns: int) -> bool:
        if now_ns < self.next_ns or (self.end_ns is not None and now_ns >= self.end_ns):
            return False
        missed = (now_ns - self.next_ns) // self.interval_ns
        self.skipped += missed
        # The next deadline stays on the grid however late this send is: no drift.
        self.next_ns += (missed + 1) * self.interval_ns
        return True

    def finish(self, now_ns: int) -> None:
        """Count the slots left unsent when sending stopped at ``now_ns``: up to the end
        of the run if it ran out, up to now if it was stopped early."""
        limit_ns = now_ns + 1 if self.end_ns is None else min(now_ns + 1, self.end_ns)
        if limit_ns > self.next_ns:
            unsent = -(-(limit_ns - self.next_ns) // self.interval_ns)  # ceiling division
            self.skipped += unsent
            self.next_ns += unsent * self.interval_ns


class _Session:
    """The mutable bookkeeping of one run: what was sent, what came back."""

    def __init__(self, sock: socket.socket, payload_size: int) -> None:
        self.sock = sock
        self.packet = bytearray(payload_size)  # reused: only the header changes per send
        # array.array appends in amortized O(1) without numpy's per-call overhead.
        self.sent_ns = array.array("q")
        self.answered = bytearray()  # one flag per sequence number, to spot duplicates
        self.reply_seq = array.array("q")
        self.reply_sent_ns = array.array("q")
        self.reply_recv_ns = array.array("q")
        self.last_attempt_ns: int | None = None
        self.max_send_gap_ns = 0
        self.duplicates = 0
        self.invalid = 0
        self.errors: Counter[str] = Counter()

    def send(self, now_ns: int) -> None:
        if self.last_attempt_ns is not None:
            self.max_send_gap_ns = max(self.max_send_gap_ns, now_ns - self.last_attempt_ns)
        self.last_attempt_ns = now_ns
        seq = len(self.sent_ns)
        HEADER.pack_into(self.packet, 0, seq, now_ns)
        try:
            self.sock.send(self.packet)
        except OSError as exc:
            # A failed send consumes no sequence number: nothing left, so nothing is lost.
            # Linux reports an earlier ICMP error (port or host unreachable) on the next
            # send or recv of a connected socket; that is how "refused" shows up here.
            self.errors[error_kind(exc)] += 1
            return
        self.sent_ns.append(now_ns)
        self.answered.append(0)

    def receive_pending(self) -> None:
        """Read every datagram that is waiting, without blocking."""
        while True:
            try:
                data = self.sock.recv(_RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                self.errors[error_kind(exc)] += 1
                continue
            recv_ns = time.monotonic_ns()
            self._record(data, recv_ns)

    def _record(self, data: bytes, recv_ns: int) -> None:
        if len(data) != len(self.packet):
            self.invalid += 1
            return
        seq, sent_ns = HEADER.unpack_from(data)
        # Validate against our own record before believing the peer: a stray or mangled
        # datagram must neither index out of range nor count as a reply.
        if seq >= len(self.sent_ns) or self.sent_ns[seq] != sent_ns:
            self.invalid += 1
            return
        if self.answered[seq]:
            self.duplicates += 1
            return
        self.answered[seq] = 1
        self.reply_seq.append(seq)
        self.reply_sent_ns.append(sent_ns)
        self.reply_recv_ns.append(recv_ns)


def _wait_readable(sock: socket.socket, timeout_s: float) -> None:
    if timeout_s > 0:
        select.select([sock], [], [], timeout_s)


def run_echo(
    target: str,
    *,
    port: int = DEFAULT_PORT,
    interval_ms: float = 1.0,
    duration_s: float | None = None,
    stop: StopFlag | None = None,
    drain_ms: float = 100.0,
    payload_size: int = PAYLOAD_SIZE,
) -> EchoResult:
    """Probe ``target:port`` until ``duration_s`` has passed or ``stop`` is set.

    At least one of the two must be given. After sending stops, replies are still
    collected for ``drain_ms`` so that probes in flight are not counted as lost.
    Socket errors (ICMP unreachable during a switchover, say) are counted, never raised.
    """
    if interval_ms <= 0:
        raise ValueError(f"interval_ms must be > 0, not {interval_ms}")
    if duration_s is None and stop is None:
        raise ValueError("give duration_s or stop, or the probe never ends")
    if duration_s is not None and duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, not {duration_s}")
    if payload_size < HEADER.size or payload_size > _RECV_BYTES:
        raise ValueError(f"payload_size must be in [{HEADER.size}, {_RECV_BYTES}]")
    interval_ns = max(1, round(interval_ms * NS_PER_MS))
    family, sockaddr = resolve_udp(target, port)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF_BYTES)
        try:
            # connect() makes the kernel drop datagrams from anyone else and report ICMP
            # errors for this peer to us.
            sock.connect(sockaddr)
        except OSError as exc:
            raise ProbeTargetError(target, port, str(exc)) from exc
        sock.setblocking(False)
        session = _Session(sock, payload_size)

        started_ns = time.monotonic_ns()
        end_ns = None if duration_s is None else started_ns + round(duration_s * NS_PER_S)
        schedule = SendSchedule(started_ns, interval_ns, end_ns)
        while stop is None or not stop.is_set():
            now_ns = time.monotonic_ns()
            if end_ns is not None and now_ns >= end_ns:
                break
            if schedule.due(now_ns):
                session.send(now_ns)
            session.receive_pending()
            wake_ns = schedule.next_ns if end_ns is None else min(schedule.next_ns, end_ns)
            wait_s = (wake_ns - time.monotonic_ns()) / NS_PER_S
            _wait_readable(sock, min(wait_s, _MAX_WAIT_S))
        stopped_ns = time.monotonic_ns()
        schedule.finish(stopped_ns)

        drain_end_ns = stopped_ns + round(drain_ms * NS_PER_MS)
        session.receive_pending()
        while (now_ns := time.monotonic_ns()) < drain_end_ns:
            _wait_readable(sock, (drain_end_ns - now_ns) / NS_PER_S)
            session.receive_pending()

    return EchoResult(
        target=target,
        port=port,
        interval_ms=interval_ms,
        payload_size=payload_size,
        started_ns=started_ns,
        stopped_ns=stopped_ns,
        sent=len(session.sent_ns),
        seq=as_int_array(session.reply_seq),
        sent_ns=as_int_array(session.reply_sent_ns),
        recv_ns=as_int_array(session.reply_recv_ns),
        max_send_gap_ns=session.max_send_gap_ns,
        skipped_slots=schedule.skipped,
        duplicates=session.duplicates,
        invalid=session.invalid,
        errors=dict(session.errors),
    )


def send_intervals_ns(result: EchoResult) -> IntArray:
    """Intervals between consecutive sends of answered probes (a check of the prober).

    Only answered probes carry their send time in the result, so on a lossy run some
    intervals span several periods.
    """
    order = np.argsort(result.seq, kind="stable")
    return np.diff(result.sent_ns[order])
