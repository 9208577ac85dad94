"""The sans-IO wire codec and Connection: no sockets, bytes in and bytes out.

Round trips for every message, the handshake (happy path, wrong keys, replays, messages
out of turn), size caps checked before allocation, and hypothesis fuzzing of the decoder:
whatever the bytes, a failure is a WireError and the connection is dead afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import LivemigError
from livemig.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME_BYTES,
    MAX_PAGES_PER_FRAME,
    MAX_PAYLOAD,
    MAX_STATE_CHUNK,
    MAX_ZERO_PAGES_PER_FRAME,
    NONCE_BYTES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    AuthenticationError,
    Challenge,
    Connection,
    DeviceState,
    FrameTooLarge,
    Hello,
    LocalProtocolError,
    Message,
    MsgType,
    Pages,
    PeerAborted,
    PeerLost,
    PeerNotTrusted,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    State,
    UnexpectedMessage,
    VersionMismatch,
    Welcome,
    WireError,
    decode,
    encode,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NPAGES = 4096


def fuzz(examples: int) -> settings:
    """Hypothesis settings for the fuzz tests: a fixed budget, no per-example deadline."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])



def pair(client_key: bytes = KEY, server_key: bytes = KEY,
         npages: int | None = NPAGES) -> tuple[Connection, Connection]:
    return (Connection(Role.CLIENT, client_key, "hostA", npages=npages),
            Connection(Role.SERVER, server_key, "hostB", npages=npages))


def handshake(client: Connection, server: Connection) -> None:
    server.receive_data(client.initiate())
    assert server.next_message() is None
    client.receive_data(server.data_to_send())
    assert client.next_message() is None
    server.receive_data(client.data_to_send())
    assert server.next_message() is None
    client.receive_data(server.data_to_send())
    assert client.next_message() is None
    assert client.established and server.established


def established(npages: int | None = NPAGES) -> tuple[Connection, Connection]:
    client, server = pair(npages=npages)
    handshake(client, server)
    return client, server


def transfer(src: Connection, dst: Connection, msg: Message) -> Message:
    dst.receive_data(src.send(msg))
    out = dst.next_message()
    assert out is not None
    if not isinstance(out, Abort):  # nothing may be taken after an Abort
        assert dst.next_message() is None
    return out


def frame(mtype: int, payload: bytes, *, magic: bytes = MAGIC,
          version: int = PROTOCOL_VERSION, flags: int = 0, length: int | None = None) -> bytes:
    """A frame built by hand, to say what the encoder never would."""
    size = len(payload) if length is None else length
    return HEADER.pack(magic, version, mtype, flags, size) + payload


def mac(key: bytes, label: bytes, c_nonce: bytes, s_nonce: bytes) -> bytes:
    return hmac.new(key, label + c_nonce + s_nonce, hashlib.sha256).digest()


def random_pages(n: int, z: int, seed: int = 0, npages: int = NPAGES) -> Pages:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(npages, n + z, replace=False).astype(np.uint32)
    data = rng.integers(0, 256, n * PAGE_SIZE, dtype=np.uint8).tobytes()
    return Pages(7, chosen[:n], chosen[n:], data)


def assert_same_pages(a: Pages, b: Pages) -> None:
    assert a.round == b.round
    np.testing.assert_array_equal(a.indexes, b.indexes)
    np.testing.assert_array_equal(a.zero_indexes, b.zero_indexes)
    assert bytes(a.data) == bytes(b.data)
    assert b.indexes.dtype == np.uint32 and b.zero_indexes.dtype == np.uint32


def assert_dead(conn: Connection) -> None:
    """After an error every call raises, and says it is our misuse now."""
    with pytest.raises(LocalProtocolError):
        conn.next_message()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        conn.send(Request("ping"))


# -- codec round trips ------------------------------------------------------------------

EVERY_MESSAGE: list[Message] = [
    Hello("hostA", b"\x01" * NONCE_BYTES),
    Challenge("host-b.example", b"\x02" * NONCE_BYTES, b"\x03" * 32),
    Auth(b"\x04" * 32),
    Welcome(),
    Request("reserve", {"vm": "web", "mem_mib": 256, "nested": {"a": [1, 2.5, None, True]}}),
    Request("x"),
    Reply(True, {"pages": 65536}),
    Reply(False, {"error": "no room: 12 MiB free, 256 MiB needed", "ünï": "cödé"}),
    Abort("hostB: out of memory, the VM keeps running on hostA"),
    DeviceState(b"QEVM" + bytes(range(256)) * 10),
    DeviceState(b"", last=True),
]


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_codec_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(("n", "z"), [(0, 0), (1, 0), (0, 5), (3, 2),
                                      (MAX_PAGES_PER_FRAME, 0),
                                      (10, MAX_ZERO_PAGES_PER_FRAME)])
def test_codec_round_trip_pages(n: int, z: int) -> None:
    msg = random_pages(n, z, npages=1 << 20)
    out = decode(encode(msg))
    assert isinstance(out, Pages)
    assert_same_pages(msg, out)


