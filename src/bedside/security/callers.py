"""Who may call: the callers file, with each caller's tenant, roles, beds, bearer-token hashes
and client-certificate fingerprints.

Tokens are 32 random bytes; only their SHA-256 is stored. A slow password hash (bcrypt, scrypt)
protects guessable secrets; a 256-bit random token cannot be guessed, so one SHA-256 (~0.3 µs) on
each request is as safe and keeps authentication off the latency budget. A client certificate
identifies a caller when its subject common name is the caller's name and its SHA-256 fingerprint
is one the file lists, so removing a fingerprint revokes a certificate without a CRL.

The server re-reads the file when it changes (checked at most once a second), so `bedside tokens
revoke` takes effect within a second, without a restart.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.protocol.types import ROLES, Caller
from bedside.settings import DEFAULTS

TOKEN_PREFIX = "bst_"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
BED_PATTERN = re.compile(r"[A-Za-z0-9._*?\[\]-]{1,64}")
RELOAD_CHECK_S = 1.0
log = logging.getLogger("bedside.security")
_LOCKS: dict[str, int] = {}  # callers file -> the descriptor holding its edit lock in this process
MAX_CALLERS = DEFAULTS.security.max_callers  # the file is read whole: a mistaken script must not fill memory


class CallersError(ValueError):
    """A callers file or an entry that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Peer:
    """A verified client certificate: its subject common name and SHA-256 fingerprint (hex)."""

    common_name: str
    fingerprint: str


@dataclass
class CallerRecord:
    name: str
    tenant: str
    roles: list[str]
    beds: list[str] = field(default_factory=list)
    tokens: list[dict[str, str]] = field(default_factory=list)  # {"id", "sha256", "created"}
    certificates: list[dict[str, str]] = field(default_factory=list)  # {"sha256", "created", "not_after"}

    def caller(self) -> Caller:
        return Caller(self.name, self.tenant, frozenset(self.roles), tuple(self.beds), authenticated=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "roles": self.roles,
            "beds": self.beds,
            "tokens": self.tokens,
            "certificates": self.certificates,
        }


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_record(name: str, tenant: str, roles: list[str], beds: list[str]) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise CallersError(f"caller name {name[:64]!r} must be 1-64 letters, digits, '.', '_', '@' or '-'")
    if not TENANT_PATTERN.fullmatch(tenant):
        raise CallersError(f"tenant {tenant[:64]!r} must be 1-64 letters, digits, '.', '_' or '-'")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise CallersError(f"roles must be some of {', '.join(ROLES)}; got {', '.join(unknown) or 'none'}")
    bad = [b for b in beds if not BED_PATTERN.fullmatch(b)]
    if bad:
        raise CallersError(f"bed pattern {bad[0][:64]!r} must be 1-64 letters, digits, '.', '_', '-', '*', '?'")
    if beds and "device" not in roles:
        raise CallersError("beds are given to callers with the device role only")


