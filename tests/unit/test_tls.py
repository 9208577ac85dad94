"""Mutual TLS between daemons: certificates from ``livemig.keys``, contexts from
``wire.tls``, and the channel's refusals, over real sockets on 127.0.0.1.

Every refusal is checked at both ends: the caller gets the error it can act on, and
the server's handler (where a reservation would start QEMU) never runs.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import logging
import os
import ssl
import stat
import time
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from livemig import cli, keys
from livemig.keys import HostFiles
from livemig.wire import channel as channel_module
from livemig.wire import tls
from livemig.wire.channel import Channel, PeerServer, connect, serve
from livemig.wire.frames import (
    PAGE_SIZE,
    Abort,
    AuthenticationError,
    Pages,
    PeerAborted,
    PeerLost,
    PeerNotTrusted,
    Reply,
    Request,
)

KEY = b"k" * 32
LOOPBACK = "127.0.0.1"
NONE = np.empty(0, np.uint32)


def run(coro: Coroutine[Any, Any, None], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


class PKI:
    """Our CA with hostA, hostB and hostC, and a foreign CA that issued its own hostA."""

    def __init__(self, root: Path) -> None:
        self.ours = root / "ours"
        self.foreign = root / "foreign"
        keys.init_ca(self.ours)
        keys.init_ca(self.foreign, name="someone else's CA")
        self.hosts = {h: keys.issue_host(self.ours, h, [LOOPBACK]) for h in
                      ("hostA", "hostB", "hostC")}
        self.foreign_hostA = keys.issue_host(self.foreign, "hostA", [LOOPBACK])
        # A daemon deploys our CA's certificate beside its own, never another's.
        self.foreign_hostA_trusting_ours = HostFiles(
            self.ours / keys.CA_CERT, self.foreign_hostA.cert, self.foreign_hostA.key)

    def client(self, host: str) -> ssl.SSLContext:
        return tls.client_context(self.hosts[host])

    def server(self, host: str) -> ssl.SSLContext:
        return tls.server_context(self.hosts[host])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


class Served:
    """A ``serve()`` server on a free port that counts its handler's calls."""

    def __init__(self, ssl_context: ssl.SSLContext | None, me: str = "hostB") -> None:
        self._ssl = ssl_context
        self._me = me
        self.calls = 0
        self.seen: list[tuple[str, str | None]] = []
        self.server: PeerServer | None = None

    async def _handler(self, channel: Channel) -> None:
        self.calls += 1
        self.seen.append((channel.peer, channel.certified_host))
        channel.connection.npages = 600
        while True:
            try:
                msg = await channel.recv(timeout=10)
            except PeerLost:
                return
            if isinstance(msg, Request):
                await channel.send(Reply(True, {"kind": msg.kind}))

    async def __aenter__(self) -> Served:
        self.server = await serve(LOOPBACK, 0, key=KEY, me=self._me, handler=self._handler,
                                  ssl=self._ssl, handshake_timeout=3)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0.05)  # let refused connections finish closing


# -- keys -------------------------------------------------------------------------------


def test_keys_are_root_only_and_certificates_name_their_host(pki: PKI) -> None:
    files = pki.hosts["hostB"]
    for key in (files.key, pki.ours / keys.CA_KEY):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hostB"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [LOOPBACK]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ca = x509.load_pem_x509_certificate((pki.ours / keys.CA_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert files.ca.read_bytes() == (pki.ours / keys.CA_CERT).read_bytes()
    assert keys.describe(files.cert)["names"] == ["hostB", LOOPBACK]


def test_a_ca_is_not_replaced_by_accident(pki: PKI) -> None:
    before = (pki.ours / keys.CA_CERT).read_bytes()
    with pytest.raises(keys.KeysError):
        keys.init_ca(pki.ours)
    assert (pki.ours / keys.CA_CERT).read_bytes() == before


