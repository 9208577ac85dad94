"""The TCP-flow probes against real sockets on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from livemig.probes.tcpflow import run_download, run_tcp_echo


class PausingEchoServer:
    """A TCP echo server that can stop answering for a while, as a paused VM does."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.paused = threading.Event()
        self.reset_now = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.05)
        conn = None
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
                break
            except TimeoutError:
                continue
        if conn is None:
            return
        with conn:
            conn.settimeout(0.01)
            while not self.done.is_set():
                if self.reset_now.is_set():
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    return
                if self.paused.is_set():
                    time.sleep(0.005)
                    continue
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.listener.close()


@pytest.fixture
def echo_server() -> Iterator[PausingEchoServer]:
    server = PausingEchoServer()
    yield server
    server.close()


def test_a_pause_shows_as_the_longest_stall(echo_server: PausingEchoServer) -> None:
    def pause() -> None:
        time.sleep(0.3)
        echo_server.paused.set()
        time.sleep(0.3)
        echo_server.paused.clear()

    pauser = threading.Thread(target=pause)
    pauser.start()
    result = run_tcp_echo("127.0.0.1", port=echo_server.port, duration_s=1.2)
    pauser.join()
    assert result.survived, result.error
    assert result.stall_ms is not None and 280 <= result.stall_ms <= 600
    assert result.echoed >= result.sent - 20
    assert result.sent > 100


def test_a_reset_connection_did_not_survive(echo_server: PausingEchoServer) -> None:
    threading.Timer(0.3, echo_server.reset_now.set).start()
    result = run_tcp_echo("127.0.0.1", port=echo_server.port, duration_s=1.0)
    assert not result.survived
    assert result.error is not None


class SlowFile(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"x" * 300_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_paced_download_arrives_whole_and_takes_its_time() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowFile)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        result = run_download("127.0.0.1", "/f", port=server.server_address[1], rate_kbps=600)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.complete, result
    assert result.received_bytes == result.expected_bytes == 300_000
    assert result.seconds >= 0.4  # 300 kB at 600 kB/s, paced rather than at once
