"""The sealed-file format: AES-256-GCM with the key provider's keys, for models and journal rows.

    magic b"BEDSIDE-SEALED1\\n" | key id (8 bytes) | nonce (12 random bytes) | ciphertext + 16-byte tag

The associated data is magic + key id + purpose (b"model", b"journal"): the header cannot be
altered without failing the tag, and a blob sealed for one purpose does not open as another (a
journal row cannot be put in place of a model). The key id says which key sealed a blob, so a wrong
key is told apart from damage, and rotation knows what still needs re-sealing. A random 96-bit
nonce per seal: far below the 2^32 seals per key at which GCM's nonce collisions start to matter for
a box that seals a journal row per vital sign (rotate the key yearly).

Decryption is into memory only: nothing here writes a decrypted byte to disk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from bedside.security.keys import KEY_ID_BYTES, KeyRing, sync_folder

MAGIC = b"BEDSIDE-SEALED1\n"
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES
MAX_PLAIN = (1 << 31) - 1 - TAG_BYTES  # what one AES-GCM call of the cryptography package takes
SUFFIX = ".enc"
MODEL = b"model"
JOURNAL = b"journal"


class SealedError(ValueError):
    """A sealed blob that does not open; the message completes "<what> ..." and names no key material."""


def is_sealed(blob: bytes) -> bool:
    return blob[: len(MAGIC)] == MAGIC


def sealed_key_id(blob: bytes) -> str:
    """The id of the key that sealed `blob` (SealedError when it is no sealed blob)."""
    _check_header(blob)
    return blob[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex()


def seal(data: bytes, ring: KeyRing, purpose: bytes) -> bytes:
    if len(data) > MAX_PLAIN:
        raise SealedError(f"is {len(data)} bytes; at most {MAX_PLAIN} can be sealed")
    raw_id = bytes.fromhex(ring.current_id)
    cipher = ring.cipher(raw_id)
    assert cipher is not None  # the current key is always in the ring
    nonce = secrets.token_bytes(NONCE_BYTES)
    head = MAGIC + raw_id
    return head + nonce + cipher.encrypt(nonce, data, head + purpose)


def open_sealed(blob: bytes, ring: KeyRing, purpose: bytes) -> bytes:
    """The plaintext of a sealed blob; SealedError saying why it does not open."""
    _check_header(blob)
    head = blob[: len(MAGIC) + KEY_ID_BYTES]
    raw_id = head[len(MAGIC) :]
    cipher = ring.cipher(raw_id)
    if cipher is None and ring.refresh():  # the key file may have changed since it was read (rotation)
        cipher = ring.cipher(raw_id)
    if cipher is None:
        raise SealedError(
            f"is encrypted with key {raw_id.hex()}, which the key provider does not have (wrong key?); "
            f"it has {', '.join(ring.ids)}"
        )
    from cryptography.exceptions import InvalidTag  # here: the package is there once a cipher is

    nonce = blob[len(head) : HEADER_BYTES]
    try:
        return cipher.decrypt(nonce, blob[HEADER_BYTES:], head + purpose)
    except InvalidTag:
        raise SealedError("fails its integrity check (altered or damaged)") from None


def _check_header(blob: bytes) -> None:
    if not blob or blob[: len(MAGIC)] != MAGIC[: len(blob)]:
        raise SealedError("is not a bedside encrypted file")
    if len(blob) < OVERHEAD:
        raise SealedError(f"is truncated ({len(blob)} bytes; a sealed file has at least {OVERHEAD})")


def reseal(blob: bytes, ring: KeyRing, purpose: bytes) -> bytes:
    """`blob` opened with whichever ring key sealed it and sealed again with the current key; as it
    is when the current key sealed it already (so a rotation that stopped half-way can run again)."""
    if sealed_key_id(blob) == ring.current_id:
        open_sealed(blob, ring, purpose)  # still checked: a rotation must not carry damage forward
        return blob
    return seal(open_sealed(blob, ring, purpose), ring, purpose)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `path` (owner-only unless `mode` says otherwise, e.g. files a web server publishes) so
    that a reader sees the old file or the new one, never half; synced, with its folder, before it
    returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    sync_folder(path.parent)


def seal_file(path: Path, ring: KeyRing, purpose: bytes = MODEL) -> Path:
    """Write `path` + ".enc", sealed with the current key; `path` itself is left as it is."""
    path = Path(path)
    target = path.with_name(path.name + SUFFIX)
    write_atomic(target, seal(path.read_bytes(), ring, purpose))
    return target
