"""Certificates for a deployment without a hospital PKI: a local CA, the server's certificate and
one client certificate per device or service, and what identifies a verified client (its
common name and SHA-256 fingerprint, the pair the callers file lists).

ECDSA P-256 keys: a key is made in ~0.1 ms (RSA-2048: ~50 ms, which would slow every test that
issues certificates), and every TLS stack a monitor or client library ships accepts them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bedside.security.callers import Peer

ALWAYS_HOSTS = ("localhost", "127.0.0.1", "::1")
CLOCK_SLACK = dt.timedelta(minutes=5)  # a device whose clock is a little behind still accepts a new certificate


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key, as PEM bytes and as objects (the CA's key signs others)."""

    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, cert_path: Path, key_path: Path) -> None:
        """The certificate (world-readable: it is public) and the key (owner-only, 0600)."""
        write_file(cert_path, self.cert_pem, 0o644)
        write_file(key_path, self.key_pem, 0o600)

    @property
    def not_after(self) -> str:
        return self.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with `mode` from the first byte: a key never exists readable by others,
    not even for the moment between writing and a chmod."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is reduced by the umask; the file must be exactly `mode`
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    end = not_after if not_after is not None else now + dt.timedelta(days=days)
    start = not_before if not_before is not None else min(now - CLOCK_SLACK, end - dt.timedelta(days=days))
    if end <= start:
        raise ValueError("a certificate must end after it begins")
    return start, end


def _issue(
    subject: str,
    issuer: Issued | None,
    days: int,
    extensions: list[x509.ExtensionType],
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, not_before, not_after)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    for extension in extensions:
        critical = isinstance(extension, x509.BasicConstraints | x509.KeyUsage)
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(key if issuer is None else issuer.key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), cert, key)


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(common_name: str = "bedside local CA", days: int = 3650) -> Issued:
    """A CA that signs server and client certificates only (path length 0: no intermediate CAs)."""
    return _issue(common_name, None, days, [x509.BasicConstraints(ca=True, path_length=0), _key_usage(sign_certs=True)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def make_server(ca: Issued, hosts: list[str], days: int = 825) -> Issued:
    """The server's certificate for `hosts` (names or IP addresses) and always this box's loopback
    names. 825 days: the longest validity clients such as Apple's accept for a server certificate."""
    names = list(dict.fromkeys([*ALWAYS_HOSTS, *(h.strip() for h in hosts if h.strip())]))
    subject = next((h for h in names if h not in ALWAYS_HOSTS), "localhost")
    return _issue(
        subject,
        ca,
        days,
        [
            x509.BasicConstraints(ca=False, path_length=None),
            _key_usage(sign_certs=False),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            x509.SubjectAlternativeName([_san(h) for h in names]),
        ],
    )


def make_client(
    ca: Issued,
    name: str,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A client certificate with CN=`name` (the caller's name in the callers file). `not_after` in
    the past makes an expired certificate, for tests of its refusal."""
    return _issue(
        name,
        ca,
        days,
        [
            x509.BasicConstraints(ca=False, path_length=None),
            _key_usage(sign_certs=False),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
        ],
        not_before,
        not_after,
    )


def load_issued(cert_pem: bytes, key_pem: bytes) -> Issued:
    """A certificate and its key read back (a CA made by `bedside certs init`); ValueError when
    either is not PEM, the key is not an unencrypted EC key, or they do not belong together."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # encrypted: the library asks for the password this way
        raise ValueError("the key is encrypted; bedside reads unencrypted keys (kept owner-only)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the key is not an EC key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError("the key does not belong to the certificate")
    return Issued(cert_pem, key_pem, cert, key)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER bytes, lower-case hex: what the callers file lists."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    """The subject's one common name; "" when it has none or several (which one would count is
    ambiguous, and an empty name matches no caller)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return ""
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def peer_from_der(der: bytes) -> Peer:
    cert = x509.load_der_x509_certificate(der)
    return Peer(common_name(cert), hashlib.sha256(der).hexdigest())


def peer_from_pem(pem: bytes) -> Peer:
    """The Peer of the first certificate in `pem`; ValueError when there is none."""
    cert = x509.load_pem_x509_certificate(pem)
    return Peer(common_name(cert), fingerprint(cert))
