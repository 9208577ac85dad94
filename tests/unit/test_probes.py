"""The probes against real sockets on loopback: small servers in threads play the guest.

Each server implements the server side of docs/guest-protocols.md (or, for HTTP, what
busybox httpd does: HTTP/1.0, close after every response), with a controlled pause that
stands in for a migration's switchover. Every server is a context manager that stops its
thread and closes its sockets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import pytest

from livemig.probes import echo, game
from livemig.probes import http as http_probe
from livemig.probes.cli import add_probe_commands
from livemig.probes.timeseries import NS_PER_MS, NS_PER_S

LOOPBACK = "127.0.0.1"


def free_port(kind: socket.SocketKind) -> int:
    """A port that nothing listens on (free when we looked)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


class ServerThread:
    """A thread running ``serve()`` until ``close()``; the base of the test servers."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, name=type(self).__name__)

    def serve(self) -> None:
        raise NotImplementedError

    def close_sockets(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()
        self.close_sockets()


class EchoServer(ServerThread):
    """lm-echo: sends every datagram back unchanged.

    From ``pause_after_s`` after the first datagram, it drops everything for ``pause_s``
    (a VM paused for switchover). ``mangle`` corrupts every reply's send time instead;
    ``copies`` sends each reply that many times.
    """

    def __init__(
        self,
        pause_after_s: float | None = None,
        pause_s: float = 0.0,
        mangle: bool = False,
        copies: int = 1,
    ) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.port: int = self.sock.getsockname()[1]
        self.pause_after_ns = None if pause_after_s is None else round(pause_after_s * NS_PER_S)
        self.pause_ns = round(pause_s * NS_PER_S)
        self.mangle = mangle
        self.copies = copies
        self.first_seen = threading.Event()
        self.received = 0
        self.dropped = 0

    def serve(self) -> None:
        first_ns: int | None = None
        while not self.stopping.is_set():
            readable, _, _ = select.select([self.sock], [], [], 0.02)
            if not readable:
                continue
            data, addr = self.sock.recvfrom(4096)
            now_ns = time.monotonic_ns()
            if first_ns is None:
                first_ns = now_ns
                self.first_seen.set()
            self.received += 1
            if self.pause_after_ns is not None:
                pause_start_ns = first_ns + self.pause_after_ns
                if pause_start_ns <= now_ns < pause_start_ns + self.pause_ns:
                    self.dropped += 1
                    continue
            if self.mangle:
                data = data[:8] + bytes(8) + data[16:]
            for _ in range(self.copies):
                self.sock.sendto(data, addr)

    def close_sockets(self) -> None:
        self.sock.close()


SNAPSHOT = struct.Struct("!4sIQQI")


class GameServer(ServerThread):
    """lm-game at ``hz``: a snapshot per client per tick, ``entities`` x 16 bytes each.

    From ``pause_after_s`` after the first join it sends nothing for ``pause_s`` (ticks
    go on, as the server's clock does not stop for the test). ``id_offset`` makes it
    address snapshots to the wrong client id.
    """

    def __init__(
        self,
        hz: float = 20.0,
        entities: int = 4,
        pause_after_s: float | None = None,
        pause_s: float = 0.0,
        id_offset: int = 0,
    ) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.port: int = self.sock.getsockname()[1]
        self.period_ns = round(NS_PER_S / hz)
        self.entities = entities
        self.pause_after_ns = None if pause_after_s is None else round(pause_after_s * NS_PER_S)
        self.pause_ns = round(pause_s * NS_PER_S)
        self.id_offset = id_offset
        self.clients: dict[Any, tuple[int, int]] = {}  # address -> (client id, last seen)
        self.joins = 0
        self.bad = 0

    def serve(self) -> None:
        tick = 0
        first_ns: int | None = None
        next_tick_ns = time.monotonic_ns()
        while not self.stopping.is_set():
            wait_s = max(0.0, (next_tick_ns - time.monotonic_ns()) / NS_PER_S)
            readable, _, _ = select.select([self.sock], [], [], min(wait_s, 0.02))
            now_ns = time.monotonic_ns()
            if readable:
                data, addr = self.sock.recvfrom(4096)
                if len(data) == 8 and data[:4] == b"LMGC":
                    (client_id,) = struct.unpack("!I", data[4:])
                    self.clients[addr] = (client_id, now_ns)
                    self.joins += 1
                    if first_ns is None:
                        first_ns = now_ns
                else:
                    self.bad += 1
            if now_ns < next_tick_ns:
                continue
            next_tick_ns += self.period_ns
            tick += 1
            self.clients = {a: c for a, c in self.clients.items() if now_ns - c[1] < 5 * NS_PER_S}
            if first_ns is not None and self.pause_after_ns is not None:
                pause_start_ns = first_ns + self.pause_after_ns
                if pause_start_ns <= now_ns < pause_start_ns + self.pause_ns:
                    continue
            body = bytes(range(16)) * self.entities
            for addr, (client_id, _) in self.clients.items():
                header = SNAPSHOT.pack(
                    b"LMGS", client_id + self.id_offset, tick, now_ns, self.entities
                )
                self.sock.sendto(header + body, addr)

    def close_sockets(self) -> None:
        self.sock.close()


FILE_BYTES = 10_000
DYN_BYTES = 5_000


class _Handler(BaseHTTPRequestHandler):
    """What busybox httpd does for our paths: HTTP/1.0, one response per connection."""

    server: TestHttpServer

    def do_GET(self) -> None:
        delay_s = (self.server.paused_until_ns - time.monotonic_ns()) / NS_PER_S
        if delay_s > 0:
            time.sleep(delay_s)
        if self.path == "/file.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(FILE_BYTES))
            self.end_headers()
            self.wfile.write(b"f" * FILE_BYTES)
        elif self.path.startswith("/cgi-bin/dyn"):
            # What busybox does for CGI: its own status line, then the script's header
            # lines as the script wrote them (bare LFs), no Content-Length, so the client
            # must read to end-of-file.
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\n\n")
            self.wfile.write(b"d" * DYN_BYTES)
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        # busybox hands the body to the CGI, which appends it to a log and confirms.
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/cgi-bin/post" or self.headers["Content-Type"] != (
                "application/x-www-form-urlencoded"):
            self.send_error(400)
            return
        self.server.posted.append(body)
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\n\nposted")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean


class TestHttpServer(ThreadingHTTPServer):
    __test__ = False
    # Non-daemon handler threads, so that server_close() joins every one of them.
    daemon_threads = False

    def __init__(self) -> None:
        super().__init__((LOOPBACK, 0), _Handler)
        self.paused_until_ns = 0
        self.posted: list[bytes] = []

    @property
    def url_base(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A probe that stops mid-download resets its connections: that is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def http_server() -> Iterator[TestHttpServer]:
    server = TestHttpServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
        assert not thread.is_alive()


def probe_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` the way the main CLI will: add_probe_commands on its subparsers."""
    parser = argparse.ArgumentParser(prog="livemig")
    add_probe_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# --- echo ----------------------------------------------------------------------------


def test_echo_steady_state_has_no_loss_and_tiny_gaps() -> None:
    with EchoServer() as server:
        result = echo.run_echo(LOOPBACK, port=server.port, duration_s=0.5)
    s = result.summary()
    assert 350 <= result.sent <= 501  # skips only when this machine is very busy
    assert s.lost == 0
    assert s.replies == result.sent
    assert s.downtime_ms is not None
    assert s.downtime_ms < 100
    assert s.rtt_median_ms is not None
    assert s.rtt_median_ms < 10
    assert result.invalid == result.duplicates == 0
    assert result.errors == {}
    # Replies are recorded as sent and received by us, in order of arrival.
    assert (result.recv_ns >= result.sent_ns).all()
    assert result.seq.tolist() == sorted(result.seq.tolist())


def test_echo_sends_on_a_drift_free_schedule() -> None:
    with EchoServer() as server:
        result = echo.run_echo(LOOPBACK, port=server.port, duration_s=0.5, interval_ms=2.0)
    # Sends + skipped slots fill the run exactly; the typical gap is the period (the
    # median, because a busy machine holds the prober up now and then: SendSchedule's
    # own tests check the arithmetic on a clock of their own).
    assert result.sent + result.skipped_slots == 250
    intervals = echo.send_intervals_ns(result)
    assert abs(float(np.median(intervals)) - 2 * NS_PER_MS) < 0.5 * NS_PER_MS


def test_schedule_keeps_deadlines_on_the_grid_however_late_a_send_is() -> None:
    schedule = echo.SendSchedule(started_ns=1000, interval_ns=100, end_ns=2000)
    assert schedule.due(1000)
    assert not schedule.due(1099)  # the next slot is not due yet
    assert schedule.due(1170)  # 70 late: sent, and the next deadline is still 1200
    assert schedule.next_ns == 1200
    assert schedule.skipped == 0


def test_schedule_skips_missed_slots_instead_of_bursting() -> None:
    schedule = echo.SendSchedule(started_ns=0, interval_ns=100, end_ns=1000)
    assert schedule.due(0)
    # Held up until 550: slots 100..400 are skipped, 500 is sent late, once.
    assert schedule.due(550)
    assert schedule.skipped == 4
    assert not schedule.due(560)
    assert schedule.next_ns == 600


def test_schedule_accounts_for_every_slot_of_the_run() -> None:
    schedule = echo.SendSchedule(started_ns=0, interval_ns=100, end_ns=1000)
    sends = sum(schedule.due(t) for t in (0, 100, 350, 351))
    assert not schedule.due(1000)  # the run is over
    schedule.finish(1040)  # stalled past the end: 400..900 were never sent
    assert sends == 3
    assert sends + schedule.skipped == 10


def test_schedule_stopped_early_owes_only_the_slots_already_due() -> None:
    schedule = echo.SendSchedule(started_ns=0, interval_ns=100)
    assert schedule.due(0)
    schedule.finish(250)  # 100 and 200 were due and unsent; 300 was not due yet
    assert schedule.skipped == 2


def test_echo_measures_a_pause_as_downtime() -> None:
    with EchoServer(pause_after_s=0.3, pause_s=0.2) as server:
        result = echo.run_echo(LOOPBACK, port=server.port, duration_s=0.9)
    s = result.summary()
    assert server.dropped > 20  # the pause happened (fewer sends on a busy machine)
    assert s.downtime_ms is not None
    assert 180 <= s.downtime_ms <= 400
    assert s.gap_start_ns is not None
    assert s.gap_end_ns is not None
    # The gap sits where the pause was: about 0.3 s into the run.
    gap_at_s = (s.gap_start_ns - result.started_ns) / NS_PER_S
    assert 0.2 <= gap_at_s <= 0.6
    assert s.lost == server.dropped
    assert s.silent_at_end_ms < 50


def test_echo_json_round_trips_and_says_what_it_measured() -> None:
    with EchoServer(pause_after_s=0.1, pause_s=0.05) as server:
        result = echo.run_echo(LOOPBACK, port=server.port, duration_s=0.3)
    data = json.loads(json.dumps(result.to_json()))
    assert data["probe"] == "echo"
    assert data["target"] == LOOPBACK
    assert data["interval_ms"] == 1.0
    assert data["reply_columns"] == ["seq", "sent_ns", "recv_ns"]
    assert len(data["replies"]) == data["summary"]["replies"]
    assert all(len(row) == 3 for row in data["replies"])
    assert data["summary"]["downtime_ms"] >= 40
    again = echo.EchoResult.from_json(data)
    assert again.to_json() == data


def test_echo_stops_when_asked() -> None:
    stop = threading.Event()
    results: list[echo.EchoResult] = []
    with EchoServer() as server:
        worker = threading.Thread(
            target=lambda: results.append(
                echo.run_echo(LOOPBACK, port=server.port, stop=stop, drain_ms=10)
            )
        )
        worker.start()
        time.sleep(0.2)
        stop.set()
        worker.join(timeout=2)
        assert not worker.is_alive()
    assert results[0].sent > 50
    assert results[0].summary().lost == 0


def test_echo_counts_refusals_without_crashing() -> None:
    result = echo.run_echo(LOOPBACK, port=free_port(socket.SOCK_DGRAM), duration_s=0.2)
    s = result.summary()
    assert result.errors.get("refused", 0) > 0
    assert s.replies == 0
    assert s.downtime_ms is None
    # Nothing answered, so the whole run was silent.
    assert s.silent_at_end_ms >= 150
    data = json.loads(json.dumps(result.to_json()))
    assert data["replies"] == []
    assert data["summary"]["downtime_ms"] is None
    assert echo.EchoResult.from_json(data).to_json() == data


def test_echo_rejects_replies_that_are_not_ours() -> None:
    with EchoServer(mangle=True) as server:
        result = echo.run_echo(LOOPBACK, port=server.port, duration_s=0.1, drain_ms=20)
    assert result.invalid == result.sent > 0
    assert result.summary().replies == 0
    assert result.summary().lost == result.sent


def test_echo_counts_duplicates_once() -> None:
    with EchoServer(copies=2) as server:
        result = echo.run_echo(LOOPBACK, port=server.port, duration_s=0.1, drain_ms=20)
    assert result.sent > 0
    assert result.duplicates == result.sent
    assert result.summary().replies == result.sent
    assert result.summary().lost == 0


class StallingStop:
    """A stop flag that never stops, but holds the prober up once, 50 ms long, on its
    100th look: a stand-in for the prober being descheduled."""

    def __init__(self) -> None:
        self.calls = 0

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls == 100:
            time.sleep(0.05)
        return False


def test_echo_skips_missed_slots_instead_of_bursting() -> None:
    with EchoServer() as server:
        result = echo.run_echo(
            LOOPBACK, port=server.port, duration_s=0.3, stop=StallingStop(), drain_ms=20
        )
    s = result.summary()
    # The stall shows as skipped slots and as the prober's own send gap, not as a burst
    # of late probes that would hide it from the reply timeline.
    assert result.skipped_slots >= 45
    assert s.max_send_gap_ms >= 50
    assert s.downtime_ms is not None
    assert s.downtime_ms >= 45
    assert result.sent + result.skipped_slots == 300
    # A burst would send some 50 probes back to back after the stall.
    back_to_back = echo.send_intervals_ns(result) < 0.1 * NS_PER_MS
    assert back_to_back.sum() < 10


def test_echo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        echo.run_echo(LOOPBACK, port=7)  # neither duration nor stop: would never end
    with pytest.raises(ValueError):
        echo.run_echo(LOOPBACK, port=7, duration_s=1, interval_ms=0)
    with pytest.raises(echo.ProbeTargetError):
        echo.run_echo("no-such-host.invalid", port=7, duration_s=0.1)


# --- game ----------------------------------------------------------------------------


def test_game_codec() -> None:
    assert game.encode_join(7) == b"LMGC\x00\x00\x00\x07"
    data = SNAPSHOT.pack(b"LMGS", 7, 42, 123, 2) + bytes(32)
    assert game.parse_snapshot(data) == game.Snapshot(
        client_id=7, tick=42, server_ns=123, entities=2
    )
    for bad in (
        data[:20],  # shorter than the header
        b"XXXX" + data[4:],  # wrong magic
        data + bytes(16),  # more entities than announced
        data[:-1],  # fewer
        SNAPSHOT.pack(b"LMGS", 7, 1, 1, 100) + bytes(1600),  # over 1400 bytes
    ):
        with pytest.raises(game.SnapshotError):
            game.parse_snapshot(bad)


def test_game_players_receive_ticks() -> None:
    with GameServer(hz=20) as server:
        result = game.run_game(LOOPBACK, port=server.port, players=3, duration_s=1.0)
    assert server.bad == 0
    assert [p.client_id for p in result.players] == [1, 2, 3]
    for player in result.players:
        assert player.joins_sent == 1  # at the start; the next one is due after 1 s
        assert 12 <= player.arrivals_ns.size <= 22
        assert player.lost_ticks == 0
        spread = player.interarrival()
        assert spread is not None
        assert 35 <= spread.median_ms <= 65
        assert player.invalid == 0
    summary = result.summary()
    assert summary["players_served"] == 3
    assert summary["max_gap_ms"] < 200


def test_game_measures_a_pause_and_keeps_joining() -> None:
    with GameServer(hz=20, pause_after_s=0.3, pause_s=0.2) as server:
        result = game.run_game(
            LOOPBACK, port=server.port, players=2, duration_s=1.2, join_interval_s=0.5
        )
    summary = result.summary()
    assert 190 <= summary["max_gap_ms"] <= 400
    for player in result.players:
        assert player.joins_sent == 3  # at 0, 0.5 and 1.0 s
        assert player.lost_ticks >= 3  # ticks went on while nothing was sent
    data = json.loads(json.dumps(result.to_json()))
    assert data["probe"] == "game"
    assert len(data["players"]) == 2
    first = data["players"][0]
    assert len(first["arrivals_ns"]) == len(first["ticks"]) == first["snapshots"]
    assert first["interarrival"]["max_ms"] >= 190


def test_game_ignores_snapshots_for_someone_else() -> None:
    with GameServer(id_offset=1000) as server:
        result = game.run_game(LOOPBACK, port=server.port, players=1, duration_s=0.3)
    player = result.players[0]
    assert player.arrivals_ns.size == 0
    assert player.invalid >= 3


def test_game_counts_refusals_without_crashing() -> None:
    result = game.run_game(
        LOOPBACK,
        port=free_port(socket.SOCK_DGRAM),
        players=2,
        duration_s=0.3,
        join_interval_s=0.05,
    )
    assert all(p.errors.get("refused", 0) > 0 for p in result.players)
    assert result.summary()["max_gap_ms"] is None
    assert result.summary()["silent_at_end_ms"] >= 250
    data = json.loads(json.dumps(result.to_json()))
    assert all(p["interarrival"] is None for p in data["players"])


# --- http ----------------------------------------------------------------------------


def test_http_codec() -> None:
    assert http_probe.parse_mix("/file.bin:0.7,/cgi-bin/dyn?kb=16:0.3") == (
        http_probe.WeightedPath("/file.bin", 0.7),
        http_probe.WeightedPath("/cgi-bin/dyn?kb=16", 0.3),
    )
    assert http_probe.parse_mix("/a:0.95, POST /cgi-bin/post:0.05") == (
        http_probe.WeightedPath("/a", 0.95),
        http_probe.WeightedPath("/cgi-bin/post", 0.05, method="POST"),
    )
    for bad_mix in ("/a", "/a:0", "/a:-1", "a:1", "/a b:1", "/a:x", "PUT /a:1", "post /a:1",
                    "POST  /a:1"):
        with pytest.raises(ValueError):
            http_probe.parse_mix(bad_mix)
    target = http_probe.parse_url("http://10.0.0.2:8080/x?y=1")
    assert (target.host, target.port, target.path) == ("10.0.0.2", 8080, "/x?y=1")
    assert target.host_header == "10.0.0.2:8080"
    assert http_probe.parse_url("http://vm/").host_header == "vm"
    with pytest.raises(ValueError):
        http_probe.parse_url("https://vm/")
    assert http_probe.build_request("/x", "vm") == (
        b"GET /x HTTP/1.0\r\nHost: vm\r\nUser-Agent: livemig-probe\r\nAccept: */*\r\n\r\n"
    )
    post = http_probe.build_request("/p", "vm", "POST")
    head, _, body = post.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /p HTTP/1.0\r\n")
    assert f"Content-Length: {len(body)}".encode() in head and body == http_probe.POST_FORM
    with pytest.raises(ValueError):
        http_probe.build_request("/p", "vm", "DELETE")

    head = http_probe.parse_response_head(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\n")
    assert head == http_probe.ResponseHead(status=200, content_length=12)
    head = http_probe.parse_response_head(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n")
    assert head.content_length is None
    head = http_probe.parse_response_head(b"HTTP/1.0 404 Not Found\nContent-Length: 3\n\n")
    assert head == http_probe.ResponseHead(status=404, content_length=3)
    for bad in (
        b"HTTP/1.0 200 OK\r\n",  # no empty line
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nServer: x\r\n\r\n",  # a blank line inside
        b"\r\n",
    ):
        with pytest.raises(http_probe.ResponseError) as info:
            http_probe.parse_response_head(bad)
        assert info.value.kind == "protocol"


def test_http_load_posts_forms_where_the_mix_says(http_server: TestHttpServer) -> None:
    result = http_probe.run_http_blocking(
        http_server.url_base + "/ignored", clients=2, duration_s=0.5,
        mix=http_probe.parse_mix("/file.bin:0.5,POST /cgi-bin/post:0.5"), seed=3)
    assert result.errors() == {}
    by_path = result.summary()["requests_by_path"]
    assert by_path["POST /cgi-bin/post"] > 0 and by_path["/file.bin"] > 0
    # Every completed POST delivered the whole form (a stopped client may post one more).
    assert set(http_server.posted) == {http_probe.POST_FORM}
    assert by_path["POST /cgi-bin/post"] <= len(http_server.posted)


def test_http_clients_think_between_requests(http_server: TestHttpServer) -> None:
    result = http_probe.run_http_blocking(
        http_server.url_base + "/file.bin", clients=2, duration_s=0.6, think_s=0.1)
    assert result.errors() == {}
    # Each client: a request, 100 ms of thought, the next: at most 6 each in 0.6 s.
    assert 2 <= result.summary()["requests"] <= 12
    starts = sorted(result.done_ns - result.latency_ns)
    assert sum(1 for a, b in itertools.pairwise(starts) if b - a < 0.02e9) <= 6


def test_http_load_with_a_mix(http_server: TestHttpServer) -> None:
    result = http_probe.run_http_blocking(
        http_server.url_base + "/ignored",
        clients=4,
        duration_s=0.8,
        mix=http_probe.parse_mix("/file.bin:0.5,/cgi-bin/dyn?kb=5:0.5"),
        seed=1,
    )
    s = result.summary()
    assert result.errors() == {}
    assert s["requests"] >= 20
    by_path = s["requests_by_path"]
    assert by_path["/file.bin"] > 0
    assert by_path["/cgi-bin/dyn?kb=5"] > 0
    # Content-Length bodies and read-to-EOF bodies are both read whole.
    assert (
        s["bytes"] == by_path["/file.bin"] * FILE_BYTES + by_path["/cgi-bin/dyn?kb=5"] * DYN_BYTES
    )
    data = json.loads(json.dumps(result.to_json()))
    buckets = data["buckets"]
    assert buckets["width_ms"] == 100
    assert len(buckets["requests"]) == len(buckets["bytes"]) == len(buckets["errors"]) in (8, 9)
    assert sum(buckets["requests"]) == s["requests"]
    assert sum(buckets["bytes"]) == s["bytes"]
    assert data["paths"] == [
        {"path": "/file.bin", "weight": 0.5, "method": "GET"},
        {"path": "/cgi-bin/dyn?kb=5", "weight": 0.5, "method": "GET"},
    ]
    assert len(data["completions"]) == s["requests"]
    assert data["summary"]["requests_per_s"] > 0
    assert data["summary"]["mb_per_s"] > 0


def test_http_pause_is_a_dip_not_a_crash(http_server: TestHttpServer) -> None:
    stop = threading.Event()
    results: list[http_probe.HttpResult] = []
    worker = threading.Thread(
        target=lambda: results.append(
            http_probe.run_http_blocking(
                http_server.url_base + "/file.bin", clients=2, stop=stop, timeout_s=2.0
            )
        )
    )
    worker.start()
    try:
        time.sleep(0.4)
        pause_start_ns = time.monotonic_ns()
        http_server.paused_until_ns = pause_start_ns + 300 * NS_PER_MS
        time.sleep(0.6)
    finally:
        stop.set()
        worker.join(timeout=5)
    assert not worker.is_alive()
    result = results[0]
    impact = result.service_impact(
        pause_start_ns + 20 * NS_PER_MS, pause_start_ns + 280 * NS_PER_MS
    )
    assert impact.ratio is not None
    assert impact.ratio < 0.2
    assert result.errors() == {}
    # Service came back after the pause.
    assert (result.done_ns > pause_start_ns + 300 * NS_PER_MS).sum() > 5


def test_http_counts_errors_by_kind(http_server: TestHttpServer) -> None:
    refused = http_probe.run_http_blocking(
        f"http://{LOOPBACK}:{free_port(socket.SOCK_STREAM)}/", clients=2, duration_s=0.2
    )
    assert refused.summary()["requests"] == 0
    assert refused.errors().get("refused", 0) >= 2

    missing = http_probe.run_http_blocking(
        http_server.url_base + "/missing", clients=1, duration_s=0.2
    )
    assert missing.errors().get("http_404", 0) >= 1
    assert missing.to_json()["buckets"]["errors"][0] >= 1

    # A server that accepts (the kernel does, from the backlog) but never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        hung = http_probe.run_http_blocking(
            f"http://{LOOPBACK}:{port}/", clients=2, duration_s=0.6, timeout_s=0.2
        )
    assert hung.errors().get("timeout", 0) >= 2
    assert hung.summary()["requests"] == 0


# --- CLI -----------------------------------------------------------------------------


def test_cli_echo_writes_json_atomically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "echo.json"
    with EchoServer() as server:
        args = probe_args(
            [
                "probe",
                "echo",
                LOOPBACK,
                "--port",
                str(server.port),
                "--duration",
                "0.3",
                "-o",
                str(out),
            ]
        )
        assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["probe"] == "echo"
    assert data["sent"] > 200
    assert data["summary"]["lost"] == 0
    assert os.listdir(out.parent) == ["echo.json"]  # no temporary file left behind
    line = capsys.readouterr().out
    assert line.startswith("echo ")
    assert line.count("\n") == 1


def test_cli_http_and_game_write_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], http_server: TestHttpServer
) -> None:
    args = probe_args(
        [
            "probe",
            "http",
            http_server.url_base + "/file.bin",
            "--clients",
            "2",
            "--duration",
            "0.3",
            "--mix",
            "/file.bin:1,/cgi-bin/dyn:1",
            "-o",
            str(tmp_path / "http.json"),
        ]
    )
    assert args.func(args) == 0
    data = json.loads((tmp_path / "http.json").read_text())
    assert data["clients"] == 2
    assert data["summary"]["requests"] > 0
    assert data["errors"] == {}

    with GameServer() as server:
        args = probe_args(
            [
                "probe",
                "game",
                LOOPBACK,
                "--port",
                str(server.port),
                "--players",
                "2",
                "--duration",
                "0.3",
                "-o",
                str(tmp_path / "game.json"),
            ]
        )
        assert args.func(args) == 0
    data = json.loads((tmp_path / "game.json").read_text())
    assert [p["id"] for p in data["players"]] == [1, 2]
    assert all(p["snapshots"] > 0 for p in data["players"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["http", "game"]


def test_cli_without_output_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    with EchoServer() as server:
        args = probe_args(
            ["probe", "echo", LOOPBACK, "--port", str(server.port), "--duration", "0.1"]
        )
        assert args.func(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["probe"] == "echo"
    assert captured.err.startswith("echo ")


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["probe", "echo", LOOPBACK, "--interval-ms", "0"],
        ["probe", "http", "ftp://x/"],
        ["probe", "http", "http://x/", "--mix", "/a:zero"],
        ["probe", "game", LOOPBACK, "--players", "0"],
    ):
        with pytest.raises(SystemExit) as info:
            probe_args(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_cli_unknown_host_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    args = probe_args(["probe", "echo", "no-such-host.invalid", "--duration", "0.1"])
    assert args.func(args) == 2
    assert "no-such-host.invalid" in capsys.readouterr().err


def test_cli_process_stops_on_sigterm_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "echo.json"
    with EchoServer() as server:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "livemig.probes.cli",
                "probe",
                "echo",
                LOOPBACK,
                "--port",
                str(server.port),
                "-o",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # The first probe arrives after the handlers are in place.
            assert server.first_seen.wait(timeout=10)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    assert stdout.startswith("echo ")
    data = json.loads(out.read_text())
    assert data["sent"] > 100
    assert data["summary"]["lost"] == 0