def test_frame_layout_is_as_documented() -> None:
    raw = encode(Request("go", {}))
    assert raw[:4] == b"LMIG"
    assert raw[4] == PROTOCOL_VERSION and raw[5] == MsgType.REQUEST
    assert struct.unpack_from("<HI", raw, 6) == (0, len(raw) - 12)
    assert raw[12:] == b"\x02go{}"
    pages = encode(Pages(3, np.array([5, 1]), np.array([9]), bytes(2 * PAGE_SIZE)))
    assert struct.unpack_from("<III", pages, 12) == (3, 2, 1)
    assert struct.unpack_from("<3I", pages, 24) == (5, 1, 9)
    assert len(pages) == 12 + 12 + 12 + 2 * PAGE_SIZE


@pytest.mark.parametrize("msg", [m for m in EVERY_MESSAGE
                                 if isinstance(m, Request | Reply | Abort)],
                         ids=lambda m: type(m).__name__)
def test_connection_round_trip_both_ways(msg: Message) -> None:
    client, server = established()
    if isinstance(msg, Reply):
        transfer(client, server, Request("ask"))
        transfer(server, client, Request("ask"))
    assert transfer(client, server, msg) == msg
    if not isinstance(msg, Abort):  # the connection is closed after an Abort
        assert transfer(server, client, msg) == msg


def test_pages_round_trip_both_ways_zero_copy() -> None:
    client, server = established()
    for src, dst in ((client, server), (server, client)):
        msg = random_pages(300, 40)
        out = transfer(src, dst, msg)
        assert isinstance(out, Pages)
        assert_same_pages(msg, out)
        # The data is a view of the receive buffer, not a copy of it.
        assert isinstance(out.data, memoryview) and isinstance(out.data.obj, bytearray)


def test_send_pages_parts_do_not_copy_the_data() -> None:
    client, server = established()
    ram = np.random.default_rng(1).integers(0, 256, (16, PAGE_SIZE), dtype=np.uint8)
    msg = Pages(1, np.arange(16, dtype=np.uint32), np.empty(0, np.uint32), ram.data.cast("B"))
    parts = client.send_pages_parts(msg)
    assert len(parts) == 2
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), ram)
    server.receive_data(b"".join(parts))
    out = server.next_message()
    assert isinstance(out, Pages)
    assert bytes(out.data) == ram.tobytes()


def test_lent_page_data_is_never_overwritten_under_a_reader() -> None:
    client, server = established()
    first, second = random_pages(4, 0, seed=1), random_pages(4, 0, seed=2)
    got = transfer(client, server, first)
    assert isinstance(got, Pages)
    held = np.frombuffer(got.data, np.uint8)  # a reader that keeps a numpy view
    got2 = transfer(client, server, second)
    assert held.tobytes() == bytes(first.data)  # moved to a fresh buffer instead
    assert isinstance(got2, Pages) and bytes(got2.data) == bytes(second.data)
    # Nobody holds got2.data's buffer but got2 itself: reused, and got2.data released.
    transfer(client, server, first)
    with pytest.raises(ValueError, match="released"):
        bytes(got2.data)


# -- the handshake ------------------------------------------------------------------------


def test_handshake_proofs_are_as_specified() -> None:
    client, server = pair()
    hello = decode(client.initiate())
    assert isinstance(hello, Hello) and hello.host == "hostA"
    server.receive_data(encode(hello))
    assert server.next_message() is None
    assert server.peer_host == "hostA" and server.state is State.AWAIT_AUTH
    challenge = decode(server.data_to_send())
    assert isinstance(challenge, Challenge) and challenge.host == "hostB"
    assert challenge.proof == mac(KEY, b"server", hello.nonce, challenge.nonce)
    client.receive_data(encode(challenge))
    assert client.next_message() is None
    auth = decode(client.data_to_send())
    assert isinstance(auth, Auth)
    assert auth.proof == mac(KEY, b"client", hello.nonce, challenge.nonce)
    assert not client.established and not server.established
    server.receive_data(encode(auth))
    assert server.next_message() is None and server.established
    assert isinstance(decode(server.data_to_send()), Welcome)


def test_handshake_fed_byte_by_byte() -> None:
    client, server = pair()
    for src, dst in ((client, server), (server, client), (client, server), (server, client)):
        data = src.initiate() if src is client and src.state is State.START \
            else src.data_to_send()
        for i in range(len(data)):
            dst.receive_data(data[i:i + 1])
            assert dst.next_message() is None
    assert client.established and server.established and client.peer_host == "hostB"


def test_nonces_are_fresh_per_connection() -> None:
    nonces = set()
    for _ in range(20):
        client, server = pair()
        hello = decode(client.initiate())
        server.receive_data(encode(hello))
        server.next_message()
        challenge = decode(server.data_to_send())
        assert isinstance(hello, Hello) and isinstance(challenge, Challenge)
        nonces |= {hello.nonce, challenge.nonce}
    assert len(nonces) == 40


