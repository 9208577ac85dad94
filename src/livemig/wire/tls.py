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

``sniff`` tells a TLS ClientHello from livemig's plaintext Hello by the first byte, so a
daemon can refuse the wrong kind of peer with a message instead of a broken handshake.
Nothing here does I/O but reading the certificate files.
"""

from __future__ import annotations

import enum
import re
import ssl
from typing import Any, Final

from livemig.keys import HostFiles

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


def describe_ssl_error(exc: BaseException) -> str:
    """One line for the operator out of an ssl error: OpenSSL's reason, and for a
    refused certificate what the verifier said."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__
