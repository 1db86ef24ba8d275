"""Certificates made by bedside.security.certs, and the TLS contexts bedside.security.tls builds
from the settings, checked over real loopback TLS connections with the stdlib ssl module: a valid
client certificate is accepted and names its peer; an expired one, one from another CA, and none
(when required) are refused; plaintext to the TLS port fails; unusable settings are one line
naming the setting, never the file's path."""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bedside.security.callers import Peer
from bedside.security.certs import (
    Issued,
    fingerprint,
    load_issued,
    make_ca,
    make_client,
    make_server,
    peer_from_der,
    peer_from_pem,
)
from bedside.security.tls import TLSConfigError, grpc_credentials_args, peer_of, server_context
from bedside.settings import SecuritySettings

NOW = dt.datetime.now(dt.UTC)


@dataclass
class PKI:
    folder: Path
    ca: Issued
    server: Issued

    def client(self, name: str, **kwargs: object) -> tuple[Path, Path, Issued]:
        issued = make_client(self.ca, name, **kwargs)  # type: ignore[arg-type]
        return (*self.write(name, issued), issued)

    def write(self, name: str, issued: Issued) -> tuple[Path, Path]:
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        issued.write(cert, key)
        return cert, key

    def settings(self, **changes: str) -> SecuritySettings:
        base = {
            "tls_cert": str(self.folder / "server.pem"),
            "tls_key": str(self.folder / "server.key"),
            "tls_client_ca": str(self.folder / "ca.pem"),
        }
        return SecuritySettings(**(base | changes))  # type: ignore[arg-type]


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = make_ca()
    server = make_server(ca, ["box.ward.example", "10.1.2.3"])
    pki = PKI(tmp_path, ca, server)
    pki.write("ca", ca)
    pki.write("server", server)
    return pki


def client_context(pki: PKI, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.folder / "ca.pem")
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def call(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext | None) -> tuple[str, bytes | Exception]:
    """One connection to a blocking TLS server thread that answers with the peer it verified (or
    "none"): (the server's outcome, "ok" or its handshake error; what the client read, or the
    exception it got). A None client context sends plaintext."""
    outcome: dict[str, str] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    peer = peer_of(tls)
                    tls.sendall(b"none" if peer is None else f"{peer.common_name} {peer.fingerprint}".encode())
                outcome["server"] = "ok"
            except (ssl.SSLError, OSError) as exc:
                outcome["server"] = str(exc)
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        read: bytes | Exception
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            try:
                if client_ctx is None:
                    raw.sendall(b"\x0bMSH|^~\\&|plaintext\x1c\r")
                    read = raw.recv(200)
                else:
                    with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        read = tls.recv(200)
            except (ssl.SSLError, OSError) as exc:
                read = exc
        thread.join(10)
    return outcome["server"], read


def refused(answer: tuple[str, bytes | Exception], reason: str) -> bool:
    """Refused in the handshake for `reason` (the server's error says why), and the client read
    nothing: TLS 1.3 reports a refused client certificate at the client's first read."""
    server, read = answer
    return reason in server and not (isinstance(read, bytes) and read)


# --- the certificates ---------------------------------------------------------------------


