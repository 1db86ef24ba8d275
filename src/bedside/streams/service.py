"""The bedside streams: the HL7 ingest process, per-bed state, periodic scoring, ECG sessions and
the alert bus, wired together. Protocol-free: the server exposes them over HTTP, SSE and
WebSocket; every model call goes through the dataplane."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from bedside.alerts.bus import AlertBus
from bedside.alerts.events import Event
from bedside.alerts.hl7out import HL7AlertSender
from bedside.dataplane import Dataplane
from bedside.errors import InvalidInput
from bedside.monitoring.latency import LatencyWindow
from bedside.settings import DEFAULTS, Settings, split_host_port
from bedside.streams.beds import Beds
from bedside.streams.ecg import ECGSession, ECGStats
from bedside.streams.ingest import IngestProcess
from bedside.streams.scorer import VitalsScorer

BED_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _p99(window: LatencyWindow) -> float | None:
    p99 = window.summary()["p99_ms"]
    return None if p99 is None else round(p99, 3)


class Streams:
    def __init__(self, dataplane: Dataplane, settings: Settings = DEFAULTS) -> None:
        self.dataplane = dataplane
        self.settings = settings
        self.beds = Beds(settings.streams.max_beds)
        self.bus = AlertBus(settings.alerts.subscriber_queue, settings.alerts.history)
        self.scorer = VitalsScorer(dataplane, self.beds, self.bus, settings.scoring)
        self.ecg = ECGStats()
        self.mllp: IngestProcess | None = None
        target = split_host_port(settings.alerts.hl7_target)  # checked when the settings were made
        self.hl7_out = (
            HL7AlertSender(self.bus, *target, outbox=settings.alerts.hl7_outbox) if target is not None else None
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the HL7 ingest, the alert sender and the scorer. OSError: the MLLP port is taken."""
        streams = self.settings.streams
        if streams.mllp_port >= 0:
            host = streams.mllp_host or self.settings.server.host
            self.mllp = IngestProcess(self.beds.add, host, streams.mllp_port, streams.ack_timeout_s)
            await self.mllp.start()
        if self.hl7_out is not None:
            self.hl7_out.start()
        self._tasks.append(asyncio.create_task(self.scorer.run()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.hl7_out is not None:
            await self.hl7_out.close()
        if self.mllp is not None:
            await self.mllp.close()

    def open_ecg(self, bed: str) -> ECGSession:
        """A session for one bed's ECG; InvalidInput for a bed name that cannot be one."""
        if not BED_PATTERN.fullmatch(bed):
            raise InvalidInput("bed must be 1-64 of A-Z a-z 0-9 . _ -")
        return ECGSession(self.dataplane, self.settings.ecg, bed, self.bus, self.ecg)

    def subscribe(self) -> asyncio.Queue[Event]:
        return self.bus.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.bus.unsubscribe(queue)

    def recent_alerts(self) -> list[dict[str, Any]]:
        return [alert.to_dict() for alert in self.bus.recent]

    def status(self) -> dict[str, Any]:
        return {
            "beds": len(self.beds),
            "mllp": None
            if self.mllp is None
            else {
                "port": self.mllp.port,
                "accepted": self.mllp.accepted,
                "rejected": self.mllp.rejected,
                "connections": self.mllp.connections,
                "open_connections": self.mllp.open_connections,
                "ingest_pid": self.mllp.pid,
                "ingest_restarts": self.mllp.restarts,
            },
            "scoring": {
                "interval_s": self.settings.scoring.interval_s,
                "cycles": self.scorer.cycles,
                "model": self.settings.scoring.model,
                "model_p99_ms": _p99(self.scorer.latency),
            },
            "ecg": {"windows": self.ecg.windows, "p99_ms": _p99(self.ecg.latency)},
            "alerts": {
                "published": self.bus.published,
                "dropped_by_slow_subscribers": self.bus.dropped,
                "hl7_out": None if self.hl7_out is None else self.hl7_out.status(),
            },
        }

    def beds_view(self) -> list[dict[str, Any]]:
        """Bed, latest NEWS2 inputs and level; no identifiers beyond the bed."""
        return [
            {"bed": bed, "updated": state.updated, "vitals": state.vitals(state.updated).__dict__}
            for bed, state in self.beds.items()
        ]
