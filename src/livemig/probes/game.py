"""Game clients for the guest's ``lm-game`` server (docs/guest-protocols.md).

Each player is one UDP socket. It joins with ``!4sI`` = (``b"LMGC"``, client id) at the
start and again every second (the server drops a client silent for 5 s), and records the
arrival of every snapshot ``!4sIQQI`` = (``b"LMGS"``, client id, tick, server time in ns,
entity count) followed by 16 bytes per entity. What players feel during a migration is
the longest gap between snapshots, against the server's normal tick period (50 ms at
20 Hz).

The codec (``encode_join``, ``parse_snapshot``) is sans-IO; ``run_game`` is the loop
around it, with all players served by one thread through one selector so that no
player's timing depends on thread scheduling.
"""

from __future__ import annotations

import array
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.errors import LivemigError
from livemig.probes.echo import ProbeTargetError, StopFlag, error_kind, resolve_udp
from livemig.probes.timeseries import (
    NS_PER_MS,
    NS_PER_S,
    Distribution,
    Gap,
    IntArray,
    as_int_array,
    interarrival,
    longest_gap,
)

DEFAULT_PORT = 27960
CLIENT_MAGIC = b"LMGC"
SERVER_MAGIC = b"LMGS"
JOIN = struct.Struct("!4sI")
SNAPSHOT_HEADER = struct.Struct("!4sIQQI")
ENTITY_SIZE = 16
# The server keeps snapshots under 1400 bytes; anything longer is not one of them.
MAX_SNAPSHOT_BYTES = 1400
JOIN_INTERVAL_S = 1.0

# Bounds the wait in the loop so that a stop request is seen promptly even though joins
# are due only once a second.
_MAX_WAIT_S = 0.05
_RECV_BYTES = 2048
_RCVBUF_BYTES = 1 << 20


class SnapshotError(LivemigError):
    """A datagram from the server is not a valid snapshot (the peer broke the protocol)."""

    def __init__(self, reason: str, length: int) -> None:
        super().__init__(f"bad snapshot ({length} bytes): {reason}")
        self.reason = reason
        self.length = length


@dataclass(frozen=True)
class Snapshot:
    """The header of one snapshot; the entity states themselves are not kept."""

    client_id: int
    tick: int
    server_ns: int
    entities: int


def encode_join(client_id: int) -> bytes:
    """The join (or keep-alive) datagram of client ``client_id``."""
    return JOIN.pack(CLIENT_MAGIC, client_id)


def parse_snapshot(data: bytes) -> Snapshot:
    """Decode and check one snapshot datagram; raises SnapshotError if it is not one."""
    if len(data) < SNAPSHOT_HEADER.size:
        raise SnapshotError("shorter than the header", len(data))
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("longer than any snapshot", len(data))
    magic, client_id, tick, server_ns, entities = SNAPSHOT_HEADER.unpack_from(data)
    if magic != SERVER_MAGIC:
        raise SnapshotError(f"magic {magic!r}", len(data))
    if len(data) != SNAPSHOT_HEADER.size + ENTITY_SIZE * entities:
        raise SnapshotError(f"length does not match {entities} entities", len(data))
    return Snapshot(client_id=client_id, tick=tick, server_ns=server_ns, entities=entities)


