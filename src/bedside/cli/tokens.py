"""`bedside tokens`: the callers file from the command line: add a caller and issue its bearer
token (shown once), list callers, revoke a caller, a token or a certificate.

The file is the one the server reads (security.callers_file, else STATE_DIR/callers.json, with
BEDSIDE_* variables applied as `bedside serve` applies them); the server re-reads it within a
second of a change, so a revocation needs no restart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bedside.cli.common import console, fail

if TYPE_CHECKING:
    from bedside.security.callers import CallerRecord, CallerRegistry
    from bedside.settings import Settings

app = typer.Typer(help="Callers and their bearer tokens (the callers file).", no_args_is_help=True)
notes = Console(stderr=True)  # the token alone on stdout, so `TOKEN=$(bedside tokens add ...)` captures just it
FINGERPRINT = re.compile(r"[0-9a-f]{64}")

CallersOption = Annotated[
    Path | None,
    typer.Option(
        "--callers", help="Callers file. Default: security.callers_file, else STATE_DIR/callers.json (as serve)."
    ),
]
TenantOption = Annotated[str | None, typer.Option("--tenant", help="The caller's tenant (new callers: required).")]
RoleOption = Annotated[
    list[str] | None,
    typer.Option("--role", help="infer, monitor, admin or device; repeat for several (new callers: required)."),
]
BedOption = Annotated[
    list[str] | None,
    typer.Option("--bed", help='Beds a device may feed, shell patterns such as "ICU-*"; repeatable.'),
]


def _settings() -> Settings:
    """The settings the server would run with in this environment (a bad variable: exit 2)."""
    from bedside.settings import SettingsError, from_environment

    try:
        return from_environment(os.environ)[0]
    except SettingsError as exc:
        fail(str(exc), 2)


def callers_file(given: Path | None) -> Path:
    """--callers, else the file the server would read with this environment's settings."""
    from bedside.settings import callers_path

    return given if given is not None else callers_path(_settings(), os.environ)


def open_registry(given: Path | None) -> CallerRegistry:
    from bedside.security.callers import CallerRegistry, CallersError

    try:
        return CallerRegistry(callers_file(given), _settings().security.max_callers, edit=True)
    except CallersError as exc:
        fail(str(exc), 2)


def upsert(
    registry: CallerRegistry, name: str, tenant: str | None, roles: list[str] | None, beds: list[str] | None
) -> CallerRecord:
    """Create the caller (tenant and roles required) or update what is given of an existing one."""
    from bedside.security.callers import CallersError

    record = registry.records.get(name)
    if record is None and (tenant is None or not roles):
        fail(f"caller {name!r} is new: give its --tenant and at least one --role", 2)
    try:
        return registry.upsert(
            name,
            tenant if tenant is not None else record.tenant if record is not None else "",
            roles or (record.roles if record is not None else []),
            beds if beds is not None else (record.beds if record is not None else []),
        )
    except CallersError as exc:
        fail(str(exc), 2)


def save(registry: CallerRegistry) -> None:
    try:
        registry.save()
    except OSError as exc:
        fail(f"cannot write the callers file: {exc.strerror or type(exc).__name__}", 2)


def describe(record: CallerRecord) -> str:
    beds = f", beds {' '.join(record.beds)}" if record.beds else ""
    return f"{record.name} (tenant {record.tenant}, roles {' '.join(record.roles)}{beds})"


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The caller's name (a client certificate's common name too).")],
    tenant: TenantOption = None,
    role: RoleOption = None,
    bed: BedOption = None,
    callers: CallersOption = None,
) -> None:
    """Add a caller (or update one) and issue it a new bearer token, printed once."""
    registry = open_registry(callers)
    record = upsert(registry, name, tenant, role, bed)
    token_id, token = registry.issue_token(name)
    save(registry)
    notes.print(f"caller {escape(describe(record))}: token {token_id} issued", soft_wrap=True)
    typer.echo(token)
    notes.print(
        "this token is shown once and cannot be shown again (only its hash is kept); "
        f"send it as 'Authorization: Bearer ...'. Revoke it with: bedside tokens revoke {token_id}",
        soft_wrap=True,
        markup=False,
    )


@app.command("list")
def list_callers(
    callers: CallersOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON, for scripts.")] = False,
) -> None:
    """List the callers: tenant, roles, beds, token ids with their dates, certificate count. Never a hash."""
    registry = open_registry(callers)
    records = [r for _, r in sorted(registry.records.items())]
    if as_json:
        rows = [
            {
                "caller": r.name,
                "tenant": r.tenant,
                "roles": r.roles,
                "beds": r.beds,
                "tokens": [{"id": t["id"], "created": t.get("created", "")} for t in r.tokens],
                "certificates": len(r.certificates),
            }
            for r in records
        ]
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if not records:
        console.print("no callers yet; add one with `bedside tokens add NAME --tenant T --role R`")
        return
    table = Table("caller", "tenant", "roles", "beds", "tokens (id created)", "certificates", title="bedside callers")
    for r in records:
        table.add_row(
            escape(r.name),
            escape(r.tenant),
            " ".join(r.roles),
            escape(" ".join(r.beds)) or "-",
            "\n".join(f"{t['id']} {t.get('created', '')[:16].replace('T', ' ')}" for t in r.tokens) or "-",
            str(len(r.certificates)),
        )
    console.print(table)


@app.command("revoke")
def revoke(
    what: Annotated[str, typer.Argument(help="A caller's name, a token id, or a certificate's SHA-256 fingerprint.")],
    callers: CallersOption = None,
) -> None:
    """Revoke a caller (every token and certificate), one token, or one certificate.

    A running server stops accepting it within a second."""
    from bedside.security.callers import CallersError

    registry = open_registry(callers)
    fingerprint = what.lower().replace(":", "")
    removed = None
    if FINGERPRINT.fullmatch(fingerprint) and what not in registry.records:
        for record in registry.records.values():
            kept = [c for c in record.certificates if c["sha256"] != fingerprint]
            if len(kept) != len(record.certificates):
                record.certificates = kept
                removed = f"certificate {fingerprint[:16]}... of caller {record.name}"
    if removed is None:
        try:
            removed = registry.revoke(what)
        except CallersError as exc:
            fail(str(exc), 2)
    save(registry)
    console.print(f"revoked {escape(removed)}; a running server stops accepting it within a second", soft_wrap=True)
