"""The tamper-evident audit log: every inference, admin action and authentication failure, in a
hash-chained SQLite file (security.audit_file, else STATE_DIR/audit.sqlite). Never tensor data.

`record()` runs on the event loop for every inference: it appends a tuple to an in-memory buffer
(~0.5 µs), never blocks, never raises. Beyond `buffer_max` entries waiting, entries are counted as
lost and the writer stores an `audit_lost` entry with the count, so a gap is itself on the record.
A sender thread hands the buffer every `flush_ms` (sooner when it fills) to a writer process
(`bedside.security.auditwriter`, so the hashing and SQLite work never holds this process's GIL),
which stores it in one transaction:
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
import logging
import pickle
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bedside.security.auditstore import (  # re-exported: the chain's definition, for auditcheck and tests
    BATCH_MAX,
    CHILD_TIMEOUT_S,
    ERROR_LOG_S,
    FIELDS,
    GENESIS,
    REQUEST_ID_MAX,
    TEXT_MAX,
    WAKE_AT,
    Entry,
    _Store,
    describe,
    entry_hash,
    head_file,
    read_head_file,
    receive_message,
    retention_cutoff,
    send_message,
)

log = logging.getLogger("bedside.audit")

__all__ = ["FIELDS", "GENESIS", "AuditLog", "entry_hash", "head_file", "read_head_file"]


class _WriterError(Exception):
    """A batch the writer process could not store; the text is its reason."""


class _Child:
    """The writer process and our end of its socket."""

    def __init__(self, path: Path, retention_days: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(  # our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "bedside.security.auditwriter",
                    str(theirs.fileno()),
                    str(path),
                    str(retention_days),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(CHILD_TIMEOUT_S)
        self.sock = ours

    def call(self, message: Any) -> Any:
        send_message(self.sock, message)
        return receive_message(self.sock)

    def stop(self, *, kill: bool) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if kill:
            with contextlib.suppress(OSError):
                self.process.kill()
        try:
            self.process.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class AuditLog:
    """The audit log at `path`: `record()` from anywhere; after `start()` a sender thread hands the
    buffer to a writer process, which hashes and stores it (before `start()`, flush() stores it)."""

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
        self._write_lock = threading.Lock()  # one batch at a time: the sender thread or flush()
        self._store = _Store(path)  # used in this process until start()
        self._child: _Child | None = None
        self._started = False  # batches go to the writer process (started again if it died)
        self._thread: threading.Thread | None = None
        self._closing = False
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
        """Append one entry to the buffer (~1 µs); the writer stores it. Never blocks or
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
        """Open the file (created owner-only with its folder; OSError when it cannot be), start the
        writer process (which also applies retention at once and then hourly) and the sender thread."""
        with self._write_lock:
            self._open()
            self._store.close()  # from now on the writer process holds the file
            self._started = True
            self._child = _Child(self.path, self.retention_days)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def flush(self) -> int:
        """Store every entry recorded before this call, now (and wait for it); the entries stored.
        An error is logged and kept in stats()["last_error"]; the entries stay in memory."""
        with self._write_lock:
            return self._write_pending()

    def close(self) -> None:
        """Stop the sender thread, store what is left, stop the writer process, close the file."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._write_lock:
            self._write_pending()
            if self._child is not None:
                with contextlib.suppress(OSError, EOFError, pickle.PickleError):
                    self._child.call(("exit",))
                self._child.stop(kill=False)
                self._child = None
            self._started = False
            self._store.close()

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "lost": self._lost, "pending": len(self._buf), "last_error": self.last_error}

    def retain(self, now_ns: int | None = None) -> int:
        """Delete the entries older than retention_days (0: none), oldest first, recording the last
        deleted entry as the anchor's boundary; the number deleted. An entry older than the limit
        that follows a newer one (the clock went back) is kept until every entry before it goes, so
        the remaining entries always form one chain from the boundary."""
        if self.retention_days <= 0:
            return 0
        cutoff = retention_cutoff(self.retention_days, now_ns)
        deleted = 0
        while True:
            with self._write_lock:  # a chunk at a time, the buffer stored between: entries keep flowing
                self._write_pending()
                if self._started:  # the writer process deletes every chunk
                    try:
                        return int(self._call(("retain", cutoff)))
                    except Exception as exc:
                        self._failed("retention", exc)
                        return 0
                try:
                    count, last = self._store.retain_chunk(self._open(), cutoff)
                except Exception as exc:  # retried within the hour; the writer goes on
                    self._failed("retention", exc)
                    return deleted
                deleted += count
            if last is None:
                return deleted

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            with self._write_lock:
                self._write_pending()

    def _open(self) -> sqlite3.Connection:
        """The connection in this process, opened on first use or after an error."""
        return self._store.open()

    def _call(self, message: Any) -> Any:
        """Send a request to the writer process (started again if it is not running) and return its
        answer, after noting the errors it reports. OSError when the process is gone."""
        if self._child is not None and self._child.process.poll() is not None:  # it died: a new one
            self._child.stop(kill=False)
            self._child = None
        try:
            if self._child is None:
                self._child = _Child(self.path, self.retention_days)
            status, value, notes = self._child.call(message)
        except (OSError, EOFError, pickle.PickleError, ValueError) as exc:
            if self._child is not None:
                self._child.stop(kill=True)
                self._child = None
            raise OSError(f"the audit writer process failed: {describe(exc)}") from None
        if status == "failed":
            for doing, reason in notes:
                self._note(doing, reason)
            raise _WriterError(value)
        if message[0] == "write":
            self._stored(int(value))
        for doing, reason in notes:
            self._note(doing, reason)
        return value

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
        """Store one batch: in the writer process once started, else here. Raises on failure."""
        if self._started:
            self._call(("write", batch))
            return
        seq, digest = self._store.write(self._open(), batch)
        self._stored(len(batch))
        try:
            self._store.write_head_file(seq, digest)
        except OSError as exc:
            self._failed("writing the head file", exc)

    def _stored(self, count: int) -> None:
        self.written += count
        if self.last_error is not None:
            log.warning("audit log writing again")
            self.last_error = None

    def _failed(self, doing: str, exc: BaseException) -> None:
        """Note the failure; the connection (maybe what broke) reopens."""
        self._note(doing, describe(exc))
        if isinstance(exc, sqlite3.Error):
            self._store.close()

    def _note(self, doing: str, reason: str) -> None:
        """One log line a minute at most, no path, no entry data."""
        self.last_error = f"{doing}: {reason}"
        now = time.monotonic()
        if now - self._logged_at >= ERROR_LOG_S:
            self._logged_at = now
            log.error("audit log %s failed (%s); kept in memory and retried", doing, reason)
