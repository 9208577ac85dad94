"""Two channels joined in memory, like trio's memory streams: no socket, same codec.

``channel_pair()`` gives a connected (client, server) pair of real ``Channel`` objects
whose transports hand bytes to each other through the event loop. Everything above the
transport is the production code: the handshake, the frame codec and its limits, flow
control, ``request()``, ``abort()``, ``close()``. So the migration roles can be driven
end to end in a unit test, with no QEMU, no namespace and no port, and a test can also
break the "wire" in the ways a network does: ``sever()`` is a peer that vanished,
``stall()`` a peer that stopped reading.
"""

from __future__ import annotations

import asyncio
from typing import Any

from livemig.wire.channel import Channel, _WireProtocol
from livemig.wire.frames import Connection, Role

# Above this many undelivered bytes the writer is told to pause, as a socket's full send
# buffer would; a paused reader is what makes them pile up.
HIGH_WATER_BYTES = 1 << 20


class MemoryTransport(asyncio.Transport):
    """One end's transport: what it is given goes to the ``peer`` end's protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str) -> None:
        super().__init__()
        self._loop = loop
        self._label = label
        self.protocol: _WireProtocol | None = None  # ours: we feed it what the peer sends
        self.peer: MemoryTransport | None = None
        self._inbox = bytearray()  # sent to us, not yet taken by our protocol
        self._reading = True
        self._closed = False  # our end is closed
        self._peer_closed = False  # the peer's is: end of stream once the inbox is read
        self._lost = False  # our protocol has had connection_lost
        self._writer_paused = False
        self._stalled = False
        self._delivery_pending = False

    # -- asyncio.Transport ----------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self._label, "sockname": self._label}.get(name, default)

    def is_closing(self) -> bool:
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        peer = self.peer
        if self._closed or peer is None or peer._closed:
            return  # as a socket transport does once either end is closed: dropped
        peer._inbox += data
        peer._schedule_delivery()
        if peer.buffered() > HIGH_WATER_BYTES and not self._writer_paused:
            self._writer_paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0 if self.peer is None else self.peer.buffered()

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True
        self._schedule_delivery()

    def is_reading(self) -> bool:
        return self._reading

    def close(self) -> None:
        """Our end closes: our protocol loses the connection at the next turn, and the
        peer reads what we already sent, then end of stream."""
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon(self._lose, None)
        peer = self.peer
        if peer is not None and not peer._closed:
            peer._peer_closed = True
            peer._schedule_delivery()

    def abort(self) -> None:
        self._inbox.clear()
        self.close()

    # -- faults a test can cause ----------------------------------------------------------

    def sever(self) -> None:
        """The cable is cut: nothing more arrives either way, both ends see the loss."""
        for end in (self, self.peer):
            if end is not None and not end._closed:
                end._inbox.clear()
                end._closed = True
                end._loop.call_soon(end._lose, ConnectionResetError("severed"))

    def stall(self) -> None:
        """Our side stops taking what arrives, like a hung process: the sender's writes
        pile up and pause it, and nothing more reaches our protocol, not even the end
        of the stream. Closing our own end still works."""
        self._stalled = True

    # -- delivery -------------------------------------------------------------------------

    def buffered(self) -> int:
        return len(self._inbox)

    def _schedule_delivery(self) -> None:
        if not self._delivery_pending:
            self._delivery_pending = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._delivery_pending = False
        proto = self.protocol
        if proto is None or self._stalled or self._closed:
            return
        while self._inbox and self._reading:
            buf = proto.get_buffer(len(self._inbox))
            n = min(len(buf), len(self._inbox))
            buf[:n] = self._inbox[:n]
            del self._inbox[:n]
            proto.buffer_updated(n)
        sender = self.peer
        if (sender is not None and sender._writer_paused and sender.protocol is not None
                and self.buffered() <= HIGH_WATER_BYTES // 2):
            sender._writer_paused = False
            sender.protocol.resume_writing()
        if self._peer_closed and not self._inbox and not proto.eof_received():
            self.close()  # as asyncio's transports do when eof_received() says so

    def _lose(self, exc: Exception | None) -> None:
        if not self._lost and self.protocol is not None:
            self._lost = True
            self.protocol.connection_lost(exc)


async def channel_pair(*, key: bytes, client: str = "hostA", server: str = "hostB",
                       server_key: bytes | None = None,
                       timeout: float = 5.0) -> tuple[Channel, Channel]:
    """A connected (client, server) pair after livemig's own handshake, ``client`` and
    ``server`` being the hosts they say they are. A ``server_key`` other than ``key``
    makes the handshake fail as it would between hosts with different keys."""
    loop = asyncio.get_running_loop()
    ends = []
    for role, me, other, secret in (
            (Role.CLIENT, client, server, key),
            (Role.SERVER, server, client, key if server_key is None else server_key)):
        transport = MemoryTransport(loop, f"memory:{other}")
        protocol = _WireProtocol(Connection(role, secret, me, peer=f"memory:{other}"))
        transport.protocol = protocol
        ends.append((transport, protocol))
    (client_transport, client_proto), (server_transport, server_proto) = ends
    client_transport.peer, server_transport.peer = server_transport, client_transport
    client_proto.connection_made(client_transport)
    server_proto.connection_made(server_transport)
    pair = (Channel(client_proto, f"memory:{server}"), Channel(server_proto, f"memory:{client}"))
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(channel._handshake() for channel in pair))
    except BaseException:
        for channel in pair:
            await channel.close(timeout=0.1)
        raise
    return pair


def transport_of(channel: Channel) -> MemoryTransport:
    """The in-memory transport under one of ``channel_pair()``'s channels."""
    transport = channel._transport
    assert isinstance(transport, MemoryTransport), "not an in-memory channel"
    return transport
