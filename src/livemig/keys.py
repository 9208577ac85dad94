"""The certificates daemons authenticate each other with: one CA, one certificate per host.

    livemig keys init --dir D                       D/ca.crt, D/ca.key (0600), D/ca.crl
    livemig keys host NAME --ip A [--ip B] --dir D  D/NAME.crt, D/NAME.key (0600), by D's CA
    livemig keys revoke NAME --dir D                D/ca.crl lists NAME's certificates

A host's TLS directory holds ``ca.crt``, ``ca.crl``, ``NAME.crt`` and ``NAME.key``:
exactly what ``keys host`` writes beside the CA, so a host is deployed by copying those
four files (never ``ca.key``) to its ``[tls] dir`` (``config``). The test bed does that itself at
'testbed up': the CA lives in the run directory, each host's files in the host's own
directory.

Revocation is a CRL, as libvirt and QEMU do it (``cacrl.pem`` beside ``cacert.pem``): the
CA signs the list of revoked serials, and an operator copies ``ca.crl`` to every host as
it copies ``ca.crt``; daemons read it again when it changes (``wire.tls.Contexts``). The
CA keeps a copy of every certificate it issues (``D/issued/SERIAL.crt``, as ``openssl
ca`` keeps ``newcerts/``), so that a host can be revoked by name even when its files went
straight to the host with ``--out``.

A CRL has a nextUpdate, and OpenSSL refuses every peer ("CRL has expired") once it is
past: a forgotten re-signing would stop the whole cluster. Our CRLs are not fetched from
a server that could replay an old one; they are files the operator copies. So a CRL is
valid for as long as its CA (past that, nothing verifies anyway), is signed anew at every
revocation, and ``keys show`` warns when its end is near.

A host certificate names its host as the subject's CN and as the one DNS name of its
subjectAltName (what TLS host name checks read), plus its IP addresses. It is good for
both TLS ends (serverAuth and clientAuth), since every daemon is a source one day and a
destination the next, and it can sign nothing (CA:FALSE).

Generation uses the ``cryptography`` package, not the openssl command: it is typed,
raises exceptions instead of exit codes, needs no temporary config file for
subjectAltName, and does not depend on the openssl CLI's flags across versions.
Keys are ECDSA P-256: a TLS 1.3 handshake with them costs a few milliseconds.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from livemig.errors import LivemigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_CRL = "ca.crl"
ISSUED = "issued"
CA_DAYS = 3650
# 'keys show' warns about a CRL (and so its CA) that ends sooner than this.
CRL_WARN = datetime.timedelta(days=30)
HOST_DAYS = 365
# Certificates start a little in the past: a host whose clock runs slightly behind the
# one that issued them must not refuse them as not yet valid.
BACKDATE = datetime.timedelta(minutes=5)
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")


class KeysError(LivemigError):
    """A CA, host certificate or CRL cannot be made, is missing, or does not fit the CA;
    or our own certificate is revoked (carries .path)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class HostFiles:
    """What a daemon needs to speak mutual TLS: our CA, its certificate and key, and the
    CA's revocation list. ``crl`` is optional: deployments older than CRLs have none."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None

    @classmethod
    def in_dir(cls, directory: Path, host: str) -> HostFiles:
        return cls(directory / CA_CERT, directory / f"{host}.crt", directory / f"{host}.key",
                   directory / CA_CRL)

    def missing(self) -> list[Path]:
        return [p for p in (self.ca, self.cert, self.key) if not p.is_file()]

    def require(self) -> HostFiles:
        if missing := self.missing():
            names = ", ".join(str(p) for p in missing)
            raise KeysError(missing[0], f"missing {names}; make them with 'livemig keys init' "
                                        "and 'livemig keys host', or run with "
                                        "--insecure-plaintext (not on a real network)")
        return self


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by root only, from its first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # all or nothing: a crash leaves no half key behind
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    """Write a world-readable file by an atomic replace: a reader (a daemon reloading its
    CRL) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path, *, name: str = "livemig CA", force: bool = False) -> Path:
    """Create a CA in ``directory``; returns its certificate. Refuses to replace one
    unless ``force``: every host certificate it issued would stop being trusted."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        raise KeysError(cert_path, f"a CA exists in {directory} already; replacing it "
                                   "invalidates every host certificate (use --force)")
    key = _new_key()
    # A random serial in the name too: two test beds' CAs must never be mistaken for
    # one another, even where a verifier matches issuers by name.
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {secrets.token_hex(4)}"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "livemig"),
    ])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    # Every deployment has a CRL from the start; a replaced CA's list does not carry over.
    _sign_crl(directory, cert, key, [], number=1)
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise KeysError(Path(exc.filename or directory),
                        f"no CA in {directory}; run 'livemig keys init --dir {directory}' "
                        "first") from exc
    except ValueError as exc:
        raise KeysError(directory, f"the CA in {directory} does not load: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeysError(key_path, f"{key_path} is not an EC key made by 'livemig keys init'")
    return cert, key


def issue_host(directory: Path, host: str, ips: list[str], *, days: int = HOST_DAYS,
               out: Path | None = None) -> HostFiles:
    """Issue ``host``'s certificate from the CA in ``directory``. The key and certificate
    go to ``out`` (default ``directory``) with a copy of the CA certificate: a complete
    TLS directory for that host."""
    if not _HOST_RE.fullmatch(host):
        raise KeysError(directory, f"{host!r} is not a host name (letters, digits, '-', '.')")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise KeysError(directory, f"bad --ip: {exc}") from exc
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    names += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = HostFiles.in_dir(out or directory, host)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    write_public(directory / ISSUED / f"{cert.serial_number:x}.crt", pem)
    _write_private(files.key, _key_pem(key))
    write_public(files.cert, pem)
    if files.ca != directory / CA_CERT:
        write_public(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
        if (directory / CA_CRL).is_file():
            write_public((out or directory) / CA_CRL, (directory / CA_CRL).read_bytes())
    return files


# -- revocation -------------------------------------------------------------------------


def host_of(cert: x509.Certificate) -> str | None:
    """The host a certificate of ours names: its one DNS subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if len(names) == 1 else None


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL at ``path``, which must be signed by ``ca_cert``'s CA: a list of another
    CA would revoke nothing of ours, and OpenSSL would then refuse every peer for lack
    of a CRL of our CA."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise KeysError(path, f"{path} is not a PEM CRL (a half-copied file?)") from exc
    public = ca_cert.public_key()
    if (crl.issuer != ca_cert.subject or not isinstance(public, ec.EllipticCurvePublicKey)
            or not crl.is_signature_valid(public)):
        raise KeysError(path, f"{path} was not signed by our CA "
                              f"({ca_cert.subject.rfc4514_string()})")
    return crl


