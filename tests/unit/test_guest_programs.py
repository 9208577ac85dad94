"""The guest's C programs (guest/src), built and run on the host for real.

They are ordinary Linux programs, built static only so that they run in the busybox
initramfs, so the host exercises them over loopback UDP, a pty standing in for the
virtio-serial port, and a scratch directory standing in for /run/lm. The wire formats
are those of docs/guest-protocols.md.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parents[2] / "guest" / "src"
PROGRAMS = ("lm-echo", "lm-game", "lm-mmuncher", "lm-agent")

SNAP_HEADER = struct.Struct("!4sIQQI")
ENTITY = struct.Struct("!Iiii")
JOIN = struct.Struct("!4sI")
MMUNCHER_KEYS = {
    "size_mib",
    "rate_mibps",
    "pages_written",
    "passes",
    "errors",
    "full_verifies",
    "last_full_verify_errors",
    "first_error",
}
PAGE = 4096
MMUNCHER_MAGIC = 0x554D4D4C


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls predicate until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return value


@pytest.fixture(scope="session")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guest-bin")
    done = subprocess.run(
        ["make", "-C", str(SRC), f"OUT={out}"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"guest build failed:\n{done.stdout}\n{done.stderr}")
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@dataclass
class Spawner:
    bin_dir: Path
    run_dir: Path
    log_dir: Path
    procs: list[subprocess.Popen[bytes]]

    def __call__(
        self, program: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts a guest program; its stdout and stderr go to <log_dir>/<program>.*"""
        full_env = {**os.environ, "LM_RUN_DIR": str(self.run_dir), **(env or {})}
        with (
            open(self.log_dir / f"{program}.out", "wb") as out,
            open(self.log_dir / f"{program}.err", "wb") as err,
        ):
            proc = subprocess.Popen(
                [str(self.bin_dir / program), *args], env=full_env, stdout=out, stderr=err
            )
        self.procs.append(proc)
        return proc

    def stdout(self, program: str) -> str:
        return (self.log_dir / f"{program}.out").read_text()


