"""The key provider: the 32-byte keys that encrypt files at rest (models, the observation journal).

`security.key` names where they come from: `file:PATH` (owner-only), `env:VARIABLE`, or
`command:COMMAND` (run without a shell, so a TPM or HSM tool can hand the key over without it ever
being written to disk). Each gives the same text: one key a line (or whitespace separated), base64
(standard or urlsafe) or 64 hex characters, `#` comments ignored. The first key is the current one,
which new files are sealed with; the others are older keys still accepted for opening, so a key can
be rotated while the server runs.

A key is named by its key id, the first 16 hex characters of its SHA-256: messages, logs and the
command line show ids, never keys, and no error carries key material or the host path of the file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import secrets
import shlex
import string
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
KEY_ID_BYTES = 8  # 16 hex characters: enough to tell keys apart, far too few to learn anything of one
COMMAND_TIMEOUT_S = 10.0
MAX_KEYS = 64
MAX_TEXT = 64 << 10  # a key text is a few lines; anything bigger is not one
SETTING = "security.key"
log = logging.getLogger("bedside.security")


class KeyProviderError(ValueError):
    """The key provider gave no usable key; the message is one line, without key material or paths."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[: 2 * KEY_ID_BYTES]


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


class KeyRing:
    """The current key and the older ones still accepted for decryption. `refresh()` re-reads a key
    file that changed (rotation writes it twice), so a running server follows a rotation."""

    def __init__(self, keys: Sequence[bytes], spec: str = "") -> None:
        if not keys:
            raise KeyProviderError("a key ring needs at least one key")
        if any(len(k) != KEY_BYTES for k in keys):
            raise KeyProviderError(f"every key must be {KEY_BYTES} bytes")
        self._spec = spec  # only a file: spec is re-read; env and command keys last as long as the process
        self._stamp = _file_stamp(spec)
        self._set(keys)

    def _set(self, keys: Sequence[bytes]) -> None:
        unique = tuple(dict.fromkeys(keys))
        # built whole and swapped in one assignment each: readers on other threads see the old ring
        # or the new one, never half of each
        self._by_id: dict[bytes, bytes] = {bytes.fromhex(key_id(k)): k for k in reversed(unique)}
        self._ciphers: dict[bytes, AESGCM] = {}
        self._keys = unique

    @property
    def current(self) -> bytes:
        return self._keys[0]

    @property
    def current_id(self) -> str:
        return key_id(self._keys[0])

    @property
    def ids(self) -> list[str]:
        return [key_id(k) for k in self._keys]

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # never the keys themselves, in a log or a traceback
        return f"KeyRing(ids={self.ids})"

    def find(self, raw_id: bytes) -> bytes | None:
        return self._by_id.get(raw_id)

    def cipher(self, raw_id: bytes) -> AESGCM | None:
        """The AES-GCM context for a key id (built once: key setup costs more than sealing a row)."""
        ciphers = self._ciphers
        found = ciphers.get(raw_id)
        if found is None:
            key = self._by_id.get(raw_id)
            if key is None:
                return None
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError:  # imported here so that a box without encryption does not need it
                raise KeyProviderError(
                    f"{SETTING} is set but the 'cryptography' package is not installed (pip install cryptography)"
                ) from None
            found = ciphers[raw_id] = AESGCM(key)
        return found

    def refresh(self) -> bool:
        """Re-read a `file:` key file that changed since it was read; True when the keys changed. A
        file that cannot be used now (half-edited, wrong rights) leaves the keys as they were."""
        stamp = _file_stamp(self._spec)
        if stamp is None or stamp == self._stamp:
            return False
        # remembered before the read: a file that cannot be used is told once per change of the
        # file, not on every journal commit that calls refresh()
        self._stamp = stamp
        try:
            keys = read_keys(self._spec, {})
        except KeyProviderError as exc:
            log.warning("%s: keeping the keys read before: %s", SETTING, exc)
            return False
        if keys == list(self._keys):
            return False
        self._set(keys)
        log.info("%s changed: current key %s, %d older", SETTING, self.current_id, len(self._keys) - 1)
        return True


def load_keyring(spec: str, environ: Mapping[str, str]) -> KeyRing | None:
    """The key ring that `security.key` names, None when it is empty. KeyProviderError when the
    provider gives no usable key."""
    if not spec.strip():
        return None
    return KeyRing(read_keys(spec, environ), spec)


