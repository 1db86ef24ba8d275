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
        key = secrets.token_bytes(KEY_BYTES)
        # O_EXCL: two processes starting together agree on one key (the loser reads the winner's)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return box_key(folder)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        return key
    if len(key) != KEY_BYTES:
        raise OSError(f"the box key in the state folder is damaged ({len(key)} bytes, not {KEY_BYTES})")
    return key


def pseudonym(key: bytes, identifier: str, length: int = 16) -> str:
    """A keyed digest of `identifier`: stable on this box, not reversible without the key."""
    return hmac.new(key, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:length]
