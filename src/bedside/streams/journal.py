"""The observation journal: accepted vital signs on disk before their ACK, and the per-bed windows
read back from it at start. Without it an ACK promised only memory: a kill -9 of the server lost
the windows of 1,713 of 1,715 beds, and monitors do not resend what was acknowledged.

SQLite in WAL mode, `observations.db` in the state folder (owner-only). The HL7 ingest process
writes it from one worker thread with group commit: the messages that arrive while a transaction
commits are written together in the next one, so a ward's burst shares one fsync and the serving
event loop never waits on the disk. `synchronous=FULL` (journal_sync "full") survives a power loss,
NORMAL a crash of the processes. Rows older than the observation age limit are pruned, and the
row count is capped, so the file stays bounded.

A message may be written and then not acknowledged (the server could not store it, or the ingest
process died before the ACK); the monitor resends it, so reading back keeps one reading per bed,
vital sign and time.

With a key (security.key), each row's bed, vital sign, value and time are sealed together
(bedside.security.sealed, purpose "journal") into the value column, bed and vital left empty: the
file holds no bed or vital sign in clear, only the time column that pruning needs. Reading back
checks the sealed time against that column, so a row moved in time is refused as altered. A row
that does not open (no key, a wrong key, altered) is skipped and counted, never fatal to a start.
A sealed row is ~100 bytes in the value column; sealing costs ~4.4 us a row in the writer thread,
opening ~2.7 us at restore (2M rows, the default cap: ~5 s more), measured on this 2-core box. The
writer stats a `file:` key file once a commit: that is how it follows a key rotation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from bedside.security.keys import KeyProviderError, KeyRing
from bedside.security.sealed import JOURNAL, SealedError, open_sealed, reseal, seal, sealed_key_id
from bedside.settings import DEFAULTS
from bedside.streams.hl7v2 import Observation

JOURNAL_FILE = "observations.db"
# the default of streams.journal_max_rows: an hour of one reading a minute of 7 vital signs for
# 4,700 beds; ~130 MB on disk, read back into the bed windows in 3-4 s at start (bench/hl7_ingest.py)
MAX_ROWS = DEFAULTS.streams.journal_max_rows
PRUNE_EVERY_S = 60.0
PRUNE_CHUNK = 20_000  # rows deleted per step, so pruning never holds the next commit long
READ_BATCH = 10_000
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS observations (bed TEXT NOT NULL, vital TEXT NOT NULL, value, time REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS observations_time ON observations (time)",
)
ERROR_LOG_S = 60.0
COUNTERS = ("journal_commits", "journal_rows", "journal_failures")
RESEAL_BATCH = 2_000  # rows re-sealed per transaction: the ingest writer waits at most one batch
log = logging.getLogger("bedside.journal")
Row = tuple[str, str, object, float]


@dataclass
class Skipped:
    """Rows read back but left out: sealed rows that do not open, and the first reason why."""

    rows: int = 0
    reason: str = ""


def seal_row(row: Row, keys: KeyRing) -> Row:
    """The row as stored with a key: bed and vital empty, everything sealed into the value column."""
    bed, vital, value, when = row
    return ("", "", seal(orjson.dumps([bed, vital, value, when]), keys, JOURNAL), when)


def open_row(row: Row, keys: KeyRing | None) -> Row:
    """A stored row as written; SealedError when a sealed one does not open."""
    bed, _, blob, when = row
    if bed or not isinstance(blob, bytes):
        return row  # written in clear (no key then): readable as it is
    if keys is None:
        raise SealedError("is encrypted and no key is configured (security.key)")
    try:
        bed, vital, value, sealed_when = orjson.loads(open_sealed(blob, keys, JOURNAL))
    except (ValueError, TypeError) as exc:  # SealedError, KeyProviderError, or not the 4 fields
        raise SealedError(str(exc) if isinstance(exc, SealedError | KeyProviderError) else "is malformed") from None
    if sealed_when != when:
        raise SealedError("fails its integrity check (its time was altered)")
    return (bed, vital, value, when)


def open_journal(path: Path, sync: str = "full") -> sqlite3.Connection:
    """The journal at `path`, created owner-only with its folder. OSError when it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives -wal and -shm these rights too
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=5000")  # a previous ingest process may still be closing it
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            for statement in SCHEMA:
                db.execute(statement)
        except BaseException:
            db.close()
            raise
    except sqlite3.Error as exc:
        raise OSError(f"cannot open the observation journal in the state folder (streams.state_dir): {exc}") from None
    return db