def test_wrong_key_detected_by_the_client() -> None:
    client, server = pair(client_key=OTHER_KEY)
    server.receive_data(client.initiate())
    server.next_message()
    client.receive_data(server.data_to_send())
    with pytest.raises(AuthenticationError) as info:
        client.next_message()
    assert info.value.peer == "hostB"
    assert "hostB does not hold our key" in str(info.value)
    abort = decode(client.data_to_send())  # tells the other operator why
    assert isinstance(abort, Abort) and "hostA" in abort.reason
    assert not client.established
    assert_dead(client)


def test_wrong_key_detected_by_the_server() -> None:
    # A client with the wrong key that does not check the Challenge: forge its Auth.
    client, server = pair()
    hello = decode(client.initiate())
    assert isinstance(hello, Hello)
    server.receive_data(encode(hello))
    server.next_message()
    challenge = decode(server.data_to_send())
    assert isinstance(challenge, Challenge)
    server.receive_data(encode(Auth(mac(OTHER_KEY, b"client", hello.nonce, challenge.nonce))))
    with pytest.raises(AuthenticationError) as info:
        server.next_message()
    assert info.value.peer == "hostA"
    assert isinstance(decode(server.data_to_send()), Abort)
    assert not server.established
    assert_dead(server)


def test_server_proof_cannot_be_reflected_as_client_proof() -> None:
    client, server = pair()
    hello = decode(client.initiate())
    assert isinstance(hello, Hello)
    server.receive_data(encode(hello))
    server.next_message()
    challenge = decode(server.data_to_send())
    assert isinstance(challenge, Challenge)
    server.receive_data(encode(Auth(challenge.proof)))
    with pytest.raises(AuthenticationError):
        server.next_message()


def test_replayed_auth_fails() -> None:
    # An eavesdropper recorded a whole good session and replays the client's side.
    client, server = pair()
    hello_bytes = client.initiate()
    server.receive_data(hello_bytes)
    server.next_message()
    client.receive_data(server.data_to_send())
    client.next_message()
    auth_bytes = client.data_to_send()
    server.receive_data(auth_bytes)
    server.next_message()
    assert server.established

    fresh = Connection(Role.SERVER, KEY, "hostB")
    fresh.receive_data(hello_bytes)
    assert fresh.next_message() is None
    fresh.receive_data(auth_bytes)
    with pytest.raises(AuthenticationError):
        fresh.next_message()
    assert not fresh.established


def test_replayed_challenge_fails() -> None:
    # Something impersonates hostB by replaying the Challenge of an earlier session.
    client, server = pair()
    server.receive_data(client.initiate())
    server.next_message()
    old_challenge = server.data_to_send()
    client.receive_data(old_challenge)
    client.next_message()
    assert client.data_to_send()

    fresh = Connection(Role.CLIENT, KEY, "hostA")
    fresh.initiate()
    fresh.receive_data(old_challenge)
    with pytest.raises(AuthenticationError):
        fresh.next_message()


OUT_OF_TURN: list[tuple[str, Role, Callable[[], bytes]]] = [
    ("auth-first", Role.SERVER, lambda: encode(Auth(b"\0" * 32))),
    ("request-first", Role.SERVER, lambda: encode(Request("reserve"))),
    ("pages-first", Role.SERVER, lambda: encode(random_pages(1, 0))),
    ("reply-first", Role.SERVER, lambda: encode(Reply(True))),
    ("welcome-to-server", Role.SERVER, lambda: encode(Welcome())),
    ("challenge-to-server", Role.SERVER,
     lambda: encode(Challenge("hostX", b"\0" * 32, b"\0" * 32))),
    ("welcome-before-challenge", Role.CLIENT, lambda: encode(Welcome())),
    ("request-before-challenge", Role.CLIENT, lambda: encode(Request("reserve"))),
    ("hello-to-client", Role.CLIENT, lambda: encode(Hello("hostX", b"\0" * 32))),
]


@pytest.mark.parametrize(("role", "make"), [(r, m) for _, r, m in OUT_OF_TURN],
                         ids=[name for name, _, _ in OUT_OF_TURN])
def test_out_of_turn_before_welcome(role: Role, make: Callable[[], bytes]) -> None:
    conn = Connection(role, KEY, "hostB", npages=NPAGES)
    if role is Role.CLIENT:
        conn.initiate()
    conn.receive_data(make())
    with pytest.raises(UnexpectedMessage):
        conn.next_message()
    assert not conn.established
    assert_dead(conn)


def test_out_of_turn_after_challenge() -> None:
    client, server = pair()
    server.receive_data(client.initiate())
    server.next_message()
    challenge = server.data_to_send()
    server.receive_data(encode(Request("commit")))  # Auth expected
    with pytest.raises(UnexpectedMessage):
        server.next_message()
    client.receive_data(challenge)
    client.next_message()
    client.receive_data(encode(Request("commit")))  # Welcome expected
    with pytest.raises(UnexpectedMessage):
        client.next_message()


