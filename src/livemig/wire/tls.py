"""Mutual TLS between daemons: the contexts, who a certificate names, what a peer speaks.

Policy, the same on both ends: TLS 1.3 only; our CA and nothing else is trusted (the
system's CAs are never loaded: a certificate any public CA signed must not move VMs);
both ends present a host certificate of that CA.

- The client (a migration's source) knows whom it calls: the certificate must name the
  target host (``server_hostname``; OpenSSL checks the subjectAltName DNS name).
- The server (the destination) cannot know in advance who calls; it requires a
  certificate of our CA with the client-auth purpose and records the host it names
  (``certified_host``). The livemig handshake inside then checks that the peer calls
  itself by that name.

Revocation: when the TLS directory holds ``ca.crl`` (our CA's CRL, ``keys revoke``),
both contexts check the peer's certificate against it (OpenSSL's CRL check of the leaf;
our chains are one CA deep), so a revoked host can neither send nor receive a VM. A
deployment older than CRLs has none and runs on without the check, with a warning.

A daemon takes its contexts from ``Contexts``, which builds them again when one of its
TLS files changes, looked at once per new connection: revocation matters because a host
is compromised now, and a stat is microseconds against a handshake's milliseconds.
We chose that over SIGHUP, which needs an operator to remember to signal every daemon in
the cluster after copying the CRL, and leaves the cluster open to the revoked host
until each one has been. Connections already authenticated are not cut: a migration
that began before the revocation finishes.

``sniff`` tells a TLS ClientHello from livemig's plaintext Hello by the first byte, so a
daemon can refuse the wrong kind of peer with a message instead of a broken handshake.
Nothing here does I/O but reading the certificate files.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from livemig import keys
from livemig.keys import HostFiles, KeysError

log = logging.getLogger(__name__)

# TLS record type 22 (handshake): the first byte of every ClientHello.
TLS_HANDSHAKE_BYTE: Final = 0x16
_HOST_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")


class Speaks(enum.Enum):
    """What a peer's first byte says it speaks."""

    TLS = "TLS"
    PLAINTEXT = "livemig plaintext"
    OTHER = "neither TLS nor livemig"


def sniff(first: bytes) -> Speaks:
    """Classify a connection from its first byte (``first`` may be longer)."""
    if not first:
        return Speaks.OTHER
    if first[0] == TLS_HANDSHAKE_BYTE:
        return Speaks.TLS
    if first[:1] == b"L":  # livemig's frames start with the magic b"LMIG"
        return Speaks.PLAINTEXT
    return Speaks.OTHER


def _configure(ctx: ssl.SSLContext, files: HostFiles) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(files.ca))  # ours only, never the system's
    if files.crl is not None and files.crl.is_file():
        # Checked first: OpenSSL would take a CRL of another CA, or a half-copied one,
        # as "no CRL of our CA", and refuse every peer with a misleading reason.
        keys.load_crl(files.crl, x509.load_pem_x509_certificate(files.ca.read_bytes()))
        ctx.load_verify_locations(cafile=str(files.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def client_context(files: HostFiles) -> ssl.SSLContext:
    """For connecting to another daemon: pass the target's host name as
    ``server_hostname``, which its certificate must name."""
    ctx = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), files.require())
    ctx.check_hostname = True
    return ctx


def server_context(files: HostFiles) -> ssl.SSLContext:
    """For accepting daemons: a client without a certificate of our CA is refused in
    the TLS handshake."""
    ctx = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files.require())
    # No session tickets: a resumed session would skip the client's certificate, and
    # each daemon connects once per migration, so there is nothing to save.
    ctx.num_tickets = 0
    return ctx


def checks_revocation(ctx: ssl.SSLContext) -> bool:
    return bool(ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF)


@dataclass(frozen=True)
class _Built:
    server: ssl.SSLContext
    client: ssl.SSLContext
    # Why no peer would accept us, when our own CRL lists our own certificate.
    revoked_self: str | None