@pytest.fixture
def spawn(bin_dir: Path, run_dir: Path, tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(bin_dir, run_dir, tmp_path, [])
    yield spawner
    for proc in spawner.procs:
        if proc.poll() is None:
            proc.kill()  # by pid: Popen signals only the process it started
        proc.wait(timeout=5)
    for log in sorted(tmp_path.glob("*.err")):
        if text := log.read_text():
            print(f"--- {log.name}\n{text}")


def test_programs_are_static(bin_dir: Path) -> None:
    # The initramfs has no dynamic loader: a PT_INTERP header would mean "not found".
    pt_interp = 3
    for program in PROGRAMS:
        data = (bin_dir / program).read_bytes()
        assert data[:4] == b"\x7fELF"
        phoff = struct.unpack_from("<Q", data, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
        assert pt_interp not in types, program


def test_options_are_checked(bin_dir: Path, run_dir: Path) -> None:
    env = {**os.environ, "LM_RUN_DIR": str(run_dir)}
    for argv in (
        ["lm-echo", "-p", "0"],
        ["lm-echo", "-p", "-1"],
        ["lm-game", "-r", "x"],
        ["lm-game", "-w", "4", "-d", "8"],
        ["lm-mmuncher", "-s", "0"],
        ["lm-mmuncher", "extra"],
    ):
        done = subprocess.run(
            [str(bin_dir / argv[0]), *argv[1:]], env=env, capture_output=True, timeout=5
        )
        assert done.returncode == 2, argv
    assert list(run_dir.iterdir()) == []


def test_echo_round_trips(spawn: Spawner, run_dir: Path) -> None:
    port = free_udp_port()
    spawn("lm-echo", "-p", str(port))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        probe = struct.pack("!QQ", 7, time.monotonic_ns()).ljust(64, b"\0")
        payloads = [probe, b"", b"x", bytes(range(256)) * 5, os.urandom(9000)]
        for payload in payloads:
            # The server may still be binding: retry the first exchange.
            for _ in range(25):
                s.sendto(payload, ("127.0.0.1", port))
                try:
                    data, addr = s.recvfrom(65536)
                    break
                except TimeoutError:
                    continue
            else:
                pytest.fail("no echo")
            assert data == payload
            assert addr == ("127.0.0.1", port)
    # A base service, not a workload: readiness is the workload's to declare.
    assert list(run_dir.iterdir()) == []


def connect_once_listening(port: int, server: subprocess.Popen[bytes]) -> socket.socket:
    """A TCP connection to lm-echo on ``port``, which may still be binding."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail(f"lm-echo does not listen on TCP (exit {server.poll()})")
            time.sleep(0.02)


def test_echo_serves_tcp_connections_too(spawn: Spawner) -> None:
    port = free_udp_port()
    first = connect_once_listening(port, spawn("lm-echo", "-p", str(port)))
    with first, socket.create_connection(("127.0.0.1", port), timeout=1) as second:
        big = os.urandom(200_000)  # more than one read: echoed in pieces, in order
        second.sendall(b"second")
        first.sendall(big)
        got = bytearray()
        while len(got) < len(big):
            got += first.recv(65536)
        assert bytes(got) == big
        assert second.recv(100) == b"second"
    # A closed client leaves the server serving others.
    with socket.create_connection(("127.0.0.1", port), timeout=1) as third:
        third.sendall(b"again")
        assert third.recv(100) == b"again"


def test_echo_outlives_sigpipe(spawn: Spawner) -> None:
    """Echoing to a TCP client that reset the connection (a probe killed, a flow cut by
    a migration) raises SIGPIPE. Once, that ended lm-echo, and every later probe of the
    benchmark was refused ("connection refused", 3 runs of 200)."""
    port = free_udp_port()
    echo = spawn("lm-echo", "-p", str(port))
    time.sleep(0.2)  # past its start: the disposition is set before it serves
    os.kill(echo.pid, signal.SIGPIPE)
    with connect_once_listening(port, echo) as client:
        client.sendall(b"still here")
        assert client.recv(100) == b"still here"
    assert echo.poll() is None


class GameClient:
    def __init__(self, port: int, client_id: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.server = ("127.0.0.1", port)
        self.client_id = client_id

    def join(self) -> None:
        self.sock.sendto(JOIN.pack(b"LMGC", self.client_id), self.server)

    def receive(self, duration: float) -> list[bytes]:
        """Everything that arrives within duration seconds."""
        got = []
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.sock], [], [], left)[0]:
                got.append(self.sock.recv(65536))
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def game_clients() -> Iterator[Callable[[int, int], GameClient]]:
    made: list[GameClient] = []

    def make(port: int, client_id: int) -> GameClient:
        made.append(GameClient(port, client_id))
        return made[-1]

    yield make
    for client in made:
        client.close()


def test_game_sends_snapshots_at_tick_rate(
    spawn: Spawner, run_dir: Path, game_clients: Callable[[int, int], GameClient]
) -> None:
    port = free_udp_port()
    proc = spawn("lm-game", "-p", str(port), "-r", "20", "-w", "256", "-d", "16")
    wait_for((run_dir / "ready").exists, 5, "game ready")
    assert (run_dir / "game.pid").read_text().strip() == str(proc.pid)

    client = game_clients(port, 0xDEADBEEF)
    junk = game_clients(port, 0)
    client.join()
    junk.sock.sendto(b"LMGC\0\0\0\1x", junk.server)  # one byte too long
    junk.sock.sendto(b"LMGX\0\0\0\1", junk.server)
    junk.sock.sendto(b"LMG", junk.server)
    snapshots = client.receive(1.0)

    assert 15 <= len(snapshots) <= 25, len(snapshots)
    assert junk.receive(0.05) == []
    headers = [SNAP_HEADER.unpack_from(s) for s in snapshots]
    for snap, (magic, client_id, _tick, _ns, count) in zip(snapshots, headers, strict=True):
        assert magic == b"LMGS"
        assert client_id == 0xDEADBEEF
        assert len(snap) == SNAP_HEADER.size + count * ENTITY.size < 1400
        ids = [
            ENTITY.unpack_from(snap, SNAP_HEADER.size + i * ENTITY.size)[0] for i in range(count)
        ]
        assert ids == list(range(count))
    ticks = [h[2] for h in headers]
    times = [h[3] for h in headers]
    assert ticks == sorted(set(ticks))
    assert times == sorted(times)
    # Absolute deadlines: server time per tick is the period, with no accumulated lag.
    hz = (ticks[-1] - ticks[0]) / ((times[-1] - times[0]) / 1e9)
    assert 19 <= hz <= 21, hz
    # Entities move between ticks.
    assert snapshots[0][SNAP_HEADER.size :] != snapshots[-1][SNAP_HEADER.size :]

    stats = wait_for(
        lambda: (s := read_json(run_dir / "stats" / "game.json")) and s["clients"] == 1 and s,
        3,
        "game stats with one client",
    )
    assert set(stats) == {"clients", "tick", "hz", "world_kb"}
    assert (stats["hz"], stats["world_kb"]) == (20, 256)

    proc.terminate()
    assert proc.wait(timeout=5) == 0
    assert not (run_dir / "game.pid").exists()


def test_game_drops_silent_client(
    spawn: Spawner, run_dir: Path, game_clients: Callable[[int, int], GameClient]
) -> None:
    port = free_udp_port()
    spawn("lm-game", "-p", str(port), "-r", "50", "-w", "64", "-d", "4")
    wait_for((run_dir / "ready").exists, 5, "game ready")
    chatty, silent = game_clients(port, 1), game_clients(port, 2)
    chatty.join()
    silent.join()
    joined = time.monotonic()
    # Kept until 5 s of silence...
    while time.monotonic() - joined < 4.5:
        chatty.join()
        assert silent.receive(0.5)
        assert chatty.receive(0.01)
    # ...and dropped soon after.
    while time.monotonic() - joined < 5.6:
        chatty.join()
        silent.receive(0.5)
    assert silent.receive(0.3) == []
    assert chatty.receive(0.3)
    wait_for(
        lambda: (s := read_json(run_dir / "stats" / "game.json")) and s["clients"] == 1,
        2,
        "game stats with one client",
    )


def mmuncher_stats(run_dir: Path) -> dict[str, Any] | None:
    return read_json(run_dir / "stats" / "mmuncher.json")


def wait_full_verify(run_dir: Path, count: int) -> dict[str, Any]:
    stats: dict[str, Any] = wait_for(
        lambda: (s := mmuncher_stats(run_dir)) and s["full_verifies"] >= count and s,
        5,
        f"full verify #{count}",
    )
    return stats


def test_mmuncher_sweeps_and_verifies(spawn: Spawner, run_dir: Path) -> None:
    proc = spawn("lm-mmuncher", "-s", "2")
    wait_for((run_dir / "ready").exists, 5, "mmuncher ready")
    assert (run_dir / "mmuncher.pid").read_text().strip() == str(proc.pid)
    stats = wait_for(lambda: (s := mmuncher_stats(run_dir)) and s["passes"] > 0 and s, 5, "a sweep")
    assert set(stats) == MMUNCHER_KEYS
    assert (stats["size_mib"], stats["rate_mibps"]) == (2, 0)
    assert stats["pages_written"] >= 512
    assert (stats["errors"], stats["first_error"], stats["full_verifies"]) == (0, "", 0)

    for n in (1, 2):
        proc.send_signal(signal.SIGUSR1)
        stats = wait_full_verify(run_dir, n)
        assert stats["full_verifies"] == n
        assert (stats["errors"], stats["last_full_verify_errors"]) == (0, 0)

    proc.terminate()
    assert proc.wait(timeout=5) == 0
    assert not (run_dir / "mmuncher.pid").exists()
    assert "INTEGRITY" not in spawn.stdout("lm-mmuncher")


def test_mmuncher_keeps_to_its_rate(spawn: Spawner, run_dir: Path) -> None:
    spawn("lm-mmuncher", "-s", "1", "-r", "4")
    wait_for((run_dir / "ready").exists, 5, "mmuncher ready")

    def next_stats(previous: dict[str, Any] | None) -> tuple[float, int]:
        stats = wait_for(
            lambda: (s := mmuncher_stats(run_dir)) and s != previous and s, 3, "new stats"
        )
        return time.monotonic(), stats["pages_written"]

    # Timed by when each stats file appears, to within one 20 ms poll.
    t0, pages0 = next_stats(mmuncher_stats(run_dir))
    next_stats(mmuncher_stats(run_dir))
    t2, pages2 = next_stats(mmuncher_stats(run_dir))
    rate = (pages2 - pages0) / (t2 - t0)
    assert 0.9 * 1024 <= rate <= 1.1 * 1024, rate  # 4 MiB/s of 4 KiB pages


def find_region(pid: int, size: int) -> int:
    """Address of mmuncher's region: the anonymous mapping that starts with page 0."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start != size or not fields[1].startswith("rw") or len(fields) > 5:
                continue
            mem.seek(start)
            if struct.unpack("<II", mem.read(8)) == (MMUNCHER_MAGIC, 0):
                return start
    pytest.fail("mmuncher's region not found")


def test_mmuncher_detects_corruption_and_lost_writes(spawn: Spawner, run_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("writing another process's memory through /proc/PID/mem needs root")
    # Slow enough that our writes never race with mmuncher rewriting the same page.
    proc = spawn("lm-mmuncher", "-s", "1", "-r", "4")
    wait_for((run_dir / "ready").exists, 5, "mmuncher ready")
    region = find_region(proc.pid, 1 << 20)

    with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as mem:

        def page(index: int) -> bytes:
            mem.seek(region + index * PAGE)
            return mem.read(PAGE)

        # A flipped payload byte: the checksum must catch it.
        offset = region + 10 * PAGE + 1000
        mem.seek(offset)
        byte = mem.read(1)
        mem.seek(offset)
        mem.write(bytes([byte[0] ^ 0xFF]))

        # An old but self-consistent page put back: only the sequence number can tell.
        old = page(20)
        wait_for(lambda: page(20)[8:16] != old[8:16], 2, "page 20 to be rewritten")
        mem.seek(region + 20 * PAGE)
        mem.write(old)

    proc.send_signal(signal.SIGUSR1)
    stats = wait_full_verify(run_dir, 1)
    # Each fault is found once, by the sweep or by the full pass, then repaired.
    assert stats["errors"] == 2
    assert 0 <= stats["last_full_verify_errors"] <= 2
    assert re.fullmatch(r"page (10|20): .+", stats["first_error"])
    out = spawn.stdout("lm-mmuncher")
    assert "mmuncher: INTEGRITY ERROR page 10: corrupted" in out
    assert "mmuncher: INTEGRITY ERROR page 20: lost write" in out

    proc.send_signal(signal.SIGUSR1)
    stats = wait_full_verify(run_dir, 2)
    assert (stats["errors"], stats["last_full_verify_errors"]) == (2, 0)


class AgentPort:
    """The host's end of a pty that plays the virtio-serial port."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        # Raw before the agent starts, so no byte is ever echoed or translated.
        tty.setraw(self.slave)
        self.slave_path = os.ttyname(self.slave)
        # The slave stays open here too: with no slave open at all, reading the master
        # fails with EIO, which would race with the agent opening it.
        self.pending = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def reply(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                pytest.fail(f"no reply from the agent; got {self.pending!r}")
            self.pending += os.read(self.master, 65536)
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def request(self, line: str, timeout: float = 5.0) -> str:
        self.send(line.encode() + b"\n")
        return self.reply(timeout)

    def hang_up(self) -> None:
        """What the host leaving looks like to the agent."""
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def close(self) -> None:
        self.hang_up()
        os.close(self.slave)


@pytest.fixture
def agent_port() -> Iterator[AgentPort]:
    port = AgentPort()
    yield port
    port.close()


def start_agent(spawn: Spawner, port: AgentPort, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    proc = spawn("lm-agent", "-p", port.slave_path, *args, **kw)
    assert port.request("ping") == "ok pong"
    return proc


def status_of(reply: str) -> dict[str, Any]:
    assert reply.startswith("ok "), reply
    value: dict[str, Any] = json.loads(reply[3:])
    return value


def test_agent_framing(spawn: Spawner, agent_port: AgentPort) -> None:
    start_agent(spawn, agent_port)
    # Split across writes, several in one write, CRLF.
    agent_port.send(b"pi")
    time.sleep(0.05)
    agent_port.send(b"ng\nping\r\nping\n")
    assert [agent_port.reply() for _ in range(3)] == ["ok pong"] * 3
    assert agent_port.request("hello").startswith("err ")
    assert agent_port.request("").startswith("err ")
    assert agent_port.request("ping ").startswith("err ")
    assert agent_port.request("ping 0a1b2c") == "ok pong 0a1b2c"
    assert agent_port.request("ping XYZ").startswith("err ")
    assert agent_port.request("ping\0").startswith("err ")
    assert agent_port.request("x" * 256) == "err unknown request"  # the longest allowed
    assert agent_port.request("x" * 257) == "err line too long"
    assert agent_port.request("ping" * 1000) == "err line too long"
    assert agent_port.request("ping") == "ok pong"


def test_agent_status_and_verify(spawn: Spawner, agent_port: AgentPort, run_dir: Path) -> None:
    start_agent(spawn, agent_port)
    assert agent_port.request("verify") == "err no mmuncher"
    status = status_of(agent_port.request("status"))
    assert status["ready"] is False
    assert status["workload"] == ""
    assert status["stats"] == {}

    (run_dir / "workload").write_text('mm"uncher\n')
    spawn("lm-mmuncher", "-s", "2")
    wait_for((run_dir / "ready").exists, 5, "mmuncher ready")
    (run_dir / "stats" / "broken.json").write_text("not json\n")
    status = status_of(agent_port.request("status"))
    assert status["ready"] is True
    assert status["workload"] == 'mm"uncher'
    assert isinstance(status["uptime_s"], float)
    assert status["uptime_s"] > 0
    assert set(status["stats"]) == {"mmuncher", "broken"}
    assert status["stats"]["broken"] is None
    assert set(status["stats"]["mmuncher"]) == MMUNCHER_KEYS
    before = status["stats"]["mmuncher"]["full_verifies"]

    for n in (1, 2):
        status = status_of(agent_port.request("verify", timeout=12))
        stats = status["stats"]["mmuncher"]
        assert stats["full_verifies"] == before + n
        assert (stats["errors"], stats["last_full_verify_errors"]) == (0, 0)


def test_agent_verify_reports_dead_mmuncher(
    spawn: Spawner, agent_port: AgentPort, run_dir: Path
) -> None:
    start_agent(spawn, agent_port)
    mm = spawn("lm-mmuncher", "-s", "1")
    wait_for((run_dir / "ready").exists, 5, "mmuncher ready")
    mm.kill()
    mm.wait(timeout=5)
    assert (run_dir / "mmuncher.pid").exists()  # SIGKILL leaves it behind
    assert agent_port.request("verify") == "err no mmuncher"


@pytest.fixture
def fake_arping(tmp_path: Path) -> Path:
    """A directory with an `arping` that logs its arguments and exits with the code in
    the file `rc` beside it."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    script = bin_dir / "arping"
    script.write_text(
        '#!/bin/sh\necho "$@" >> "$(dirname "$0")/log"\nexit "$(cat "$(dirname "$0")/rc")"\n'
    )
    script.chmod(0o755)
    (bin_dir / "rc").write_text("0\n")
    return bin_dir


def test_agent_announce(
    spawn: Spawner, agent_port: AgentPort, run_dir: Path, fake_arping: Path
) -> None:
    env = {"PATH": f"{fake_arping}:/usr/bin:/bin"}
    start_agent(spawn, agent_port, "-i", "test0", env=env)
    assert agent_port.request("announce").startswith("err arping failed")  # no ip file
    (run_dir / "ip").write_text("10.0.0.5; reboot\n")
    assert agent_port.request("announce").startswith("err arping failed")
    assert not (fake_arping / "log").exists()

    (run_dir / "ip").write_text("10.0.0.5\n")
    assert agent_port.request("announce") == "ok announced"
    assert (fake_arping / "log").read_text().splitlines() == [
        "-q -U -c 1 -I test0 10.0.0.5",
        "-q -A -c 1 -I test0 10.0.0.5",
    ]
    (fake_arping / "rc").write_text("1\n")
    assert agent_port.request("announce").startswith("err arping failed")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_agent_idles_without_host(spawn: Spawner, agent_port: AgentPort) -> None:
    proc = start_agent(spawn, agent_port)
    agent_port.hang_up()  # reads now fail at once
    time.sleep(0.2)
    before = cpu_seconds(proc.pid)
    time.sleep(1.0)
    assert proc.poll() is None
    assert cpu_seconds(proc.pid) - before < 0.2
