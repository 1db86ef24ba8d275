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
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
log = logging.getLogger("bedside.journal")


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


def read_rows(path: Path, since: float) -> Iterator[tuple[str, str, object, float]]:
    """(bed, vital, value, time) of every observation at or after `since`, in time order (so
    each is an append to its bed's window). Run it off the event loop: a full journal is millions
    of rows."""
    db = open_journal(path, "normal")
    try:
        cursor = db.execute("SELECT bed, vital, value, time FROM observations WHERE time >= ? ORDER BY time", (since,))
        while rows := cursor.fetchmany(READ_BATCH):
            yield from rows
    except sqlite3.Error as exc:
        raise OSError(f"cannot read the observation journal in the state folder (streams.state_dir): {exc}") from None
    finally:
        db.close()


class JournalWriter:
    """Writes accepted observations from a worker thread, many messages to a transaction."""

    def __init__(self, path: Path, sync: str = "full", max_age_s: float = 3600.0, max_rows: int = MAX_ROWS) -> None:
        self.path, self.sync, self.max_age_s, self.max_rows = path, sync, max_age_s, max_rows
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
                db.execute("BEGIN")
                try:
                    for rows, _ in batch:
                        db.executemany("INSERT INTO observations VALUES (?, ?, ?, ?)", rows)
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
