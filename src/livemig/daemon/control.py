"""The local control protocol between the CLI and its host's daemon: JSON lines.

One request line, then reply lines: any number of ``Progress``, then one last reply.
The messages, and their version, are declared in ``wire.messages``::

    {"op": "migrate", "vm": "v1", "to": "hostB", "options": {...}, "v": 1}
    {"type": "progress", ...}*  then  {"type": "result", "report": {...}}
                                or    {"type": "error", "message": ..., ...}

The socket is root-only (mode 0600 in a root-only directory): whoever can talk to it can
move VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from livemig import paths
from livemig.errors import LivemigError
from livemig.wire import messages
from livemig.wire.messages import ControlReply, ControlRequest, Failed, Migrate, Progress

MAX_LINE_BYTES = 1 << 20
PEER_PORT = 7477


def socket_path(host: str) -> Path:
    return paths.host_dir(host) / "livemigd.sock"


def key_file() -> Path:
    """The test bed's shared peer key (HMAC); real hosts would each hold a copy."""
    return paths.run_dir() / "peer.key"


class DaemonUnavailable(LivemigError):
    def __init__(self, host: str, why: str) -> None:
        super().__init__(f"the livemig daemon of {host} does not answer ({why}); "
                         f"'livemig testbed up' starts it")
        self.host = host


async def call(host: str, request: ControlRequest) -> AsyncGenerator[ControlReply, None]:
    """Send one request to ``host``'s daemon and yield its replies until the last."""
    try:
        reader, writer = await asyncio.open_unix_connection(
            str(socket_path(host)), limit=MAX_LINE_BYTES
        )
    except OSError as exc:
        raise DaemonUnavailable(host, exc.strerror or str(exc)) from exc
    try:
        writer.write(messages.encode_control(request))
        await writer.drain()
        while line := await reader.readline():
            reply = messages.decode_control_reply(line)
            yield reply
            if not isinstance(reply, Progress):
                return
        raise DaemonUnavailable(host, "it closed the connection mid-request")
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the daemon went away; nothing left to flush
            await writer.wait_closed()


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
    except DaemonUnavailable:
        if not began:
            raise
        vm = request.vm
        raise MigrationFailed(Failed(message=(
            f"{host}'s daemon ended in the middle of the migration of {vm}; restarted, it "
            f"settles it: {vm} runs on {host} again unless {request.to} already "
            f"ran it ('livemig vm list' shows where)"))) from None
    raise DaemonUnavailable(host, "it sent no result")
