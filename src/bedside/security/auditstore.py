"""The audit log's storage: the file's schema, the hash chain, a batch's write in one transaction,
the head file, retention, and the framing of messages to the writer process. Used by the writer
process (`auditwriter`) and, before it is started, by `AuditLog` itself; read by `auditcheck`."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

FIELDS = (
    "time_ns",
    "kind",
    "caller",
    "tenant",
    "transport",
    "model",
    "version",
    "request_id",
    "outcome",
    "latency_us",
    "detail",
)
INT_FIELDS = frozenset({"time_ns", "latency_us"})
GENESIS = "0" * 64  # prev_hash of the first entry ever written
REQUEST_ID_MAX = 128
TEXT_MAX = 256
YIELD_EVERY = 128  # entries hashed and inserted between two hand-backs of the GIL
BATCH_MAX = 50_000  # entries written or deleted per transaction: another process never waits long
WAKE_AT = 4096  # entries in memory that wake the writer before flush_ms
RETAIN_EVERY_S = 3600.0
ERROR_LOG_S = 60.0
CHILD_TIMEOUT_S = 120.0  # an answer from the writer process slower than this: it is stuck, restarted
_INT_MAX = 2**62
_COLUMNS = ", ".join(f"{n} {'INTEGER' if n in INT_FIELDS else 'TEXT'} NOT NULL" for n in (*FIELDS, "prev_hash", "hash"))
SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, {_COLUMNS})",
    "CREATE TABLE IF NOT EXISTS anchor (name TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL)",
)
_INSERT = f"INSERT INTO entries (seq, {', '.join(FIELDS)}, prev_hash, hash) VALUES "
_ROW = f"({', '.join('?' * 14)})"
_SET_ANCHOR = "INSERT OR REPLACE INTO anchor (name, seq, hash) VALUES (?, ?, ?)"
log = logging.getLogger("bedside.audit")

Entry = tuple[Any, ...]  # the values of FIELDS, in that order


def head_file(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def entry_hash(prev_hash: str, seq: int, values: Sequence[Any]) -> str:
    """SHA-256 (hex) of the previous hash's 32 bytes and the canonical bytes of [seq, *values].
    ValueError (or orjson.JSONEncodeError, a TypeError) for values no writer could have stored."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + orjson.dumps([seq, *values])).hexdigest()


