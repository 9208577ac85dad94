"""The asyncio channel over real sockets on 127.0.0.1, and the pacer.

Peers that misbehave (close mid-frame, stay silent, forge the handshake) are played by
plain asyncio streams driving a sans-IO Connection, or by nothing at all. Every test
closes what it opens: pytest turns a ResourceWarning into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time

import numpy as np
import pytest
from served import KEY, LOOPBACK, Served, run

from livemig.wire.channel import Channel, Pacer, TokenBucket, connect
from livemig.wire.frames import (
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    AuthenticationError,
    Challenge,
    Connection,
    FrameTooLarge,
    LocalProtocolError,
    Pages,
    PeerAborted,
    PeerLost,
    PeerTimeout,
    PeerUnreachable,
    Reply,
    Request,
    Role,
    VersionMismatch,
    decode,
    encode,
)

OTHER_KEY = b"o" * 32
NONE = np.empty(0, np.uint32)


async def answer_requests(channel: Channel) -> None:
    """A handler: answers every Request with its kind and body, until the peer leaves."""
    while True:
        try:
            msg = await channel.recv(timeout=10)
        except PeerLost:
            return
        if isinstance(msg, Request):
            await channel.send(Reply(True, {"kind": msg.kind, **msg.body}))


# -- the handshake and requests ---------------------------------------------------------


def test_handshake_and_request_reply() -> None:
    async def main() -> None:
        async with Served(answer_requests) as served:
            channel = await connect(LOOPBACK, served.port, key=KEY, me="hostA", timeout=5)
            async with channel:
                assert channel.peer == "hostB"
                for i in range(5):
                    reply = await channel.request("reserve", {"i": i}, timeout=5)
                    assert reply == Reply(True, {"kind": "reserve", "i": i})
            assert await served.done.get() is None
            assert served.calls == 1
    run(main())


def test_server_side_channel_knows_the_client() -> None:
    async def handler(channel: Channel) -> None:
        assert channel.peer == "hostA"
        assert channel.connection.established
        await channel.send(Request("hello-from-server", {}))
        reply = await channel.recv(timeout=5)
        assert reply == Reply(True, {"who": "hostA"})

    async def main() -> None:
        async with (Served(handler) as served,
                    await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel):
                msg = await channel.recv(timeout=5)
                assert msg == Request("hello-from-server", {})
                await channel.send(Reply(True, {"who": "hostA"}))
                assert await served.done.get() is None
    run(main())


def test_pages_round_trip_with_content_check() -> None:
    npages = 8192  # 32 MiB
    rng = np.random.default_rng(5)
    source = rng.integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
    zeros = np.sort(rng.choice(npages, 500, replace=False)).astype(np.uint32)
    source[zeros] = 0
    order = np.setdiff1d(rng.permutation(npages), zeros).astype(np.uint32)
    rng.shuffle(order)
    dest = np.full((npages, PAGE_SIZE), 0xAA, np.uint8)

    async def handler(channel: Channel) -> None:
        channel.connection.npages = npages
        while True:
            msg = await channel.recv(timeout=10)
            if isinstance(msg, Pages):
                dest[msg.indexes] = np.frombuffer(msg.data, np.uint8).reshape(-1, PAGE_SIZE)
                dest[msg.zero_indexes] = 0
            elif isinstance(msg, Request):
                await channel.send(Reply(True, {"blake2b": hashlib.blake2b(dest.data).hexdigest()}))
                return

    async def main() -> None:
        async with (Served(handler) as served,
                    await connect(LOOPBACK, served.port, key=KEY, me="hostA",
                                  npages=npages) as channel):
                await channel.send_pages(Pages(1, NONE, zeros, b""))
                for first in range(0, order.size, 1000):  # frames of various fill
                    idx = order[first:first + 1000]
                    await channel.send_pages(Pages(1, idx, NONE, source[idx].tobytes()))
                reply = await channel.request("done", timeout=10)
                assert await served.done.get() is None
        assert reply.body["blake2b"] == hashlib.blake2b(source.data).hexdigest()
    run(main())


def test_request_answered_by_abort_raises() -> None:
    async def handler(channel: Channel) -> None:
        await channel.recv(timeout=5)
        await channel.abort("hostB: no room for a 256 MiB VM")

    async def main() -> None:
        async with Served(handler) as served:
            async with await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel:
                with pytest.raises(PeerAborted) as info:
                    await channel.request("reserve", {}, timeout=5)
                assert info.value.reason == "hostB: no room for a 256 MiB VM"
                assert info.value.peer == "hostB"
            assert await served.done.get() is None
    run(main())


# -- peers that fail ----------------------------------------------------------------------


async def raw_client_handshake(port: int, key: bytes = KEY) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter, Connection]:
    """A peer built from a plain stream and a sans-IO Connection."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    conn = Connection(Role.CLIENT, key, "hostA", npages=64)
    writer.write(conn.initiate())
    while not conn.established:
        conn.receive_data(await reader.read(4096))
        conn.next_message()
        writer.write(conn.data_to_send())
    return reader, writer, conn


