"""De-identified update health, from each box to the publisher.

A box POSTs after every pass: its device id (an asset name, never a patient's), the versions it
serves, what each pass did, golden-check results and latency summaries. Nothing from a request, a
patient or a host path. The newest report of each box is kept; an unsent one waits for the next pass.

`ReportStore` is the publisher's side: one JSON file per box in a folder, which `bedside rollout`
reads to decide whether a stage is healthy, written by `serve_repository` (which also serves the
update repository's files, with Range requests for resumable downloads).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import urllib3

from bedside import __version__
from bedside.security.sealed import write_atomic
from bedside.updates.rollout import PlanError, check_name

log = logging.getLogger("bedside.updates")
REPORT_MAX = 64 * 1024  # bytes in one report
DEVICES_MAX = 100_000  # boxes whose reports one folder keeps
QUIET = frozenset({"up-to-date", "not-eligible", "paused", "halted", "deferred", "busy"})


class Reporter:
    def __init__(
        self, url: str, device_id: str, groups: frozenset[str], pool: urllib3.PoolManager, timeout_s: float
    ) -> None:
        self.url = url.rstrip("/")
        self.device_id = device_id
        self.groups = sorted(groups)
        self.pool = pool
        self.timeout_s = timeout_s
        self.pending: bytes | None = None
        self.last: dict[str, Any] = {}
        self.now: dict[str, Any] = {}
        self.sent = 0

    def status(self) -> dict[str, Any]:
        """Per model: what the last pass did (`now`), the last change and its version, for the status
        page and the aggregate export."""
        models = {}
        for model in sorted({*self.now, *self.last}):
            now, last = self.now.get(model) or {}, self.last.get(model) or {}
            models[model] = {
                "now": now.get("action"),
                "last": last.get("action"),
                "version": last.get("version"),
                "serving": last.get("serving"),
                "reason": last.get("reason") or now.get("reason") or "",
            }
        return {"models": models, "reports_sent": self.sent}

    def send(self, outcomes: Sequence[Any], states: dict[str, Any]) -> bool:
        now = {}
        for outcome in outcomes:
            now[outcome.model] = {"action": outcome.action, "version": outcome.version, "reason": outcome.reason}
            if outcome.action not in QUIET or outcome.model not in self.last:  # "nothing to do" keeps the last change
                self.last[outcome.model] = asdict(outcome)
        self.now = now
        report = {
            "device": self.device_id,
            "groups": self.groups,
            "at": time.time(),
            "bedside": __version__,
            "serving": states,
            "now": now,  # what this pass did (paused, deferred, up to date...)
            "last": self.last,  # the last change per model (installed, refused, rolled back), with its figures
        }
        self.pending = json.dumps(report).encode()[:REPORT_MAX]
        if not self.url:
            return False
        try:
            response = self.pool.request(
                "POST",
                f"{self.url}/{self.device_id}",
                body=self.pending,
                headers={"Content-Type": "application/json"},
                timeout=self.timeout_s,
            )
        except urllib3.exceptions.HTTPError as exc:
            log.warning("update report not sent (%s); it is sent with the next pass", type(exc).__name__)
            return False
        if response.status != 204:
            log.warning("update report refused (HTTP %d)", response.status)
            return False
        self.pending = None
        self.sent += 1
        return True


class ReportStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def put(self, device: str, raw: bytes) -> str | None:
        """Store a box's report; the reason it is refused, or None."""
        try:
            check_name("device id", device, 64)
            doc = json.loads(raw)
        except (PlanError, ValueError) as exc:
            return str(exc) if isinstance(exc, PlanError) else "the report is not JSON"
        if not isinstance(doc, dict) or doc.get("device") != device:
            return "the report's device does not match its URL"
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{device}.json"
            if not path.exists() and sum(1 for _ in self.folder.glob("*.json")) >= DEVICES_MAX:
                return f"this report folder holds {DEVICES_MAX} boxes already"
            write_atomic(path, raw)
        return None

    def all(self) -> dict[str, dict[str, Any]]:
        out = {}
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                out[path.stem] = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
        return out


class _Handler(SimpleHTTPRequestHandler):
    """Static files with single Range requests (206), plus POST /reports/<device>."""

    reports: ReportStore

    def log_message(self, format: str, *args: Any) -> None:  # no per-request lines
        return None

    def do_POST(self) -> None:
        prefix = "/reports/"
        given = self.headers.get("Content-Length") or "0"
        length = int(given) if given.isascii() and given.isdigit() else -1  # "abc" or "-5": refused below
        if not self.path.startswith(prefix) or not 0 < length <= REPORT_MAX:
            self.send_error(HTTPStatus.BAD_REQUEST, "POST /reports/<device> with a JSON body of at most 64 KiB")
            return
        why = self.reports.put(self.path[len(prefix) :], self.rfile.read(length))
        if why:
            self.send_error(HTTPStatus.BAD_REQUEST, why)
            return
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()

    def send_head(self) -> Any:
        wanted = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not wanted.startswith("bytes=") or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first, _, last = wanted[6:].partition("-")
        try:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        except ValueError:
            return super().send_head()
        if start >= size or start > end:
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            return None
        fh = open(path, "rb")  # noqa: SIM115 - closed by the base class after copyfile
        fh.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Slice(fh, end - start + 1)


class _Slice:
    """A file object that ends after `left` bytes (copyfile reads to EOF)."""

    def __init__(self, fh: Any, left: int) -> None:
        self.fh, self.left = fh, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return bytes(data)

    def close(self) -> None:
        self.fh.close()


def serve_repository(repo: Path, reports: Path, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for the update repository's files and the boxes' reports (call serve_forever)."""
    handler = type("Handler", (_Handler,), {"reports": ReportStore(reports)})
    return ThreadingHTTPServer((host, port), partial(handler, directory=str(repo)))
