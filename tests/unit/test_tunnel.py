"""The device-state tunnel between two daemons, over a real channel on 127.0.0.1.

Each QEMU is played by the far end of a socket pair: on the source it writes a stream
and closes, as QEMU does when its migration completes; on the destination it reads until
the end of the stream. What arrives must be byte for byte what was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import numpy as np
import pytest
from served import KEY, LOOPBACK, Served, run

from livemig.migration.tunnel import StateSink, StateSource, TunnelError
from livemig.wire.channel import Channel, connect
from livemig.wire.frames import MAX_STATE_CHUNK, DeviceState, PeerLost, Reply, Request


def pair() -> tuple[socket.socket, socket.socket]:
    """(the daemon's end, non-blocking; QEMU's end)."""
    ours, qemu_end = socket.socketpair()
    ours.setblocking(False)
    qemu_end.setblocking(False)
    return ours, qemu_end


async def qemu_writes(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    for start in range(0, len(data), 50_000):  # QEMU writes in pieces, as it goes
        await loop.sock_sendall(sock, data[start:start + 50_000])
    sock.close()


async def qemu_reads(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        got += chunk
    sock.close()
    return bytes(got)


@pytest.mark.parametrize("size", [0, 1, 600_000, 3 * MAX_STATE_CHUNK + 7])
def test_the_stream_arrives_whole_and_ends(size: int) -> None:
    stream = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    received: list[bytes] = []

    async def destination(channel: Channel) -> None:
        ours, qemu_end = pair()
        sink = StateSink(ours)
        reader = asyncio.create_task(qemu_reads(qemu_end))
        try:
            while not sink.ended:
                msg = await channel.recv(timeout=10)
                assert isinstance(msg, DeviceState)
                assert len(msg.data) <= MAX_STATE_CHUNK
                await sink.write(msg)
            received.append(await reader)
            assert sink.bytes == size
            assert isinstance(await channel.recv(timeout=10), Request)  # as "image" asks
            await channel.send(Reply(True, {}))
            with pytest.raises(TunnelError):  # nothing may follow the end
                await sink.write(DeviceState(b"late"))
        finally:
            sink.close()

    async def main() -> None:
        async with Served(destination) as served:
            async with await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel:
                ours, qemu_end = pair()
                source = StateSource(ours)
                try:
                    source.start(channel)
                    await qemu_writes(qemu_end, stream)
                    assert await source.finished(timeout=10) == size
                    assert (await channel.request("image", timeout=10)).ok
                finally:
                    await source.close()
            assert await served.done.get() is None
        assert received == [stream]
    run(main())


def test_a_broken_channel_is_reported_while_qemu_still_writes() -> None:
    """The source waits on the pump beside QEMU (``VM.migration_ended(alongside=)``): a
    dead channel must end that wait, not a time-out after QEMU filled its socket."""

    async def hang_up(channel: Channel) -> None:
        # The state was flowing when we left: returning closes the channel mid-stream.
        assert isinstance(await channel.recv(timeout=5), DeviceState)

    async def qemu_writes(qemu_end: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):  # our end closed when the test is done
            for _ in range(200):
                await loop.sock_sendall(qemu_end, b"x" * 65536)
                await asyncio.sleep(0.01)

    async def main() -> None:
        async with Served(hang_up) as served:
            async with await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel:
                ours, qemu_end = pair()
                source = StateSource(ours)
                writer = asyncio.ensure_future(qemu_writes(qemu_end))
                try:
                    source.start(channel)
                    assert source.pump is not None
                    with pytest.raises((PeerLost, TunnelError)):
                        await asyncio.wait_for(source.pump, timeout=10)
                    assert not writer.done()  # QEMU was still writing: no time-out helped
                finally:
                    writer.cancel()
                    qemu_end.close()
                    await source.close()
            assert await served.done.get() is None
    run(main())


def test_finished_without_an_end_times_out() -> None:
    async def idle(channel: Channel) -> None:
        # QEMU wrote nothing and never ended its stream: no state and no end mark may
        # come, only the source closing the channel once it gave up.
        with pytest.raises(PeerLost):
            await channel.recv(timeout=5)

    async def main() -> None:
        async with Served(idle) as served:
            async with await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel:
                ours, qemu_end = pair()  # QEMU never closes its end
                source = StateSource(ours)
                try:
                    source.start(channel)
                    with pytest.raises(TunnelError):
                        await source.finished(timeout=0.2)
                finally:
                    qemu_end.close()
                    await source.close()
            assert await served.done.get() is None
    run(main())