def read_rows(
    path: Path, since: float, keys: KeyRing | None = None, skipped: Skipped | None = None
) -> Iterator[tuple[str, str, object, float]]:
    """(bed, vital, value, time) of every observation at or after `since`, in time order (so
    each is an append to its bed's window). Run it off the event loop: a full journal is millions
    of rows. Sealed rows are opened with `keys`; those that do not open are counted in `skipped`
    (and logged once), not raised: one bad row must not keep a ward's windows from coming back."""
    skipped = Skipped() if skipped is None else skipped
    db = open_journal(path, "normal")
    try:
        # a sealed row's value is read as bytes whatever became of it: text that is not UTF-8 would
        # fail the whole read, where one damaged row must only be skipped
        cursor = db.execute(
            "SELECT bed, vital, CASE bed WHEN '' THEN CAST(value AS BLOB) ELSE value END, time FROM observations"
            " WHERE time >= ? ORDER BY time",
            (since,),
        )
        while rows := cursor.fetchmany(READ_BATCH):
            for row in rows:
                if row[0]:
                    yield row  # the common case without a key: no call per row
                    continue
                try:
                    yield open_row(row, keys)
                except SealedError as exc:
                    skipped.rows += 1
                    skipped.reason = skipped.reason or str(exc)
    except sqlite3.Error as exc:
        raise OSError(f"cannot read the observation journal in the state folder (streams.state_dir): {exc}") from None
    finally:
        db.close()
        if skipped.rows:
            log.warning("observation journal: %d rows skipped: a row %s", skipped.rows, skipped.reason)


def reseal_rows(path: Path, keys: KeyRing) -> tuple[int, int]:
    """Seal every sealed row again with the current key (key rotation), a batch per transaction so
    a running ingest writer is never held long. Returns (re-sealed, rows that do not open; kept)."""
    current = keys.current_id
    done = failed = 0
    last = 0
    db = open_journal(path, "full")
    try:
        db.execute("PRAGMA secure_delete=ON")  # no copy under the retired key left in free space
        while True:
            rows = db.execute(
                "SELECT rowid, value FROM observations WHERE bed = '' AND rowid > ? ORDER BY rowid LIMIT ?",
                (last, RESEAL_BATCH),
            ).fetchall()
            if not rows:
                return done, failed
            last = rows[-1][0]
            updates: list[tuple[bytes, int]] = []
            for rowid, blob in rows:
                try:
                    if isinstance(blob, bytes) and sealed_key_id(blob) != current:
                        updates.append((reseal(blob, keys, JOURNAL), rowid))
                except (SealedError, KeyProviderError):
                    failed += 1
            if updates:
                # by rowid: the writer only inserts, and a row pruned meanwhile is simply not updated
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("UPDATE observations SET value = ? WHERE rowid = ?", updates)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                done += len(updates)
    except sqlite3.Error as exc:
        raise OSError(f"cannot re-seal the observation journal: {exc}") from None
    finally:
        db.close()