def test_second_hello_and_second_welcome_are_refused() -> None:
    client, server = established()
    server.receive_data(encode(Hello("hostA", b"\0" * 32)))
    with pytest.raises(UnexpectedMessage):
        server.next_message()
    client.receive_data(encode(Welcome()))
    with pytest.raises(UnexpectedMessage):
        client.next_message()


def test_a_big_frame_out_of_turn_is_refused_from_its_header() -> None:
    server = Connection(Role.SERVER, KEY, "hostB", npages=NPAGES)
    header = frame(MsgType.PAGES, b"", length=MAX_PAYLOAD[MsgType.PAGES])
    server.receive_data(header)  # no payload follows: the header is enough
    with pytest.raises(UnexpectedMessage):
        server.next_message()


def test_the_message_after_welcome_is_kept_for_later() -> None:
    client, server = pair()
    handshake_bytes = client.initiate()
    server.receive_data(handshake_bytes)
    server.next_message()
    client.receive_data(server.data_to_send())
    client.next_message()
    server.receive_data(client.data_to_send())
    server.next_message()
    client.receive_data(server.data_to_send() + server.send(Request("reserve")))
    assert client.next_message() is None and client.established
    assert client.next_message() == Request("reserve")


def test_an_abort_ahead_is_seen_without_taking_anything_out_of_order() -> None:
    """A sender that does not read asks whether the peer gave up: only a whole Abort at
    the head of the buffer says so, and asking takes nothing."""
    client, server = established()
    assert not client.aborted_ahead()
    transfer(client, server, Request("image"))
    client.receive_data(server.send(Reply(True, {})) + server.send(Abort("gone")))
    assert not client.aborted_ahead()  # a Reply comes first: it is not skipped
    assert client.next_message() == Reply(True, {})
    assert client.aborted_ahead() and client.aborted_ahead()
    assert client.next_message() == Abort("gone")
    assert not client.aborted_ahead()  # closed now: nothing more is ahead
    client2, server2 = established()
    whole = server2.send(Abort("half"))
    client2.receive_data(whole[:-1])
    assert not client2.aborted_ahead()  # not whole yet
    client2.receive_data(whole[-1:])
    assert client2.aborted_ahead()


def test_local_misuse_is_refused() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError):
        server.initiate()
    client2, _ = pair()
    with pytest.raises(LocalProtocolError):
        client2.send(Request("reserve"))  # before the handshake
    client3, _ = pair()
    client3.initiate()
    with pytest.raises(LocalProtocolError):
        client3.initiate()
    c4, _ = established()
    with pytest.raises(LocalProtocolError):
        c4.send(Hello("hostA", b"\0" * 32))  # the handshake is the connection's own
    c5, _ = established()
    with pytest.raises(LocalProtocolError):
        c5.send("hello")  # type: ignore[arg-type]
    assert_dead(c5)


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, b"short", "hostA")
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, KEY, "host\nB")
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, KEY, "hostA", npages=-1)


# -- conversation rules -----------------------------------------------------------------


def test_reply_answers_a_request_in_order() -> None:
    client, server = established()
    transfer(client, server, Request("one"))
    transfer(client, server, Request("two"))
    assert transfer(server, client, Reply(True, {"n": 1})) == Reply(True, {"n": 1})
    assert transfer(server, client, Reply(False, {"n": 2})) == Reply(False, {"n": 2})
    with pytest.raises(LocalProtocolError):
        server.send(Reply(True))  # nothing left to answer


def test_reply_to_no_request_is_the_peers_error() -> None:
    client, server = established()
    client.receive_data(encode(Reply(True)))
    with pytest.raises(RemoteProtocolError):
        client.next_message()
    assert_dead(client)


def test_abort_closes_the_connection() -> None:
    client, server = established()
    assert transfer(client, server, Abort("giving up")) == Abort("giving up")
    assert client.state is State.CLOSED and server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Request("more"))  # we closed it
    with pytest.raises(PeerAborted) as info:
        server.next_message()  # the peer closed it
    assert info.value.reason == "giving up"


def test_abort_during_the_handshake_is_returned() -> None:
    client, server = pair()
    server.receive_data(client.initiate())
    server.next_message()
    server.data_to_send()
    client.receive_data(server.send(Abort("hostB: no room for another VM")))
    assert client.next_message() == Abort("hostB: no room for another VM")
    assert not client.established


def test_eof_between_frames_and_mid_frame() -> None:
    client, server = established()
    server.receive_data(b"")
    with pytest.raises(PeerLost) as info:
        server.next_message()
    assert not info.value.mid_frame and info.value.peer == "hostA"
    client, server = established()
    data = client.send(Request("reserve", {"x": 1}))
    server.receive_data(data[:-3])
    assert server.next_message() is None
    server.receive_data(b"")
    with pytest.raises(PeerLost) as info:
        server.next_message()
    assert info.value.mid_frame
    assert_dead(server)


