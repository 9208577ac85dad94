"""The local control protocol between the CLI and its host's daemon: JSON lines.

One request line, then reply lines: any number of ``Progress``, then one last reply.
The messages, and their version, are declared in ``wire.messages``::

    {"op": "migrate", "vm": "v1", "to": "hostB", "options": {...}, "v": 1}
    {"type": "progress", ...}*  then  {"type": "result", "report": {...}}
                                or    {"type": "error", "message": ..., ...}

The socket is root-only (mode 0600 in a root-only directory): whoever can talk to it can
move VMs.

A migration may be silent for long (held for a drill, or asking a silent target where its
VM runs), so silence alone proves nothing. After ``LIVENESS_CHECK_S`` without a line the
client asks the daemon, on a connection of its own, whether it still answers (``ping``);
a daemon that does not answer within ``PING_TIMEOUT_S`` ends the wait with
``DaemonHung``, instead of the caller waiting for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from livemig import config, paths
from livemig.daemon import remote
from livemig.errors import LivemigError
from livemig.wire import messages
from livemig.wire.messages import ControlReply, ControlRequest, Failed, Migrate, Progress

MAX_LINE_BYTES = 1 << 20
PEER_PORT = 7477
LIVENESS_CHECK_S = 10.0  # no reply line for this long: does the daemon still answer?
PING_TIMEOUT_S = 10.0  # generous: a loaded 2-core machine, a daemon busy with pages


def socket_path(host: str) -> Path:
    return paths.host_dir(host) / "livemigd.sock"


def key_file() -> Path:
    """The lab's shared peer key (HMAC), of which each of its hosts gets a copy."""
    return paths.run_dir() / "peer.key"


class DaemonUnavailable(LivemigError):
    def __init__(self, host: str, why: str) -> None:
        super().__init__(f"the livemig daemon of {host} does not answer ({why}); is it "
                         f"running? ('systemctl status livemigd' there)")
        self.host = host


class DaemonHung(DaemonUnavailable):
    """The daemon's process holds its socket but does not answer a ping: its event loop
    is blocked, or the process is stopped."""

    def __init__(self, host: str, why: str) -> None:
        LivemigError.__init__(self, f"the livemig daemon of {host} hangs ({why}); "
                                    f"{socket_path(host).parent / 'livemigd.log'} may say why")
        self.host = host


async def call(host: str, request: ControlRequest, *, check_liveness: bool = True,
               ) -> AsyncGenerator[ControlReply, None]:
    """Send one request to ``host``'s daemon and yield its replies until the last: on
    its socket if this process sees ``host``'s files (its own host, or a lab's hosts
    from outside), else over the peers' channel with this host's keys.
    With ``check_liveness``, after ``LIVENESS_CHECK_S`` without a reply line the daemon
    must answer a ping, or DaemonHung is raised."""
    own = config.current()
    if own is not None and host != own.name:
        replies = remote.call(own, remote.read_key(own.peer_key), remote.client_context(own),
                              host, request)
        async with contextlib.aclosing(replies):
            async for reply in replies:
                yield reply
        return
    try:
        reader, writer = await asyncio.open_unix_connection(
            str(socket_path(host)), limit=MAX_LINE_BYTES
        )
    except OSError as exc:
        raise DaemonUnavailable(host, exc.strerror or str(exc)) from exc
    try:
        writer.write(messages.encode_control(request))
        await writer.drain()
        while line := await _next_line(host, reader, check_liveness):
            reply = messages.decode_control_reply(line)
            yield reply
            if not isinstance(reply, messages.Interim):
                return
        raise DaemonUnavailable(host, "it closed the connection mid-request")
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the daemon went away; nothing left to flush
            await writer.wait_closed()


async def _next_line(host: str, reader: asyncio.StreamReader, check_liveness: bool) -> bytes:
    """The next line, however long it takes, as long as the daemon answers pings."""
    while True:
        try:
            # A timed-out readline() consumed nothing: the line, when it comes, is whole.
            async with asyncio.timeout(LIVENESS_CHECK_S if check_liveness else None):
                return await reader.readline()
        except TimeoutError:
            await ping(host)


async def ping(host: str, timeout: float | None = None) -> messages.Pong:
    """The daemon's answer to a ping on a fresh connection; DaemonHung if none comes
    within ``timeout`` seconds (default ``PING_TIMEOUT_S``), DaemonUnavailable if
    nothing listens."""
    timeout = PING_TIMEOUT_S if timeout is None else timeout
    try:
        async with asyncio.timeout(timeout):
            async with contextlib.aclosing(call(host, messages.Ping(),
                                                check_liveness=False)) as replies:
                async for reply in replies:
                    if isinstance(reply, messages.Pong):
                        return reply
                    raise UnexpectedReply(host, messages.Ping(), reply)
    except TimeoutError:
        raise DaemonHung(host, f"it did not answer a ping within {timeout:g} s") from None
    raise DaemonUnavailable(host, "it sent no reply to a ping")


class MigrationFailed(LivemigError):
    """The daemon reported a failed migration; ``vm_runs_on`` says where the VM is now."""

    def __init__(self, reply: Failed) -> None:
        super().__init__(reply.message)
        self.stage = reply.stage
        self.vm_runs_on = reply.vm_runs_on


class UnexpectedReply(LivemigError):
    """The daemon answered with a reply that does not belong to the request."""

    def __init__(self, host: str, request: ControlRequest, reply: ControlReply) -> None:
        super().__init__(f"{host}'s daemon answered {type(request).__name__} with "
                         f"{type(reply).__name__}: run the CLI and the daemons of one release")
        self.host = host


async def request(host: str, message: ControlRequest,
                  expected: type[messages.FinalReply]) -> messages.FinalReply:
    """Send a request that has one reply, ``expected``; a ``Failed`` raises LivemigError."""
    # aclosing: leaving the loop early must close the connection now, not when the
    # generator is collected, perhaps after its event loop has stopped.
    async with contextlib.aclosing(call(host, message)) as replies:
        async for reply in replies:
            if isinstance(reply, expected):
                return reply
            if isinstance(reply, Failed):
                raise LivemigError(reply.message)
            raise UnexpectedReply(host, message, reply)
    raise DaemonUnavailable(host, "it sent no reply")


async def migrate(
    host: str,
    request: Migrate,
    on_progress: Callable[[Progress], None] | None = None,
) -> messages.MigrationReport:
    """Ask ``host``'s daemon to run a migration; returns its report or raises."""
    began = False
    try:
        async with contextlib.aclosing(call(host, request)) as replies:  # as in ``request``
            async for reply in replies:
                began = True
                if isinstance(reply, Progress):
                    if on_progress is not None:
                        on_progress(reply)
                elif isinstance(reply, messages.Migrated):
                    return reply.report
                elif isinstance(reply, Failed):
                    raise MigrationFailed(reply)
                else:
                    raise UnexpectedReply(host, request, reply)
    except DaemonHung as exc:
        vm = request.vm
        raise MigrationFailed(Failed(message=(
            f"{exc}, in the middle of the migration of {vm}; where {vm} runs now is not "
            f"known ('livemig vm list' shows it)"))) from None
    except DaemonUnavailable:
        if not began:
            raise
        vm = request.vm
        raise MigrationFailed(Failed(message=(
            f"{host}'s daemon ended in the middle of the migration of {vm}; restarted, it "
            f"settles it: {vm} runs on {host} again unless {request.to} already "
            f"ran it ('livemig vm list' shows where)"))) from None
    raise DaemonUnavailable(host, "it sent no result")
