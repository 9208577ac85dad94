"""The wire protocol between two livemig daemons, sans-IO (in the manner of h11).

``Connection(role, key, host)`` never touches a socket: feed it bytes with
``receive_data()`` (or, zero-copy, ``get_buffer()``/``buffer_updated()``), take messages
out with ``next_message()`` (``None`` = need more bytes), write what ``data_to_send()``
returns after every ``next_message()`` (the handshake answers itself), and ``send(message)``
hands back the bytes to write. Every length is capped before anything is allocated. A
connection starts with the HMAC challenge-response handshake (Hello -> Challenge -> Auth
-> Welcome); until it completes, any other message is a protocol error, and no state of
the engine can change.

Frame layout (all integers little-endian, like the uint32 index arrays they carry)::

    offset size field
    0      4    magic     b"LMIG"
    4      1    version   PROTOCOL_VERSION
    5      1    type      MsgType (1..8)
    6      2    flags     0; reserved, a receiver rejects any other value
    8      4    length    payload bytes that follow, at most MAX_PAYLOAD[type]

    payload by type
    Hello      nonce[32] | host_len u8 | host (ASCII, hostname characters)
    Challenge  nonce[32] | proof[32] | host_len u8 | host
    Auth       proof[32]
    Welcome    (empty)
    Request    kind_len u8 | kind (ASCII identifier) | JSON object (UTF-8)
    Reply      ok u8 (0 or 1) | JSON object (UTF-8)
    Pages      round u32 | n u32 | z u32 | indexes n x u32 | zero_indexes z x u32
               | data n x 4096
    Abort      reason (UTF-8, printable, 1..1024 bytes)
    DeviceState  last u8 (0 or 1) | data (0..1 MiB): a chunk of QEMU's device-state
               stream, tunnelled; ``last`` ends the stream

Over TLS the peer's certificate already proved who it is; set ``expect_peer`` to the
host it names, and the handshake then also requires the peer to call itself by that
name (a Hello or Challenge naming another host raises ``PeerNotTrusted``). The HMAC
proofs stay as an inner check: the shared key is the cluster's membership secret, which
can be rotated to cut off every certificate at once (there is no revocation list).

The proofs are HMAC-SHA256 over the two fresh nonces, with a label per direction so that
neither side's proof can be reflected back as the other's::

    Challenge.proof = HMAC(key, b"server" + client_nonce + server_nonce)
    Auth.proof      = HMAC(key, b"client" + client_nonce + server_nonce)

Pages: each page index is below ``Connection.npages`` (the VM's page count, which the
destination sets once it has reserved the RAM: before that, Pages are a protocol error),
and a frame names each page at most once, so a frame means the same whatever order a
receiver applies it in. The receiving role therefore needs no checks of its own.

Errors (the root is ``livemig.errors.LivemigError``)::

    WireError                  about one connection; .peer names the other daemon
     ├── LocalProtocolError    we broke the protocol (a bug here): an invalid message, a
     │                         message out of turn, a call on a dead connection
     ├── RemoteProtocolError   the peer broke it: bad magic, unknown type, bad flags,
     │    │                    malformed payload, a message out of turn
     │    ├── VersionMismatch  the peer speaks another protocol version (.theirs, .ours)
     │    ├── FrameTooLarge    a header announced more than the cap (.length, .limit)
     │    └── UnexpectedMessage  a legal frame in the wrong state (.state)
     ├── AuthenticationError   a proof did not verify: the peer does not hold our key
     │    └── PeerNotTrusted   TLS refused a certificate (ours or the peer's), or the
     │                         peer calls itself other than its certificate (.by_peer)
     ├── PeerAborted           the peer sent Abort (.reason)
     ├── PeerLost              the connection closed or broke (.mid_frame)
     │    └── PeerUnreachable  we could not connect at all
     └── PeerTimeout           the peer did not answer in time (.what, .seconds)

After any error raised by a ``Connection`` the connection is dead: every further call
raises ``LocalProtocolError``. When the peer broke the protocol or failed authentication,
the connection first queues an Abort that tells the peer why; flush ``data_to_send()``
before closing the socket.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import operator
import re
import secrets
import struct
from dataclasses import dataclass, field
from typing import Final, NoReturn

import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError
from livemig.units import PAGE_SIZE as PAGE_SIZE

PROTOCOL_VERSION = 2  # 2: DeviceState, the tunnelled device-state stream
MAX_PAGES_PER_FRAME = 1024  # data pages; zero pages (indexes only) up to 16x as many
MAX_ZERO_PAGES_PER_FRAME = 16 * MAX_PAGES_PER_FRAME
MAX_JSON_BYTES = 64 * 1024
NONCE_BYTES = 32
PROOF_BYTES = 32  # HMAC-SHA256
MAX_HOST_BYTES = 64
MAX_KIND_BYTES = 32
MAX_REASON_BYTES = 1024
MIN_KEY_BYTES = 16
MAX_NPAGES = 1 << 32  # page indexes are u32 on the wire
MAX_STATE_CHUNK = 1 << 20  # device state per DeviceState frame

MAGIC: Final = b"LMIG"
HEADER: Final = struct.Struct("<4sBBHI")  # magic, version, type, flags, payload length
HEADER_SIZE: Final = HEADER.size
_PAGES_FIXED: Final = struct.Struct("<III")  # round, data pages, zero pages
_U32: Final = np.dtype("<u4")

# Hostnames only: the peer's name ends up in log lines and error messages, so it must not
# be able to carry newlines or terminal escapes.
_HOST_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KIND_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")


class Role(enum.Enum):
    CLIENT = "client"  # the side that connects: the migration's source
    SERVER = "server"  # the side that accepts: the destination


class MsgType(enum.IntEnum):
    """The type byte of a frame."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    REQUEST = 5
    REPLY = 6
    PAGES = 7
    ABORT = 8
    DEVICE_STATE = 9

    @property
    def is_handshake(self) -> bool:
        """Handshake messages are the connection's own: it builds and checks them."""
        return self in (MsgType.HELLO, MsgType.CHALLENGE, MsgType.AUTH, MsgType.WELCOME)


