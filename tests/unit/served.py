"""A real ``serve()`` server for the unit tests of the channel and of what runs on it.

A handler runs in a task of the server's, which nobody awaits: an assertion there fails
no test by itself. ``Served`` hands each handler's outcome to the test through ``done``,
and the test must take it (``assert await served.done.get() is None``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from livemig.wire.channel import Channel, serve

KEY = b"k" * 32
LOOPBACK = "127.0.0.1"


def run(coro: Coroutine[Any, Any, None], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


class Served:
    """A ``serve()`` server on a free port, with a record of what its handler saw."""

    def __init__(self, handler: Callable[[Channel], Awaitable[None]], *,
                 key: bytes = KEY, ssl_context: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._key = key
        self._ssl = ssl_context
        self.calls = 0
        self.done: asyncio.Queue[BaseException | None] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def _run(self, channel: Channel) -> None:
        self.calls += 1
        try:
            await self._handler(channel)
        except BaseException as exc:  # handed to the test, which decides; then re-raised
            # BaseException: pytest.raises that did not raise, and pytest.fail, raise
            # pytest's Failed, which is not an Exception. put_nowait: never await here,
            # where a cancellation may be on its way out.
            self.done.put_nowait(exc)
            raise
        self.done.put_nowait(None)

    async def __aenter__(self) -> Served:
        self.server = await serve(LOOPBACK, 0, key=self._key, me="hostB", handler=self._run,
                                  ssl=self._ssl, handshake_timeout=2)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