def read_head_file(path: Path) -> tuple[int, str] | None:
    """(seq, hash) from `<audit file>.head`, None when it is missing or unreadable."""
    try:
        data = orjson.loads(head_file(path).read_bytes())
        return int(data["seq"]), str(data["hash"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _insert(db: sqlite3.Connection, values: list[Any]) -> None:
    """Insert rows (their 14 values one after the other) with ONE statement. executemany steps
    SQLite once per row and hands the GIL to and fro each time: with the event loop running,
    thousands of forced thread switches a second cost 15 % of REST throughput at c=16."""
    db.execute(_INSERT + ", ".join([_ROW] * (len(values) // 14)), values)


def _clean(values: Entry) -> Entry:
    """The values as stored: text truncated and valid UTF-8 (a lone surrogate from a caller would
    stop both orjson and SQLite), integers bounded. The usual entry (ASCII text, short, as record()
    truncated it) passes the first test unchanged: the writer's cost per entry is mostly here."""
    try:
        time_ns, kind, caller, tenant, transport, model, version, request_id, outcome, latency_us, detail = values
        if (
            "".join((kind, caller, tenant, transport, model, version, request_id, outcome, detail)).isascii()
            and max(len(kind), len(caller), len(tenant), len(transport), len(outcome), len(model), len(version))
            <= TEXT_MAX
            and len(detail) <= TEXT_MAX
            and len(request_id) <= REQUEST_ID_MAX
            and type(time_ns) is int
            and type(latency_us) is int
            and -_INT_MAX <= latency_us <= _INT_MAX
        ):
            return values
    except (TypeError, ValueError):  # not text, or not 11 values: the field by field way below
        pass
    out: list[Any] = []
    for name, value in zip(FIELDS, values, strict=True):
        if name in INT_FIELDS:
            try:
                out.append(max(-_INT_MAX, min(int(value), _INT_MAX)))
            except (TypeError, ValueError, OverflowError):
                out.append(0)
            continue
        text = value if isinstance(value, str) else str(value)
        text = text[: REQUEST_ID_MAX if name == "request_id" else TEXT_MAX]
        if not text.isascii():
            text = text.encode("utf-8", "replace").decode("utf-8")
        out.append(text)
    return tuple(out)


def describe(exc: BaseException) -> str:
    """The first line of an error, no path, no entry data: what stats() and the log show."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def send_message(sock: socket.socket, message: Any) -> None:
    """One message: its pickle (protocol 5) after its length (4 bytes), in ONE write."""
    data = pickle.dumps(message, protocol=5)
    sock.sendall(struct.pack("!I", len(data)) + data)


def receive_message(sock: socket.socket) -> Any:
    """The next message; EOFError when the other end closed."""
    (size,) = struct.unpack("!I", _receive_exactly(sock, 4))
    return pickle.loads(_receive_exactly(sock, size))  # our own process at the other end


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the audit writer's connection closed")
        got += n
    return bytes(data)


class _Store:
    """The file itself: opening, writing a batch as one chained transaction, retention. Run by the
    writer process (`bedside.security.auditwriter`), or in the calling thread before `start()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self) -> sqlite3.Connection:
        """The connection, opened (and the schema made) on first use or after an error."""
        if self.db is not None:
            return self.db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives -wal and -shm these rights
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OSError(f"cannot open the audit log: {exc}") from None
        try:
            db.execute("PRAGMA busy_timeout=5000")  # another process sharing the file may hold the lock
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            for statement in SCHEMA:
                db.execute(statement)
        except sqlite3.Error as exc:
            db.close()
            raise OSError(f"cannot open the audit log: {exc}") from None
        self.db = db
        return db

    def close(self) -> None:
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            self.db = None

    def write(self, db: sqlite3.Connection, batch: list[Entry]) -> tuple[int, str]:
        """Store the batch in one transaction; the new head (seq, hash)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            seq, digest = self.head(db)
            rows: list[Any] = []
            for values in batch:
                values = _clean(values)
                seq, prev = seq + 1, digest
                digest = entry_hash(prev, seq, values)
                rows.extend((seq, *values, prev, digest))
                if len(rows) == YIELD_EVERY * 14:
                    _insert(db, rows)
                    rows = []
                    time.sleep(0)  # in the calling thread: hand the GIL back between chunks
            if rows:
                _insert(db, rows)
            db.execute(_SET_ANCHOR, ("head", seq, digest))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return seq, digest

    def head(self, db: sqlite3.Connection) -> tuple[int, str]:
        """The chain's head, read inside the transaction: the anchor, else the later of the last entry
        and the head file, so a deleted tail leaves a gap in seq for verify to name, not new entries."""
        row = db.execute("SELECT seq, hash FROM anchor WHERE name = 'head'").fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        row = db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        head = (int(row[0]), str(row[1])) if row is not None else (0, GENESIS)
        side = read_head_file(self.path)
        return side if side is not None and side[0] > head[0] else head

    def write_head_file(self, seq: int, digest: str) -> None:
        """`<audit file>.head`, replaced atomically after the commit: it may lag (a crash, another
        process's later batch), never run ahead of the file, so it never raises a false alarm.
        OSError when it cannot be written."""
        target = head_file(self.path)
        tmp = target.with_name(f"{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(orjson.dumps({"seq": seq, "hash": digest}))
        os.replace(tmp, target)

    def retain_chunk(self, db: sqlite3.Connection, cutoff: int) -> tuple[int, int | None]:
        """Delete the next BATCH_MAX entries older than cutoff (see AuditLog.retain) in one
        transaction; (entries deleted, the last seq deleted or None when none was)."""
        deleted = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            # the last of the next BATCH_MAX entries before the first one to keep
            last = db.execute(
                "SELECT MAX(seq) FROM (SELECT seq FROM entries WHERE seq < coalesce((SELECT seq FROM "
                "entries WHERE time_ns >= ? ORDER BY seq LIMIT 1), 1 << 62) ORDER BY seq LIMIT ?)",
                (cutoff, BATCH_MAX),
            ).fetchone()[0]
            if last is not None:
                (digest,) = db.execute("SELECT hash FROM entries WHERE seq = ?", (last,)).fetchone()
                deleted = db.execute("DELETE FROM entries WHERE seq <= ?", (last,)).rowcount
                db.execute(_SET_ANCHOR, ("boundary", last, digest))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return deleted, last


def retention_cutoff(retention_days: int, now_ns: int | None = None) -> int:
    return (time.time_ns() if now_ns is None else now_ns) - retention_days * 86_400 * 10**9