class JournalWriter:
    """Writes accepted observations from a worker thread, many messages to a transaction."""

    def __init__(
        self,
        path: Path,
        sync: str = "full",
        max_age_s: float = 3600.0,
        max_rows: int = MAX_ROWS,
        keys: KeyRing | None = None,
    ) -> None:
        self.path, self.sync, self.max_age_s, self.max_rows = path, sync, max_age_s, max_rows
        self.keys = keys  # None: rows stored in clear
        self.commits = self.rows = self.failures = 0
        self._pending: list[tuple[list[tuple[str, str, object, float]], asyncio.Future[None]]] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self._pruned_at = -PRUNE_EVERY_S
        self._logged_at = -ERROR_LOG_S

    def start(self) -> None:
        """Open the journal (OSError when it cannot be) and start the writer thread."""
        self._loop = asyncio.get_running_loop()
        self._db = open_journal(self.path, self.sync)
        if self.keys is not None:  # pruned rows zeroed, not left in free pages (clear ones from before a key)
            self._db.execute("PRAGMA secure_delete=ON")
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()

    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, (self.commits, self.rows, self.failures), strict=True))

    async def write(self, bed: str, observations: list[Observation]) -> None:
        """Return once the observations are committed; OSError when they could not be."""
        assert self._loop is not None, "start() first"
        done: asyncio.Future[None] = self._loop.create_future()
        rows: list[tuple[str, str, object, float]] = [(bed, o.vital, o.value, o.time) for o in observations]
        with self._wake:
            self._pending.append((rows, done))
            self._wake.notify()
        await done

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(10)
            if self._thread.is_alive():
                return  # stuck in the disk: closing the connection under it could crash; we are exiting
        if self._db is not None:
            self._db.close()

    def _run(self) -> None:
        assert self._db is not None and self._loop is not None
        db, loop = self._db, self._loop
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                batch, self._pending = self._pending, []
            if not batch:
                return
            error: OSError | None = None
            try:
                keys = self.keys
                if keys is not None:
                    keys.refresh()  # a rotated key file: seal with the new current key from this commit on
                db.execute("BEGIN")
                try:
                    for rows, _ in batch:
                        stored = rows if keys is None else [seal_row(row, keys) for row in rows]
                        db.executemany("INSERT INTO observations VALUES (?, ?, ?, ?)", stored)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # a failed COMMIT may have rolled back already
                        db.execute("ROLLBACK")
                    raise
                self.commits += 1
                self.rows += sum(len(rows) for rows, _ in batch)
            except Exception as exc:  # sqlite3.Error, or a value it cannot bind: a NAK, never a hang
                self.failures += 1
                error = OSError(f"the observation journal could not be written: {exc}")
                self._log_failure(exc)
            try:
                loop.call_soon_threadsafe(_settle, [done for _, done in batch], error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            self._prune(db)

    def _prune(self, db: sqlite3.Connection) -> None:
        """Drop rows past the age limit and beyond the row cap, a chunk at a time; again at the next
        commit while there is more, else once a minute."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        try:
            old = db.execute(
                "DELETE FROM observations WHERE rowid IN (SELECT rowid FROM observations WHERE time < ? LIMIT ?)",
                (time.time() - self.max_age_s, PRUNE_CHUNK),
            ).rowcount
            # rowids grow with each insert, so the lowest are the oldest writes
            (newest,) = db.execute("SELECT coalesce(max(rowid), 0) FROM observations").fetchone()
            over = db.execute(
                "DELETE FROM observations WHERE rowid IN (SELECT rowid FROM observations WHERE rowid <= ? LIMIT ?)",
                (newest - self.max_rows, PRUNE_CHUNK),
            ).rowcount
        except sqlite3.Error as exc:
            self._log_failure(exc)
            old = over = 0
        self._pruned_at = now if max(old, over) < PRUNE_CHUNK else -PRUNE_EVERY_S

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at >= ERROR_LOG_S:  # a full disk fails every commit: once a minute is enough
            log.error("observation journal %s: %s (monitors get a NAK and resend)", self.path, exc)
            self._logged_at = now


def _settle(waiting: list[asyncio.Future[None]], error: OSError | None) -> None:
    for done in waiting:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