# The most payload each type may announce. A header over its cap is refused before a
# single payload byte is read or any room is made for it.
MAX_PAYLOAD: Final[dict[MsgType, int]] = {
    MsgType.HELLO: NONCE_BYTES + 1 + MAX_HOST_BYTES,
    MsgType.CHALLENGE: NONCE_BYTES + PROOF_BYTES + 1 + MAX_HOST_BYTES,
    MsgType.AUTH: PROOF_BYTES,
    MsgType.WELCOME: 0,
    MsgType.REQUEST: 1 + MAX_KIND_BYTES + MAX_JSON_BYTES,
    MsgType.REPLY: 1 + MAX_JSON_BYTES,
    MsgType.PAGES: _PAGES_FIXED.size
    + 4 * (MAX_PAGES_PER_FRAME + MAX_ZERO_PAGES_PER_FRAME)
    + PAGE_SIZE * MAX_PAGES_PER_FRAME,
    MsgType.ABORT: MAX_REASON_BYTES,
    MsgType.DEVICE_STATE: 1 + MAX_STATE_CHUNK,
}
MAX_FRAME_BYTES: Final = HEADER_SIZE + max(MAX_PAYLOAD.values())


# -- messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Client's first frame: who it is and a fresh nonce."""

    host: str
    nonce: bytes


@dataclass(frozen=True)
class Challenge:
    """Server's nonce and its proof of the key: HMAC(key, b"server" + c_nonce + s_nonce)."""

    host: str
    nonce: bytes
    proof: bytes


@dataclass(frozen=True)
class Auth:
    """Client's proof of the key: HMAC(key, b"client" + c_nonce + s_nonce)."""

    proof: bytes


@dataclass(frozen=True)
class Welcome:
    """Server: the peer is authenticated. Only now may requests flow."""


@dataclass(frozen=True)
class Request:
    """A control request, ``kind`` plus a JSON object (e.g. reserve, commit, locate).

    The body's values are ``object``, not ``Any``: a peer's JSON is read only through the
    typed messages of ``wire.messages``, which validate it first."""

    kind: str
    body: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """The answer to the oldest unanswered Request: ``ok`` or not, with a JSON object."""

    ok: bool
    body: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Pages:
    """A batch of guest pages. ``data`` holds len(indexes) x 4096 bytes, in order;
    ``zero_indexes`` are pages that are all zero, sent as indexes only.

    On the receiving side ``data`` is a memoryview into the connection's receive buffer,
    valid until the connection next takes bytes in (``receive_data``/``get_buffer``, or
    the channel's next ``recv``). Copy the pages out before then (the destination writes
    them into guest RAM anyway). A view still in use then is detected: the connection
    moves to a fresh buffer and leaves the old one to the view, so nothing is overwritten
    under it; ``data`` itself is released, and using it raises ``ValueError``.
    """

    round: int
    indexes: npt.NDArray[np.uint32]
    zero_indexes: npt.NDArray[np.uint32]
    data: bytes | memoryview


@dataclass(frozen=True)
class Abort:
    """Either side gives up; ``reason`` is one sentence for the operator."""

    reason: str


@dataclass(frozen=True)
class DeviceState:
    """A chunk of QEMU's device-state stream (CPU and devices, no RAM), carried inside
    the authenticated channel instead of on a TCP port of QEMU's own. ``last`` marks
    the end of the stream; its ``data`` may be empty."""

    data: bytes
    last: bool = False


Message = Hello | Challenge | Auth | Welcome | Request | Reply | Pages | Abort | DeviceState

_TYPE_OF: Final[dict[type, MsgType]] = {
    Hello: MsgType.HELLO,
    Challenge: MsgType.CHALLENGE,
    Auth: MsgType.AUTH,
    Welcome: MsgType.WELCOME,
    Request: MsgType.REQUEST,
    Reply: MsgType.REPLY,
    Pages: MsgType.PAGES,
    Abort: MsgType.ABORT,
    DeviceState: MsgType.DEVICE_STATE,
}

_NAME: Final[dict[MsgType, str]] = {t: cls.__name__ for cls, t in _TYPE_OF.items()}


# -- errors -----------------------------------------------------------------------------


class WireError(LivemigError):
    """About one connection to another daemon. ``peer`` names it: its host name once
    known, else its address; ``None`` for the connection-less codec functions."""

    def __init__(self, peer: str | None, message: str) -> None:
        super().__init__(message)
        self.peer = peer


class LocalProtocolError(WireError):
    """We broke the protocol, or used a connection wrongly: a bug in livemig."""

    def __init__(self, peer: str | None, detail: str, msg_type: str | None = None) -> None:
        where = f" with {peer}" if peer else ""
        super().__init__(peer, f"livemig broke the wire protocol{where}: {detail} (a bug)")
        self.detail = detail
        self.msg_type = msg_type


class RemoteProtocolError(WireError):
    """The peer sent bytes that break the protocol."""

    def __init__(self, peer: str | None, detail: str, msg_type: str | None = None) -> None:
        who = f"peer {peer}" if peer else "the peer"
        super().__init__(peer, f"{who} broke the wire protocol: {detail}")
        self.detail = detail
        self.msg_type = msg_type


class VersionMismatch(RemoteProtocolError):
    """The peer speaks another version of the protocol."""

    def __init__(self, peer: str | None, theirs: int, ours: int = PROTOCOL_VERSION) -> None:
        super().__init__(
            peer,
            f"peer speaks protocol version {theirs}, we speak {ours}; "
            "run the same livemig release on both hosts",
        )
        self.theirs = theirs
        self.ours = ours


class FrameTooLarge(RemoteProtocolError):
    """A header announced a payload beyond the cap for its type."""

    def __init__(self, peer: str | None, msg_type: str, length: int, limit: int) -> None:
        super().__init__(
            peer, f"a {msg_type} frame announced {length} bytes, more than the {limit} allowed",
            msg_type,
        )
        self.length = length
        self.limit = limit


