"""What the status page and the aggregate export show, gathered from the dataplane, the streams
and the update agent. No ASGI here: the routes (rest.py) and the live stream (events.py) call in.

The page shows beds by their label and scores, models by their figures; never a patient
identifier, a request's values or a host path. The export is the de-identified aggregate
(monitoring/aggregate.py) of the same sources, as a central dashboard may receive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson

from bedside import __version__
from bedside.dataplane import Dataplane
from bedside.monitoring.aggregate import aggregate
from bedside.protocol.types import Caller
from bedside.settings import DEFAULTS, MonitoringSettings
from bedside.streams.service import Streams

UpdateStatus = Callable[[], dict[str, Any]]
SHARED_S = 0.2  # a snapshot serves every live feed of one caller this long
MAX_SHARED = 256  # callers whose last snapshot is kept
PAGE_FILES = {"": ("status.html", "text/html; charset=utf-8"), "status.js": ("status.js", "text/javascript"),
              "status.css": ("status.css", "text/css")}  # fmt: skip
# The page loads nothing from elsewhere (no CDN: it works offline) and runs no inline code.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


def page_asset(name: str) -> tuple[bytes, str] | None:
    """The page's file `name` ('' for the page itself) and its content type; None for any other."""
    found = PAGE_FILES.get(name)
    if found is None:
        return None
    return resources.files("bedside.server").joinpath("page", found[0]).read_bytes(), found[1]


class StatusBoard:
    def __init__(
        self, dataplane: Dataplane, streams: Streams | None, monitoring: MonitoringSettings = DEFAULTS.monitoring
    ) -> None:
        self.dataplane = dataplane
        self.streams = streams
        self.monitoring = monitoring
        self.updates: UpdateStatus | None = None  # set when the update agent runs
        self.started = time.time()
        self._shared: dict[tuple[str, str], tuple[float, bytes]] = {}

    def snapshot(self, caller: Caller, transport: str = "status") -> dict[str, Any]:
        """Everything the page draws, for what the caller may see (monitor)."""
        rows = self.dataplane.statistics(None, None, caller, transport)
        models = []
        for row in rows:
            detail = row.detail
            latency = detail.get("latency") or {}
            drift = detail.get("drift")
            models.append(
                {
                    "name": row.name,
                    "version": row.version,
                    "state": row.state,
                    "ok": row.success.count,
                    "failed": row.failure.count,
                    "rejected": sum((detail.get("rejected") or {}).values()),
                    "p50_ms": latency.get("p50_ms"),
                    "p99_ms": latency.get("p99_ms"),
                    "histogram": (detail.get("histograms") or {}).get("request"),
                    "queue_depth": row.queue_depth,
                    "drift": None if drift is None else {"state": drift["state"], "drifted": drift["drifted"]},
                }
            )
        return {
            "time": round(time.time(), 1),
            "server_version": __version__,
            "models": models,
            "beds": self._beds(),
            "alerts": self._alerts(),
            "streams": self._streams(),
            "updates": self.updates() if self.updates is not None else None,
        }

    def snapshot_bytes(self, caller: Caller) -> bytes:
        """The snapshot as JSON, shared by every live feed of the same caller for SHARED_S: twenty
        ward displays cost one snapshot, not twenty."""
        key = (caller.name, caller.tenant)
        now = time.monotonic()
        cached = self._shared.get(key)
        if cached is not None and now - cached[0] < SHARED_S:
            return cached[1]
        body = orjson.dumps(self.snapshot(caller))
        if len(self._shared) >= MAX_SHARED:  # bounded: callers come and go
            self._shared.clear()
        self._shared[key] = (now, body)
        return body

    def export(self, caller: Caller, transport: str = "rest") -> dict[str, Any]:
        """The de-identified aggregate a central dashboard may receive (monitor)."""
        rows = [row.to_dict() for row in self.dataplane.statistics(None, None, caller, transport)]
        return aggregate(
            rows,
            self.streams.status() if self.streams is not None else None,
            self.updates() if self.updates is not None else None,
            started=self.started,
            now=time.time(),
            k=self.monitoring.export_k,
            window_min=self.monitoring.export_window_min,
            server_version=__version__,
        )

    def _beds(self) -> list[dict[str, Any]]:
        """Each held bed with its latest score; the most urgent first."""
        if self.streams is None:
            return []
        latest = self.streams.scorer.latest
        out = []
        for bed, state in self.streams.beds.items():
            score = latest.get(bed)
            entry: dict[str, Any] = {"bed": bed, "updated": round(state.updated, 1)}
            if score is not None:
                entry.update(
                    news2=score.news2,
                    news2_risk=score.news2_risk,
                    qsofa=score.qsofa,
                    risk=score.risk,
                    source=score.source,
                    degraded=score.degraded,
                    scored_at=round(score.time, 1),
                )
            out.append(entry)
        out.sort(key=_urgency)
        return out

    def _alerts(self) -> list[dict[str, Any]]:
        if self.streams is None:
            return []
        recent = list(self.streams.bus.recent)[-self.monitoring.status_alerts :]
        return [alert.to_dict() for alert in reversed(recent)]

    def _streams(self) -> dict[str, Any] | None:
        if self.streams is None:
            return None
        status = self.streams.status()
        mllp, ecg, scoring = status.get("mllp") or {}, status["ecg"], status["scoring"]
        return {
            "beds": status["beds"],
            "hl7_accepted": mllp.get("accepted", 0),
            "hl7_refused": mllp.get("rejected", 0),
            "scored_by_model": scoring["scored_by_model"],
            "degraded_to_rules": scoring["degraded_to_rules"],
            "ecg_windows": ecg["windows"],
            "ecg_over_budget": ecg["over_budget"],
            "ecg_p99_ms": ecg["p99_ms"],
            "ecg_budget_ms": ecg["budget_ms"],
            "alerts_by_level": status["alerts"]["by_level"],
        }


def _urgency(bed: dict[str, Any]) -> tuple[int, str]:
    """Highest NEWS2 first, beds not scored yet last, then by label."""
    news2 = bed.get("news2")
    return (-int(news2) if news2 is not None else 1, str(bed["bed"]))
