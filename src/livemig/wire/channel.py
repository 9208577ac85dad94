"""The wire protocol over asyncio: a thin transport around the sans-IO ``Connection``.

``connect()`` opens a connection and completes the handshakes (mutual TLS when given a
context from ``wire.tls``, then livemig's own); ``serve()`` accepts them and calls
``handler(channel)`` only once a peer has shown a host certificate of our CA (over TLS)
and proved that it holds our key. A
``Channel`` sends and receives messages with a timeout on every wait, and translates
socket failures into the wire errors of ``frames`` (``PeerLost``, ``PeerTimeout``) with
``raise ... from``. ``Pacer`` paces page traffic with a token bucket.

Receiving is zero-copy up to the destination's RAM: the protocol is an
``asyncio.BufferedProtocol`` that lets the socket ``recv_into`` the connection's own
buffer, sized so that a Pages frame lands whole, and ``Pages.data`` is a view of it.
Reading pauses while a whole frame waits to be taken, so at most one big frame is
buffered per connection.

Cancellation: a cancelled ``recv`` consumed nothing (a message is taken from the
buffer in one synchronous step). A cancelled ``send``/``send_pages`` either wrote
nothing (cancelled while pacing) or had already queued the whole frame with the
transport, which then delivers all of it unless the connection breaks, in which case
the peer may have received any prefix of it and sees a frame cut short. A frame is never
interleaved with another.

A channel is closed after any WireError except PeerTimeout from ``recv`` and ``send``:
a timed-out receive consumed nothing, so the conversation can go on. A timed-out
``request`` closes it, since its late Reply would otherwise answer the next Request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import ssl as ssl_module
import sys
import termios
import time
from collections.abc import Awaitable, Callable

from livemig.wire import messages
from livemig.wire.frames import (
    Abort,
    Connection,
    LocalProtocolError,
    Message,
    Pages,
    PeerAborted,
    PeerLost,
    PeerNotTrusted,
    PeerTimeout,
    PeerUnreachable,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    State,
    WireError,
    encode,
    printable_reason,
)
from livemig.wire.tls import (
    Speaks,
    certified_host,
    describe_peer_certificate_refused,
    describe_ssl_error,
    sniff,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Channel",
    "Pacer",
    "PeerLost",
    "PeerServer",
    "PeerTimeout",
    "PeerUnreachable",
    "TokenBucket",
    "connect",
    "serve",
]

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.001
# The kernel keeps at most this much of our data unsent (TCP_NOTSENT_LOWAT): enough to
# keep a gigabit link busy for a millisecond, not megabytes that whatever comes next
# (the stop-and-copy's pages, a reply we wait for) must queue behind.
NOTSENT_LOWAT = 128 * 1024

# struct tcp_info (linux/tcp.h): its __u64 tcpi_bytes_acked sits at bytes 120..128.
_TCP_INFO_LEN = 232
_BYTES_ACKED = slice(120, 128)

DEFAULT_TIMEOUT = 30.0  # seconds; every wait takes its own, this is only the default
ABORT_GRACE_S = 1.0  # after abort(): a transport that does not end by then is let go
BURST_SECONDS = 0.01  # a pacer lets this much traffic through at once: smooth at 10 ms
_SUB_BYTE = 1.0


# -- pacing -----------------------------------------------------------------------------


class TokenBucket:
    """A token bucket on an explicit clock: pure logic, no sleeping.

    Bytes are charged when they are sent; the answer is how long to wait first. Tokens
    accrue at ``rate_bps / 8`` bytes per second up to ``burst_seconds`` worth, and a
    charge may take the bucket below zero (a frame is bigger than the burst): the debt is
    paid by waiting. So n bytes after an idle spell go out over
    ``(n - burst) / rate`` seconds, whatever the size of the pieces.
    """

    def __init__(self, rate_bps: float | None, now: float, *,
                 burst_seconds: float = BURST_SECONDS) -> None:
        if burst_seconds <= 0:
            raise ValueError("burst_seconds must be positive")
        self._burst_seconds = burst_seconds
        self._rate: float | None = None
        self._tokens = 0.0
        self._stamp = now
        self.set_rate(rate_bps, now)

    @property
    def rate_bps(self) -> float | None:
        return self._rate

    @property
    def burst_s(self) -> float:
        return self._burst_seconds

    def set_rate(self, rate_bps: float | None, now: float) -> None:
        """Change the rate at ``now``; ``None`` means unthrottled. Tokens earned so far
        were earned at the old rate; a debt is kept and paid at the new rate."""
        if rate_bps is not None and not rate_bps > 0:
            raise ValueError(f"rate must be positive or None, not {rate_bps!r}")
        if self._rate is None:
            self._tokens = 0.0 if rate_bps is None else rate_bps / 8 * self._burst_seconds
        else:
            self._refill(now)
        self._stamp = now
        self._rate = None if rate_bps is None else float(rate_bps)
        if self._rate is not None:
            self._tokens = min(self._tokens, self._capacity)

    @property
    def _capacity(self) -> float:
        assert self._rate is not None
        return self._rate / 8 * self._burst_seconds

    def _refill(self, now: float) -> None:
        if self._rate is not None and now > self._stamp:
            self._tokens = min(self._capacity,
                               self._tokens + (now - self._stamp) * self._rate / 8)
        self._stamp = max(self._stamp, now)

    def charge(self, nbytes: int, now: float) -> float:
        """Charge ``nbytes`` at ``now``; return the seconds to wait before sending them."""
        if self._rate is None:
            return 0.0
        self._refill(now)
        self._tokens -= nbytes
        return self.debt_seconds(now)

    def debt_seconds(self, now: float) -> float:
        """How long until the bucket is out of debt, at the current rate."""
        if self._rate is None:
            return 0.0
        self._refill(now)
        if self._tokens > -_SUB_BYTE:
            # Less than a byte owed is rounding, not debt: waiting for it would chase
            # ever smaller float remainders.
            return 0.0
        return -self._tokens / (self._rate / 8)


class Pacer:
    """Paces traffic to ``rate_bps`` (bits per second, settable at any time; ``None`` =
    unthrottled). ``await pacer.consume(n)`` before sending ``n`` bytes.

    A rate change takes effect at once, also for a ``consume`` already waiting. A
    cancelled ``consume`` has still charged its bytes: the bucket then runs a little
    below its rate, never above. The clock is injectable; it must agree with the loop's
    time scale (seconds)."""

    def __init__(self, rate_bps: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 burst_seconds: float = BURST_SECONDS) -> None:
        self._clock = clock
        self._bucket = TokenBucket(rate_bps, clock(), burst_seconds=burst_seconds)
        self._wakeups: set[asyncio.Future[None]] = set()

    @property
    def rate_bps(self) -> float | None:
        return self._bucket.rate_bps

    @rate_bps.setter
    def rate_bps(self, value: float | None) -> None:
        self._bucket.set_rate(value, self._clock())
        for fut in self._wakeups:  # let waiters recompute their wait at the new rate
            if not fut.done():
                fut.set_result(None)

    def reset(self, rate_bps: float | None) -> None:
        """Start afresh at ``rate_bps`` with a full burst and no debt: a new transfer,
        such as a stop-and-copy after the pre-copy rounds."""
        self._bucket = TokenBucket(rate_bps, self._clock(), burst_seconds=self._bucket.burst_s)
        for fut in self._wakeups:
            if not fut.done():
                fut.set_result(None)

    async def consume(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent at the rate."""
        wait = self._bucket.charge(nbytes, self._clock())
        while wait > 0:
            await self._sleep(wait)
            wait = self._bucket.debt_seconds(self._clock())

    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(seconds, _resolve, fut)
        self._wakeups.add(fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._wakeups.discard(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- the asyncio protocol ---------------------------------------------------------------


class _WireProtocol(asyncio.BufferedProtocol):
    """Moves bytes between a transport and a Connection; wakes the Channel. It never
    calls a Connection method that can raise: errors surface in the Channel's task."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.gone = asyncio.Event()  # connection_lost has run: the socket is closed
        self.on_connect: Callable[[_WireProtocol], None] | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writers: list[asyncio.Future[None]] = []
        self._write_paused = False
        self._read_paused = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.on_connect is not None:
            self.on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)
        if not self.conn.need_data():
            # A whole frame (or a broken one) is in: stop reading until it is taken, so
            # the buffer holds at most one big frame and the frame is not moved.
            self.pause_reading()
            self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close our end too: a peer that stopped sending is gone

    def connection_lost(self, exc: Exception | None) -> None:
        # Let go of the transport: under TLS it is asyncio's SSL transport, whose
        # SSLProtocol keeps our get_buffer/buffer_updated as bound methods, so holding it
        # would make a reference cycle. Only the cyclic GC frees those, and rarely: it
        # counts objects, not the megabytes of OpenSSL buffers the cycle keeps (1.1 MiB
        # a migration, seen in the soak as heap growth).
        self.transport = None
        self.lost = True
        self.eof = True
        self.lost_exc = exc
        self._wake_reader()
        for fut in self._writers:
            if not fut.done():
                fut.set_result(None)
        self.gone.set()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for fut in self._writers:
            if not fut.done():
                fut.set_result(None)

    # used by the Channel

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.lost:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.lost:
            self._read_paused = False
            self.transport.resume_reading()

    @property
    def receiving(self) -> bool:
        """A task waits in ``readable``: it takes the next message itself."""
        return self._reader is not None

    async def readable(self) -> None:
        """Wait until a frame is complete, the buffered bytes are bad, or the stream ended."""
        if self.eof:
            return
        if self._reader is not None:
            raise RuntimeError("another task is already receiving on this channel")
        self._reader = asyncio.get_running_loop().create_future()
        try:
            await self._reader
        finally:
            self._reader = None

    async def writable(self) -> None:
        """Wait until the transport wants more data (or the connection is gone)."""
        if not self._write_paused or self.lost:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writers.append(fut)
        try:
            await fut
        finally:
            self._writers.remove(fut)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)


# -- the channel --------------------------------------------------------------------------


class Channel:
    """An authenticated connection to another daemon. Obtain one from ``connect()`` or
    in a ``serve()`` handler; close it with ``await close()`` (or ``async with``)."""

    def __init__(self, protocol: _WireProtocol, label: str) -> None:
        assert protocol.transport is not None
        self._proto = protocol
        self._conn = protocol.conn
        self._transport = protocol.transport
        self._label = label  # the peer's address
        self._closing = False
        self._cause: WireError | None = None  # what closed the channel, if an error did
        self.pacer = Pacer()  # paces send_pages(); unthrottled until a rate is set
        if (sock := self._tcp_socket()) is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        # The host the peer's TLS certificate names (verified against our CA); None
        # on a plaintext channel, where only the shared key vouches for the peer.
        self.certified_host: str | None = None

    @property
    def peer(self) -> str:
        """The peer's host name once it told us (authenticated after the handshake)."""
        return self._conn.peer_host or self._label

    @property
    def address(self) -> str:
        return self._label

    @property
    def connection(self) -> Connection:
        """The sans-IO connection: set ``connection.npages`` after reserving RAM."""
        return self._conn

    @property
    def is_closing(self) -> bool:
        return self._closing or self._proto.lost

    # -- receiving ------------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message from the peer (an Abort too: it is returned, not raised).
        ``Pages.data`` is valid until the next ``recv``. Raises PeerTimeout after
        ``timeout`` seconds (None: wait for ever), PeerLost if the connection ends, a
        RemoteProtocolError or AuthenticationError if the peer breaks the protocol."""
        try:
            async with asyncio.timeout(timeout):
                return await self._recv()
        except TimeoutError as exc:
            raise PeerTimeout(self.peer, "send a message", timeout) from exc

    async def _recv(self) -> Message:
        if self._closing:
            self._check_open()
        while True:
            msg = self._take()
            if msg is not None:
                return msg
            await self._proto.readable()

    def _take(self) -> Message | None:
        """One step of the Connection: a message, or None if it needs bytes."""
        try:
            try:
                msg = self._conn.next_message()
            finally:
                self._flush()  # the handshake's answers, or an Abort telling the peer why
            if msg is None and self._proto.eof:
                self._conn.receive_data(b"")
                msg = self._conn.next_message()  # raises PeerLost: only partial frames left
        except PeerLost as err:
            self._fail(err)
            raise err from self._proto.lost_exc
        except WireError as err:
            self._fail(err)
            raise
        if self._conn.need_data():
            self._proto.resume_reading()
        return msg

    def last_words(self) -> str | None:
        """The reason of an Abort the peer sent before the connection broke, if one
        arrived: a sender that never reads learns only "connection reset" otherwise."""
        with contextlib.suppress(WireError):
            while (msg := self._conn.next_message()) is not None:
                if isinstance(msg, Abort):
                    return msg.reason
        return None

    def _tcp_socket(self) -> socket.socket | None:
        """The TCP socket under the transport (under TLS too); None for any other."""
        sock = self._transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return sock  # type: ignore[no-any-return]

    def queued_bytes(self) -> int:
        """What we have written that the peer has not yet acknowledged: in asyncio's
        buffers (and TLS's), and in the kernel's send queue (SIOCOUTQ: unsent and in
        flight)."""
        queued = self._transport.get_write_buffer_size()
        if (sock := self._tcp_socket()) is not None:
            with contextlib.suppress(OSError):
                out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                queued += int.from_bytes(out, sys.byteorder)
        return queued

    async def drained(self, timeout: float, below: int = 0) -> bool:
        """Wait, up to ``timeout``, until at most ``below`` bytes are queued (see
        ``queued_bytes``); whether they were. What a sender queued goes before whatever
        it sends next: a source drains before it stops the VM, so that the stop window
        does not wait behind megabytes of pre-copy."""
        deadline = time.monotonic() + timeout
        while self.queued_bytes() > below:
            self._check_open()
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    def bytes_acked(self) -> int | None:
        """How much of what we sent the peer's TCP has acknowledged (TCP_INFO's
        ``tcpi_bytes_acked``): what got across the link, not what waits in our socket's
        buffer. None on a socket that is not TCP (a test's socketpair)."""
        if (sock := self._tcp_socket()) is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            return None
        if len(info) < _BYTES_ACKED.stop:
            return None  # a kernel older than 4.1
        return int.from_bytes(info[_BYTES_ACKED], sys.byteorder)

    # -- sending ------------------------------------------------------------------------

    async def send(self, msg: Message, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Send ``msg`` (Pages go through ``send_pages``). Waits, up to ``timeout``, only
        while the transport's buffer is full; see the module docstring for what a
        cancelled send may have delivered."""
        if isinstance(msg, Pages):
            await self.send_pages(msg, timeout)
            return
        self._check_sendable()
        try:
            data = self._conn.send(msg)
        except WireError as err:
            self._fail(err)
            raise
        self._transport.write(data)
        await self._drain(timeout)

    async def send_pages(self, msg: Pages, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Send a Pages frame, paced by ``self.pacer``, without copying the page data
        into a joined frame. The caller may reuse ``msg.data`` once this returns: on
        Python 3.11 the transport has copied what the socket did not take."""
        self._check_sendable()
        try:
            parts = self._conn.send_pages_parts(msg)
        except WireError as err:
            self._fail(err)
            raise
        await self.pacer.consume(sum(len(part) for part in parts))
        self._check_sendable()
        # One write() per part, not writelines(): on 3.11 writelines() joins the parts
        # (a 4 MiB copy), while write() sends at once and copies only what the socket
        # did not take.
        for part in parts:
            self._transport.write(part)
        await self._drain(timeout)

    async def request(self, kind: str, body: dict[str, object] | None = None,
                      timeout: float | None = DEFAULT_TIMEOUT) -> Reply:
        """Send Request(kind, body) and return the peer's Reply within ``timeout``.
        Raises PeerAborted if the peer aborts instead, RemoteProtocolError if any other
        message comes first, and PeerTimeout (closing the channel) on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self.send(Request(kind, {} if body is None else body), None)
                msg = await self._recv()
        except TimeoutError as exc:
            err: WireError = PeerTimeout(self.peer, f"answer {kind!r}", timeout)
            self._fail(err)
            raise err from exc
        if isinstance(msg, Reply):
            return msg
        if isinstance(msg, Abort):
            err = PeerAborted(self.peer, msg.reason)
        else:
            err = RemoteProtocolError(self.peer, f"sent {type(msg).__name__} instead of a "
                                                 f"Reply to {kind!r}", type(msg).__name__)
        self._fail(err)
        raise err

    async def ask(self, message: messages.PeerRequest, expected: type[messages.R],
                  timeout: float | None = DEFAULT_TIMEOUT) -> messages.R | messages.Refusal:
        """``request`` with typed messages: send ``message``, return the peer's reply as
        ``expected``, or its ``Refusal``. A reply that does not fit raises
        RemoteProtocolError, like any other breach of the protocol, and ends the channel."""
        frame = messages.request_frame(message)
        reply = await self.request(frame.kind, frame.body, timeout)
        try:
            return messages.read_reply(reply, expected, self.peer)
        except RemoteProtocolError as err:
            self._fail(err)
            raise

    async def abort(self, reason: str, timeout: float | None = 5.0) -> None:
        """Tell the peer we give up (best effort), then close. ``reason`` is made one
        printable line of at most 1024 bytes, as an Abort requires."""
        try:
            if not self.is_closing and self._conn.state not in (State.CLOSED, State.ERROR):
                await self.send(Abort(printable_reason(reason)), timeout)
        except WireError as err:
            log.debug("could not tell %s that we abort: %s", self.peer, err)
        finally:
            await self.close(5.0 if timeout is None else timeout)  # a silent peer: no wait

    def _check_open(self) -> None:
        """Raise what a call on a closed channel deserves: PeerLost (or PeerAborted) if
        the peer ended it, LocalProtocolError if we closed it and call on regardless."""
        cause = self._cause
        if isinstance(cause, PeerAborted):
            raise PeerAborted(self.peer, cause.reason) from cause
        if isinstance(cause, PeerLost) or (self._proto.lost and cause is None):
            raise PeerLost(self.peer, "the connection is closed") from (
                cause or self._proto.lost_exc)
        if self._closing:
            raise LocalProtocolError(
                self.peer, f"the channel is closed{f' after: {cause}' if cause else ''}"
            ) from cause

    def _check_sendable(self) -> None:
        """``_check_open``, and raise PeerAborted if the peer's Abort waits unread.

        A sender that never reads (the source in pre-copy) would not hear of it
        otherwise: our reading pauses while a whole frame waits to be taken, and under
        TLS that also hides the peer's close that follows. asyncio's SSL transport then
        drops every write without an error (it logs "SSL connection is closed"), so the
        sender would go on sending into nothing until its next request."""
        self._check_open()
        if not self._proto.receiving and self._conn.aborted_ahead():
            msg = self._take()
            assert isinstance(msg, Abort)
            err = PeerAborted(self.peer, msg.reason)
            self._fail(err)
            raise err

    async def _drain(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._proto.writable()
        except TimeoutError as exc:
            raise PeerTimeout(self.peer, "take our data", timeout) from exc
        if self._proto.eof:
            # The peer ended the connection (an Abort before it, perhaps: see last_words).
            # Whatever we write now goes nowhere: under TLS, asyncio drops it with a
            # warning, and a sender that never reads would learn of it only by time-out.
            err = PeerLost(self.peer, "the connection broke while sending")
            self._fail(err)
            raise err from self._proto.lost_exc

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out and not self._proto.lost:
            self._transport.write(out)

    # -- closing --------------------------------------------------------------------------

    def _fail(self, cause: WireError) -> None:
        """Close without waiting; buffered output (an Abort, say) is still flushed."""
        if self._cause is None:
            self._cause = cause
        self._closing = True
        self._close_transport()

    def _close_transport(self) -> None:
        # Once only: on Python 3.11 a second close() of a TLS transport cuts it off from
        # its connection, and a later abort() then does nothing at all (seen as a
        # source daemon waiting for ever in close(), its migration never answered).
        if not self._transport.is_closing():
            self._transport.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection, flushing what is buffered; after ``timeout`` seconds of
        a peer that does not take it, drop it. Idempotent, and bounded: at most
        ``timeout + ABORT_GRACE_S`` seconds."""
        self._closing = True
        # Read on: the peer's own close (TLS close_notify, then EOF) may wait behind a
        # frame nobody took, and the TLS shutdown cannot finish before it is read.
        self._proto.resume_reading()
        self._close_transport()
        if self._proto.gone.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self._proto.gone.wait()
            return
        except TimeoutError:
            self._transport.abort()
        try:
            # abort() closes the socket at the next turn of the loop, or a few later
            # under TLS; a transport that still says nothing is left to the GC.
            async with asyncio.timeout(ABORT_GRACE_S):
                await self._proto.gone.wait()
        except TimeoutError:
            log.warning("the connection with %s did not end %g s after it was aborted",
                        self.peer, ABORT_GRACE_S)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the handshake ------------------------------------------------------------------

    async def _handshake(self) -> None:
        if self._conn.role is Role.CLIENT:
            self._transport.write(self._conn.initiate())
        while True:
            msg = self._take()  # only handshake frames or an Abort get this far
            if isinstance(msg, Abort):
                err = PeerAborted(self.peer, msg.reason)
                self._fail(err)
                raise err
            if self._conn.established:
                return
            await self._proto.readable()


def _address(sockname: object) -> str:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockname)


async def connect(host: str, port: int, *, key: bytes, me: str,
                  ssl: ssl_module.SSLContext | None = None, peer_name: str | None = None,
                  timeout: float = 10.0, npages: int | None = None) -> Channel:
    """Connect to the daemon at ``host:port`` as ``me`` and complete the handshake
    within ``timeout`` seconds.

    With ``ssl`` (a ``tls.client_context``), ``peer_name`` is required: the host we mean
    to reach. Its certificate must name it, and it must call itself so in the livemig
    handshake. Raises PeerUnreachable (a PeerLost) if nothing accepts, PeerTimeout,
    PeerNotTrusted if TLS fails either way (its certificate, or it refused ours),
    AuthenticationError if the peer does not hold ``key``, PeerAborted if the peer
    refuses us with a reason (a TLS daemon tells a plaintext peer so)."""
    label = _address((host, port))
    if ssl is not None and not peer_name:
        raise ValueError("TLS needs peer_name: the host whose certificate we expect")
    conn = Connection(Role.CLIENT, key, me, peer=label, npages=npages)
    if ssl is not None:
        conn.expect_peer = peer_name
    loop = asyncio.get_running_loop()
    what = "accept the connection"
    channel: Channel | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                _, protocol = await loop.create_connection(
                    lambda: _WireProtocol(conn), host, port, ssl=ssl,
                    server_hostname=peer_name if ssl is not None else None)
            except ssl_module.SSLCertVerificationError as exc:
                raise PeerNotTrusted(label, describe_peer_certificate_refused(
                    str(peer_name), exc)) from exc
            except OSError as exc:
                if ssl is not None and isinstance(exc, ssl_module.SSLError
                                                  | ConnectionResetError):
                    # Connected, then the TLS handshake broke: a peer that does not
                    # speak TLS (run with --insecure-plaintext) hangs up on a ClientHello.
                    raise PeerNotTrusted(
                        label, f"the TLS handshake failed ({describe_ssl_error(exc)}); "
                               "does its daemon run with --insecure-plaintext?",
                        by_peer=True) from exc
                raise PeerUnreachable(label, str(exc) or type(exc).__name__) from exc
            channel = Channel(protocol, label)
            if ssl is not None:
                channel.certified_host = peer_name
            what = "complete the handshake"
            try:
                await channel._handshake()
            except PeerLost as err:
                # TLS 1.3: the server checks our certificate after our side of the TLS
                # handshake is done, so its refusal comes after connect() returned: as
                # an alert, or (asyncio drops the alert when it aborts) a bare hang-up.
                if ssl is None:
                    raise
                cause = protocol.lost_exc
                why = (describe_ssl_error(cause) if isinstance(cause, ssl_module.SSLError)
                       else "it hung up in the TLS handshake")
                # We cannot tell revoked from unknown here: the hint names both, and the
                # peer's log has OpenSSL's reason.
                raise PeerNotTrusted(
                    label, f"{peer_name} refused our certificate ({why}); its daemon's log "
                           "says why (revoked? of another CA?)", by_peer=True) from err
            return channel
    except TimeoutError as exc:
        raise PeerTimeout(label, what, timeout) from exc
    finally:
        if channel is not None and not conn.established:
            await channel.close()


Handler = Callable[[Channel], Awaitable[None]]


class PeerServer:
    """What ``serve()`` returns: ``sockets``, ``close()``, ``await wait_closed()``, as
    ``asyncio.Server`` has. Closing stops accepting; connections already accepted run
    on until their handler returns."""

    def __init__(self, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self._sock = sock
        self._task = task

    @property
    def sockets(self) -> list[socket.socket]:
        return [] if self._sock.fileno() < 0 else [self._sock]

    def close(self) -> None:
        self._task.cancel()  # the accept loop closes the socket as it ends

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


ServerTLS = ssl_module.SSLContext | Callable[[], ssl_module.SSLContext]


async def serve(host: str, port: int, *, key: bytes, me: str, handler: Handler,
                ssl: ServerTLS | None = None,
                handshake_timeout: float = 10.0) -> PeerServer:
    """Listen on ``host:port`` as ``me``. For each connection, complete the handshakes
    (TLS with ``ssl``; then livemig's) within ``handshake_timeout`` and only then run
    ``handler(channel)``; the channel is closed when the handler returns. A refused peer
    is closed with one log line saying why. ``ssl`` is a ``tls.server_context``, or a
    function that returns the one to use now (``tls.Contexts.server``), asked once per
    connection so that a new CRL counts from the next one.

    A peer must speak what we speak, told by its first byte: with ``ssl`` a plaintext
    livemig peer gets an Abort saying that TLS is required; without, a TLS peer is
    hung up on (it could not read an answer). Over TLS the client's certificate must be
    a host certificate of our CA, and the host it names is the only name the client may
    give itself (``Channel.certified_host``)."""
    loop = asyncio.get_running_loop()
    sock = socket.create_server((host, port), reuse_port=False)
    sock.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    async def accept_loop() -> None:
        try:
            while True:
                try:
                    conn, addr = await loop.sock_accept(sock)
                except OSError as exc:  # out of file descriptors, say: go on serving
                    log.warning("accept on %s:%d failed: %s", host, port, exc)
                    await asyncio.sleep(0.1)
                    continue
                conn.setblocking(False)
                # asyncio sets TCP_NODELAY only on sockets whose proto field says TCP,
                # and create_server() leaves it 0: without this, every small frame
                # (a Reply, the handshake) waits up to 40 ms for a delayed ACK.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                task = loop.create_task(_serve_socket(
                    conn, _address(addr), key=key, me=me, handler=handler, ssl_for=ssl,
                    timeout=handshake_timeout))
                tasks.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(tasks.discard)
        finally:
            sock.close()

    return PeerServer(sock, loop.create_task(accept_loop()))


async def _first_byte(sock: socket.socket) -> bytes:
    """The peer's first byte, left in the socket for whoever reads next; b"" at EOF."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _resolve, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


async def _serve_socket(sock: socket.socket, label: str, *, key: bytes, me: str,
                        handler: Handler, ssl_for: ServerTLS | None,
                        timeout: float) -> None:
    loop = asyncio.get_running_loop()
    ssl = ssl_for() if callable(ssl_for) else ssl_for
    try:
        async with asyncio.timeout(timeout):
            speaks = sniff(await _first_byte(sock))
            if ssl is not None and speaks is Speaks.PLAINTEXT:
                log.warning("refused %s: it speaks livemig in plaintext; %s requires "
                            "mutual TLS", label, me)
                await loop.sock_sendall(sock, encode(Abort(
                    f"{me} requires mutual TLS and refuses plaintext peers; give this "
                    "host a certificate (livemig keys host) and run its daemon without "
                    "--insecure-plaintext")))
                sock.close()
                return
            if ssl is None and speaks is Speaks.TLS:
                log.warning("refused %s: it speaks TLS, but %s runs with "
                            "--insecure-plaintext", label, me)
                sock.close()
                return
            if ssl is not None and speaks is not Speaks.TLS:
                log.warning("refused %s: it speaks %s, not TLS", label, speaks.value)
                sock.close()
                return
            protocol = _WireProtocol(Connection(Role.SERVER, key, me))
            protocol.conn.label = label
            await loop.connect_accepted_socket(lambda: protocol, sock, ssl=ssl,
                                               ssl_handshake_timeout=timeout if ssl else None)
    except TimeoutError:
        log.warning("refused %s: no handshake within %g s", label, timeout)
        sock.close()
        return
    except (ssl_module.SSLError, OSError) as exc:
        # No byte of livemig's protocol was read: TLS refused the peer first.
        why = describe_ssl_error(exc)
        if isinstance(exc, ConnectionResetError | ssl_module.SSLEOFError):
            why = "the peer hung up (did it refuse our certificate? its log says why)"
        log.warning("refused %s: TLS handshake failed: %s", label, why)
        sock.close()
        return
    channel = Channel(protocol, label)
    if ssl is not None:
        host = certified_host(protocol.transport.get_extra_info("peercert")
                              if protocol.transport is not None else None)
        if host is None:
            log.warning("refused %s: its certificate names no host", label)
            await channel.close()
            return
        protocol.conn.expect_peer = channel.certified_host = host
    await _serve_one(channel, handler, timeout)


async def _serve_one(channel: Channel, handler: Handler, timeout: float) -> None:
    label = channel.address
    try:
        async with asyncio.timeout(timeout):
            await channel._handshake()
    except TimeoutError:
        log.warning("refused %s: no handshake within %g s", label, timeout)
        await channel.close()
        return
    except WireError as err:
        log.warning("refused %s: %s", label, err)
        await channel.close()
        return
    if channel.certified_host is not None:
        log.info("accepted %s from %s: a host certificate of our CA", channel.peer, label)
    try:
        await handler(channel)
    except WireError as err:
        log.warning("connection with %s (%s) ended: %s", channel.peer, label, err)
    except Exception:  # a bug in the handler: log it, keep serving the others
        log.exception("handler for %s (%s) failed", channel.peer, label)
    finally:
        await channel.close()