class UnexpectedMessage(RemoteProtocolError):
    """A well-formed frame that the protocol does not allow in this state."""

    def __init__(self, peer: str | None, msg_type: str, state: State) -> None:
        if state in (State.AWAIT_HELLO, State.AWAIT_CHALLENGE, State.AWAIT_AUTH,
                     State.AWAIT_WELCOME, State.START):
            detail = f"sent {msg_type} out of turn during the handshake ({state.value})"
        else:
            detail = f"sent {msg_type}, which is not allowed now ({state.value})"
        super().__init__(peer, detail, msg_type)
        self.state = state


class AuthenticationError(WireError):
    """The peer's proof of the shared key did not verify."""

    def __init__(self, peer: str | None, detail: str) -> None:
        who = f"peer {peer}" if peer else "the peer"
        super().__init__(
            peer,
            f"{who} does not hold our key: {detail}; give both daemons the same key "
            "(or something else answered in its place)",
        )
        self.detail = detail


class PeerNotTrusted(AuthenticationError):
    """TLS refused a certificate, or the peer calls itself other than its certificate.
    ``by_peer``: the peer refused us (our certificate, or TLS at all); else we refused it."""

    def __init__(self, peer: str | None, detail: str, *, by_peer: bool = False) -> None:
        who = f"peer {peer}" if peer else "the peer"
        verdict = "refused us" if by_peer else "is not trusted"
        WireError.__init__(self, peer, f"{who} {verdict}: {detail}")
        self.detail = detail
        self.by_peer = by_peer


class PeerAborted(WireError):
    """The peer gave up and said why."""

    def __init__(self, peer: str | None, reason: str) -> None:
        super().__init__(peer, f"peer {peer or '(unnamed)'} aborted: {reason}")
        self.reason = reason


class PeerLost(WireError):
    """The connection closed or broke. ``mid_frame``: a frame had begun to arrive."""

    def __init__(self, peer: str | None, detail: str, *, mid_frame: bool = False) -> None:
        super().__init__(peer, f"lost the connection to {peer or 'the peer'}: {detail}")
        self.detail = detail
        self.mid_frame = mid_frame


class PeerUnreachable(PeerLost):
    """We could not open a connection to the peer at all."""

    def __init__(self, peer: str, detail: str) -> None:
        WireError.__init__(
            self, peer, f"cannot connect to {peer}: {detail}; is livemigd running there?"
        )
        self.detail = detail
        self.mid_frame = False


class PeerTimeout(WireError):
    """The peer did not do ``what`` within ``seconds``."""

    def __init__(self, peer: str | None, what: str, seconds: float | None) -> None:
        within = f" within {seconds:g} s" if seconds is not None else ""
        super().__init__(peer, f"{peer or 'the peer'} did not {what}{within}")
        self.what = what
        self.seconds = seconds


class _Invalid(Exception):
    """Internal: an outgoing message is invalid; turned into LocalProtocolError."""


class _Malformed(Exception):
    """Internal: an incoming payload is malformed; turned into RemoteProtocolError."""


# -- codec: encoding --------------------------------------------------------------------


def _header(mtype: MsgType, length: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, mtype, 0, length)


def _check_host(host: object) -> bytes:
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise _Invalid(f"host {host!r} is not a hostname of at most {MAX_HOST_BYTES} chars")
    return host.encode("ascii")


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise _Invalid(f"{what} must be {size} bytes")
    return value


def _encode_json(body: object) -> bytes:
    if not isinstance(body, dict):
        raise _Invalid(f"body must be a dict, not {type(body).__name__}")
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _Invalid(f"body is not JSON: {exc}") from exc
    raw = text.encode("utf-8")
    if len(raw) > MAX_JSON_BYTES:
        raise _Invalid(f"body is {len(raw)} bytes of JSON, more than {MAX_JSON_BYTES}")
    return raw