def test_complete_frames_are_delivered_before_eof() -> None:
    client, server = established()
    server.receive_data(client.send(Request("a")) + client.send(Request("b")))
    server.receive_data(b"")
    assert server.next_message() == Request("a")
    assert server.next_message() == Request("b")
    with pytest.raises(PeerLost):
        server.next_message()


# -- pages validation -------------------------------------------------------------------


def pages_frame(indexes: list[int], zeros: list[int], *, rnd: int = 1,
                data_pages: int | None = None) -> bytes:
    n = len(indexes) if data_pages is None else data_pages
    payload = struct.pack("<III", rnd, len(indexes), len(zeros))
    payload += np.array(indexes + zeros, "<u4").tobytes() + bytes(PAGE_SIZE * n)
    return frame(MsgType.PAGES, payload)


@pytest.mark.parametrize(("indexes", "zeros", "data_pages"), [
    ([NPAGES], [], None),  # beyond the VM
    ([], [NPAGES + 5], None),
    ([1, 1], [], None),  # twice in one frame
    ([1, 2], [2], None),  # both data and zero
    ([1, 2], [], 1),  # data for one page only
    ([1], [], 2),  # data for two
])
def test_invalid_pages_are_the_peers_error(indexes: list[int], zeros: list[int],
                                           data_pages: int | None) -> None:
    client, server = established()
    server.receive_data(pages_frame(indexes, zeros, data_pages=data_pages))
    with pytest.raises(RemoteProtocolError):
        server.next_message()
    assert_dead(server)


def test_pages_before_reservation_are_the_peers_error() -> None:
    client, server = established(npages=None)
    server.receive_data(pages_frame([1], []))
    with pytest.raises(RemoteProtocolError):
        server.next_message()
    client, server = established(npages=None)
    server.npages = 10  # reserved now
    server.receive_data(pages_frame([9], [3]))
    out = server.next_message()
    assert isinstance(out, Pages) and list(out.indexes) == [9]


@pytest.mark.parametrize("pages", [
    Pages(1, np.array([NPAGES]), np.empty(0, np.uint32), bytes(PAGE_SIZE)),
    Pages(1, np.array([-1]), np.empty(0, np.uint32), bytes(PAGE_SIZE)),
    Pages(1, np.array([3, 3]), np.empty(0, np.uint32), bytes(2 * PAGE_SIZE)),
    Pages(1, np.array([3]), np.array([3]), bytes(PAGE_SIZE)),
    Pages(1, np.array([3]), np.empty(0, np.uint32), bytes(10)),
    Pages(1, np.array([[3]]), np.empty(0, np.uint32), bytes(PAGE_SIZE)),
    Pages(1, np.array([3.0]), np.empty(0, np.uint32), bytes(PAGE_SIZE)),
    Pages(-1, np.array([3]), np.empty(0, np.uint32), bytes(PAGE_SIZE)),
    Pages(1, np.arange(MAX_PAGES_PER_FRAME + 1, dtype=np.uint32), np.empty(0, np.uint32),
          bytes(PAGE_SIZE * (MAX_PAGES_PER_FRAME + 1))),
])
def test_invalid_pages_are_our_error(pages: Pages) -> None:
    client, _ = established()
    with pytest.raises(LocalProtocolError):
        client.send_pages_parts(pages)


@pytest.mark.parametrize("msg", [
    Request("9lives"), Request("kind with space"), Request("ünï"), Request("x" * 33),
    Request("ok", {"f": float("nan")}), Request("ok", {"s": {1, 2}}),
    Request("ok", {"big": "x" * (64 * 1024)}), Request("ok", [1, 2]),  # type: ignore[arg-type]
    Reply(1, {}),  # type: ignore[arg-type]
    Abort(""), Abort("two\nlines"), Abort("x" * 2000),
    Hello("host B", b"\0" * 32), Auth(b"short"),
])
def test_invalid_messages_are_our_error(msg: Message) -> None:
    with pytest.raises(LocalProtocolError):
        encode(msg)


# -- malformed frames from the peer -----------------------------------------------------


def json_frame(mtype: int, prefix: bytes, body: bytes) -> bytes:
    return frame(mtype, prefix + body)


