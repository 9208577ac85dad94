"""The control protocol end to end on a real Unix socket: the CLI's side
(``daemon.control``) against the daemon's own handler (``Daemon._on_cli``), or against a
scripted daemon where a reply must be one a real daemon would not send."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from test_messages import a_report

from livemig import config
from livemig.daemon import control
from livemig.daemon.server import Daemon
from livemig.errors import LivemigError
from livemig.wire import messages as m

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(autouse=True)
def own_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path))


HOST_A = """
[host]
name = "hostA"
address = "127.0.0.1"
[vms]
network = "10.77.0.0/24"
pool = "10.77.0.64-10.77.0.79"
"""


@asynccontextmanager
async def daemon_socket(host: str, handler: Handler) -> AsyncIterator[None]:
    path = control.socket_path(host)
    path.parent.mkdir(parents=True, exist_ok=True)
    server = await asyncio.start_unix_server(handler, str(path), limit=control.MAX_LINE_BYTES)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def scripted(*lines: bytes) -> Handler:
    """A daemon that reads one request and answers with ``lines``, whatever it was."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        for line in lines:
            writer.write(line)
        await writer.drain()
        writer.close()
    return answer


async def raw_exchange(host: str, line: bytes) -> m.ControlReply:
    reader, writer = await asyncio.open_unix_connection(str(control.socket_path(host)))
    writer.write(line)
    await writer.drain()
    reply = m.decode_control_reply(await reader.readline())
    writer.close()
    return reply


def test_the_daemon_answers_a_ping_with_its_name() -> None:
    async def main() -> None:
        async with daemon_socket("hostA", Daemon(config.parse(HOST_A), b"k" * 32, None)._on_cli):
            assert await control.request("hostA", m.Ping(), m.Pong) == m.Pong(host="hostA")
            figures = await control.request("hostA", m.MemoryQuery(), m.MemoryFigures)
            assert figures.python_blocks > 0
    asyncio.run(main())


@pytest.mark.parametrize("line", [
    b"hello\n",
    b'{"op": "ping"}\n',  # the last release's CLI
    b'{"v": 1, "op": "migrate", "vm": "v1"}\n',
    b'{"v": 1, "op": "cancel", "vm": "v1", "force": true}\n',
])
def test_the_daemon_refuses_a_line_that_does_not_fit_in_a_reply(line: bytes) -> None:
    async def main() -> None:
        async with daemon_socket("hostA", Daemon(config.parse(HOST_A), b"k" * 32, None)._on_cli):
            reply = await raw_exchange("hostA", line)
            assert isinstance(reply, m.Failed), reply
            assert reply.stage is None and "\n" not in reply.message
    asyncio.run(main())


def test_cancelling_what_does_not_run_is_refused() -> None:
    async def main() -> None:
        async with daemon_socket("hostA", Daemon(config.parse(HOST_A), b"k" * 32, None)._on_cli):
            with pytest.raises(LivemigError):
                await control.request("hostA", m.Cancel(vm="v1"), m.Cancelled)
    asyncio.run(main())


def test_a_migration_reports_progress_then_its_typed_report() -> None:
    progress = m.Progress(stage="iterative pre-copy", round=1, pages_left=5, rate_mbps=100.0,
                          dirty_rate_mbps=0.0,
                          bytes_sent=4096, elapsed_s=0.2)
    seen: list[m.Progress] = []

    async def main() -> m.MigrationReport:
        lines = (m.encode_control(progress), m.encode_control(progress),
                 m.encode_control(m.Migrated(report=a_report())))
        async with daemon_socket("hostA", scripted(*lines)):
            return await control.migrate("hostA", m.Migrate(vm="v1", to="hostB"), seen.append)
    assert asyncio.run(main()) == a_report()
    assert seen == [progress, progress]


def test_a_failed_migration_says_where_the_vm_runs() -> None:
    async def main() -> None:
        failed = m.Failed(message="no", stage="reservation", vm_runs_on="hostA")
        async with daemon_socket("hostA", scripted(m.encode_control(failed))):
            with pytest.raises(control.MigrationFailed) as caught:
                await control.migrate("hostA", m.Migrate(vm="v1", to="hostB"))
        assert (caught.value.stage, caught.value.vm_runs_on) == ("reservation", "hostA")
    asyncio.run(main())