def test_bad_names_and_a_missing_ca_are_refused(tmp_path: Path, pki: PKI) -> None:
    with pytest.raises(keys.KeysError):
        keys.issue_host(tmp_path, "hostA", [])  # no CA there
    with pytest.raises(keys.KeysError):
        keys.issue_host(pki.ours, "host\nA", [])
    with pytest.raises(keys.KeysError):
        keys.issue_host(pki.ours, "hostA", ["not-an-ip"])
    with pytest.raises(keys.KeysError):
        tls.server_context(HostFiles.in_dir(tmp_path, "hostA"))


# -- sans-IO helpers --------------------------------------------------------------------


def test_certified_host_takes_exactly_one_dns_name() -> None:
    assert tls.certified_host({"subjectAltName": (("DNS", "hostA"), ("IP Address",
                                                                      "10.0.0.1"))}) == "hostA"
    assert tls.certified_host(None) is None
    assert tls.certified_host({}) is None
    assert tls.certified_host({"subjectAltName": (("DNS", "a"), ("DNS", "b"))}) is None
    assert tls.certified_host({"subjectAltName": (("DNS", "*.lan"),)}) is None


def test_sniff_tells_tls_from_plaintext() -> None:
    assert tls.sniff(b"\x16\x03\x01") is tls.Speaks.TLS
    assert tls.sniff(b"LMIG") is tls.Speaks.PLAINTEXT
    assert tls.sniff(b"GET /") is tls.Speaks.OTHER
    assert tls.sniff(b"") is tls.Speaks.OTHER


# -- over sockets -----------------------------------------------------------------------


def test_mutual_tls_round_trip_records_the_certified_client(pki: PKI) -> None:
    pages = np.random.default_rng(2).integers(0, 256, (600, PAGE_SIZE), dtype=np.uint8)

    async def main() -> None:
        async with Served(pki.server("hostB")) as served:
            channel = await connect(LOOPBACK, served.port, key=KEY, me="hostA",
                                    ssl=pki.client("hostA"), peer_name="hostB",
                                    npages=600, timeout=5)
            async with channel:
                assert channel.certified_host == channel.peer == "hostB"
                ssl_object = channel._transport.get_extra_info("ssl_object")
                assert ssl_object.version() == "TLSv1.3"
                idx = np.arange(0, 600, dtype=np.uint32)
                await channel.send_pages(Pages(0, idx, NONE, pages.tobytes()))
                # 2.4 MB queued a moment ago; the peer reads it all, and acknowledges it.
                assert await channel.drained(5.0) and channel.queued_bytes() == 0
                assert (channel.bytes_acked() or 0) > 600 * PAGE_SIZE
                assert (await channel.request("reserve", timeout=5)).body == {"kind": "reserve"}
            await asyncio.sleep(0.05)
            assert served.seen == [("hostA", "hostA")]
    run(main())


def refused_before_the_handler(pki: PKI, client: HostFiles | ssl.SSLContext | None, *,
                               me: str = "hostA", server: str = "hostB",
                               peer_name: str = "hostB",
                               server_ssl: ssl.SSLContext | None | str = "tls",
                               ) -> tuple[BaseException, list[str]]:
    """Connect as ``me`` with ``client`` (files, a context, or None for plaintext);
    return what the client raised and what the server logged. The handler never ran."""
    logged: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    channel_log = logging.getLogger("livemig.wire.channel")
    collector = Collect(logging.WARNING)
    channel_log.addHandler(collector)
    caught: list[BaseException] = []
    ctx = client if not isinstance(client, HostFiles) else tls.client_context(client)
    server_ctx = pki.server(server) if server_ssl == "tls" else server_ssl
    assert not isinstance(server_ctx, str)

    async def main() -> None:
        async with Served(server_ctx, me=server) as served:
            try:
                channel = await connect(LOOPBACK, served.port, key=KEY, me=me, ssl=ctx,
                                        peer_name=peer_name if ctx else None, timeout=5)
            except AuthenticationError as exc:
                caught.append(exc)
            except PeerAborted as exc:
                caught.append(exc)
            else:
                async with channel:  # in case the refusal only comes with the first read
                    try:
                        await channel.request("reserve", {}, timeout=5)
                    except (PeerLost, PeerAborted, AuthenticationError) as exc:
                        caught.append(exc)
            await asyncio.sleep(0.1)
            assert served.calls == 0

    try:
        run(main())
    finally:
        channel_log.removeHandler(collector)
    assert len(caught) == 1
    return caught[0], logged


