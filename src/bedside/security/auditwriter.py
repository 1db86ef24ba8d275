"""The audit log's writer process: `python -m bedside.security.auditwriter FD PATH RETENTION_DAYS`,
started by `AuditLog.start()` with its end of a socket pair as FD. It hashes and stores the batches
the server's sender thread sends, so that work never holds the server's GIL; it applies retention
at once and then hourly. It imports only the audit log's own code, never the server.

Requests (length-prefixed pickles, see `audit.send_message`): ("write", batch), ("retain", cutoff),
("exit",). Each answer is (status, value, notes): status "ok" with the entries written or deleted,
or "failed" with the reason the batch was not stored; notes, the (doing, reason) of errors met
since the last answer (the head file, hourly retention), for the server to log and show in stats().
"""

from __future__ import annotations

import select
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bedside.security.auditstore import (
    RETAIN_EVERY_S,
    Entry,
    _Store,
    describe,
    receive_message,
    retention_cutoff,
    send_message,
)


class Writer:
    def __init__(self, path: Path, retention_days: int) -> None:
        self.store = _Store(path)
        self.retention_days = retention_days
        self.notes: list[tuple[str, str]] = []
        self.retained_at = -RETAIN_EVERY_S

    def failed(self, doing: str, exc: BaseException) -> None:
        self.notes.append((doing, describe(exc)))
        if isinstance(exc, sqlite3.Error):
            self.store.close()  # maybe what broke: reopened on the next request

    def write(self, batch: list[Entry]) -> tuple[str, Any]:
        try:
            seq, digest = self.store.write(self.store.open(), batch)
        except Exception as exc:  # disk full, read-only, locked: the server keeps the batch, retries
            if isinstance(exc, sqlite3.Error):
                self.store.close()
            return "failed", describe(exc)
        try:
            self.store.write_head_file(seq, digest)
        except OSError as exc:
            self.failed("writing the head file", exc)
        return "ok", len(batch)

    def retain(self, cutoff: int) -> int:
        deleted = 0
        while True:
            try:
                count, last = self.store.retain_chunk(self.store.open(), cutoff)
            except Exception as exc:  # retried within the hour
                self.failed("retention", exc)
                return deleted
            deleted += count
            if last is None:
                return deleted

    def serve(self, sock: socket.socket) -> None:
        while True:
            if self.retention_days > 0 and time.monotonic() - self.retained_at >= RETAIN_EVERY_S:
                self.retained_at = time.monotonic()
                self.retain(retention_cutoff(self.retention_days))
            wait = max(0.0, self.retained_at + RETAIN_EVERY_S - time.monotonic()) if self.retention_days > 0 else None
            ready, _, _ = select.select([sock], [], [], wait)
            if not ready:
                continue
            try:
                request = receive_message(sock)
            except (EOFError, OSError):  # the server is gone
                return
            kind = request[0]
            if kind == "write":
                status, value = self.write(request[1])
            elif kind == "retain":
                status, value = "ok", self.retain(int(request[1]))
            else:  # "exit"
                self.store.close()
                send_message(sock, ("ok", 0, self.notes))
                return
            notes, self.notes = self.notes, []
            send_message(sock, (status, value, notes))


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then stops us
    fd, path, retention_days = int(argv[0]), Path(argv[1]), int(argv[2])
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    writer = Writer(path, retention_days)
    try:
        writer.serve(sock)
    finally:
        writer.store.close()
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
