"""The tamper-evident audit log: every inference, admin action and authentication failure, in a
hash-chained SQLite file (security.audit_file, else STATE_DIR/audit.sqlite). Never tensor data.

`record()` runs on the event loop for every inference: it appends a tuple to an in-memory buffer
(~0.5 µs), never blocks, never raises. Beyond `buffer_max` entries waiting, entries are counted as
lost and the writer stores an `audit_lost` entry with the count, so a gap is itself on the record.
A writer thread stores the buffer every `flush_ms` (sooner when it fills) in one transaction:
`BEGIN IMMEDIATE`, read the chain's head inside it (so processes sharing the file keep one chain),
hash = SHA-256(previous hash's 32 bytes || canonical(entry)), canonical(entry) being the UTF-8 JSON
(orjson: no spaces, non-ASCII as is) of [seq, *FIELDS values]; with seq in it, a moved entry fails.

The `anchor` table holds the seq and hash of the last entry written ("head", same transaction) and
of the last deleted by retention ("boundary"), so verification starts mid-chain and a deleted tail
shows. `<audit file>.head` repeats the head after each batch, so dropping the anchor table with the
tail shows too while that file survives. `bedside.security.auditcheck` verifies and exports.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

# the entry's values in their stored and hashed order (after seq)
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


class AuditLog:
    """The audit log at `path`: `record()` from anywhere, a writer thread (`start()`) stores."""

    def __init__(self, path: Path, *, buffer_max: int, flush_ms: float, retention_days: int) -> None:
        self.path = path
        self.buffer_max = max(1, buffer_max)
        self.flush_s = max(0.001, flush_ms / 1000)
        self.retention_days = retention_days
        self._buf: collections.deque[Entry] = collections.deque()
        self._wake_at = min(WAKE_AT, self.buffer_max // 2)
        self._wake = threading.Event()
        self._lost = 0  # entries dropped by record(); grows only (under _lost_lock)
        self._lost_noted = 0  # of those, how many an audit_lost entry already counts (writer only)
        self._lost_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one batch at a time: the writer thread or flush()
        self._db: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._retained_at = -RETAIN_EVERY_S
        self._logged_at = -ERROR_LOG_S
        self.written = 0
        self.last_error: str | None = None

    # -- the hot path -------------------------------------------------------------------------

    def record(
        self,
        kind: str,
        caller: str,
        tenant: str,
        transport: str,
        model: str = "",
        version: str = "",
        request_id: str = "",
        outcome: str = "ok",
        latency_us: int = 0,
        detail: str = "",
    ) -> None:
        """Append one entry to the buffer (~1 µs); the writer thread stores it. Never blocks or
        raises: beyond buffer_max entries in memory the entry is counted as lost. Fields that come
        from callers are truncated here, so a flood of long request ids cannot fill memory."""
        buf = self._buf
        n = len(buf)
        if n >= self.buffer_max:
            with self._lost_lock:
                self._lost += 1
            return
        try:
            buf.append(
                (
                    time.time_ns(),
                    kind,
                    caller,
                    tenant,
                    transport,
                    model[:TEXT_MAX],
                    version[:TEXT_MAX],
                    request_id[:REQUEST_ID_MAX],
                    outcome,
                    latency_us,
                    detail[:TEXT_MAX],
                )
            )
        except TypeError:  # a value that is not text: stored as its str(), never a raise on the hot path
            values = (kind, caller, tenant, transport, model, version, request_id, outcome, latency_us, detail)
            buf.append((time.time_ns(), *(v if isinstance(v, int) else str(v)[:REQUEST_ID_MAX] for v in values)))
        if n == self._wake_at:
            self._wake.set()

    # -- the writer ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the file (created owner-only with its folder; OSError when it cannot be) and start
        the writer thread, which also applies retention at once and then hourly."""
        with self._write_lock:
            self._open()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def flush(self) -> int:
        """Store every entry recorded before this call, now, from this thread; the entries stored.
        An error is logged and kept in stats()["last_error"]; the entries stay in memory."""
        with self._write_lock:
            return self._write_pending()

    def close(self) -> None:
        """Stop the writer thread, store what is left, close the file."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._write_lock:
            self._write_pending()
            if self._db is not None:
                self._db.close()
                self._db = None

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "lost": self._lost, "pending": len(self._buf), "last_error": self.last_error}

    def retain(self, now_ns: int | None = None) -> int:
        """Delete the entries older than retention_days (0: none), oldest first, recording the last
        deleted entry as the anchor's boundary; the number deleted. An entry older than the limit
        that follows a newer one (the clock went back) is kept until every entry before it goes, so
        the remaining entries always form one chain from the boundary."""
        if self.retention_days <= 0:
            return 0
        cutoff = (time.time_ns() if now_ns is None else now_ns) - self.retention_days * 86_400 * 10**9
        deleted = 0
        while True:
            with self._write_lock:  # a chunk at a time, the buffer stored between: entries keep flowing
                self._write_pending()
                try:
                    db = self._open()
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
                            deleted += db.execute("DELETE FROM entries WHERE seq <= ?", (last,)).rowcount
                            db.execute(_SET_ANCHOR, ("boundary", last, digest))
                        db.execute("COMMIT")
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                        raise
                except Exception as exc:  # retried within the hour; the writer goes on
                    self._failed("retention", exc)
                    return deleted
            if last is None:
                return deleted

    def _run(self) -> None:
        while not self._closing:
            if time.monotonic() - self._retained_at >= RETAIN_EVERY_S:
                self._retained_at = time.monotonic()
                self.retain()
            self._wake.wait(self.flush_s)
            self._wake.clear()
            with self._write_lock:
                self._write_pending()

    def _open(self) -> sqlite3.Connection:
        """The connection, opened (and the schema made) on first use or after an error."""
        if self._db is not None:
            return self._db
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
        self._db = db
        return db

    def _write_pending(self) -> int:
        """Store the buffer, BATCH_MAX entries to a transaction (caller holds _write_lock)."""
        written = 0
        while True:
            batch: list[Entry] = []
            buf = self._buf
            with contextlib.suppress(IndexError):  # popleft is atomic: record() may append meanwhile
                for _ in range(BATCH_MAX):
                    batch.append(buf.popleft())
            lost = self._lost - self._lost_noted
            if lost:
                self._lost_noted += lost
                detail = f"{lost} audit entries were lost: more than security.audit_buffer waited in memory"
                batch.append((time.time_ns(), "audit_lost", "", "", "", "", "", "", "lost", 0, detail))
            if not batch:
                return written
            try:
                self._write(batch)
            except Exception as exc:  # disk full, read-only, locked, a damaged anchor: retried next tick
                if lost:  # the next attempt counts these again, with any lost meanwhile, in one entry
                    self._lost_noted -= lost
                    batch.pop()
                buf.extendleft(reversed(batch))  # kept, in order, ahead of what came since
                excess = len(buf) - self.buffer_max
                for _ in range(max(0, excess)):
                    buf.pop()  # the newest go first, counted: memory stays bounded while the disk is out
                if excess > 0:
                    with self._lost_lock:
                        self._lost += excess
                self._failed("writing", exc)
                return written
            written += len(batch)
            if len(batch) < BATCH_MAX:
                return written

    def _write(self, batch: list[Entry]) -> None:
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        try:
            seq, digest = self._head(db)
            rows: list[Any] = []
            for values in batch:
                values = _clean(values)
                seq, prev = seq + 1, digest
                digest = entry_hash(prev, seq, values)
                rows.extend((seq, *values, prev, digest))
                if len(rows) == YIELD_EVERY * 14:
                    _insert(db, rows)
                    rows = []
                    time.sleep(0)  # hand the GIL back to the event loop between chunks
            if rows:
                _insert(db, rows)
            db.execute(_SET_ANCHOR, ("head", seq, digest))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.written += len(batch)
        if self.last_error is not None:
            log.warning("audit log writing again")
            self.last_error = None
        self._write_head_file(seq, digest)

    def _head(self, db: sqlite3.Connection) -> tuple[int, str]:
        """The chain's head, read inside the transaction: the anchor, else the later of the last entry
        and the head file, so a deleted tail leaves a gap in seq for verify to name, not new entries."""
        row = db.execute("SELECT seq, hash FROM anchor WHERE name = 'head'").fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        row = db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        head = (int(row[0]), str(row[1])) if row is not None else (0, GENESIS)
        side = read_head_file(self.path)
        return side if side is not None and side[0] > head[0] else head

    def _write_head_file(self, seq: int, digest: str) -> None:
        """`<audit file>.head`, replaced atomically after the commit: it may lag (a crash, another
        process's later batch), never run ahead of the file, so it never raises a false alarm."""
        target = head_file(self.path)
        tmp = target.with_name(f"{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps({"seq": seq, "hash": digest}))
            os.replace(tmp, target)
        except OSError as exc:
            self._failed("writing the head file", exc)

    def _failed(self, doing: str, exc: BaseException) -> None:
        """One log line a minute at most, no path, no entry data; the connection (maybe what broke) reopens."""
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        reason = (text.splitlines() or [type(exc).__name__])[0][:200]
        self.last_error = f"{doing}: {reason}"
        now = time.monotonic()
        if now - self._logged_at >= ERROR_LOG_S:
            self._logged_at = now
            log.error("audit log %s failed (%s); kept in memory and retried", doing, reason)
        if isinstance(exc, sqlite3.Error) and self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
