"""Encryption at rest from the command line: `encrypt` seals a repository's models, `keys new`
writes a key file, `keys rotate` moves the models and the observation journal to a new key while a
server keeps running. Key ids are printed, never keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from bedside.cli.common import console, fail
from bedside.security.keys import (
    KeyProviderError,
    KeyRing,
    key_id,
    load_keyring,
    new_key,
    read_keys,
    sync_folder,
    write_key_file,
)
from bedside.security.sealed import MODEL, SUFFIX, SealedError, open_sealed, reseal, seal, sealed_key_id, write_atomic

ROTATE_JOURNAL_PASSES = 5  # a running ingest writer may commit one batch with the old key per pass

KeyOption = Annotated[
    str,
    typer.Option(
        "--key",
        envvar="BEDSIDE_SECURITY_KEY",
        show_envvar=False,
        help="Where the key comes from, as security.key: file:PATH, env:VARIABLE or command:COMMAND "
        "(default: $BEDSIDE_SECURITY_KEY).",
    ),
]

keys_app = typer.Typer(help="Keys for files at rest: make one, rotate to a new one.", no_args_is_help=True)


def _ring(spec: str) -> KeyRing:
    if not spec.strip():
        fail("no key given: use --key file:PATH (or env:VARIABLE, command:COMMAND) or set BEDSIDE_SECURITY_KEY", 2)
    try:
        ring = load_keyring(spec, os.environ)
    except KeyProviderError as exc:
        fail(f"--key: {exc}", 2)
    assert ring is not None
    return ring


def _folder(repository: Path) -> Path:
    if not repository.is_dir():
        fail(f"repository {repository} is not a folder", 2)
    return repository


def encrypt(
    repository: Annotated[Path, typer.Argument(help="Model repository folder.")],
    key: KeyOption = "",
    model: Annotated[str | None, typer.Option("--model", help="Only this model (default: every model).")] = None,
    remove_plain: Annotated[
        bool,
        typer.Option(
            "--remove-plain",
            help="Delete each model.onnx once its model.onnx.enc is written, synced and decrypts back to the same "
            "bytes (a version with both is refused by the server as ambiguous).",
        ),
    ] = False,
) -> None:
    """Encrypt every model.onnx in REPOSITORY (AES-256-GCM) into model.onnx.enc beside it."""
    ring = _ring(key)
    root = _folder(repository)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if model is not None:
        if model not in names:
            fail(f"--model: no model {model!r} in {repository}", 2)
        names = [model]
    sealed = kept = 0
    for name in names:
        for plain in sorted((root / name).glob("*/model.onnx")):
            where = f"{name}/{plain.parent.name}"
            try:
                data = plain.read_bytes()
                target = plain.with_name(plain.name + SUFFIX)
                write_atomic(target, seal(data, ring, MODEL))
                # read back from disk, not from memory: the plain file goes only once the sealed one opens
                if open_sealed(target.read_bytes(), ring, MODEL) != data:
                    fail(f"{where}: model.onnx.enc does not decrypt to model.onnx; both kept", 1)
                if remove_plain:
                    plain.unlink()
                    sync_folder(plain.parent)
            except (OSError, SealedError, KeyProviderError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                fail(f"{where}: cannot encrypt: {reason}", 1)
            sealed += 1
            kept += not remove_plain
            note = ", model.onnx removed" if remove_plain else ""
            console.print(f"  {escape(where)}: model.onnx.enc written (key {ring.current_id}){note}", soft_wrap=True)
    if not sealed:
        console.print("no model.onnx to encrypt")
        return
    console.print(f"{sealed} model file(s) encrypted with key {ring.current_id}")
    if kept:
        console.print(
            "[yellow]model.onnx kept beside each model.onnx.enc: the server refuses a version with both; "
            "remove them (or run again with --remove-plain) before serving[/yellow]",
            soft_wrap=True,
        )


@keys_app.command("new")
def keys_new(
    file: Annotated[Path, typer.Argument(help="Key file to create (owner-only); an existing file is never replaced.")],
) -> None:
    """Write a new key file with one random 256-bit key; use it as --key file:FILE (security.key)."""
    key = new_key()
    try:
        write_key_file(file, [key], replace=False)
    except FileExistsError:
        fail(f"{file} exists; a key file is never overwritten (rotate with `bedside keys rotate`)", 2)
    except OSError as exc:
        fail(f"cannot write {file}: {exc.strerror or type(exc).__name__}", 2)
    console.print(f"wrote {escape(str(file))}: key {key_id(key)} (owner-only)", soft_wrap=True)


@keys_app.command("rotate")
def keys_rotate(
    repository: Annotated[Path, typer.Argument(help="Model repository folder whose .enc files are re-encrypted.")],
    key: KeyOption = "",
    journal: Annotated[
        Path | None,
        typer.Option("--journal", help="State folder (streams.state_dir) whose observation journal is re-encrypted."),
    ] = None,
) -> None:
    """Move the models (and the observation journal) to a new key, without downtime.

    The key file gets the new key first and the old one after it (a running server opens both),
    every .enc file and journal row is re-encrypted with the new key, then the key file keeps the
    new key only. Interrupted: run it again."""
    from bedside.streams.journal import JOURNAL_FILE, reseal_rows

    kind, _, rest = key.partition(":")
    if kind != "file" or not rest.strip():
        fail(
            "--key must be file:PATH: rotation rewrites the key file (env: and command: keys rotate at their source)", 2
        )
    path = Path(rest.strip()).expanduser()
    root = _folder(repository)
    database = None if journal is None else journal / JOURNAL_FILE
    if database is not None and not database.is_file():
        fail(f"--journal: no observation journal in {journal}", 2)
    try:
        old = read_keys(key, os.environ)
    except KeyProviderError as exc:
        fail(f"--key: {exc}", 2)
    new = new_key()
    ring = KeyRing([new, *old])
    try:
        write_key_file(path, [new, *old])
    except OSError as exc:
        fail(f"cannot write the key file: {exc.strerror or type(exc).__name__}", 1)
    console.print(f"key file: new key {key_id(new)} first, then {', '.join(key_id(k) for k in old)}")
    resealed = failed = 0
    for sealed_path in sorted(p for p in root.rglob("*" + SUFFIX) if p.is_file() and not p.name.startswith(".")):
        where = escape(str(sealed_path.relative_to(root)))
        try:
            blob = sealed_path.read_bytes()
            if sealed_key_id(blob) == ring.current_id:
                continue  # done by an earlier, interrupted rotation
            write_atomic(sealed_path, reseal(blob, ring, MODEL))
        except (OSError, SealedError, KeyProviderError) as exc:
            failed += 1
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            console.print(f"  [red]{where}: {escape(reason)}[/red]", soft_wrap=True)
            continue
        resealed += 1
        console.print(f"  {where}: re-encrypted with key {ring.current_id}", soft_wrap=True)
    if database is not None:
        rows = unreadable = 0
        try:
            for _ in range(ROTATE_JOURNAL_PASSES):  # until a pass finds no row left on an old key
                done, unreadable = reseal_rows(database, ring)
                rows += done
                if not done:
                    break
        except OSError as exc:
            fail(f"{exc}; the key file keeps both keys, run the rotation again", 1)
        console.print(f"  observation journal: {rows} row(s) re-encrypted, {unreadable} that no key opens left as is")
    if failed:
        fail(f"{failed} file(s) could not be re-encrypted; the key file keeps the old key too (see above)", 1)
    try:
        write_key_file(path, [new])
    except OSError as exc:
        fail(f"cannot write the key file: {exc.strerror or type(exc).__name__}; it keeps both keys", 1)
    console.print(f"{resealed} model file(s) re-encrypted; current key {key_id(new)}, old key(s) retired")
