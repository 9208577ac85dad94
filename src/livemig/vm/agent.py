"""Host side of the guest agent, a line protocol on a virtio-serial port.

See ``docs/guest-protocols.md``. QEMU exposes the port as a Unix socket. It holds what we
write until the guest opens the port, so a request sent while the guest still boots is
answered once the agent starts. Only one request is in flight at a time. A request that
times out closes the connection, but the guest may still deliver its late reply to the
next connection, so that connection first resynchronises: it sends ``ping TOKEN`` with a
fresh token and drops every line before ``ok pong TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

from livemig.errors import AgentError, GuestTimeout

MAX_REPLY_BYTES = 1 << 20


class AgentClient:
    def __init__(self, vm: str, socket_path: Path) -> None:
        self.vm = vm
        self.socket_path = socket_path
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._maybe_stale = False

    async def _connect(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is None:
            self._streams = await asyncio.open_unix_connection(
                str(self.socket_path), limit=MAX_REPLY_BYTES
            )
            if self._maybe_stale:
                reader, writer = self._streams
                token = secrets.token_hex(8).encode()
                writer.write(b"ping " + token + b"\n")
                await writer.drain()
                async with asyncio.timeout(timeout):
                    while (stale := await reader.readline()) != b"ok pong " + token + b"\n":
                        if not stale:
                            raise ConnectionError("the agent closed the connection")
                self._maybe_stale = False
        return self._streams

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):  # the guest side is gone: nothing to flush
                await writer.wait_closed()

    async def request(self, line: str, timeout: float) -> str:
        """Send one request and return the text after ``ok``."""
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await self._connect(timeout)
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    raw = await reader.readline()
            except TimeoutError:
                self._maybe_stale = True
                await self.close()
                raise GuestTimeout(self.vm, f"agent reply to {line!r}", timeout) from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                await self.close()
                raise AgentError(self.vm, line, f"connection failed: {exc}") from exc
        if not raw:
            await self.close()
            raise AgentError(self.vm, line, "the agent closed the connection")
        reply = raw.decode(errors="replace").rstrip("\n")
        status, _, text = reply.partition(" ")
        if status != "ok":
            raise AgentError(self.vm, line, text or reply)
        return text

    async def ping(self, timeout: float = 5.0) -> None:
        await self.request("ping", timeout)

    async def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._json(await self.request("status", timeout), "status")

    async def verify(self, timeout: float = 15.0) -> dict[str, Any]:
        """Ask mmuncher for a full pass over its region; returns the status afterwards."""
        return self._json(await self.request("verify", timeout), "verify")

    async def announce(self, timeout: float = 5.0) -> None:
        await self.request("announce", timeout)

    def _json(self, text: str, request: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AgentError(self.vm, request, f"reply is not JSON: {text[:200]!r}") from exc
        if not isinstance(value, dict):
            raise AgentError(self.vm, request, f"reply is not a JSON object: {text[:200]!r}")
        return value