async def close_stream(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):  # the peer reset it first: closed either way
        await writer.wait_closed()


def test_client_closes_mid_frame_server_sees_peer_lost() -> None:
    async def handler(channel: Channel) -> None:
        channel.connection.npages = 64
        await channel.recv(timeout=5)

    async def main() -> None:
        async with Served(handler) as served:
            reader, writer, conn = await raw_client_handshake(served.port)
            pages = Pages(1, np.arange(8, dtype=np.uint32), NONE, bytes(8 * PAGE_SIZE))
            whole = conn.send(pages)
            writer.write(whole[:len(whole) // 2])
            await writer.drain()
            await close_stream(writer)
            err = await served.done.get()
            assert isinstance(err, PeerLost)
            assert err.mid_frame and err.peer == "hostA"
    run(main())


def test_oversized_header_is_refused_without_reading_on() -> None:
    async def handler(channel: Channel) -> None:
        channel.connection.npages = 64
        await channel.recv(timeout=5)

    async def main() -> None:
        async with Served(handler) as served:
            reader, writer, conn = await raw_client_handshake(served.port)
            try:
                header = bytearray(conn.send(Request("x"))[:12])
                header[5] = 7  # Pages
                header[8:12] = (2 << 30).to_bytes(4, "little")  # 2 GiB
                writer.write(bytes(header))
                err = await served.done.get()
                assert isinstance(err, FrameTooLarge) and err.length == 2 << 30
                assert isinstance(decode(await reader.read()), Abort)  # told, then closed
            finally:
                await close_stream(writer)
    run(main())


def test_server_closes_mid_frame_client_sees_peer_lost() -> None:
    async def half_a_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.SERVER, KEY, "hostB")
        while not conn.established:
            conn.receive_data(await reader.read(4096))
            conn.next_message()
            writer.write(conn.data_to_send())
        frame = encode(Request("commit", {"pad": "x" * 100}))
        writer.write(frame[:40])
        await writer.drain()
        await close_stream(writer)

    async def main() -> None:
        server = await asyncio.start_server(half_a_reply, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with await connect(LOOPBACK, port, key=KEY, me="hostA") as channel:
                with pytest.raises(PeerLost) as info:
                    await channel.recv(timeout=5)
                assert info.value.mid_frame and info.value.peer == "hostB"
                with pytest.raises(PeerLost):
                    await channel.send(Request("more"))
        finally:
            server.close()
            await server.wait_closed()
    run(main())


def test_silent_peer_times_out_the_handshake() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept, then say nothing

    async def main() -> None:
        server = await asyncio.start_server(silent, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            started = time.monotonic()
            with pytest.raises(PeerTimeout) as info:
                await connect(LOOPBACK, port, key=KEY, me="hostA", timeout=0.3)
            assert time.monotonic() - started < 2
            assert info.value.peer == f"{LOOPBACK}:{port}" and info.value.seconds == 0.3
        finally:
            for writer in accepted:
                await close_stream(writer)
            server.close()
            await server.wait_closed()
    run(main())


def test_silent_peer_times_out_recv_and_the_channel_goes_on() -> None:
    go = asyncio.Event()

    async def handler(channel: Channel) -> None:
        await go.wait()
        await answer_requests(channel)

    async def main() -> None:
        async with (Served(handler) as served,
                    await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel):
                with pytest.raises(PeerTimeout) as info:
                    await channel.recv(timeout=0.2)
                assert info.value.peer == "hostB"
                go.set()
                reply = await channel.request("ping", timeout=5)
                assert reply.ok
    run(main())


def test_request_timeout_closes_the_channel() -> None:
    async def handler(channel: Channel) -> None:
        try:
            await channel.recv(timeout=5)  # and never answer
            await channel.recv(timeout=5)
        except PeerLost:
            pass

    async def main() -> None:
        async with Served(handler) as served:
            async with await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel:
                with pytest.raises(PeerTimeout):
                    await channel.request("commit", timeout=0.2)
                assert channel.is_closing
                with pytest.raises(LocalProtocolError):
                    await channel.send(Request("again"))
            assert await served.done.get() is None
    run(main())


def test_connect_to_nothing_is_unreachable() -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, LOOPBACK, 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(PeerUnreachable) as info:
            await connect(LOOPBACK, port, key=KEY, me="hostA", timeout=2)
        assert isinstance(info.value, PeerLost)
        assert isinstance(info.value.__cause__, OSError)
    run(main())


# -- authentication over TCP ------------------------------------------------------------


def test_wrong_key_client_is_refused_before_the_handler(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with Served(answer_requests) as served:
            with pytest.raises(AuthenticationError) as info:
                await connect(LOOPBACK, served.port, key=OTHER_KEY, me="hostA", timeout=5)
            assert info.value.peer == "hostB"
            for _ in range(100):  # the server notices the Abort and logs its line
                if caplog.records:
                    break
                await asyncio.sleep(0.01)
            assert served.calls == 0
    with caplog.at_level(logging.WARNING, logger="livemig.wire.channel"):
        run(main())
    assert len(caplog.records) == 1 and "refused" in caplog.records[0].getMessage()


def test_forged_auth_is_refused_before_the_handler(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with Served(answer_requests) as served:
            reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
            try:
                conn = Connection(Role.CLIENT, KEY, "hostA")
                writer.write(conn.initiate())
                head = await reader.readexactly(12)
                challenge = decode(head + await reader.readexactly(
                    int.from_bytes(head[8:12], "little")))
                assert isinstance(challenge, Challenge)
                writer.write(encode(Auth(b"\x00" * 32)) + encode(Request("reserve")))
                rest = await reader.read()  # the server answers with an Abort, then EOF
                assert isinstance(decode(rest), Abort)
            finally:
                await close_stream(writer)
            assert served.calls == 0
    with caplog.at_level(logging.WARNING, logger="livemig.wire.channel"):
        run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not hold our key" in lines[0]


def test_request_before_the_handshake_is_refused() -> None:
    async def main() -> None:
        async with Served(answer_requests) as served:
            reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
            try:
                writer.write(encode(Request("reserve", {"mem_mib": 256})))
                assert isinstance(decode(await reader.read()), Abort)
            finally:
                await close_stream(writer)
            assert served.calls == 0
    run(main())


def test_server_with_another_version_is_refused() -> None:
    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        bad = bytearray(encode(Challenge("hostB", b"\0" * 32, b"\0" * 32)))
        bad[4] = PROTOCOL_VERSION + 1
        writer.write(bytes(bad))
        await reader.read()
        await close_stream(writer)

    async def main() -> None:
        server = await asyncio.start_server(old_server, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(VersionMismatch) as info:
                await connect(LOOPBACK, port, key=KEY, me="hostA", timeout=5)
            assert info.value.theirs == PROTOCOL_VERSION + 1
        finally:
            server.close()
            await server.wait_closed()
    run(main())


# -- pacing -------------------------------------------------------------------------------


def test_token_bucket_exact() -> None:
    rate = 8e6  # bits/s = 1e6 bytes/s; 10 ms of burst = 10_000 bytes
    bucket = TokenBucket(rate, now=0.0)
    now = 0.0
    for _ in range(100):  # 1 MB in pieces of 10 kB, each sent once its wait is over
        now += bucket.charge(10_000, now)
    assert now == pytest.approx(0.99, abs=1e-9)  # the first 10 kB rode on the burst
    assert bucket.charge(0, now) == 0.0
    # Idle for a second: the bucket refills only up to its burst.
    now += 1.0
    assert bucket.charge(10_000, now) == 0.0
    assert bucket.charge(10_000, now) == pytest.approx(0.01, abs=1e-12)


def test_token_bucket_big_charge_and_rate_change() -> None:
    bucket = TokenBucket(8e6, now=0.0)
    assert bucket.charge(4_010_000, 0.0) == pytest.approx(4.0)  # one frame beyond the burst
    bucket.set_rate(16e6, now=1.0)  # 1 s of the 4 s debt paid at 1 MB/s; 3 MB owed
    assert bucket.debt_seconds(1.0) == pytest.approx(1.5)  # paid at 2 MB/s now
    bucket.set_rate(None, now=1.2)
    assert bucket.debt_seconds(1.2) == 0.0 and bucket.charge(10**9, 1.2) == 0.0
    bucket.set_rate(8e6, now=2.0)  # throttled again: starts with a full burst
    assert bucket.charge(10_000, 2.0) == 0.0
    with pytest.raises(ValueError):
        bucket.set_rate(0, now=3.0)


def test_pacer_with_an_injected_clock() -> None:
    clock = [0.0]
    sleeps: list[float] = []

    async def main() -> None:
        pacer = Pacer(8e6, clock=lambda: clock[0])
        real_sleep = pacer._sleep

        async def fake_sleep(seconds: float) -> None:
            sleeps.append(seconds)
            clock[0] += seconds
            await real_sleep(0)

        pacer._sleep = fake_sleep  # type: ignore[method-assign]
        for _ in range(100):
            await pacer.consume(10_000)
    run(main())
    assert clock[0] == pytest.approx(0.99, abs=1e-9)
    assert len(sleeps) == 99


def test_pacer_reset_forgets_the_debt_of_the_last_transfer() -> None:
    clock = [0.0]
    sleeps: list[float] = []

    async def main() -> None:
        pacer = Pacer(8e6, clock=lambda: clock[0])  # 1 MB/s, a 10 kB burst
        real_sleep = pacer._sleep

        async def fake_sleep(seconds: float) -> None:
            sleeps.append(seconds)
            clock[0] += seconds
            await real_sleep(0)

        pacer._sleep = fake_sleep  # type: ignore[method-assign]
        await pacer.consume(110_000)  # 100 kB beyond the burst: 0.1 s of debt, paid
        assert clock[0] == pytest.approx(0.1)
        pacer.rate_bps = 8e6
        await pacer.consume(5_000)  # a rate change keeps the (empty) bucket: it waits
        assert clock[0] == pytest.approx(0.105)
        pacer.reset(8e6)
        await pacer.consume(10_000)  # a reset starts with a full burst: no wait
        assert clock[0] == pytest.approx(0.105)
    run(main())
    assert len(sleeps) == 2


def test_pacer_accuracy_8_mbit_per_s() -> None:
    async def main() -> float:
        pacer = Pacer(8e6)
        started = time.monotonic()
        for _ in range(16):
            await pacer.consume(62_500)  # 1 MB in all
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert 0.9 < elapsed < 1.4  # ideal 0.99 s; generous above for a busy machine


def test_pacer_unthrottled_and_rate_change_wakes_a_waiter() -> None:
    async def main() -> None:
        pacer = Pacer()
        started = time.monotonic()
        for _ in range(1000):
            await pacer.consume(1 << 20)
        assert time.monotonic() - started < 0.5
        pacer.rate_bps = 8e3  # 1 kB/s: 100 kB would take 100 s
        waiter = asyncio.create_task(pacer.consume(100_000))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        pacer.rate_bps = None
        await asyncio.wait_for(waiter, 1)
    run(main())


def test_send_pages_is_paced() -> None:
    async def handler(channel: Channel) -> None:
        channel.connection.npages = 1024
        await answer_requests(channel)

    async def main() -> None:
        async with (Served(handler) as served,
                    await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel):
                channel.pacer.rate_bps = 40e6  # 5 MB/s
                started = time.monotonic()
                for first in range(0, 256, 32):  # 1 MiB in 8 frames
                    idx = np.arange(first, first + 32, dtype=np.uint32)
                    await channel.send_pages(Pages(0, idx, NONE, bytes(32 * PAGE_SIZE)))
                await channel.request("done", timeout=5)
                elapsed = time.monotonic() - started
        assert 0.15 < elapsed < 0.6  # ideal (1 MiB - 50 kB) / 5 MB/s = 0.2 s
    run(main())


def test_accepted_connections_send_small_frames_at_once() -> None:
    """Replies are small frames; a delayed ACK (40 ms) must not hold them back."""
    nodelay: list[int] = []

    async def handler(channel: Channel) -> None:
        sock = channel._transport.get_extra_info("socket")
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await answer_requests(channel)

    async def main() -> None:
        async with Served(handler) as served:
            async with await connect(LOOPBACK, served.port, key=KEY, me="hostA") as channel:
                await channel.request("ping", timeout=5)
            assert await served.done.get() is None
        assert nodelay and nodelay[0] != 0
    run(main())