@pytest.mark.parametrize("raw", [
    json_frame(MsgType.REQUEST, b"\x02go", b"[1, 2]"),  # not an object
    json_frame(MsgType.REQUEST, b"\x02go", b"{\"a\": NaN}"),
    json_frame(MsgType.REQUEST, b"\x02go", b"{\"a\": 1"),
    json_frame(MsgType.REQUEST, b"\x02go", b"\xff\xfe{}"),  # not UTF-8
    json_frame(MsgType.REQUEST, b"\x02go", b"[" * 60000),  # nested too deep
    json_frame(MsgType.REQUEST, b"\x02go", b"{\"n\": " + b"9" * 5000 + b"}"),
    json_frame(MsgType.REQUEST, b"\x029x", b"{}"),  # kind not an identifier
    json_frame(MsgType.REQUEST, b"\x02\xc3\xbc", b"{}"),  # kind not ASCII
    json_frame(MsgType.REQUEST, b"\x00", b"{}"),  # empty kind
    json_frame(MsgType.REQUEST, b"\x20go", b"{}"),  # kind longer than the payload
    json_frame(MsgType.REPLY, b"\x02", b"{}"),  # ok neither 0 nor 1
    frame(MsgType.REPLY, b""),
    frame(MsgType.ABORT, b""),
    frame(MsgType.ABORT, b"line\nbreak"),
    frame(MsgType.ABORT, b"\xff"),
    frame(MsgType.PAGES, b"\x00" * 8),  # shorter than its fixed part
], ids=lambda raw: raw[12:30].hex())
def test_malformed_payloads(raw: bytes) -> None:
    client, server = established()
    client.send(Request("so-that-a-reply-is-legal"))
    client.receive_data(raw)
    with pytest.raises(RemoteProtocolError):
        client.next_message()
    assert_dead(client)
    with pytest.raises(RemoteProtocolError):
        decode(raw)


@pytest.mark.parametrize("raw", [
    frame(MsgType.HELLO, b"\0" * 32 + b"\x05host"),  # host shorter than announced
    frame(MsgType.HELLO, b"\0" * 32 + b"\x05hos\nt"),  # not a hostname
    frame(MsgType.HELLO, b"\0" * 32 + b"\x02\xc3\xbc"),  # not ASCII
    frame(MsgType.HELLO, b"\0" * 32 + b"\x00"),  # empty host
    frame(MsgType.HELLO, b"\0" * 20),
])
def test_malformed_hello(raw: bytes) -> None:
    server = Connection(Role.SERVER, KEY, "hostB")
    server.receive_data(raw)
    with pytest.raises(RemoteProtocolError):
        server.next_message()
    assert_dead(server)


def test_bad_magic_is_refused_at_the_first_bytes() -> None:
    server = Connection(Role.SERVER, KEY, "hostB", peer="10.0.0.9:4242")
    server.receive_data(b"GE")  # an HTTP client, say
    with pytest.raises(RemoteProtocolError) as info:
        server.next_message()
    assert info.value.peer == "10.0.0.9:4242"


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 255])
def test_wrong_version(version: int) -> None:
    server = Connection(Role.SERVER, KEY, "hostB")
    server.receive_data(frame(MsgType.HELLO, b"", version=version))
    with pytest.raises(VersionMismatch) as info:
        server.next_message()
    assert (info.value.theirs, info.value.ours) == (version, PROTOCOL_VERSION)
    assert f"peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}" in str(info.value)


def test_unknown_type_and_flags() -> None:
    for raw in (frame(0, b""), frame(len(MsgType) + 1, b""), frame(255, b""),
                frame(MsgType.WELCOME, b"", flags=1)):
        client, _ = established()
        client.receive_data(raw)
        with pytest.raises(RemoteProtocolError):
            client.next_message()


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.name)
def test_every_cap_is_checked_from_the_header(mtype: MsgType) -> None:
    client, _ = established()
    client.receive_data(frame(mtype, b"", length=MAX_PAYLOAD[mtype] + 1))
    with pytest.raises(FrameTooLarge) as info:
        client.next_message()
    assert info.value.limit == MAX_PAYLOAD[mtype]


def test_two_gib_header_is_refused_before_any_allocation() -> None:
    client, _ = established()
    tracemalloc.start()
    try:
        client.receive_data(frame(MsgType.PAGES, b"", length=2 << 30))
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with pytest.raises(FrameTooLarge) as info:
            client.next_message()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.length == 2 << 30
    assert peak - before < 64 * 1024
    assert client.buffered == HEADER_SIZE  # no payload byte was ever asked for


def test_buffer_grows_only_to_the_announced_frame() -> None:
    client, server = established()
    parts = server.send_pages_parts(random_pages(MAX_PAGES_PER_FRAME, 0))
    whole = b"".join(parts)
    client.receive_data(whole[:HEADER_SIZE])
    view = client.get_buffer()
    assert len(view) == len(whole) - HEADER_SIZE  # exactly the rest of the frame
    assert len(view.obj) <= MAX_FRAME_BYTES + 64 * 1024  # type: ignore[arg-type]
    view[:] = whole[HEADER_SIZE:]
    del view
    client.buffer_updated(len(whole) - HEADER_SIZE)
    assert not client.need_data()
    assert isinstance(client.next_message(), Pages)


# -- fuzzing ------------------------------------------------------------------------------


def feed(conn: Connection, data: bytes, chunks: list[int]) -> list[Message]:
    """Feed ``data`` in pieces, alternating the two receive paths; collect messages.
    Let a WireError out; anything else escaping is a bug the tests catch."""
    out: list[Message] = []
    pos, i = 0, 0
    while pos < len(data):
        size = max(1, chunks[i % len(chunks)]) if chunks else len(data)
        piece = data[pos:pos + size]
        if i % 2:
            view = conn.get_buffer()
            piece = piece[:len(view)]
            view[:len(piece)] = piece
            del view
            conn.buffer_updated(len(piece))
        else:
            conn.receive_data(piece)
        pos += len(piece)
        i += 1
        while (msg := conn.next_message()) is not None:
            out.append(msg)
            if isinstance(msg, Abort):  # the peer is done; nothing after it is read
                return out
    return out


