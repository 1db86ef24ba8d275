"""`bedside audit`: verify, export and show the tamper-evident audit log
(bedside.security.audit). The file is security.audit_file, else STATE_DIR/audit.sqlite, with
BEDSIDE_* variables applied as for `serve`; --file names another."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from bedside.cli.common import console, fail

app = typer.Typer(
    help="Verify, export and show the tamper-evident audit log.",
    no_args_is_help=True,
    add_completion=False,
)

FileOption = Annotated[
    Path | None,
    typer.Option("--file", help="Audit log file. Default: security.audit_file, else STATE_DIR/audit.sqlite."),
]


def _path(file: Path | None) -> Path:
    """--file, else the file the settings (with BEDSIDE_* variables) name; a missing one: exit 2."""
    if file is None:
        from bedside.cli.serving import _settings_or_exit
        from bedside.settings import audit_path

        settings, _ = _settings_or_exit(os.environ)
        file = audit_path(settings, os.environ)
    if not file.is_file():
        fail(f"no audit log at {file} (security.audit_file; see --file)", 2)
    return file


def _time_ns(text: str | None, option: str) -> int | None:
    """An ISO 8601 time (without a zone: local time) in ns since the epoch; a bad one: exit 2."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option} wants an ISO 8601 time such as 2026-05-01T08:00, got {text!r}", 2)
    return int(moment.astimezone().timestamp() * 1e9) if moment.tzinfo is None else int(moment.timestamp() * 1e9)


def _shown_time(ns: object) -> str:
    if not isinstance(ns, int):
        return repr(ns)
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]  # local time, as --since takes


@app.command()
def verify(file: FileOption = None) -> None:
    """Check the hash chain: exit 0 when intact, 1 naming the first bad entry."""
    from bedside.security.auditcheck import AuditFileError
    from bedside.security.auditcheck import verify as check

    path = _path(file)
    try:
        result = check(path)
    except AuditFileError as exc:
        fail(str(exc), 2)
    for warning in result.warnings:
        console.print(f"[yellow]warning: {escape(warning)}[/yellow]", soft_wrap=True)
    head = f"entry {result.head_seq} {result.head_hash}" if result.head_seq else "none (no entries)"
    console.print(f"{result.checked} entries checked; chain head: {head}", soft_wrap=True)
    if not result.intact:
        fail(f"NOT intact: {result.reason}", 1)
    console.print("[green]intact[/green]")


@app.command()
def export(
    out: Annotated[str, typer.Option("--out", help="File to write the JSON lines to; '-': standard output.")],
    file: FileOption = None,
    since: Annotated[
        str | None, typer.Option(help="First entry at or after this ISO 8601 time (no zone: local time).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Last entry before this ISO 8601 time.")] = None,
) -> None:
    """Write entries as JSON lines, one object per entry with its hashes (verifiable elsewhere)."""
    from bedside.security.auditcheck import AuditFileError
    from bedside.security.auditcheck import export as write

    path = _path(file)
    since_ns, until_ns = _time_ns(since, "--since"), _time_ns(until, "--until")
    try:
        if out == "-":
            count = write(path, sys.stdout.buffer, since_ns, until_ns)
            sys.stdout.flush()
        else:
            # owner-only: the entries name callers, tenants and models
            # (the mode of os.open only applies to a new file: an existing one is narrowed too)
            with os.fdopen(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as target:
                os.fchmod(target.fileno(), 0o600)
                count = write(path, target, since_ns, until_ns)
    except AuditFileError as exc:
        fail(str(exc), 2)
    # the count goes to stderr, so `--out -` stays pure JSON lines
    Console(stderr=True).print(f"exported {count} entries", soft_wrap=True)


@app.command()
def show(
    last: Annotated[int, typer.Option("--last", "-n", help="How many of the latest entries to show.", min=1)] = 20,
    file: FileOption = None,
) -> None:
    """Show the latest entries as a table."""
    from bedside.security.auditcheck import AuditFileError, last_entries

    path = _path(file)
    try:
        entries = last_entries(path, last)
    except AuditFileError as exc:
        fail(str(exc), 2)
    # kind/transport, caller/tenant and model:version share columns so a row fits 80 columns;
    # audit data is folded, never cut short with an ellipsis
    columns = ("seq", "time", "kind", "caller", "model", "request", "outcome", "µs", "detail")
    table = Table(
        *(Column(name, no_wrap=name in ("seq", "time"), overflow="fold") for name in columns),
        title=f"audit log: the last {len(entries)} entries",
    )
    for entry in entries:
        model = f"{entry['model']}:{entry['version']}" if entry["version"] else entry["model"]
        cells = (
            entry["seq"],
            _shown_time(entry["time_ns"]),
            f"{entry['kind']}/{entry['transport']}" if entry["transport"] else entry["kind"],
            f"{entry['caller']}/{entry['tenant']}" if entry["tenant"] else entry["caller"],
            model,
            entry["request_id"],
            entry["outcome"],
            entry["latency_us"],
            entry["detail"],
        )
        table.add_row(*(escape(str(cell)) for cell in cells))
    console.print(table)