def test_the_ca_server_and_client_certificates_have_what_tls_needs(pki: PKI):
    ca, server = pki.ca.cert, pki.server.cert
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "box.ward.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.1.2.3"]
    assert server.issuer == ca.subject
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    _, _, device = pki.client("monitor-7")
    assert device.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "monitor-7"
    assert list(device.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ca.verify_directly_issued_by(ca)
    device.cert.verify_directly_issued_by(ca)


def test_keys_are_owner_only_and_peers_agree_from_der_and_pem(pki: PKI):
    cert, key, device = pki.client("monitor-7")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((pki.folder / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    der = device.cert.public_bytes(serialization.Encoding.DER)
    expected = Peer("monitor-7", hashlib.sha256(der).hexdigest())
    assert fingerprint(device.cert) == expected.fingerprint
    assert peer_from_der(der) == peer_from_pem(cert.read_bytes()) == expected
    again = load_issued(cert.read_bytes(), key.read_bytes())
    assert fingerprint(again.cert) == expected.fingerprint
    with pytest.raises(ValueError, match="does not belong"):
        load_issued(cert.read_bytes(), (pki.folder / "server.key").read_bytes())


def test_an_expired_certificate_can_be_made_for_tests(pki: PKI):
    _, _, old = pki.client("old", not_after=NOW - dt.timedelta(days=1))
    assert old.cert.not_valid_after_utc < NOW
    assert old.cert.not_valid_before_utc < old.cert.not_valid_after_utc


# --- TLS over loopback ----------------------------------------------------------------------


def test_a_valid_client_certificate_is_accepted_and_its_peer_read(pki: PKI):
    cert, key, device = pki.client("monitor-7")
    context = server_context(pki.settings())
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    answer = call(context, client_context(pki, cert, key))
    assert answer == ("ok", f"monitor-7 {fingerprint(device.cert)}".encode())


def test_an_expired_client_certificate_is_refused(pki: PKI):
    cert, key, _ = pki.client("old", not_after=NOW - dt.timedelta(minutes=1))
    context = server_context(pki.settings())
    assert context is not None
    assert refused(call(context, client_context(pki, cert, key)), "certificate has expired")


def test_a_certificate_from_another_ca_is_refused(pki: PKI):
    stranger = make_client(make_ca("some other CA"), "monitor-7")
    cert, key = pki.write("stranger", stranger)
    context = server_context(pki.settings())
    assert context is not None
    assert refused(call(context, client_context(pki, cert, key)), "unable to get local issuer certificate")


def test_no_client_certificate_is_refused_when_required_and_allowed_when_optional(pki: PKI):
    required = server_context(pki.settings(client_cert="required"))
    optional = server_context(pki.settings(client_cert="optional"))
    assert required is not None and optional is not None and optional.verify_mode == ssl.CERT_OPTIONAL
    assert refused(call(required, client_context(pki)), "peer did not return a certificate")
    assert call(optional, client_context(pki)) == ("ok", b"none")
    cert, key, _ = pki.client("old", not_after=NOW - dt.timedelta(minutes=1))
    assert refused(
        call(optional, client_context(pki, cert, key)), "certificate has expired"
    )  # optional, but verified when sent


def test_without_a_client_ca_no_certificate_is_asked_for_or_trusted(pki: PKI):
    context = server_context(pki.settings(tls_client_ca=""))
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    cert, key, _ = pki.client("monitor-7")
    assert call(context, client_context(pki, cert, key)) == (
        "ok",
        b"none",
    )  # never a peer from an unverified certificate


def test_plaintext_to_the_tls_port_fails(pki: PKI):
    context = server_context(pki.settings())
    assert context is not None
    server, read = call(context, None)
    assert server != "ok" and not (isinstance(read, bytes) and read.startswith(b"\x0b"))


def test_no_tls_settings_no_context():
    assert server_context(SecuritySettings()) is None
    assert grpc_credentials_args(SecuritySettings()) is None
    assert peer_of(None) is None


def test_grpc_gets_plain_bytes_and_the_client_policy(pki: PKI):
    args = grpc_credentials_args(pki.settings(client_cert="optional"))
    assert args is not None
    assert args.private_key == (pki.folder / "server.key").read_bytes()
    assert args.certificate_chain == (pki.folder / "server.pem").read_bytes()
    assert args.root_certificates == (pki.folder / "ca.pem").read_bytes()
    assert args.require_client_auth is False
    required = grpc_credentials_args(pki.settings())
    assert required is not None and required.require_client_auth is True
    no_ca = grpc_credentials_args(pki.settings(tls_client_ca=""))
    assert no_ca is not None and no_ca.root_certificates is None and no_ca.require_client_auth is False


# --- settings that cannot be used: one line naming the setting ---------------------------------


def config_error(settings: SecuritySettings) -> str:
    with pytest.raises(TLSConfigError) as caught:
        server_context(settings)
    message = str(caught.value)
    assert "\n" not in message and "/" not in message.replace("security.", ""), message  # no host path
    return message


def test_missing_files_name_the_setting_not_the_path(pki: PKI):
    assert config_error(pki.settings(tls_cert=str(pki.folder / "gone.pem"))).startswith(
        "security.tls_cert: the file cannot be read (No such file or directory)"
    )
    assert config_error(pki.settings(tls_key=str(pki.folder / "gone.key"))).startswith("security.tls_key: ")
    assert config_error(pki.settings(tls_client_ca=str(pki.folder / "gone.pem"))).startswith("security.tls_client_ca: ")


def test_a_key_of_another_certificate_is_refused(pki: PKI):
    _, other_key, _ = pki.client("monitor-7")
    assert config_error(pki.settings(tls_key=str(other_key))) == (
        "security.tls_key does not match security.tls_cert (a different key pair)"
    )


def test_half_given_and_wrong_files_are_refused(pki: PKI):
    assert "security.tls_key is set without security.tls_cert" in config_error(pki.settings(tls_cert=""))
    assert "security.tls_cert is set without security.tls_key" in config_error(pki.settings(tls_key=""))
    lone_ca = SecuritySettings(tls_client_ca=str(pki.folder / "ca.pem"))
    assert "security.tls_client_ca needs security.tls_cert" in config_error(lone_ca)
    assert "security.tls_cert is not a PEM certificate" in config_error(
        pki.settings(tls_cert=str(pki.folder / "server.key"))
    )
    assert "security.tls_key is not a PEM private key" in config_error(
        pki.settings(tls_key=str(pki.folder / "server.pem"))
    )
    assert "security.tls_client_ca holds no CA certificate" in config_error(
        pki.settings(tls_client_ca=str(pki.folder / "server.pem"))
    )


def test_an_expired_server_certificate_is_refused_at_start(pki: PKI):
    old = make_client(pki.ca, "old-server", not_after=NOW - dt.timedelta(days=2))
    cert, key = pki.write("old-server", old)
    assert config_error(pki.settings(tls_cert=str(cert), tls_key=str(key))).startswith("security.tls_cert expired on ")


def test_an_encrypted_key_is_refused_without_a_prompt(pki: PKI):
    key = pki.server.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = pki.folder / "encrypted.key"
    path.write_bytes(key)
    assert "security.tls_key is encrypted" in config_error(pki.settings(tls_key=str(path)))


@pytest.mark.parametrize("name", ["ca", "server", "CA"])
def test_certs_client_refuses_the_names_of_the_ca_and_the_server(tmp_path: Path, monkeypatch, name: str):
    from typer.testing import CliRunner

    from bedside.cli.certs import app

    monkeypatch.setenv("BEDSIDE_STREAMS_STATE_DIR", str(tmp_path / "state"))
    folder = tmp_path / "pki"
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(folder)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["client", str(folder), name, "--tenant", "icu", "--role", "device", "--force"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2 and "cannot be a client's name" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (tmp_path / "state" / "callers.json").exists()
