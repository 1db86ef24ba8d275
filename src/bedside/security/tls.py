"""TLS for the listeners, from the `security` settings: the server's certificate and key, and the
CA that signs client certificates (mutual TLS).

The files are read and checked here, once, before any listener starts, so a mistake is one line
naming the setting (security.tls_key ...), never a bare OpenSSL error or a listener that starts
and then fails every handshake. Messages never name the file's path: they land in the system log.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from bedside.security.callers import Peer
from bedside.security.certs import peer_from_der
from bedside.settings import SecuritySettings

MAX_PEM = 1 << 20  # a certificate chain or key file is a few KiB; a larger one is the wrong file


class TLSConfigError(ValueError):
    """TLS settings that cannot be used; one line naming the setting and what is wrong."""


@dataclass(frozen=True)
class TLSFiles:
    """The checked contents of the TLS settings' files (PEM)."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None
    require_client_cert: bool


class GrpcTLS(NamedTuple):
    """What grpc.ssl_server_credentials takes: [(private_key, certificate_chain)], root_certificates
    and require_client_auth. grpcio either requires a client certificate or does not ask for one:
    with security.client_cert=optional it asks for none, so gRPC callers then use tokens."""

    private_key: bytes
    certificate_chain: bytes
    root_certificates: bytes | None
    require_client_auth: bool


def _read(setting: str, path: str) -> bytes:
    try:
        with Path(path).expanduser().open("rb") as source:
            data = source.read(MAX_PEM + 1)
    except OSError as exc:
        raise TLSConfigError(
            f"security.{setting}: the file cannot be read ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(data) > MAX_PEM:
        raise TLSConfigError(f"security.{setting}: the file is over {MAX_PEM >> 20} MiB, too large for a PEM file")
    return data


def _certificates(setting: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(
            f"security.{setting} is not a PEM certificate file (-----BEGIN CERTIFICATE-----)"
        ) from None


def _check_key(data: bytes, cert: x509.Certificate) -> None:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # the library's way of saying the key needs a password
        raise TLSConfigError(
            "security.tls_key is encrypted; bedside needs an unencrypted key, readable by its owner only"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError("security.tls_key is not a PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TLSConfigError("security.tls_key does not match security.tls_cert (a different key pair)")


def load_files(security: SecuritySettings) -> TLSFiles | None:
    """The TLS files the settings name, checked; None when TLS is off (no tls_cert)."""
    if security.tls_key and not security.tls_cert:
        raise TLSConfigError("security.tls_key is set without security.tls_cert; set both or neither")
    if security.tls_client_ca and not security.tls_cert:
        raise TLSConfigError(
            "security.tls_client_ca needs security.tls_cert: client certificates are asked for over TLS only"
        )
    if not security.tls_cert:
        return None
    if not security.tls_key:
        raise TLSConfigError("security.tls_cert is set without security.tls_key; set both or neither")
    chain = _read("tls_cert", security.tls_cert)
    leaf = _certificates("tls_cert", chain)[0]
    if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        # every client would refuse it: better one line now than failed handshakes later
        expired = leaf.not_valid_after_utc.strftime("%Y-%m-%d")
        raise TLSConfigError(f"security.tls_cert expired on {expired}; renew it")
    key = _read("tls_key", security.tls_key)
    _check_key(key, leaf)
    client_ca = None
    if security.tls_client_ca:
        client_ca = _read("tls_client_ca", security.tls_client_ca)
        found = _certificates("tls_client_ca", client_ca)
        if not any(_is_ca(c) for c in found):
            raise TLSConfigError("security.tls_client_ca holds no CA certificate (basicConstraints CA:TRUE)")
    return TLSFiles(chain, key, client_ca, client_ca is not None and security.client_cert == "required")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def server_context(security: SecuritySettings) -> ssl.SSLContext | None:
    """The server-side TLS context (TLS 1.2 or later) the settings ask for; None without tls_cert.
    With tls_client_ca, a client certificate is required or optional per security.client_cert;
    one that is sent must verify against that CA either way."""
    files = load_files(security)
    if files is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # the stdlib loads a chain from files only; they were read and checked just above. The
        # password callback keeps OpenSSL from prompting on a terminal should the key change since.
        context.load_cert_chain(
            Path(security.tls_cert).expanduser(), Path(security.tls_key).expanduser(), password=lambda: b""
        )
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise TLSConfigError(f"security.tls_cert and security.tls_key cannot be loaded: {reason}") from None
    if files.client_ca is not None:
        context.load_verify_locations(cadata=files.client_ca.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED if files.require_client_cert else ssl.CERT_OPTIONAL
    return context


def grpc_credentials_args(security: SecuritySettings) -> GrpcTLS | None:
    """What the gRPC server's credentials need (plain bytes: only server/ imports grpc); None
    without tls_cert. Usage: grpc.ssl_server_credentials([(t.private_key, t.certificate_chain)],
    root_certificates=t.root_certificates, require_client_auth=t.require_client_auth)."""
    files = load_files(security)
    if files is None:
        return None
    return GrpcTLS(files.key, files.cert_chain, files.client_ca, files.require_client_cert)


def peer_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Peer | None:
    """The verified client certificate of an established connection; None when there is no TLS,
    no certificate, or the context does not verify client certificates (an unverified one must
    never identify a caller)."""
    if ssl_object is None or ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return peer_from_der(der)
    except ValueError:  # OpenSSL verified it, so this is not expected; still, no identity
        return None