def _sign_crl(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              entries: list[x509.RevokedCertificate], *, number: int) -> Path:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        # Backdated as certificates are: a host a little behind must not find it "not
        # yet valid". Valid as long as the CA: see the module's docstring for why.
        .last_update(now - BACKDATE)
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    path = directory / CA_CRL
    write_public(path, builder.sign(ca_key, hashes.SHA256())
                  .public_bytes(serialization.Encoding.PEM))
    return path


def issued(directory: Path) -> list[x509.Certificate]:
    """The certificates the CA in ``directory`` issued, as far as it knows: its copies
    in ``issued/``, and host certificates beside it (from CAs made before those copies)."""
    ca_cert, _ = _load_ca(directory)
    found: dict[int, x509.Certificate] = {}
    for path in [*sorted((directory / ISSUED).glob("*.crt")), *sorted(directory.glob("*.crt"))]:
        if path.name == CA_CERT:
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            continue  # not one of this CA's: a foreign file in its directory
        found.setdefault(cert.serial_number, cert)
    return list(found.values())


# What 'keys revoke --reason' takes: the RFC 5280 reasons that fit a host certificate.
REVOKE_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}


@dataclass(frozen=True)
class Revoked:
    """What 'keys revoke' did: serials it added to the CRL, and those listed already."""

    crl: Path
    added: tuple[int, ...]
    already: tuple[int, ...]