def _index_array(values: object, what: str, cap: int, npages: int) -> npt.NDArray[np.uint32]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise _Invalid(f"{what} must be one-dimensional")
    if arr.size == 0:
        return np.empty(0, _U32)
    if arr.dtype.kind not in "ui":
        raise _Invalid(f"{what} must hold integers, not {arr.dtype}")
    if arr.size > cap:
        raise _Invalid(f"{arr.size} {what} in one frame, more than {cap}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= npages:
        raise _Invalid(f"{what} holds page {lo if lo < 0 else hi}, outside 0..{npages - 1}")
    return arr.astype(_U32, copy=False)


def _has_duplicates(a: npt.NDArray[np.uint32], b: npt.NDArray[np.uint32]) -> bool:
    if a.size + b.size < 2:
        return False
    # One sort of at most 17k u32 values: ~0.1 ms per frame, well under the ~1 ms the
    # frame's 4 MiB take to copy, and it makes a frame's meaning independent of order.
    both = np.concatenate((a, b))
    both.sort()
    return bool((both[1:] == both[:-1]).any())


def _pages_parts(msg: Pages, npages: int) -> list[bytes | memoryview]:
    try:
        rnd = operator.index(msg.round)  # numpy integers welcome
    except TypeError as exc:
        raise _Invalid(f"round {msg.round!r} is not an integer") from exc
    if not 0 <= rnd < 1 << 32:
        raise _Invalid(f"round {rnd} is not a u32")
    idx = _index_array(msg.indexes, "indexes", MAX_PAGES_PER_FRAME, npages)
    zero = _index_array(msg.zero_indexes, "zero_indexes", MAX_ZERO_PAGES_PER_FRAME, npages)
    try:
        data = memoryview(msg.data)
    except TypeError as exc:
        raise _Invalid("data must be a bytes-like object") from exc
    if not data.c_contiguous:
        raise _Invalid("data must be C-contiguous")
    if data.ndim != 1 or data.format != "B":
        data = data.cast("B")
    if data.nbytes != PAGE_SIZE * idx.size:
        raise _Invalid(f"data holds {data.nbytes} bytes for {idx.size} pages of {PAGE_SIZE}")
    if _has_duplicates(idx, zero):
        raise _Invalid("a page appears twice in one frame")
    fixed_len = _PAGES_FIXED.size + 4 * (idx.size + zero.size)
    head = b"".join((
        _header(MsgType.PAGES, fixed_len + data.nbytes),
        _PAGES_FIXED.pack(rnd, idx.size, zero.size),
        idx.tobytes(),
        zero.tobytes(),
    ))
    return [head, data] if data.nbytes else [head]


def _payload(msg: object) -> tuple[MsgType, bytes]:
    """The payload of any message but Pages."""
    match msg:
        case Hello(host=host, nonce=nonce):
            raw = _check_host(host)
            payload = _check_bytes(nonce, NONCE_BYTES, "nonce") + bytes((len(raw),)) + raw
            return MsgType.HELLO, payload
        case Challenge(host=host, nonce=nonce, proof=proof):
            raw = _check_host(host)
            payload = b"".join((
                _check_bytes(nonce, NONCE_BYTES, "nonce"),
                _check_bytes(proof, PROOF_BYTES, "proof"),
                bytes((len(raw),)),
                raw,
            ))
            return MsgType.CHALLENGE, payload
        case Auth(proof=proof):
            return MsgType.AUTH, _check_bytes(proof, PROOF_BYTES, "proof")
        case Welcome():
            return MsgType.WELCOME, b""
        case Request(kind=kind, body=body):
            if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
                raise _Invalid(f"kind {kind!r} is not an identifier of at most "
                               f"{MAX_KIND_BYTES} chars")
            raw_kind = kind.encode("ascii")
            return MsgType.REQUEST, bytes((len(raw_kind),)) + raw_kind + _encode_json(body)
        case Reply(ok=ok, body=body):
            if not isinstance(ok, bool):
                raise _Invalid(f"ok must be a bool, not {type(ok).__name__}")
            return MsgType.REPLY, bytes((ok,)) + _encode_json(body)
        case DeviceState(data=data, last=last):
            if not isinstance(last, bool):
                raise _Invalid(f"last must be a bool, not {type(last).__name__}")
            try:
                raw_state = bytes(data)
            except TypeError as exc:
                raise _Invalid("data must be a bytes-like object") from exc
            if len(raw_state) > MAX_STATE_CHUNK:
                raise _Invalid(f"a device-state chunk of {len(raw_state)} bytes, more "
                               f"than {MAX_STATE_CHUNK}")
            return MsgType.DEVICE_STATE, bytes((last,)) + raw_state
        case Abort(reason=reason):
            if not isinstance(reason, str) or not reason or not reason.isprintable():
                raise _Invalid("reason must be a non-empty printable one-line string")
            raw = reason.encode("utf-8")
            if len(raw) > MAX_REASON_BYTES:
                raise _Invalid(f"reason is {len(raw)} bytes, more than {MAX_REASON_BYTES}")
            return MsgType.ABORT, raw
    raise _Invalid(f"{type(msg).__name__} is not a livemig message")


def _encode_parts(msg: object, npages: int = MAX_NPAGES) -> list[bytes | memoryview]:
    if isinstance(msg, Pages):
        return _pages_parts(msg, npages)
    mtype, payload = _payload(msg)
    return [_header(mtype, len(payload)) + payload]


def encode_parts(msg: Message) -> list[bytes | memoryview]:
    """One frame as parts to write in order: for Pages the header with the index arrays,
    then the page data itself (not copied), so a transport can write them without
    concatenating megabytes; for the other messages a single ``bytes``.
    Raises LocalProtocolError for an invalid message."""
    try:
        return _encode_parts(msg)
    except _Invalid as exc:
        raise LocalProtocolError(None, str(exc), type(msg).__name__) from exc


def encode(msg: Message) -> bytes:
    """One frame as bytes. Raises LocalProtocolError for an invalid message. Outside a
    Connection nothing checks whether the message is allowed; use it for tests and
    tools, and ``Connection.send`` for the protocol."""
    return b"".join(encode_parts(msg))


def printable_reason(text: str, limit: int = MAX_REASON_BYTES) -> str:
    """Make any text fit an Abort's reason: one printable line of at most ``limit`` bytes."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text) or "error"
    return clean.encode("utf-8")[:limit].decode("utf-8", "ignore")


# -- codec: decoding --------------------------------------------------------------------


def _check_header(buf: bytes | bytearray | memoryview, offset: int,
                  peer: str | None) -> tuple[MsgType, int]:
    """Validate the header at ``offset``: magic, version, type, flags, length cap."""
    magic, version, raw_type, flags, length = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise RemoteProtocolError(peer, f"bad magic {magic!r}: not the livemig protocol")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(peer, version)
    try:
        mtype = MsgType(raw_type)
    except ValueError as exc:
        raise RemoteProtocolError(peer, f"unknown frame type {raw_type}") from exc
    if flags:
        raise RemoteProtocolError(peer, f"reserved flags {flags:#06x} set", _NAME[mtype])
    if length > MAX_PAYLOAD[mtype]:
        raise FrameTooLarge(peer, _NAME[mtype], length, MAX_PAYLOAD[mtype])
    return mtype, length


def _decode_host(raw: memoryview) -> str:
    try:
        host = str(raw, "ascii")
    except UnicodeDecodeError as exc:
        raise _Malformed("host name is not ASCII") from exc
    if not _HOST_RE.fullmatch(host):
        raise _Malformed(f"host name {host!r} is not a hostname")
    return host


def _decode_json(raw: memoryview) -> dict[str, object]:
    if len(raw) > MAX_JSON_BYTES:
        raise _Malformed(f"JSON body of {len(raw)} bytes, more than {MAX_JSON_BYTES}")
    try:
        value = json.loads(str(raw, "utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise _Malformed("JSON body is not UTF-8") from exc
    except RecursionError as exc:  # the C scanner recurses per nesting level
        raise _Malformed("JSON body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise _Malformed(f"JSON body does not parse: {exc}") from exc
    if not isinstance(value, dict):
        raise _Malformed(f"JSON body is a {type(value).__name__}, not an object")
    return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _decode_small(mtype: MsgType, p: memoryview) -> Message:
    """Decode the payload of any message but Pages."""
    n = len(p)
    match mtype:
        case MsgType.HELLO:
            if n < NONCE_BYTES + 1 or n != NONCE_BYTES + 1 + p[NONCE_BYTES]:
                raise _Malformed("payload length does not match its host length")
            return Hello(_decode_host(p[NONCE_BYTES + 1:]), bytes(p[:NONCE_BYTES]))
        case MsgType.CHALLENGE:
            fixed = NONCE_BYTES + PROOF_BYTES
            if n < fixed + 1 or n != fixed + 1 + p[fixed]:
                raise _Malformed("payload length does not match its host length")
            return Challenge(_decode_host(p[fixed + 1:]), bytes(p[:NONCE_BYTES]),
                             bytes(p[NONCE_BYTES:fixed]))
        case MsgType.AUTH:
            if n != PROOF_BYTES:
                raise _Malformed(f"proof of {n} bytes, not {PROOF_BYTES}")
            return Auth(bytes(p))
        case MsgType.WELCOME:
            return Welcome()  # its cap of 0 bytes was checked with the header
        case MsgType.REQUEST:
            if n < 1 or not 1 <= p[0] <= MAX_KIND_BYTES or n < 1 + p[0]:
                raise _Malformed("bad kind length")
            try:
                kind = str(p[1:1 + p[0]], "ascii")
            except UnicodeDecodeError as exc:
                raise _Malformed("kind is not ASCII") from exc
            if not _KIND_RE.fullmatch(kind):
                raise _Malformed(f"kind {kind!r} is not an identifier")
            return Request(kind, _decode_json(p[1 + p[0]:]))
        case MsgType.REPLY:
            if n < 1 or p[0] not in (0, 1):
                raise _Malformed("ok flag is neither 0 nor 1")
            return Reply(bool(p[0]), _decode_json(p[1:]))
        case MsgType.DEVICE_STATE:
            if n < 1 or p[0] not in (0, 1):
                raise _Malformed("last flag is neither 0 nor 1")
            return DeviceState(bytes(p[1:]), bool(p[0]))
        case MsgType.ABORT:
            try:
                reason = str(p, "utf-8")
            except UnicodeDecodeError as exc:
                raise _Malformed("reason is not UTF-8") from exc
            if not reason or not reason.isprintable():
                raise _Malformed("reason is empty or not one printable line")
            return Abort(reason)
    raise _Malformed(f"no decoder for {mtype!r}")  # unreachable: MsgType is closed


def _u32s(buf: bytearray | bytes | memoryview, offset: int,
          count: int) -> npt.NDArray[np.uint32]:
    if not count:
        return np.empty(0, _U32)
    # Copied out: the index arrays are small (<= 68 KiB) and the caller keeps them.
    return np.frombuffer(buf, _U32, count, offset).copy()


def _decode_pages(buf: bytearray | bytes | memoryview, view: memoryview, start: int,
                  end: int, npages: int) -> Pages:
    """Decode the Pages payload in ``buf[start:end]``; ``data`` is a view of ``view``."""
    length = end - start
    if length < _PAGES_FIXED.size:
        raise _Malformed("payload shorter than its fixed part")
    rnd, n, z = _PAGES_FIXED.unpack_from(buf, start)
    if n > MAX_PAGES_PER_FRAME or z > MAX_ZERO_PAGES_PER_FRAME:
        raise _Malformed(f"{n} data and {z} zero pages, more than "
                         f"{MAX_PAGES_PER_FRAME} and {MAX_ZERO_PAGES_PER_FRAME}")
    data_at = start + _PAGES_FIXED.size + 4 * (n + z)
    if end != data_at + PAGE_SIZE * n:
        raise _Malformed(f"payload of {length} bytes does not fit {n} data and {z} zero pages")
    idx = _u32s(buf, start + _PAGES_FIXED.size, n)
    zero = _u32s(buf, start + _PAGES_FIXED.size + 4 * n, z)
    for arr, what in ((idx, "data"), (zero, "zero")):
        if arr.size and int(arr.max()) >= npages:
            raise _Malformed(f"{what} page {int(arr.max())} is beyond the VM's {npages} pages")
    if _has_duplicates(idx, zero):
        raise _Malformed("a page appears twice in one frame")
    return Pages(rnd, idx, zero, view[data_at:end])


def decode(frame: bytes | bytearray | memoryview, *, npages: int = MAX_NPAGES) -> Message:
    """Decode exactly one whole frame, without any connection state (tests, tools).
    Raises a RemoteProtocolError for anything but one valid frame. For Pages, ``data``
    is a view into ``frame``."""
    view = memoryview(frame).cast("B")
    if len(view) < HEADER_SIZE:
        raise RemoteProtocolError(None, f"{len(view)} bytes are not a whole frame")
    mtype, length = _check_header(view, 0, None)
    if len(view) != HEADER_SIZE + length:
        raise RemoteProtocolError(
            None, f"header announces {length} payload bytes, {len(view) - HEADER_SIZE} follow")
    try:
        if mtype is MsgType.PAGES:
            return _decode_pages(view, view, HEADER_SIZE, len(view), npages)
        return _decode_small(mtype, view[HEADER_SIZE:])
    except _Malformed as exc:
        raise RemoteProtocolError(None, f"malformed {_NAME[mtype]}: {exc}", _NAME[mtype]) from exc


# -- the connection ---------------------------------------------------------------------


class State(enum.Enum):
    """Where a connection stands. Handshake states are named after what they wait for."""

    START = "start"  # client, before initiate()
    AWAIT_HELLO = "await-hello"  # server
    AWAIT_CHALLENGE = "await-challenge"  # client, Hello sent
    AWAIT_AUTH = "await-auth"  # server, Challenge sent
    AWAIT_WELCOME = "await-welcome"  # client, Auth sent
    OPEN = "open"  # authenticated: requests and pages flow
    CLOSED = "closed"  # an Abort went one way or the other
    ERROR = "error"  # dead after an error


_HANDSHAKE_STATES: Final = frozenset(
    {State.START, State.AWAIT_HELLO, State.AWAIT_CHALLENGE, State.AWAIT_AUTH,
     State.AWAIT_WELCOME})

_C, _S = Role.CLIENT, Role.SERVER
_OPEN_TRAFFIC: Final = {MsgType.REQUEST: State.OPEN, MsgType.REPLY: State.OPEN,
                        MsgType.PAGES: State.OPEN, MsgType.DEVICE_STATE: State.OPEN,
                        MsgType.ABORT: State.CLOSED}

# Everything that moves a connection's state lives in these two tables (h11's rule).
# _RECEIVE: what may arrive in each state, the state it leads to, and the handshake
# message the connection answers with by itself. A frame type missing here is refused
# from its header alone, before its payload is read.
_RECEIVE: Final[dict[tuple[Role, State], dict[MsgType, tuple[State, MsgType | None]]]] = {
    (_S, State.AWAIT_HELLO): {MsgType.HELLO: (State.AWAIT_AUTH, MsgType.CHALLENGE),
                              MsgType.ABORT: (State.CLOSED, None)},
    (_C, State.AWAIT_CHALLENGE): {MsgType.CHALLENGE: (State.AWAIT_WELCOME, MsgType.AUTH),
                                  MsgType.ABORT: (State.CLOSED, None)},
    (_S, State.AWAIT_AUTH): {MsgType.AUTH: (State.OPEN, MsgType.WELCOME),
                             MsgType.ABORT: (State.CLOSED, None)},
    (_C, State.AWAIT_WELCOME): {MsgType.WELCOME: (State.OPEN, None),
                                MsgType.ABORT: (State.CLOSED, None)},
    (_C, State.OPEN): {t: (s, None) for t, s in _OPEN_TRAFFIC.items()},
    (_S, State.OPEN): {t: (s, None) for t, s in _OPEN_TRAFFIC.items()},
}
# _SEND: what the application may send in each state, and the state it leads to. The
# handshake messages are sent by the connection itself (initiate() and the answers above).
_SEND: Final[dict[tuple[Role, State], dict[MsgType, State]]] = {
    (_C, State.START): {MsgType.HELLO: State.AWAIT_CHALLENGE, MsgType.ABORT: State.CLOSED},
    (_C, State.AWAIT_CHALLENGE): {MsgType.ABORT: State.CLOSED},
    (_C, State.AWAIT_WELCOME): {MsgType.ABORT: State.CLOSED},
    (_S, State.AWAIT_HELLO): {MsgType.ABORT: State.CLOSED},
    (_S, State.AWAIT_AUTH): {MsgType.ABORT: State.CLOSED},
    (_C, State.OPEN): dict(_OPEN_TRAFFIC),
    (_S, State.OPEN): dict(_OPEN_TRAFFIC),
}

_READ_CHUNK: Final = 64 * 1024  # what we read while the next frame's size is unknown


class Connection:
    """One end of a livemig connection, sans-IO.

    Receiving: ``receive_data(data)`` (``b""`` = the peer closed), or zero-copy through
    ``get_buffer()``/``buffer_updated()`` as ``asyncio.BufferedProtocol`` does; then
    ``next_message()`` until it returns ``None``, writing ``data_to_send()`` after each
    call, because the connection answers the handshake by itself. ``need_data()`` tells a
    reader whether to read on. Handshake messages are never returned: after the
    handshake, ``established`` is true and ``peer_host`` names the authenticated peer.

    Sending: the client calls ``initiate()`` once and writes the Hello it returns;
    afterwards ``send(msg)`` checks that ``msg`` is valid and allowed now and returns its
    frame; ``send_pages_parts(pages)`` returns the same frame in parts.

    Request/Reply: each Reply answers the oldest unanswered Request that went the other
    way; a Reply with nothing to answer is a protocol error on either side.

    ``npages`` bounds the page indexes of Pages in both directions. The destination sets
    it when it has reserved the VM's RAM, before it answers the reservation; a Pages
    frame that arrives while it is ``None`` is the peer's protocol error.
    """

    def __init__(self, role: Role, key: bytes, host: str, *, npages: int | None = None,
                 peer: str | None = None) -> None:
        """``host`` is our name, told to the peer; ``peer`` labels the peer (its
        address, say) in errors until it has told us its name."""
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the key must be at least {MIN_KEY_BYTES} bytes")
        if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
            raise ValueError(f"host {host!r} is not a hostname")
        self.role = role
        self.host = host
        self.peer_host: str | None = None  # as the peer claims; verified once established
        # The name the peer must give in its Hello/Challenge: the host its TLS
        # certificate names. None: any name (the HMAC alone authenticates).
        self.expect_peer: str | None = None
        self.label = peer  # the peer's address, say: names it until it tells its name
        self._key = key
        self._npages: int | None = None
        self.npages = npages
        self._state = State.START if role is Role.CLIENT else State.AWAIT_HELLO
        self._my_nonce = b""
        self._peer_nonce = b""
        self._out = bytearray()
        self._requests_out = 0  # our Requests the peer has not answered yet
        self._requests_in = 0  # the peer's Requests we have not answered yet
        self._error: WireError | None = None
        self._peer_abort: str | None = None  # the reason of the Abort the peer sent
        self._eof = False
        # The receive buffer: bytes [start:end) are the peer's and not yet consumed.
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._hdr: tuple[MsgType, int] | None = None  # validated header of the next frame
        self._lent: list[memoryview] = []  # Pages.data views handed out since last write

    # -- properties -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def established(self) -> bool:
        """The handshake has completed (and no Abort or error has ended it since)."""
        return self._state is State.OPEN

    @property
    def peer(self) -> str:
        """The peer's name for messages: its host name if it told us, else its label."""
        return self.peer_host or self.label or "(unnamed)"

    @property
    def npages(self) -> int | None:
        return self._npages

    @npages.setter
    def npages(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_NPAGES):
            raise ValueError(f"npages must be None or an int in 0..{MAX_NPAGES}")
        self._npages = value

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return self._end - self._start

    # -- sending ------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """Client: the Hello that opens the handshake, with a fresh nonce. Write it first."""
        self._require_usable()
        if (self.role, self._state) != (Role.CLIENT, State.START):
            self._local_error("initiate() is for a client, once", "Hello")
        self._my_nonce = secrets.token_bytes(NONCE_BYTES)
        frame = b"".join(_encode_parts(Hello(self.host, self._my_nonce)))
        self._state = _SEND[(self.role, self._state)][MsgType.HELLO]
        return frame

    def send(self, msg: Message) -> bytes:
        """The frame for ``msg``, to write as is. Raises LocalProtocolError if ``msg`` is
        invalid or not allowed now; the connection is then dead."""
        parts = self._send_parts(msg)
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def send_pages_parts(self, msg: Pages) -> list[bytes | memoryview]:
        """Like ``send`` for Pages, as parts to write in order (``writev``-style): the
        header with the indexes, then ``msg.data`` itself, not copied."""
        if not isinstance(msg, Pages):
            self._local_error(f"send_pages_parts() takes Pages, not {type(msg).__name__}")
        return self._send_parts(msg)

    def data_to_send(self) -> bytes:
        """Bytes the connection wants written: its own handshake answers, or the Abort
        that tells the peer why we drop it. Never raises; call after every
        ``next_message()``, also after one that raised."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _send_parts(self, msg: Message) -> list[bytes | memoryview]:
        self._require_usable()
        mtype = _TYPE_OF.get(type(msg))
        if mtype is None:
            self._local_error(f"{type(msg).__name__} is not a livemig message")
        name = _NAME[mtype]
        if mtype.is_handshake:
            self._local_error("the handshake is the connection's own; use initiate()", name)
        after = _SEND.get((self.role, self._state), {}).get(mtype)
        if after is None:
            self._local_error(f"cannot send {name} in state {self._state.value}", name)
        if mtype is MsgType.REPLY and not self._requests_in:
            self._local_error("a Reply with no Request to answer", name)
        try:
            parts = _encode_parts(msg, MAX_NPAGES if self._npages is None else self._npages)
        except _Invalid as exc:
            err = LocalProtocolError(self.peer, f"invalid {name}: {exc}", name)
            self._die(err)
            raise err from exc
        if mtype is MsgType.REQUEST:
            self._requests_out += 1
        elif mtype is MsgType.REPLY:
            self._requests_in -= 1
        self._state = after
        return parts

    # -- receiving: the buffer ----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its end."""
        self._require_usable()
        if self._eof:
            self._local_error("receive_data() after the end of the stream")
        src = memoryview(data)
        if src.ndim != 1 or src.itemsize != 1:
            src = src.cast("B")
        n = src.nbytes
        if not n:
            self._eof = True
            return
        self._make_room(n, grow_to=2 * self._capacity + n)
        self._view[self._end:self._end + n] = src
        self._end += n

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view to receive the next bytes into (``BufferedProtocol``); report
        how many arrived with ``buffer_updated``. Never raises. Once a frame's header is
        in, the view is exactly the rest of that frame, so big frames land whole and
        never need moving; until then it is up to 64 KiB."""
        want = _READ_CHUNK
        grow_to = _READ_CHUNK
        try:
            size = self._frame_size()
        except WireError:
            size = None  # next_message() raises it; meanwhile the reader is paused
        if size is not None:
            missing = size - self.buffered
            if missing >= _READ_CHUNK:
                want = missing
                # Room for the biggest frame of this type, so that a later, slightly
                # bigger frame does not make us grow again.
                assert self._hdr is not None
                grow_to = HEADER_SIZE + MAX_PAYLOAD[self._hdr[0]] + _READ_CHUNK
        self._make_room(want, grow_to=grow_to)
        return self._view[self._end:self._end + want]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the view from ``get_buffer``."""
        self._end = min(self._end + nbytes, self._capacity)

    def need_data(self) -> bool:
        """Would ``next_message()`` return None for lack of bytes? False once a frame is
        complete, when the buffered bytes already break the protocol (``next_message``
        then raises), and after the end of the stream: time to stop reading."""
        if self._state in (State.ERROR, State.CLOSED) or self._eof:
            return False
        try:
            size = self._frame_size()
        except WireError:
            return False  # not swallowed: next_message() raises it again and dies
        return size is None or self.buffered < size

    def aborted_ahead(self) -> bool:
        """Is the next message, whole in the buffer and not yet taken, an Abort? A
        sender that does not read (the source in pre-copy) learns from it that the peer
        gave up, without taking any message out of order. Never raises."""
        if self._state in (State.ERROR, State.CLOSED):
            return False
        try:
            size = self._frame_size()
        except WireError:
            return False  # next_message() raises it, whoever takes the next message
        return (size is not None and self.buffered >= size and self._hdr is not None
                and self._hdr[0] is MsgType.ABORT)

    @property
    def _capacity(self) -> int:
        return len(self._buf)

    def _make_room(self, n: int, grow_to: int) -> None:
        """Ensure ``n`` writable bytes after ``end``, moving or growing the buffer."""
        if self._start == self._end and self._start:
            # All consumed: start again at the front, once nobody can see what is there.
            self._reclaim()
            self._start = self._end = 0
        if self._capacity - self._end >= n:
            return
        pending = self.buffered
        if pending + n <= self._capacity:
            self._reclaim()
            if self._start:  # the buffer may have been replaced by _reclaim()
                self._buf[0:pending] = self._buf[self._start:self._end]  # same size: memmove
        else:
            # A new buffer: whatever we lent stays valid in the old one.
            self._lent.clear()
            self._replace_buffer(max(pending + n, grow_to))
        self._start, self._end = 0, pending  # a cached header moved with its frame

    def _reclaim(self) -> None:
        """Before bytes that were lent as ``Pages.data`` are overwritten: release those
        views, and if anything still refers to the buffer (a numpy array made from a
        view, a slice of it), leave the buffer to it and continue in a fresh one."""
        if not self._lent:
            return
        lent, self._lent = self._lent, []
        shared = False
        for view in lent:
            try:
                view.release()
            except BufferError:  # an object made from the view holds it
                shared = True
        if not shared:
            # Every view of a bytearray (ours included) pins its size, so a bytearray
            # that can grow by one byte is seen by no one else. append/del leave the
            # contents untouched and cost O(1) once capacity is over-allocated.
            self._view.release()
            try:
                self._buf.append(0)
            except BufferError:
                shared = True
            else:
                del self._buf[-1]
            self._view = memoryview(self._buf)
        if shared:
            self._replace_buffer(self._capacity)

    def _replace_buffer(self, capacity: int) -> None:
        pending = self.buffered
        new = bytearray(capacity)
        new[:pending] = self._view[self._start:self._end]
        self._buf, self._view = new, memoryview(new)
        self._start, self._end = 0, pending

    # -- receiving: frames --------------------------------------------------------------

    def _frame_size(self) -> int | None:
        """Size of the frame at the head of the buffer once its header is in, else None.
        Raises RemoteProtocolError for a header that breaks the protocol, before any of
        its payload is read or any room is made for it."""
        if self._hdr is not None:
            return HEADER_SIZE + self._hdr[1]
        avail = self.buffered
        if avail < HEADER_SIZE:
            # Refuse a stranger (an HTTP client, say) at its first bytes.
            head = bytes(self._buf[self._start:self._start + min(avail, len(MAGIC))])
            if not MAGIC.startswith(head):
                raise RemoteProtocolError(self.peer, f"bad magic {head!r}: not the livemig "
                                                     "protocol")
            return None
        mtype, length = _check_header(self._buf, self._start, self.peer)
        if mtype not in _RECEIVE.get((self.role, self._state), {}):
            raise UnexpectedMessage(self.peer, _NAME[mtype], self._state)
        self._hdr = (mtype, length)
        return HEADER_SIZE + length

    def next_message(self) -> Message | None:
        """The next message from the peer, or None until more bytes arrive (and once when
        the handshake completes: check ``established``). Raises a
        WireError subclass if the peer broke the protocol, failed authentication, or
        closed mid-conversation; the connection is then dead."""
        self._require_usable()
        try:
            while True:
                size = self._frame_size()
                if size is None or self.buffered < size:
                    if self._eof:
                        raise PeerLost(
                            self.peer,
                            "it closed the connection" + (" in the middle of a frame"
                                                          if self.buffered else ""),
                            mid_frame=bool(self.buffered),
                        )
                    return None
                assert self._hdr is not None
                mtype = self._hdr[0]
                body, end = self._start + HEADER_SIZE, self._start + size
                msg = self._decode(mtype, body, end)
                self._start, self._hdr = end, None
                out = self._receive(mtype, msg)
                if out is not None or (self.established and mtype.is_handshake):
                    # Stop once the handshake completes too, so that whoever waits for
                    # ``established`` sees it before the first message is taken.
                    return out
        except WireError as err:
            self._die(err)
            raise

    def _decode(self, mtype: MsgType, start: int, end: int) -> Message:
        name = _NAME[mtype]
        try:
            if mtype is MsgType.PAGES:
                if self._npages is None:
                    raise RemoteProtocolError(
                        self.peer, "sent Pages before we reserved memory for them", name)
                pages = _decode_pages(self._buf, self._view, start, end, self._npages)
                assert isinstance(pages.data, memoryview)
                self._lent.append(pages.data)
                return pages
            return _decode_small(mtype, self._view[start:end])
        except _Malformed as exc:
            raise RemoteProtocolError(self.peer, f"malformed {name}: {exc}", name) from exc

    def _receive(self, mtype: MsgType, msg: Message) -> Message | None:
        """Apply a decoded message to the state; return it unless it is the handshake's."""
        after, answer = _RECEIVE[(self.role, self._state)][mtype]
        match msg:
            case Hello():
                self._check_name(msg.host)
                self.peer_host = msg.host
                self._peer_nonce = msg.nonce
                self._my_nonce = secrets.token_bytes(NONCE_BYTES)
            case Challenge():
                self._check_name(msg.host)
                self.peer_host = msg.host
                self._peer_nonce = msg.nonce
                if not hmac.compare_digest(msg.proof, self._proof(b"server")):
                    raise AuthenticationError(self.peer, "its Challenge proof did not verify")
            case Auth():
                if not hmac.compare_digest(msg.proof, self._proof(b"client")):
                    raise AuthenticationError(self.peer, "its Auth proof did not verify")
            case Reply():
                if not self._requests_out:
                    raise RemoteProtocolError(self.peer, "sent a Reply to no Request", "Reply")
                self._requests_out -= 1
            case Request():
                self._requests_in += 1
            case Abort():
                self._peer_abort = msg.reason
        self._state = after
        if answer is MsgType.CHALLENGE:
            self._queue(Challenge(self.host, self._my_nonce, self._proof(b"server")))
        elif answer is MsgType.AUTH:
            self._queue(Auth(self._proof(b"client")))
        elif answer is MsgType.WELCOME:
            self._queue(Welcome())
        return None if mtype.is_handshake else msg

    def _check_name(self, claimed: str) -> None:
        if self.expect_peer is not None and claimed != self.expect_peer:
            raise PeerNotTrusted(
                self.peer, f"it calls itself {claimed!r} but its certificate names "
                           f"{self.expect_peer!r}")

    def _proof(self, label: bytes) -> bytes:
        if self.role is Role.CLIENT:
            c_nonce, s_nonce = self._my_nonce, self._peer_nonce
        else:
            c_nonce, s_nonce = self._peer_nonce, self._my_nonce
        return hmac.new(self._key, label + c_nonce + s_nonce, hashlib.sha256).digest()

    def _queue(self, msg: Message) -> None:
        for part in _encode_parts(msg):
            self._out += part

    # -- errors ---------------------------------------------------------------------------

    def _require_usable(self) -> None:
        if self._state is State.ERROR:
            raise self._dead_error()
        if self._state is State.CLOSED:
            if self._peer_abort is not None:  # not our mistake: say what happened
                raise PeerAborted(self.peer, self._peer_abort)
            raise LocalProtocolError(self.peer, "we closed the connection with an Abort")

    def _dead_error(self) -> LocalProtocolError:
        err = LocalProtocolError(self.peer, f"the connection is dead after: {self._error}")
        err.__cause__ = self._error
        return err

    def _local_error(self, detail: str, msg_type: str | None = None) -> NoReturn:
        err = LocalProtocolError(self.peer, detail, msg_type)
        self._die(err)
        raise err

    def _die(self, err: WireError) -> None:
        if self._state is State.ERROR:
            return
        told = self._state not in (State.START, State.CLOSED)
        self._state = State.ERROR
        self._error = err
        if told and isinstance(err, RemoteProtocolError | AuthenticationError):
            # Tell the peer's operator why, in its own log: cheaper than guessing.
            self._out.clear()
            self._queue(Abort(printable_reason(f"{self.host}: {err}")))