class Contexts:
    """A daemon's server and client contexts, built again when its TLS files change.

    ``server()`` and ``client()`` look at the files' inode, size and mtime (an atomic
    replace changes the inode even within one mtime tick) and rebuild both contexts when
    any differs. Files that do not load (a CRL copied with cp, caught half-written; a new
    key whose certificate is not there yet) keep the previous contexts, with an error in
    the log, and are tried again at their next change: the old CRL still revokes what it
    revoked, which is safer than running without one.
    """

    def __init__(self, files: HostFiles) -> None:
        self.files = files.require()
        self._seen = self._signature()
        self._built = self._build()
        if not self.checks_revocation:
            log.warning("no CRL at %s: revoked certificates are accepted; copy the CA's "
                        "ca.crl there ('livemig keys init' makes one, 'livemig keys crl' "
                        "for an older CA)", self.files.crl)
        self._warn_if_revoked()

    @property
    def checks_revocation(self) -> bool:
        return checks_revocation(self._built.server)

    def server(self) -> ssl.SSLContext:
        self._refresh()
        return self._built.server

    def client(self) -> ssl.SSLContext:
        """The context to call a peer with. Raises KeysError when our own CRL revokes
        our certificate: every peer would refuse it, and this says why in our words."""
        self._refresh()
        if self._built.revoked_self is not None:
            raise KeysError(self.files.cert, self._built.revoked_self)
        return self._built.client

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        def stat(path: Path | None) -> tuple[int, int, int] | None:
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                return None
            return (st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else None
        return tuple(stat(p) for p in (self.files.ca, self.files.crl, self.files.cert,
                                       self.files.key))

    def _build(self) -> _Built:
        server, client = server_context(self.files), client_context(self.files)
        revoked = None
        if checks_revocation(server):
            assert self.files.crl is not None
            ca = x509.load_pem_x509_certificate(self.files.ca.read_bytes())
            crl = keys.load_crl(self.files.crl, ca)
            ours = x509.load_pem_x509_certificate(self.files.cert.read_bytes())
            if crl.get_revoked_certificate_by_serial_number(ours.serial_number) is not None:
                host = keys.host_of(ours) or self.files.cert.stem
                revoked = (f"{host}'s own certificate is revoked (serial "
                           f"{ours.serial_number:x} in {self.files.crl}), so every peer "
                           f"refuses it; issue {host} a new one with 'livemig keys host "
                           f"{host}' and put it in {self.files.cert.parent}")
        return _Built(server, client, revoked)

    def _refresh(self) -> None:
        now = self._signature()
        if now == self._seen:
            return
        self._seen = now
        before = self.checks_revocation
        try:
            self._built = self._build()
        except (OSError, ValueError, ssl.SSLError, KeysError) as exc:
            log.error("the TLS files in %s changed but do not load (%s); still using the "
                      "ones loaded before", self.files.cert.parent, exc)
            return
        if before and not self.checks_revocation:
            log.warning("%s is gone: revoked certificates are accepted again", self.files.crl)
        else:
            log.info("TLS files reloaded (%s)", "revocation checked against ca.crl"
                     if self.checks_revocation else "no CRL")
        self._warn_if_revoked()

    def _warn_if_revoked(self) -> None:
        if self._built.revoked_self is not None:
            log.warning("%s", self._built.revoked_self)


def certified_host(peercert: dict[str, Any] | None) -> str | None:
    """The host a verified peer certificate names (``SSLObject.getpeercert()``): its one
    DNS subjectAltName. None when there is no such certificate, none or several DNS
    names, or the name is not a host name: such a certificate is not one of ours."""
    if not peercert:
        return None
    names = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    if len(names) != 1 or not isinstance(names[0], str) or not _HOST_RE.fullmatch(names[0]):
        return None
    return names[0]


# OpenSSL's X509_V_ERR_* codes that have a remedy of their own.
X509_V_ERR_CRL_HAS_EXPIRED: Final = 12
X509_V_ERR_CERT_REVOKED: Final = 23


def describe_ssl_error(exc: BaseException) -> str:
    """One line for the operator out of an ssl error: OpenSSL's reason, and for a
    refused certificate what the verifier said."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == X509_V_ERR_CRL_HAS_EXPIRED:
            return f"certificate refused: {_CRL_EXPIRED}"
        return f"certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


_CRL_EXPIRED = ("our CRL (ca.crl) has expired, and OpenSSL refuses every peer until a "
                "fresh one ('livemig keys crl --dir CA') is on every host")


def describe_peer_certificate_refused(peer: str, exc: ssl.SSLCertVerificationError) -> str:
    """Why we refused ``peer``'s certificate, in the words an operator acts on."""
    if exc.verify_code == X509_V_ERR_CERT_REVOKED:
        return f"{peer}'s certificate is revoked (our CA's CRL lists it)"
    if exc.verify_code == X509_V_ERR_CRL_HAS_EXPIRED:
        return _CRL_EXPIRED
    return f"{peer}'s certificate: {exc.verify_message}"