def revoke(directory: Path, *, host: str | None = None, cert: Path | None = None,
           reason: x509.ReasonFlags | None = None) -> Revoked:
    """Add to the CA's CRL every certificate it issued to ``host``, or the certificate
    in the file ``cert``, and sign the CRL anew. Serials listed already stay as they
    were (date and reason): revoking twice changes nothing."""
    ca_cert, ca_key = _load_ca(directory)
    if (host is None) == (cert is None):
        raise ValueError("revoke a host or a certificate file, one of the two")
    if cert is not None:
        try:
            victim = x509.load_pem_x509_certificate(cert.read_bytes())
        except ValueError as exc:
            raise KeysError(cert, f"{cert} is not a PEM certificate") from exc
        try:
            victim.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise KeysError(cert, f"{cert} was not issued by the CA in {directory}, "
                                  "whose CRL cannot revoke it") from exc
        victims = [victim]
    else:
        known = issued(directory)
        victims = [c for c in known if host_of(c) == host]
        if not victims:
            hosts = sorted({h for c in known if (h := host_of(c))})
            raise KeysError(directory, f"the CA in {directory} has no record of a "
                                       f"certificate for {host!r} (it knows "
                                       f"{', '.join(hosts) or 'none'}); revoke the "
                                       "certificate's file with --cert")
    path = directory / CA_CRL
    old = load_crl(path, ca_cert) if path.is_file() else None
    entries = list(old) if old is not None else []
    listed = {entry.serial_number for entry in entries}
    added = tuple(sorted({c.serial_number for c in victims} - listed))
    already = tuple(sorted({c.serial_number for c in victims} & listed))
    if not added and old is not None:
        return Revoked(path, added, already)  # nothing new: the file and its mtime stay
    now = datetime.datetime.now(datetime.UTC)
    for serial in added:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
        if reason is not None and reason is not x509.ReasonFlags.unspecified:
            # RFC 5280 5.3.1: "unspecified" is said by leaving the reason out.
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        entries.append(entry.build())
    _sign_crl(directory, ca_cert, ca_key, entries, number=_crl_number(old) + 1)
    return Revoked(path, added, already)


def sign_crl(directory: Path) -> Path:
    """Sign the CA's CRL anew with what it lists (or empty, for a CA made before CRLs):
    a fresh thisUpdate and nextUpdate."""
    ca_cert, ca_key = _load_ca(directory)
    path = directory / CA_CRL
    old = load_crl(path, ca_cert) if path.is_file() else None
    return _sign_crl(directory, ca_cert, ca_key, list(old) if old is not None else [],
                     number=_crl_number(old) + 1)


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def _reason(entry: x509.RevokedCertificate) -> str:
    try:
        return str(entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value)
    except x509.ExtensionNotFound:
        return "unspecified"


def crl_expiry_warning(crl: x509.CertificateRevocationList, *,
                       now: datetime.datetime | None = None) -> str | None:
    """A sentence when the CRL has expired or soon will, else None."""
    now = now or datetime.datetime.now(datetime.UTC)
    ends = crl.next_update_utc
    if ends is None:
        return None
    if ends <= now:
        return (f"this CRL expired on {ends:%Y-%m-%d}: OpenSSL refuses every peer until a "
                "fresh one ('livemig keys crl --dir CA') is on every host")
    if ends - now < CRL_WARN:
        return (f"this CRL expires on {ends:%Y-%m-%d}, and then OpenSSL refuses every peer: "
                "sign a fresh one ('livemig keys crl --dir CA'; ours end with their CA, "
                "so a CA near its end needs replacing)")
    return None


def describe(path: Path) -> dict[str, object]:
    """What a certificate or a CRL says, for 'livemig keys show'."""
    data = path.read_bytes()
    if b"-----BEGIN X509 CRL-----" in data:
        return _describe_crl(path, x509.load_pem_x509_crl(data))
    cert = x509.load_pem_x509_certificate(data)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        alt += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        alt = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "names": alt,
        "not_after": cert.not_valid_after_utc.isoformat(),
        "serial": f"{cert.serial_number:x}",
    }


def _describe_crl(path: Path, crl: x509.CertificateRevocationList) -> dict[str, object]:
    # Beside its CA (not on a host), the CA's copies say whose each serial was.
    hosts: dict[int, str | None] = {}
    if (path.parent / CA_KEY).is_file():
        with contextlib.suppress(KeysError):
            hosts = {c.serial_number: host_of(c) for c in issued(path.parent)}
    described: dict[str, object] = {
        "issuer": crl.issuer.rfc4514_string(),
        "number": _crl_number(crl),
        "this_update": crl.last_update_utc.isoformat(),
        "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        "revoked": [{"serial": f"{entry.serial_number:x}",
                     "host": hosts.get(entry.serial_number),
                     "revoked_at": entry.revocation_date_utc.isoformat(),
                     "reason": _reason(entry)} for entry in crl],
    }
    if warning := crl_expiry_warning(crl):
        described["warning"] = warning
    return described
