"""`bedside certs`: certificates for a deployment without a hospital PKI (a local CA, the server's
certificate, one client certificate per device or service), and registering a certificate
issued by the hospital's own PKI. Every client certificate issued or registered is entered in
the callers file with its tenant, roles and beds: a certificate alone identifies no one.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from bedside.cli.common import console, fail
from bedside.cli.tokens import BedOption, CallersOption, RoleOption, TenantOption, describe, open_registry, save, upsert

if TYPE_CHECKING:
    from cryptography import x509

    from bedside.security.certs import Issued

app = typer.Typer(
    help="TLS certificates: a local CA, the server's, and the clients' (mutual TLS).", no_args_is_help=True
)
CA_FILES = ("ca.pem", "ca.key")
SERVER_FILES = ("server.pem", "server.key")
ForceOption = Annotated[bool, typer.Option("--force", help="Replace files that exist.")]


def _refuse_existing(folder: Path, names: tuple[str, ...], force: bool) -> None:
    existing = [n for n in names if (folder / n).exists()]
    if existing and not force:
        fail(f"{', '.join(existing)} already in {folder}: --force replaces them", 2)


def _folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # it holds the CA's key
    except OSError as exc:
        fail(f"cannot make the folder {folder}: {exc.strerror or type(exc).__name__}", 2)


def _write(issued: Issued, cert: Path, key: Path) -> None:
    try:
        issued.write(cert, key)
    except OSError as exc:
        fail(f"cannot write {cert.name} and {key.name}: {exc.strerror or type(exc).__name__}", 2)


def _until(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%d")


@app.command("init")
def init(
    folder: Annotated[Path, typer.Argument(help="Folder for ca.pem, ca.key, server.pem and server.key.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A name or IP address clients use for this box; repeatable (localhost is in)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the server certificate, days.", min=1, max=825)] = 825,
    force: ForceOption = False,
) -> None:
    """Make a local CA and a server certificate signed by it; print the serve options that use them."""
    from bedside.security.certs import ALWAYS_HOSTS, make_ca, make_server

    _refuse_existing(folder, (*CA_FILES, *SERVER_FILES), force)
    ca = make_ca()
    try:
        server = make_server(ca, host or [], days)
    except ValueError as exc:  # a name that cannot be a DNS name (e.g. not ASCII: give its xn-- form)
        fail(f"--host: {exc}", 2)
    _folder(folder)
    _write(ca, folder / "ca.pem", folder / "ca.key")
    _write(server, folder / "server.pem", folder / "server.key")
    names = ", ".join(dict.fromkeys([*ALWAYS_HOSTS, *(host or [])]))
    where = folder.resolve()
    console.print(
        f"wrote ca.pem, ca.key (owner-only), server.pem, server.key (owner-only) in {escape(str(folder))}\n"
        f"server certificate for {escape(names)}, valid until {_until(server.cert)}\n"
        "serve with TLS, asking clients for certificates signed by this CA:\n"
        f"  bedside serve --set security.tls_cert={escape(str(where / 'server.pem'))} "
        f"--set security.tls_key={escape(str(where / 'server.key'))} "
        f"--set security.tls_client_ca={escape(str(where / 'ca.pem'))}\n"
        "clients trust ca.pem; give each its own certificate: "
        f"bedside certs client {escape(str(folder))} NAME --tenant T --role R",
        soft_wrap=True,
    )


@app.command("client")
def client(
    folder: Annotated[Path, typer.Argument(help="The folder `bedside certs init` made (ca.pem, ca.key).")],
    name: Annotated[str, typer.Argument(help="The caller's name: the certificate's common name.")],
    tenant: TenantOption = None,
    role: RoleOption = None,
    bed: BedOption = None,
    days: Annotated[int, typer.Option(help="Validity, days.", min=1, max=3650)] = 365,
    callers: CallersOption = None,
    force: ForceOption = False,
) -> None:
    """Issue NAME.pem and NAME.key signed by the folder's CA and register NAME in the callers file."""
    from bedside.security.certs import fingerprint, load_issued, make_client

    if name.casefold() in ("ca", "server"):  # NAME.pem and NAME.key would be the CA's or the server's
        fail(f"{name!r} cannot be a client's name: the CA and the server certificate use it; choose another", 2)
    registry = open_registry(callers)
    upsert(registry, name, tenant, role, bed)  # checks the name, tenant, roles and beds before anything is written
    try:
        ca = load_issued((folder / "ca.pem").read_bytes(), (folder / "ca.key").read_bytes())
    except OSError as exc:
        fail(f"no CA in {folder} ({exc.strerror or type(exc).__name__}): run `bedside certs init` first", 2)
    except ValueError as exc:
        fail(f"the CA in {folder} cannot be used: {exc}", 2)
    _refuse_existing(folder, (f"{name}.pem", f"{name}.key"), force)
    issued = make_client(ca, name, days)
    _write(issued, folder / f"{name}.pem", folder / f"{name}.key")
    registry.add_certificate(name, fingerprint(issued.cert), issued.not_after)
    save(registry)
    console.print(
        f"wrote {escape(name)}.pem and {escape(name)}.key (owner-only), valid until {_until(issued.cert)}, "
        f"SHA-256 {fingerprint(issued.cert)}\nregistered caller {escape(describe(registry.records[name]))}",
        soft_wrap=True,
    )


@app.command("register")
def register(
    name: Annotated[str, typer.Argument(help="The caller's name: the certificate's common name.")],
    cert: Annotated[Path, typer.Option("--cert", help="The client's certificate (PEM), from the hospital's PKI.")],
    tenant: TenantOption = None,
    role: RoleOption = None,
    bed: BedOption = None,
    callers: CallersOption = None,
) -> None:
    """Register a client certificate from the hospital's own PKI for caller NAME.

    The server's security.tls_client_ca must hold the CA that signed it."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from bedside.security.certs import common_name, fingerprint

    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        fail(f"cannot read --cert: {exc.strerror or type(exc).__name__}", 2)
    except ValueError:
        fail("--cert is not a PEM certificate (-----BEGIN CERTIFICATE-----)", 2)
    cn = common_name(parsed)
    if cn != name:
        # the server matches a certificate by its common name and fingerprint together
        fail(f"the certificate's common name is {cn[:64]!r}, not {name[:64]!r}", 2)
    if parsed.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        fail(f"the certificate expired on {_until(parsed)}", 2)
    try:
        usages = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        fail("the certificate is not for TLS clients (no clientAuth extended key usage): TLS would refuse it", 2)
    registry = open_registry(callers)
    upsert(registry, name, tenant, role, bed)
    registry.add_certificate(name, fingerprint(parsed), parsed.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))
    save(registry)
    console.print(
        f"registered the certificate SHA-256 {fingerprint(parsed)} (valid until {_until(parsed)}) "
        f"for caller {escape(describe(registry.records[name]))}",
        soft_wrap=True,
    )