@dataclass(frozen=True, eq=False)
class PlayerResult:
    """What one player saw. ``to_json()`` fields:

    - ``id``: the client id it joined with; ``joins_sent``: join datagrams sent;
    - ``snapshots``: valid snapshots received;
    - ``arrivals_ns``: receive time of each snapshot (prober's monotonic clock, ns);
    - ``ticks``: the server tick number of each snapshot, in the same order;
    - ``lost_ticks``: ticks between the first and the last one seen that never arrived;
    - ``interarrival``: ``{count, median_ms, p99_ms, max_ms}`` of the gaps between
      snapshots, null with fewer than two;
    - ``invalid``: datagrams that were not snapshots for this player;
    - ``errors``: socket errors by kind (``refused`` while nothing listens, ...).
    """

    client_id: int
    joins_sent: int
    arrivals_ns: IntArray
    ticks: IntArray
    server_ns: IntArray
    invalid: int
    errors: Mapping[str, int]

    @property
    def lost_ticks(self) -> int:
        if self.ticks.size == 0:
            return 0
        expected = int(self.ticks.max() - self.ticks.min()) + 1
        return expected - int(np.unique(self.ticks).size)

    def interarrival(self) -> Distribution | None:
        return interarrival(self.arrivals_ns)

    def silent_at_end_ns(self, started_ns: int, stopped_ns: int) -> int:
        """Time from the last snapshot (or from the start, if none came) to ``stopped_ns``."""
        last_ns = int(self.arrivals_ns.max()) if self.arrivals_ns.size else started_ns
        return max(0, stopped_ns - last_ns)

    def to_json(self) -> dict[str, Any]:
        spread = self.interarrival()
        return {
            "id": self.client_id,
            "joins_sent": self.joins_sent,
            "snapshots": int(self.arrivals_ns.size),
            "arrivals_ns": self.arrivals_ns.tolist(),
            "ticks": self.ticks.tolist(),
            "lost_ticks": self.lost_ticks,
            "interarrival": None if spread is None else spread.to_json(),
            "invalid": self.invalid,
            "errors": dict(self.errors),
        }


@dataclass(frozen=True, eq=False)
class GameResult:
    """One run of P players. ``to_json()`` fields:

    - ``probe``: ``"game"``; ``target``, ``port``;
    - ``started_ns`` / ``stopped_ns``: the run on the prober's monotonic clock;
    - ``players``: one object per player, see ``PlayerResult``;
    - ``summary``: ``max_gap_ms`` (longest gap between two snapshots of any one player,
      null if no player got two), ``gap_start_ns`` / ``gap_end_ns`` (arrivals around
      it), ``gap_player_id``, ``snapshots`` (received in all), ``players_served``
      (players that got at least one snapshot), ``silent_at_end_ms`` (longest time any
      player waited at the end of the run since its last snapshot; large when the
      server never came back, which ``max_gap_ms`` cannot show).
    """

    target: str
    port: int
    started_ns: int
    stopped_ns: int
    players: Sequence[PlayerResult]

    def summary(self) -> dict[str, Any]:
        worst: Gap | None = None
        worst_id: int | None = None
        for player in self.players:
            gap = longest_gap(player.arrivals_ns)
            if gap is not None and (worst is None or gap.length_ns > worst.length_ns):
                worst, worst_id = gap, player.client_id
        return {
            "max_gap_ms": None if worst is None else worst.length_ms,
            "gap_start_ns": None if worst is None else worst.start_ns,
            "gap_end_ns": None if worst is None else worst.end_ns,
            "gap_player_id": worst_id,
            "snapshots": sum(int(p.arrivals_ns.size) for p in self.players),
            "players_served": sum(1 for p in self.players if p.arrivals_ns.size > 0),
            "silent_at_end_ms": max(
                p.silent_at_end_ns(self.started_ns, self.stopped_ns) for p in self.players
            )
            / NS_PER_MS,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "probe": "game",
            "target": self.target,
            "port": self.port,
            "started_ns": self.started_ns,
            "stopped_ns": self.stopped_ns,
            "players": [p.to_json() for p in self.players],
            "summary": self.summary(),
        }

    def one_line(self) -> str:
        s = self.summary()
        gap = "n/a" if s["max_gap_ms"] is None else f"{s['max_gap_ms']:.1f} ms"
        return (
            f"game {self.target}:{self.port}: {len(self.players)} players, "
            f"{s['players_served']} served, {s['snapshots']} snapshots, max gap {gap}"
        )