def test_a_certificate_from_a_foreign_ca_is_refused(pki: PKI) -> None:
    err, logged = refused_before_the_handler(pki, pki.foreign_hostA_trusting_ours)
    assert isinstance(err, PeerNotTrusted) and err.by_peer
    assert any("refused" in line and "certificate" in line for line in logged), logged


def test_a_client_without_a_certificate_is_refused(pki: PKI) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    bare.load_verify_locations(cafile=str(pki.hosts["hostA"].ca))
    err, logged = refused_before_the_handler(pki, bare)
    assert isinstance(err, PeerNotTrusted) and err.by_peer
    assert any("refused" in line for line in logged), logged


def test_a_server_with_a_valid_certificate_for_another_host_is_refused(pki: PKI) -> None:
    # We mean to reach hostB; hostC (one of ours!) answers at that address.
    err, _ = refused_before_the_handler(pki, pki.hosts["hostA"], server="hostC",
                                        peer_name="hostB")
    assert isinstance(err, PeerNotTrusted) and not err.by_peer


def test_a_server_certificate_from_a_foreign_ca_is_refused(pki: PKI) -> None:
    impostor = keys.issue_host(pki.foreign, "hostB", [LOOPBACK])
    foreign_server = tls.server_context(HostFiles(pki.ours / keys.CA_CERT, impostor.cert,
                                                  impostor.key))
    err, _ = refused_before_the_handler(pki, pki.hosts["hostA"], server_ssl=foreign_server)
    assert isinstance(err, PeerNotTrusted) and not err.by_peer


def test_a_client_that_calls_itself_other_than_its_certificate_is_refused(pki: PKI) -> None:
    # hostC holds a valid certificate of our CA, and claims to be hostA.
    err, logged = refused_before_the_handler(pki, pki.hosts["hostC"], me="hostA")
    assert isinstance(err, PeerAborted)
    assert any("not trusted" in line for line in logged), logged


def test_a_plaintext_client_is_told_that_tls_is_required(pki: PKI) -> None:
    err, logged = refused_before_the_handler(pki, None)
    assert isinstance(err, PeerAborted) and "TLS" in err.reason
    assert any("plaintext" in line for line in logged), logged


def test_a_tls_client_at_a_plaintext_daemon_is_refused(pki: PKI) -> None:
    err, logged = refused_before_the_handler(pki, pki.hosts["hostA"], server_ssl=None)
    assert isinstance(err, PeerNotTrusted) and err.by_peer
    assert any("--insecure-plaintext" in line for line in logged), logged


def test_tls_1_2_is_refused(pki: PKI) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cafile=str(pki.hosts["hostA"].ca))
    old.load_cert_chain(str(pki.hosts["hostA"].cert), str(pki.hosts["hostA"].key))
    err, _ = refused_before_the_handler(pki, old)
    assert isinstance(err, PeerNotTrusted) and err.by_peer