def test_a_daemon_of_the_last_release_is_named_as_such() -> None:
    async def main() -> None:
        async with daemon_socket("hostA", scripted(b'{"type": "result", "host": "hostA"}\n')):
            with pytest.raises(m.ControlVersionMismatch) as caught:
                await control.request("hostA", m.Ping(), m.Pong)
        assert caught.value.theirs is None
    asyncio.run(main())


def test_a_reply_to_another_request_is_refused() -> None:
    async def main() -> None:
        async with daemon_socket("hostA", scripted(m.encode_control(m.Cancelled(vm="v1")))):
            with pytest.raises(control.UnexpectedReply):
                await control.request("hostA", m.Ping(), m.Pong)
            with pytest.raises(control.UnexpectedReply):
                await control.migrate("hostA", m.Migrate(vm="v1", to="hostB"))
    asyncio.run(main())


def test_a_request_leaves_nothing_running_on_its_loop() -> None:
    # A caller's loop may stop right after the answer (loop.run_until_complete): the
    # connection must be closed by then, not by a task left to a stopped loop.
    loop = asyncio.new_event_loop()
    try:
        async def serve() -> asyncio.Server:
            path = control.socket_path("hostA")
            path.parent.mkdir(parents=True, exist_ok=True)
            return await asyncio.start_unix_server(
                scripted(m.encode_control(m.Pong(host="hostA"))), str(path))
        server = loop.run_until_complete(serve())
        assert loop.run_until_complete(control.request("hostA", m.Ping(), m.Pong)) == m.Pong(
            host="hostA")
        assert not asyncio.all_tasks(loop)
        server.close()
        loop.run_until_complete(server.wait_closed())
    finally:
        loop.close()


def slow_daemon(*, silent_for_s: float, answers_pings: bool) -> Handler:
    """A daemon whose migration reports progress, then says nothing for
    ``silent_for_s`` (held, say) before its report; its pings are answered or not."""
    progress = m.Progress(stage="iterative pre-copy", round=1, pages_left=5, rate_mbps=1.0,
                          dirty_rate_mbps=0.0,
                          bytes_sent=4096, elapsed_s=0.2)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = m.decode_control_request(await reader.readline())
        try:
            if isinstance(request, m.Ping):
                if not answers_pings:
                    await reader.read()  # nothing comes back, until the client hangs up
                    return
                writer.write(m.encode_control(m.Pong(host="hostA")))
            else:
                writer.write(m.encode_control(progress))
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(), silent_for_s)  # or hung up
                    return
                writer.write(m.encode_control(m.Migrated(report=a_report())))
            await writer.drain()
        finally:
            writer.close()
    return answer


@pytest.fixture
def quick_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "LIVENESS_CHECK_S", 0.2)
    monkeypatch.setattr(control, "PING_TIMEOUT_S", 0.3)


def test_a_silent_daemon_that_answers_pings_is_waited_for(quick_liveness: None) -> None:
    async def main() -> m.MigrationReport:
        async with daemon_socket("hostA", slow_daemon(silent_for_s=1.0, answers_pings=True)):
            return await control.migrate("hostA", m.Migrate(vm="v1", to="hostB"))
    assert asyncio.run(main()) == a_report()


def test_a_hung_daemon_ends_the_wait_with_a_clear_error(quick_liveness: None) -> None:
    async def main() -> None:
        async with daemon_socket("hostA", slow_daemon(silent_for_s=3600, answers_pings=False)):
            with pytest.raises(control.MigrationFailed) as caught:
                await asyncio.wait_for(
                    control.migrate("hostA", m.Migrate(vm="v1", to="hostB")), 5)
            with pytest.raises(control.DaemonHung):
                await control.ping("hostA")
        message = str(caught.value)
        assert "daemon of hostA hangs" in message and "migration of v1" in message, message
        assert caught.value.vm_runs_on is None
    asyncio.run(main())
