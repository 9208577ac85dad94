"""The local control protocol between the CLI and its host's daemon: JSON lines.

Request, one line:  {"op": "migrate", "vm": "v1", "to": "hostB", ...}
                    {"op": "cancel", "vm": "v1"}     {"op": "ping"}
                    {"op": "memory"}  (where the daemon's memory is: daemon.memstats)
Replies, lines:     {"type": "progress", ...}*  then one of
                    {"type": "result", ...}  or  {"type": "error", "message": ..., ...}

The socket is root-only (mode 0600 in a root-only directory): whoever can talk to it can
move VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from livemig import paths
from livemig.errors import LivemigError

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


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LivemigError(f"malformed control message: {exc}") from exc
    if not isinstance(value, dict):
        raise LivemigError("a control message must be a JSON object")
    return value


async def call(host: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Send one request to ``host``'s daemon and yield its replies until the last."""
    try:
        reader, writer = await asyncio.open_unix_connection(
            str(socket_path(host)), limit=MAX_LINE_BYTES
        )
    except OSError as exc:
        raise DaemonUnavailable(host, exc.strerror or str(exc)) from exc
    try:
        writer.write(encode(request))
        await writer.drain()
        while line := await reader.readline():
            reply = decode(line)
            yield reply
            if reply.get("type") != "progress":
                return
        raise DaemonUnavailable(host, "it closed the connection mid-request")
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the daemon went away; nothing left to flush
            await writer.wait_closed()


class MigrationFailed(LivemigError):
    """The daemon reported a failed migration; ``vm_runs_on`` says where the VM is now."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(str(reply.get("message", "the migration failed")))
        self.stage = reply.get("stage")
        self.vm_runs_on = reply.get("vm_runs_on")


async def migrate(
    host: str,
    request: dict[str, Any],
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Ask ``host``'s daemon to run a migration; returns its report or raises."""
    began = False
    try:
        async for reply in call(host, request):
            began = True
            kind = reply.get("type")
            if kind == "progress":
                if on_progress is not None:
                    on_progress(reply)
            elif kind == "result":
                report: dict[str, Any] = reply["report"]
                return report
            else:
                raise MigrationFailed(reply)
    except DaemonUnavailable:
        if not began:
            raise
        vm = request.get("vm")
        raise MigrationFailed({"message": (
            f"{host}'s daemon ended in the middle of the migration of {vm}; restarted, it "
            f"settles it: {vm} runs on {host} again unless {request.get('to')} already "
            f"ran it ('livemig vm list' shows where)")}) from None
    raise DaemonUnavailable(host, "it sent no result")