def check_fails_cleanly(conn: Connection, data: bytes, chunks: list[int]) -> None:
    try:
        feed(conn, data, chunks)
    except WireError:
        assert conn.state is State.ERROR
        assert_dead(conn)
    else:
        assert conn.state is not State.ERROR


@fuzz(400)
@given(data=st.binary(max_size=2000), chunks=st.lists(st.integers(1, 300), max_size=8))
def test_fuzz_random_bytes_at_a_fresh_server(data: bytes, chunks: list[int]) -> None:
    check_fails_cleanly(Connection(Role.SERVER, KEY, "hostB"), data, chunks)


@fuzz(400)
@given(data=st.binary(max_size=2000), chunks=st.lists(st.integers(1, 300), max_size=8),
       as_client=st.booleans())
def test_fuzz_random_bytes_after_the_handshake(data: bytes, chunks: list[int],
                                              as_client: bool) -> None:
    client, server = established()
    check_fails_cleanly(client if as_client else server, data, chunks)


@fuzz(400)
@given(data=st.binary(min_size=HEADER_SIZE - 4, max_size=600))
def test_fuzz_random_payload_behind_the_magic(data: bytes) -> None:
    # Random bytes rarely start with the magic; these get past it to the real decoders.
    client, server = established()
    client.send(Request("so-that-a-reply-is-legal"))
    check_fails_cleanly(client, MAGIC + data, [])


@fuzz(300)
@given(version=st.integers(0, 255), mtype=st.integers(0, 255), flags=st.integers(0, 65535),
       length=st.one_of(st.integers(0, (1 << 32) - 1), st.sampled_from(
           [v + d for v in MAX_PAYLOAD.values() for d in (-1, 0, 1)])),
       payload=st.binary(max_size=100), handshaken=st.booleans())
def test_fuzz_headers(version: int, mtype: int, flags: int, length: int, payload: bytes,
                      handshaken: bool) -> None:
    conn = established()[1] if handshaken else Connection(Role.SERVER, KEY, "hostB")
    raw = HEADER.pack(MAGIC, version, mtype, flags, max(0, length)) + payload
    tracemalloc.start()
    try:
        check_fails_cleanly(conn, raw, [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if version != PROTOCOL_VERSION:
        assert conn.state is State.ERROR
    # Nothing beyond the buffer a small frame needs, whatever the header announced.
    assert peak < 512 * 1024


@fuzz(100)
@given(version=st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION),
       mtype=st.sampled_from(list(MsgType)))
def test_fuzz_wrong_versions(version: int, mtype: MsgType) -> None:
    server = Connection(Role.SERVER, KEY, "hostB")
    server.receive_data(frame(mtype, b"", version=version))
    with pytest.raises(VersionMismatch) as info:
        server.next_message()
    assert info.value.theirs == version


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)
json_bodies = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
kinds = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", fullmatch=True)


@st.composite
def app_messages(draw: st.DrawFn) -> Message:
    which = draw(st.sampled_from(["request", "reply", "pages", "abort"]))
    if which == "request":
        return Request(draw(kinds), draw(json_bodies))
    if which == "reply":
        return Reply(draw(st.booleans()), draw(json_bodies))
    if which == "abort":
        return Abort(draw(st.text(min_size=1, max_size=50).filter(str.isprintable)))
    n = draw(st.integers(0, 3))
    z = draw(st.integers(0, 5))
    return random_pages(n, z, seed=draw(st.integers(0, 1000)))


def owe_replies(client: Connection, server: Connection, count: int = 1) -> None:
    """Let ``server`` send ``count`` Replies: deliver that many Requests to it."""
    for _ in range(count):
        transfer(client, server, Request("so-that-a-reply-is-legal"))


def same(a: Message, b: Message) -> bool:
    if isinstance(a, Pages) and isinstance(b, Pages):
        return (a.round == b.round and list(a.indexes) == list(b.indexes)
                and list(a.zero_indexes) == list(b.zero_indexes)
                and bytes(a.data) == bytes(b.data))
    return a == b


@fuzz(300)
@given(msgs=st.lists(app_messages(), min_size=1, max_size=4),
       chunks=st.lists(st.integers(1, 5000), max_size=6))