class CallerRegistry:
    """The callers file, read into lookup tables. Missing file: no callers (every request is 401)."""

    def __init__(self, path: Path, max_callers: int = MAX_CALLERS, *, edit: bool = False) -> None:
        """`edit`: hold the file's lock (`<file>.lock`) from this read until `save()` (or the end of
        the process), so two commands editing at once cannot write back what the other removed (a
        revoked token)."""
        self.path = path
        self.max_callers = max_callers
        if edit and str(path) not in _LOCKS:  # held already by this process: a command edits once
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _LOCKS[str(path)] = fd
        self.records: dict[str, CallerRecord] = {}
        self._by_token: dict[str, Caller] = {}
        self._by_cert: dict[tuple[str, str], Caller] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.reload()

    # --- lookups: on every request --------------------------------------------------------------

    def by_token(self, token: str) -> Caller | None:
        self._maybe_reload()
        return self._by_token.get(token_hash(token))

    def by_certificate(self, peer: Peer) -> Caller | None:
        self._maybe_reload()
        return self._by_cert.get((peer.common_name, peer.fingerprint))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                try:
                    self.reload()
                except CallersError as exc:  # keep serving with the last good file, and say so once
                    self._stamp = stamp
                    log.error("the callers file was changed but cannot be used (%s); the last good one stays", exc)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self) -> None:
        stamp = self._file_stamp()
        records = _read(self.path, self.max_callers) if stamp is not None else {}
        self.records = records
        self._by_token = {t["sha256"]: r.caller() for r in records.values() for t in r.tokens}
        self._by_cert = {(r.name, c["sha256"]): r.caller() for r in records.values() for c in r.certificates}
        self._stamp = stamp

    # --- editing: the command line ---------------------------------------------------------------

    def upsert(self, name: str, tenant: str, roles: list[str], beds: list[str]) -> CallerRecord:
        """Create the caller, or set the tenant, roles and beds of an existing one."""
        check_record(name, tenant, roles, beds)
        record = self.records.get(name)
        if record is None:
            if len(self.records) >= self.max_callers:
                limit = self.max_callers
                raise CallersError(f"the callers file holds {limit} callers, its limit (security.max_callers)")
            record = self.records[name] = CallerRecord(name, tenant, sorted(set(roles)), sorted(set(beds)))
        else:
            record.tenant, record.roles, record.beds = tenant, sorted(set(roles)), sorted(set(beds))
        return record

    def issue_token(self, name: str) -> tuple[str, str]:
        """A new token for an existing caller: (token id, token). The token is shown once, never stored."""
        record = self.records[name]
        taken = {t["id"] for r in self.records.values() for t in r.tokens} | set(self.records)
        token_id = secrets.token_hex(4)
        while token_id in taken:  # an id names one token, so revoking it revokes that one
            token_id = secrets.token_hex(4)
        token = f"{TOKEN_PREFIX}{token_id}_{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip('=')}"
        record.tokens.append({"id": token_id, "sha256": token_hash(token), "created": _now()})
        return token_id, token

    def add_certificate(self, name: str, fingerprint: str, not_after: str) -> None:
        record = self.records[name]
        if all(c["sha256"] != fingerprint for c in record.certificates):
            record.certificates.append({"sha256": fingerprint, "created": _now(), "not_after": not_after})

    def revoke(self, what: str) -> str:
        """Remove a caller (by name) or one token (by id); returns what was removed."""
        if what in self.records:
            del self.records[what]
            return f"caller {what} (every token and certificate)"
        for record in self.records.values():
            kept = [t for t in record.tokens if t["id"] != what]
            if len(kept) != len(record.tokens):
                record.tokens = kept
                return f"token {what} of caller {record.name}"
        raise CallersError(f"no caller or token id {what[:64]!r}; `bedside tokens list` shows them")

    def save(self) -> None:
        """Write the file atomically, readable by its owner only (it says who may do what)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"callers": [r.to_dict() for _, r in sorted(self.records.items())]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self.reload()
        fd = _LOCKS.pop(str(self.path), -1)
        if fd >= 0:
            os.close(fd)  # closing the descriptor drops its flock: other editors may go on


def _read(path: Path, max_callers: int) -> dict[str, CallerRecord]:
    try:
        st = path.stat()
        if st.st_mode & 0o022 or st.st_uid not in (os.getuid(), 0):
            # who may do what: a file others can write would let them add an admin token
            raise CallersError("the callers file must be owned by this user (or root) and writable by no one else")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CallersError(f"the callers file cannot be read: {type(exc).__name__}") from None
    rows = doc.get("callers") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or len(rows) > max_callers:
        raise CallersError(f"the callers file must hold a list 'callers' of at most {max_callers} entries")
    records: dict[str, CallerRecord] = {}
    for i, row in enumerate(rows):
        try:
            for key in ("roles", "beds", "tokens", "certificates"):
                if not isinstance(row.get(key, []), list):  # a string would be read letter by letter
                    raise CallersError(f"{key} must be a list")
            record = CallerRecord(
                str(row["name"]),
                str(row["tenant"]),
                [str(r) for r in row["roles"]],
                [str(b) for b in row.get("beds", [])],
                [{k: str(v) for k, v in t.items()} for t in row.get("tokens", [])],
                [{k: str(v) for k, v in c.items()} for c in row.get("certificates", [])],
            )
            check_record(record.name, record.tenant, record.roles, record.beds)
            if any("sha256" not in t or "id" not in t for t in record.tokens):
                raise CallersError("a token without id or sha256")
            if any("sha256" not in c for c in record.certificates):
                raise CallersError("a certificate without sha256")
        except (KeyError, TypeError, AttributeError, CallersError) as exc:
            raise CallersError(f"entry {i + 1} of the callers file is not valid: {exc}") from None
        records[record.name] = record
    return records


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