def test_the_keys_command_makes_a_deployable_tls_directory(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    assert cli.main(["keys", "init", "--dir", str(tmp_path / "ca")]) == 0
    assert cli.main(["keys", "host", "hostQ", "--ip", "192.0.2.7", "--dir",
                     str(tmp_path / "ca"), "--out", str(tmp_path / "q")]) == 0
    files = HostFiles.in_dir(tmp_path / "q", "hostQ")
    assert files.missing() == []
    assert not (tmp_path / "q" / keys.CA_KEY).exists()  # the CA's key stays with the CA
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert cli.main(["keys", "show", str(files.cert)]) == 0
    assert json.loads(capsys.readouterr().out)["names"] == ["hostQ", "192.0.2.7"]
    assert tls.checks_revocation(tls.server_context(files))  # loads as a daemon would
    # Revoked: 'keys show' on the CA's CRL names the host; twice changes nothing.
    for _ in range(2):
        assert cli.main(["keys", "revoke", "hostQ", "--dir", str(tmp_path / "ca"),
                         "--reason", "key-compromise"]) == 0
    assert cli.main(["keys", "show", str(tmp_path / "ca" / keys.CA_CRL)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(r["host"], r["reason"]) for r in shown["revoked"]] == [("hostQ", "keyCompromise")]
    assert shown["next_update"]


def test_no_session_ticket_is_offered(pki: PKI) -> None:
    """A resumed session would skip the client certificate: the server hands out none."""
    sessions: list[object] = []

    async def main() -> None:
        async with Served(pki.server("hostB")) as served:
            channel = await connect(LOOPBACK, served.port, key=KEY, me="hostA",
                                    ssl=pki.client("hostA"), peer_name="hostB", timeout=5)
            async with channel:
                await channel.request("ping", timeout=5)  # tickets come after the handshake
                sessions.append(channel._transport.get_extra_info("ssl_object").session)
    run(main())
    (session,) = sessions
    assert session is None or not session.has_ticket


def test_a_closed_tls_channel_is_freed_without_the_cyclic_collector(pki: PKI) -> None:
    """asyncio's SSLProtocol holds OpenSSL's buffers (about a MiB after a migration's
    pages). Were it in a reference cycle with our protocol, only a full collection would
    free it, and those are rare in a daemon: the soak saw 1.1 MiB a migration stay."""
    freed: list[bool] = []

    async def main() -> None:
        async with Served(pki.server("hostB")) as served:
            channel = await connect(LOOPBACK, served.port, key=KEY, me="hostA",
                                    ssl=pki.client("hostA"), peer_name="hostB", timeout=5)
            async with channel:
                await channel.request("ping", timeout=5)
                ssl_protocol = weakref.ref(channel._transport._ssl_protocol)  # type: ignore[attr-defined]
            del channel
            await asyncio.sleep(0.1)  # connection_lost runs from the loop
            freed.append(ssl_protocol() is None)

    gc.collect()
    gc.disable()
    try:
        run(main())
    finally:
        gc.enable()
    assert freed == [True]


@pytest.mark.parametrize("over_tls", [True, False], ids=["tls", "plaintext"])
def test_a_sender_that_never_reads_hears_the_peers_abort_and_closes_in_bounded_time(
        pki: PKI, over_tls: bool) -> None:
    """The source in pre-copy only sends. The target gives up (its QEMU died): an Abort,
    then, a moment later, its end of the connection. The Abort alone pauses the sender's
    reading, and under TLS that hid the target's close too: every later write vanished
    without an error, and closing after the next request waited for ever (a fault
    drill's source daemon never answered). The next send must raise PeerAborted with
    the target's reason, and the channel must close within its bounds."""
    gone = asyncio.Event()
    outcome: list[object] = []

    async def target(channel: Channel) -> None:
        channel.connection.npages = 600
        await channel.recv(timeout=5)  # the first Pages of round 1
        await channel.send(Abort("the destination QEMU of v1 exited"), 1.0)
        await asyncio.sleep(0.3)  # the sender reads the Abort before the close
        await channel.close(1.0)
        gone.set()

    def pages() -> Pages:
        data = np.ones((4, PAGE_SIZE), np.uint8)
        return Pages(round=1, indexes=np.arange(4, dtype=np.uint32), zero_indexes=NONE,
                     data=data.reshape(-1).data)

    async def main() -> None:
        server = await serve(LOOPBACK, 0, key=KEY, me="hostB", handler=target,
                             ssl=pki.server("hostB") if over_tls else None)
        port = server.sockets[0].getsockname()[1]
        channel = await connect(LOOPBACK, port, key=KEY, me="hostA",
                                ssl=pki.client("hostA") if over_tls else None,
                                peer_name="hostB", npages=600, timeout=5)
        try:
            await channel.send_pages(pages(), timeout=3)
            await asyncio.wait_for(gone.wait(), 5)
            await asyncio.sleep(0.1)
            try:
                await channel.send_pages(pages(), timeout=3)
            except PeerAborted as err:
                outcome.append(err.reason)
            began = time.monotonic()
            await asyncio.wait_for(channel.abort("giving up", timeout=1.0), 10)
            outcome.append(time.monotonic() - began)
        finally:
            server.close()
            await server.wait_closed()

    run(main())
    assert outcome[0] == "the destination QEMU of v1 exited", outcome
    assert outcome[1] < 1.0 + channel_module.ABORT_GRACE_S + 0.5, outcome


# -- revocation -------------------------------------------------------------------------


def crl_of(directory: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((directory / keys.CA_CRL).read_bytes())


def serial(files: HostFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


def test_every_ca_starts_with_an_empty_crl_valid_as_long_as_the_ca(pki: PKI) -> None:
    crl = crl_of(pki.ours)
    ca = x509.load_pem_x509_certificate((pki.ours / keys.CA_CERT).read_bytes())
    assert crl.issuer == ca.subject and len(crl) == 0
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc == ca.not_valid_after_utc
    assert crl.last_update_utc < datetime.datetime.now(datetime.UTC)
    assert keys.crl_expiry_warning(crl) is None
    # Deployed beside ca.crt, so daemons check revocation from their first day.
    assert all(tls.checks_revocation(pki.server(h)) for h in pki.hosts)
    assert all(tls.checks_revocation(pki.client(h)) for h in pki.hosts)


def test_revoking_a_host_lists_its_serial_once(tmp_path: Path) -> None:
    own = PKI(tmp_path)
    done = keys.revoke(own.ours, host="hostB", reason=x509.ReasonFlags.key_compromise)
    assert done.added == (serial(own.hosts["hostB"]),) and done.already == ()
    first = (own.ours / keys.CA_CRL).read_bytes()
    (entry,) = crl_of(own.ours)
    assert entry.serial_number == serial(own.hosts["hostB"])
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        is x509.ReasonFlags.key_compromise
    # Twice: nothing changes, not even the file, so no daemon reloads for nothing.
    again = keys.revoke(own.ours, host="hostB")
    assert again.added == () and again.already == done.added
    assert (own.ours / keys.CA_CRL).read_bytes() == first
    # Another host: the first entry stays as it was, the CRL's number goes up.
    keys.revoke(own.ours, cert=own.hosts["hostC"].cert)
    crl = crl_of(own.ours)
    assert {e.serial_number for e in crl} == {serial(own.hosts[h]) for h in ("hostB", "hostC")}
    kept = crl.get_revoked_certificate_by_serial_number(entry.serial_number)
    assert kept is not None and kept.revocation_date_utc == entry.revocation_date_utc
    assert list(kept.extensions) == list(entry.extensions)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    shown = keys.describe(own.ours / keys.CA_CRL)
    assert {r["host"] for r in shown["revoked"]} == {"hostB", "hostC"}  # type: ignore[attr-defined]
    assert "warning" not in shown


def test_a_host_whose_files_went_elsewhere_is_revoked_by_name(tmp_path: Path) -> None:
    keys.init_ca(tmp_path / "ca")
    files = keys.issue_host(tmp_path / "ca", "hostQ", [], out=tmp_path / "q")
    assert not (tmp_path / "ca" / "hostQ.crt").exists()
    assert keys.revoke(tmp_path / "ca", host="hostQ").added == (serial(files),)
    # A new certificate for the same host is not revoked by the old one's entry.
    fresh = keys.issue_host(tmp_path / "ca", "hostQ", [], out=tmp_path / "q")
    crl = crl_of(tmp_path / "ca")
    assert crl.get_revoked_certificate_by_serial_number(serial(fresh)) is None
    # The host's copy of the CRL is written with its files.
    assert (tmp_path / "q" / keys.CA_CRL).read_bytes() == (tmp_path / "ca" / keys.CA_CRL
                                                           ).read_bytes()


def test_unknown_hosts_and_foreign_certificates_are_not_revoked(tmp_path: Path,
                                                                pki: PKI) -> None:
    own = PKI(tmp_path)
    before = (own.ours / keys.CA_CRL).read_bytes()
    with pytest.raises(keys.KeysError) as caught:
        keys.revoke(own.ours, host="hostZ")
    assert "hostZ" in str(caught.value) and "hostA" in str(caught.value)
    with pytest.raises(keys.KeysError):
        keys.revoke(own.ours, cert=own.foreign_hostA.cert)
    with pytest.raises(keys.KeysError):
        keys.revoke(own.ours, cert=own.ours / keys.CA_KEY)  # no certificate at all
    assert (own.ours / keys.CA_CRL).read_bytes() == before
    # Nor does a daemon take another CA's CRL for ours.
    other = HostFiles(own.ours / keys.CA_CERT, own.hosts["hostA"].cert,
                      own.hosts["hostA"].key, pki.ours / keys.CA_CRL)
    with pytest.raises(keys.KeysError):
        tls.server_context(other)


def test_a_crl_near_or_past_its_end_is_warned_about(pki: PKI) -> None:
    crl = crl_of(pki.ours)
    assert crl.next_update_utc is not None
    soon = keys.crl_expiry_warning(crl, now=crl.next_update_utc - datetime.timedelta(days=3))
    past = keys.crl_expiry_warning(crl, now=crl.next_update_utc + datetime.timedelta(days=1))
    assert soon is not None and "expires" in soon
    assert past is not None and "expired" in past


def test_an_old_ca_without_a_crl_gets_one(tmp_path: Path) -> None:
    keys.init_ca(tmp_path)
    (tmp_path / keys.CA_CRL).unlink()  # as a CA made before CRLs
    files = keys.issue_host(tmp_path, "hostA", [])
    assert not tls.checks_revocation(tls.server_context(files))
    keys.sign_crl(tmp_path)
    assert len(crl_of(tmp_path)) == 0
    assert tls.checks_revocation(tls.server_context(files))


def test_a_revoked_target_is_refused_by_the_source(tmp_path: Path) -> None:
    own = PKI(tmp_path)
    keys.revoke(own.ours, host="hostB")
    err, _ = refused_before_the_handler(own, own.hosts["hostA"])
    assert isinstance(err, PeerNotTrusted) and not err.by_peer
    assert "hostB's certificate is revoked" in str(err)


def test_a_revoked_source_is_refused_by_the_target(tmp_path: Path) -> None:
    own = PKI(tmp_path)
    keys.revoke(own.ours, host="hostA")
    # A source whose own CRL is stale: only the target knows, and refuses it.
    stale = HostFiles(own.ours / keys.CA_CERT, own.hosts["hostA"].cert, own.hosts["hostA"].key)
    err, logged = refused_before_the_handler(own, stale)
    assert isinstance(err, PeerNotTrusted) and err.by_peer
    assert "hostB refused our certificate" in str(err)
    assert any("certificate revoked" in line for line in logged), logged
    # A daemon whose own CRL revokes it says so before calling anyone.
    with pytest.raises(keys.KeysError) as caught:
        tls.Contexts(own.hosts["hostA"]).client()
    assert "hostA's own certificate is revoked" in str(caught.value)


def test_an_expired_crl_refuses_every_peer_and_says_so(tmp_path: Path) -> None:
    own = PKI(tmp_path)
    ca, ca_key = keys._load_ca(own.ours)
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    expired = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
               .last_update(long_ago).next_update(long_ago + datetime.timedelta(days=1))
               .sign(ca_key, hashes.SHA256()))
    (own.ours / keys.CA_CRL).write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    err, _ = refused_before_the_handler(own, own.hosts["hostA"])
    assert isinstance(err, PeerNotTrusted) and "CRL (ca.crl) has expired" in str(err)
    assert "expired" in str(keys.describe(own.ours / keys.CA_CRL)["warning"])


def test_a_daemon_takes_a_new_crl_up_without_a_restart(tmp_path: Path) -> None:
    """The server asks ``Contexts.server`` at each connection: the CRL an operator
    copies in is in force from the next connection on."""
    own = PKI(tmp_path)
    contexts = tls.Contexts(own.hosts["hostB"])
    assert contexts.checks_revocation
    server_before = contexts.server()
    assert contexts.server() is server_before  # no change, no rebuild
    served = Served(contexts.server)

    async def call(me: str) -> None:
        channel = await connect(LOOPBACK, served.port, key=KEY, me=me,
                                ssl=own.client(me), peer_name="hostB", timeout=5)
        async with channel:
            await channel.request("ping", timeout=5)

    async def main() -> None:
        async with served:
            await call("hostA")
            keys.revoke(own.ours, host="hostA")  # hostB's ca.crl changes under its daemon
            with pytest.raises(PeerNotTrusted):
                await call("hostA")
            await call("hostC")  # the others are still let in
    run(main())
    assert served.seen == [("hostA", "hostA"), ("hostC", "hostC")]
    assert contexts.server() is not server_before


def test_a_crl_that_does_not_load_keeps_the_last_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = PKI(tmp_path)
    keys.revoke(own.ours, host="hostC")
    contexts = tls.Contexts(own.hosts["hostB"])
    before = contexts.server()
    good = (own.ours / keys.CA_CRL).read_bytes()
    (own.ours / keys.CA_CRL).write_bytes(good[: len(good) // 2])  # cp, caught half-way
    with caplog.at_level(logging.ERROR, logger="livemig.wire.tls"):
        assert contexts.server() is before
    assert any("do not load" in r.getMessage() for r in caplog.records)
    (own.ours / keys.CA_CRL).write_bytes(good)
    assert contexts.server() is not before and contexts.checks_revocation


def test_without_a_crl_a_daemon_warns_once_and_runs_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = PKI(tmp_path)
    (own.ours / keys.CA_CRL).unlink()
    with caplog.at_level(logging.WARNING, logger="livemig.wire.tls"):
        contexts = tls.Contexts(own.hosts["hostB"])
        contexts.server()
        contexts.client()
    assert not contexts.checks_revocation
    assert [r.getMessage() for r in caplog.records if "no CRL" in r.getMessage()] != []
    assert len(caplog.records) == 1
    keys.sign_crl(own.ours)  # the CRL arrives later: checked from the next connection on
    assert tls.checks_revocation(contexts.client())


def test_a_sender_learns_at_once_that_a_tls_peer_gave_up(pki: PKI) -> None:
    # A source in pre-copy only sends. When the target gives up (an Abort, then its TLS
    # close), asyncio drops whatever is written after (logging "SSL connection is
    # closed"): the next send must fail with the peer's reason, not wait for a time-out.
    pages = np.zeros((64, PAGE_SIZE), dtype=np.uint8) + 7
    idx = np.arange(64, dtype=np.uint32)

    async def give_up(channel: Channel) -> None:
        channel.connection.npages = 64
        await channel.recv(timeout=5)  # the first pages, then it gives up
        await channel.abort("the destination QEMU exited")

    async def main() -> None:
        server = await serve(LOOPBACK, 0, key=KEY, me="hostB", handler=give_up,
                             ssl=pki.server("hostB"), handshake_timeout=3)
        try:
            port = int(server.sockets[0].getsockname()[1])
            channel = await connect(LOOPBACK, port, key=KEY, me="hostA",
                                    ssl=pki.client("hostA"), peer_name="hostB",
                                    npages=64, timeout=5)
            async with channel:
                assert (channel.bytes_acked() or 0) > 0  # the handshake went across
                started = time.monotonic()
                with pytest.raises(PeerLost):
                    for _ in range(10_000):
                        await channel.send_pages(Pages(0, idx, NONE, pages.tobytes()),
                                                 timeout=30)
                assert time.monotonic() - started < 5
                assert channel.last_words() == "the destination QEMU exited"
        finally:
            server.close()
            await server.wait_closed()
    run(main())
