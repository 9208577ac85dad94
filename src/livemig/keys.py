"""The certificates daemons authenticate each other with: one CA, one certificate per host.

    livemig keys init --dir D                       D/ca.crt, D/ca.key (0600)
    livemig keys host NAME --ip A [--ip B] --dir D  D/NAME.crt, D/NAME.key (0600), by D's CA

A host's TLS directory holds ``ca.crt``, ``NAME.crt`` and ``NAME.key``: exactly what
``keys host`` writes beside the CA, so a host is deployed by copying those three files
(never ``ca.key``) to its ``--tls-dir``. The test bed does that itself at 'testbed up':
the CA lives in the run directory, each host's three files in the host's own directory.

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

import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from livemig.errors import LivemigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
HOST_DAYS = 365
# Certificates start a little in the past: a host whose clock runs slightly behind the
# one that issued them must not refuse them as not yet valid.
BACKDATE = datetime.timedelta(minutes=5)
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")


class KeysError(LivemigError):
    """A CA or host certificate cannot be made or is missing (carries .path)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class HostFiles:
    """What a daemon needs to speak mutual TLS: our CA, its certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path, host: str) -> HostFiles:
        return cls(directory / CA_CERT, directory / f"{host}.crt", directory / f"{host}.key")

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


def _write_public(path: Path, data: bytes) -> None:
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
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
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
    _write_private(files.key, _key_pem(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    if files.ca != directory / CA_CERT:
        _write_public(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def describe(path: Path) -> dict[str, object]:
    """What a certificate says, for 'livemig keys show'."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
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
