"""This box's secret key, kept in its state folder, for names that must not reveal what they came
from (a bed named after a patient identifier). Created once, owner-only, never logged or sent."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "box.key"
KEY_BYTES = 32


def box_key(folder: Path) -> bytes:
    """The key in `folder`, created on first use. OSError when the folder cannot hold it."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        _create(path)
        key = path.read_bytes()  # ours, or the one another process made first
    if len(key) != KEY_BYTES:
        raise OSError(f"the box key in the state folder is damaged ({len(key)} bytes, not {KEY_BYTES})")
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # copied in with a careless mode: only this user may read it
    return key


def _create(path: Path) -> None:
    """Write a new key beside `path`, then link it into place: the key appears whole or not at all,
    so a process starting at the same moment never reads a half-written one (and the first wins)."""
    key = secrets.token_bytes(KEY_BYTES)
    spare = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        _write(spare, key)
        try:
            os.link(spare, path)
        except FileExistsError:
            return
        except OSError:  # a file system without hard links: create it in place, exclusively
            try:
                _write(path, key)
            except FileExistsError:
                return
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        spare.unlink(missing_ok=True)


def _write(path: Path, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())


def pseudonym(key: bytes, identifier: str, length: int = 16) -> str:
    """A keyed digest of `identifier`: stable on this box, not reversible without the key."""
    if not key:
        raise ValueError("a pseudonym needs this box's key: without one it is an unsalted hash anyone can reverse")
    return hmac.new(key, identifier.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:length]