def read_keys(spec: str, environ: Mapping[str, str]) -> list[bytes]:
    kind, _, rest = spec.partition(":")
    rest = rest.strip()
    if kind == "file" and rest:
        return parse_keys(_read_key_file(Path(rest).expanduser()), f"the key file named in {SETTING}")
    if kind == "env" and rest:
        if rest not in environ:
            raise KeyProviderError(f"the variable named in {SETTING} ({rest[:64]}) is not set")
        return parse_keys(environ[rest], f"the variable named in {SETTING} ({rest[:64]})")
    if kind == "command" and rest:
        return parse_keys(_run_key_command(rest), f"the output of the key command in {SETTING}")
    raise KeyProviderError(f"{SETTING} must be file:PATH, env:VARIABLE or command:COMMAND, or empty")


def parse_keys(text: str, where: str) -> list[bytes]:
    """The keys in a key text, current first. Never quotes the text: it is key material."""
    keys: list[bytes] = []
    for line in text.splitlines():
        for token in line.split("#", 1)[0].split():
            key = _decode(token)
            if key is None:
                raise KeyProviderError(
                    f"key {len(keys) + 1} in {where} is not a {KEY_BYTES}-byte key (base64, or 64 hex characters)"
                )
            keys.append(key)
    if not keys:
        raise KeyProviderError(f"{where} holds no key")
    if len(keys) > MAX_KEYS:
        raise KeyProviderError(f"{where} holds {len(keys)} keys; at most {MAX_KEYS}")
    return keys


def _decode(token: str) -> bytes | None:
    if len(token) == 2 * KEY_BYTES and all(c in string.hexdigits for c in token):
        return bytes.fromhex(token)
    standard = token.replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == KEY_BYTES else None


def _file_stamp(spec: str) -> tuple[int, int, int, int] | None:
    kind, _, rest = spec.partition(":")
    if kind != "file" or not rest.strip():
        return None
    try:
        st = os.stat(Path(rest.strip()).expanduser())
    except OSError:
        return None
    # ino and ctime too: an atomic replace within one mtime tick still shows
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_key_file(path: Path) -> str:
    where = f"the key file named in {SETTING}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyProviderError(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(file.fileno())  # the rights of the file read, not of a name swapped in between
        if st.st_uid != os.geteuid():
            raise KeyProviderError(f"{where} is not owned by the user bedside runs as; refusing it")
        if st.st_mode & 0o077:
            raise KeyProviderError(
                f"{where} can be read or written by group or others (mode {st.st_mode & 0o777:o}); "
                "make it owner-only (chmod 600)"
            )
        data = file.read(MAX_TEXT + 1)
    if len(data) > MAX_TEXT:
        raise KeyProviderError(f"{where} is larger than a key file can be")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyProviderError(f"{where} is not text (base64 or hex keys)") from None


def _run_key_command(command: str) -> str:
    where = f"the key command in {SETTING}"
    try:
        argv = shlex.split(command)
    except ValueError:
        raise KeyProviderError(f"{where} cannot be split into words (unbalanced quotes?)") from None
    if not argv:
        raise KeyProviderError(f"{where} is empty")
    try:
        # no shell, no stdin; its stderr is not kept: a tool may print anything there
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise KeyProviderError(f"{where} did not answer within {COMMAND_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise KeyProviderError(f"{where} cannot be run: {exc.strerror or type(exc).__name__}") from None
    if done.returncode != 0:
        raise KeyProviderError(f"{where} failed (exit code {done.returncode})")
    if len(done.stdout) > MAX_TEXT:
        raise KeyProviderError(f"{where} printed more than a key text can be")
    try:
        return done.stdout.decode("ascii")
    except UnicodeDecodeError:
        raise KeyProviderError(f"{where} printed something that is not text (base64 or hex keys)") from None


def format_keys(keys: Sequence[bytes]) -> str:
    lines = [
        "# bedside keys for files at rest (AES-256-GCM), base64, one a line.",
        "# The first is the current key; the others are older keys still accepted for decryption.",
    ]
    lines += [f"{base64.b64encode(k).decode()}  # {key_id(k)}" for k in keys]
    return "\n".join(lines) + "\n"


def write_key_file(path: Path, keys: Sequence[bytes], replace: bool = True) -> None:
    """Write the keys owner-only (0600), atomically: a reader sees the old file or the new one. With
    replace=False an existing file is never touched (FileExistsError)."""
    if not keys or any(len(k) != KEY_BYTES for k in keys):
        raise KeyProviderError(f"every key must be {KEY_BYTES} bytes")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            os.fchmod(out.fileno(), 0o600)  # whatever the umask
            out.write(format_keys(keys))
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails when the name exists, with no window in which it is overwritten
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power loss."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