def test_fuzz_valid_streams_survive_any_chunking(msgs: list[Message],
                                                 chunks: list[int]) -> None:
    # Everything after an Abort is not sent; Replies need a Request before them.
    msgs = msgs[:next((i + 1 for i, m in enumerate(msgs) if isinstance(m, Abort)), len(msgs))]
    client, server = established()
    owe_replies(client, server, len(msgs))
    data = b"".join(server.send(m) for m in msgs)
    got: list[Message] = []
    pos, i = 0, 0
    while pos < len(data):  # copy each message out before the next bytes go in
        size = max(1, chunks[i % len(chunks)]) if chunks else len(data)
        got += [m if not isinstance(m, Pages) else
                Pages(m.round, m.indexes, m.zero_indexes, bytes(m.data))
                for m in feed(client, data[pos:pos + size], [])]
        pos, i = pos + size, i + 1
    assert len(got) == len(msgs) and all(same(a, b) for a, b in zip(msgs, got, strict=True))


@fuzz(300)
@given(msg=app_messages(), cut=st.integers(0, 10**6))
def test_fuzz_truncated_frames(msg: Message, cut: int) -> None:
    client, server = established()
    owe_replies(client, server)
    data = server.send(msg)
    cut %= len(data)
    if cut:  # receive_data(b"") would be the end of the stream
        client.receive_data(data[:cut])
    assert client.next_message() is None
    assert client.need_data()
    client.receive_data(b"")
    with pytest.raises(PeerLost) as info:
        client.next_message()
    assert info.value.mid_frame == (cut > 0)


@fuzz(400)
@given(msg=app_messages(), flip=st.integers(0, 10**7))
def test_fuzz_bit_flipped_frames(msg: Message, flip: int) -> None:
    client, server = established()
    owe_replies(client, server)
    raw = bytearray(server.send(msg))
    bit = flip % (8 * len(raw))
    raw[bit // 8] ^= 1 << (bit % 8)
    check_fails_cleanly(client, bytes(raw), [])
    with contextlib.suppress(RemoteProtocolError):  # anything else fails the test
        decode(bytes(raw))


@fuzz(300)
@given(data=st.binary(max_size=600), npages=st.integers(0, 1 << 32))
def test_fuzz_pure_decoder(data: bytes, npages: int) -> None:
    for raw in (data, MAGIC + bytes((PROTOCOL_VERSION,)) + data):
        with contextlib.suppress(RemoteProtocolError):  # anything else fails the test
            decode(raw, npages=npages)


@fuzz(100)
@given(body=json_bodies, kind=kinds)
def test_fuzz_json_round_trip(body: dict[str, Any], kind: str) -> None:
    msg = Request(kind, body)
    assert decode(encode(msg)) == Request(kind, json.loads(json.dumps(body)))


def test_every_wire_error_is_a_livemig_error() -> None:
    for cls in (WireError, LocalProtocolError, RemoteProtocolError, VersionMismatch,
                FrameTooLarge, UnexpectedMessage, AuthenticationError, PeerLost):
        assert issubclass(cls, LivemigError)


# -- device state and certified names ---------------------------------------------------


def test_device_state_flows_after_the_handshake_and_is_capped() -> None:
    client, server = established()
    chunk = bytes(range(256)) * 4096  # 1 MiB: the most one frame may carry
    assert len(chunk) == MAX_STATE_CHUNK
    assert transfer(client, server, DeviceState(chunk)) == DeviceState(chunk)
    assert transfer(client, server, DeviceState(b"", last=True)) == DeviceState(b"", True)
    with pytest.raises(LocalProtocolError):
        client.send(DeviceState(chunk + b"x"))


@pytest.mark.parametrize("payload", [b"", b"\x02state"], ids=["empty", "bad-last-flag"])
def test_malformed_device_state_is_refused(payload: bytes) -> None:
    _, server = established()
    server.receive_data(frame(MsgType.DEVICE_STATE, payload))
    with pytest.raises(RemoteProtocolError):
        server.next_message()
    assert_dead(server)


def test_device_state_before_the_handshake_is_refused() -> None:
    server = Connection(Role.SERVER, KEY, "hostB")
    server.receive_data(encode(DeviceState(b"QEVM")))
    with pytest.raises(UnexpectedMessage):
        server.next_message()


def test_a_client_must_call_itself_what_its_certificate_names() -> None:
    client, server = pair()
    server.expect_peer = "hostC"  # what TLS said; the client's Hello says hostA
    server.receive_data(client.initiate())
    with pytest.raises(PeerNotTrusted) as info:
        server.next_message()
    assert not info.value.by_peer
    client.receive_data(server.data_to_send())  # told why, in an Abort
    told = client.next_message()
    assert isinstance(told, Abort) and "hostC" in told.reason


def test_a_server_must_call_itself_what_its_certificate_names() -> None:
    client, server = pair()
    client.expect_peer = "hostC"
    server.receive_data(client.initiate())
    assert server.next_message() is None
    client.receive_data(server.data_to_send())  # a Challenge from "hostB"
    with pytest.raises(PeerNotTrusted):
        client.next_message()
    assert not client.established


def test_matching_certified_names_complete_the_handshake() -> None:
    client, server = pair()
    client.expect_peer, server.expect_peer = "hostB", "hostA"
    handshake(client, server)
    assert (client.peer_host, server.peer_host) == ("hostB", "hostA")
