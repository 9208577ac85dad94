"""QEMU's device-state stream, tunnelled through the daemons' authenticated channel.

As libvirt's tunnelled migration does, no QEMU listens on the network: each QEMU gets
one end of a socket pair from its own daemon (QMP ``getfd``, SCM_RIGHTS), and migrates
with ``uri=fd:NAME``. The source daemon reads what its QEMU writes and sends it as
``DeviceState`` frames inside the mutual-TLS channel; the destination daemon writes those
into its QEMU's socket. Nobody else can reach either QEMU: there is no port and no path,
only a descriptor that the daemon handed over.

    source QEMU --fd--> StateSource ==DeviceState frames (TLS)==> StateSink --fd--> dest QEMU

Both ends are set up at reservation, so the stop window pays only for moving the bytes.
The pair's buffers are sized to hold the whole stream (x-ignore-shared leaves ~600 KB of
CPU and device state), so QEMU never waits for the daemon to drain them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Final

from livemig.errors import LivemigError
from livemig.vm.handle import MigratableVM
from livemig.wire import frames
from livemig.wire.channel import Channel

SOURCE_FDNAME: Final = "livemig-state-out"
SINK_FDNAME: Final = "livemig-state-in"
SOCKET_BUFFER_BYTES: Final = 4 << 20
# Linux's <asm/socket.h>; Python's socket module does not name them.
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33


class TunnelError(LivemigError):
    """The device-state stream could not be moved between QEMU and its daemon."""


def _grow_buffers(sock: socket.socket) -> None:
    """Room for the whole stream: root may exceed net.core.[rw]mem_max (FORCE); anyone
    else gets what the kernel allows, which only means more round trips."""
    for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF),
                         (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)


async def _socket_for(vm: MigratableVM, fdname: str) -> socket.socket:
    """A socket pair whose other end ``vm``'s QEMU now holds as ``fdname``; ours is
    returned, non-blocking. Our copy of QEMU's end is closed at once: kept open, it would
    hide QEMU's end of stream from us."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for sock in (ours, theirs):
            _grow_buffers(sock)
        await vm.pass_fd(theirs.fileno(), fdname)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return ours


class StateSource:
    """The source's end: forwards what its QEMU migrates to ``uri`` as DeviceState
    frames, then one with ``last`` set once QEMU has closed its end."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pump: asyncio.Task[int] | None = None

    @classmethod
    async def open(cls, vm: MigratableVM) -> StateSource:
        return cls(await _socket_for(vm, SOURCE_FDNAME))

    @property
    def uri(self) -> str:
        return f"fd:{SOURCE_FDNAME}"

    def start(self, channel: Channel) -> None:
        """Start forwarding to ``channel``; call before QMP ``migrate``."""
        self._pump = asyncio.get_running_loop().create_task(self._forward(channel))

    async def _forward(self, channel: Channel) -> int:
        loop = asyncio.get_running_loop()
        buf = bytearray(frames.MAX_STATE_CHUNK)
        total = 0
        while True:
            try:
                n = await loop.sock_recv_into(self._sock, buf)
            except OSError as exc:
                raise TunnelError(f"reading QEMU's device state failed: {exc}") from exc
            if not n:
                break
            await channel.send(frames.DeviceState(bytes(buf[:n])))
            total += n
        await channel.send(frames.DeviceState(b"", last=True))
        return total

    @property
    def pump(self) -> asyncio.Task[int] | None:
        """The forwarding, once started: wait on it beside QEMU, which would otherwise
        wait on a full socket for ever if the forwarding failed."""
        return self._pump

    async def finished(self, timeout: float) -> int:
        """Wait until every byte and the end mark are on the channel; the bytes moved."""
        if self._pump is None:
            raise TunnelError("the device-state tunnel was never started")
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._pump)
        except TimeoutError as exc:
            raise TunnelError(f"QEMU's device state did not end within {timeout:g} s") from exc

    async def close(self) -> None:
        """Stop forwarding (what was sent stays sent) and close our end."""
        if self._pump is not None:
            if not self._pump.done():
                self._pump.cancel()
                await asyncio.wait([self._pump])  # the pump's cancellation, not ours
            if not self._pump.cancelled():
                # Seen by check() or finished(), or moot once the migration is given up:
                # taken here so that asyncio does not log it as never retrieved.
                self._pump.exception()
        self._sock.close()


class StateSink:
    """The destination's end: writes DeviceState frames into its QEMU, which waits in
    ``migrate-incoming uri``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.ended = False
        self.bytes = 0

    @classmethod
    async def open(cls, vm: MigratableVM) -> StateSink:
        return cls(await _socket_for(vm, SINK_FDNAME))

    @property
    def uri(self) -> str:
        return f"fd:{SINK_FDNAME}"

    async def write(self, chunk: frames.DeviceState) -> None:
        if self.ended:
            raise TunnelError("device state arrived after its end")
        try:
            if chunk.data:
                await asyncio.get_running_loop().sock_sendall(self._sock, chunk.data)
                self.bytes += len(chunk.data)
            if chunk.last:
                self.ended = True
                self._sock.shutdown(socket.SHUT_WR)  # QEMU sees the end of the stream
        except OSError as exc:
            raise TunnelError(f"QEMU stopped taking its device state: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