@dataclass
class _Player:
    client_id: int
    sock: socket.socket
    next_join_ns: int
    joins_sent: int = 0
    arrivals_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    ticks: array.array[int] = field(default_factory=lambda: array.array("q"))
    server_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    invalid: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def join(self, join_interval_ns: int) -> None:
        # Keep-alives follow absolute deadlines; after a stall, join once, not once per
        # missed second.
        now_ns = time.monotonic_ns()
        while self.next_join_ns <= now_ns:
            self.next_join_ns += join_interval_ns
        try:
            self.sock.send(encode_join(self.client_id))
        except OSError as exc:
            self.errors[error_kind(exc)] += 1
            return
        self.joins_sent += 1

    def receive_pending(self) -> None:
        while True:
            try:
                data = self.sock.recv(_RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                self.errors[error_kind(exc)] += 1
                continue
            recv_ns = time.monotonic_ns()
            try:
                snapshot = parse_snapshot(data)
            except SnapshotError:
                self.invalid += 1
                continue
            if snapshot.client_id != self.client_id:
                self.invalid += 1
                continue
            self.arrivals_ns.append(recv_ns)
            self.ticks.append(snapshot.tick)
            self.server_ns.append(snapshot.server_ns)

    def result(self) -> PlayerResult:
        return PlayerResult(
            client_id=self.client_id,
            joins_sent=self.joins_sent,
            arrivals_ns=as_int_array(self.arrivals_ns),
            # Ticks and server times are unsigned 64-bit on the wire; int64 holds them
            # for centuries of ticks and of nanoseconds of server uptime.
            ticks=as_int_array(self.ticks),
            server_ns=as_int_array(self.server_ns),
            invalid=self.invalid,
            errors=dict(self.errors),
        )


def run_game(
    target: str,
    *,
    port: int = DEFAULT_PORT,
    players: int = 4,
    duration_s: float | None = None,
    stop: StopFlag | None = None,
    first_id: int = 1,
    join_interval_s: float = JOIN_INTERVAL_S,
) -> GameResult:
    """Run ``players`` game clients against ``target:port`` until ``duration_s`` or ``stop``.

    Player k joins with client id ``first_id + k``. Socket errors are counted per player,
    never raised, so that an unreachable server during a switchover shows as a gap.
    """
    if players < 1:
        raise ValueError(f"players must be >= 1, not {players}")
    if duration_s is None and stop is None:
        raise ValueError("give duration_s or stop, or the probe never ends")
    if first_id < 0 or first_id + players > 2**32:
        raise ValueError("client ids must fit in 32 bits")
    if join_interval_s <= 0:
        raise ValueError(f"join_interval_s must be > 0, not {join_interval_s}")
    join_interval_ns = round(join_interval_s * NS_PER_S)
    family, sockaddr = resolve_udp(target, port)
    with ExitStack() as stack, selectors.DefaultSelector() as selector:
        started_ns = time.monotonic_ns()
        clients: list[_Player] = []
        for k in range(players):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF_BYTES)
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                raise ProbeTargetError(target, port, str(exc)) from exc
            sock.setblocking(False)
            player = _Player(client_id=first_id + k, sock=sock, next_join_ns=started_ns)
            selector.register(sock, selectors.EVENT_READ, player)
            clients.append(player)

        end_ns = None if duration_s is None else started_ns + round(duration_s * NS_PER_S)
        while stop is None or not stop.is_set():
            now_ns = time.monotonic_ns()
            if end_ns is not None and now_ns >= end_ns:
                break
            for player in clients:
                if player.next_join_ns <= now_ns:
                    player.join(join_interval_ns)
            wake_ns = min(p.next_join_ns for p in clients)
            if end_ns is not None:
                wake_ns = min(wake_ns, end_ns)
            wait_s = min(max(0.0, (wake_ns - time.monotonic_ns()) / NS_PER_S), _MAX_WAIT_S)
            for key, _ in selector.select(wait_s):
                ready: _Player = key.data
                ready.receive_pending()
        stopped_ns = time.monotonic_ns()

    return GameResult(
        target=target,
        port=port,
        started_ns=started_ns,
        stopped_ns=stopped_ns,
        players=tuple(p.result() for p in clients),
    )
