"""The bedside streams: the HL7 ingest process, per-bed state, periodic scoring, ECG sessions and
the alert bus, wired together. Protocol-free: the server exposes them over HTTP, SSE and
WebSocket; every model call goes through the dataplane."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

from bedside.alerts.bus import AlertBus
from bedside.alerts.events import Event
from bedside.alerts.hl7out import HL7AlertSender
from bedside.dataplane import Dataplane
from bedside.errors import InvalidInput
from bedside.monitoring.latency import LatencyWindow
from bedside.security.keys import KeyRing
from bedside.settings import DEFAULTS, Settings, split_host_port, state_dir
from bedside.streams.beds import Beds, states_from
from bedside.streams.ecg import ECGSession, ECGStats
from bedside.streams.identity import box_key
from bedside.streams.ingest import IngestProcess
from bedside.streams.journal import JOURNAL_FILE, Skipped, read_rows
from bedside.streams.scorer import VitalsScorer

BED_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _p99(window: LatencyWindow) -> float | None:
    p99 = window.summary()["p99_ms"]
    return None if p99 is None else round(p99, 3)


class Streams:
    def __init__(self, dataplane: Dataplane, settings: Settings = DEFAULTS, keys: KeyRing | None = None) -> None:
        self.dataplane = dataplane
        self.keys = keys  # opens the journal's sealed rows (security.key)
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
        self.restored: dict[str, Any] | None = None  # what the journal gave back at start

    async def start(self) -> None:
        """Restore the beds from the journal, start the HL7 ingest, the alert sender and the scorer.
        OSError: the MLLP port is taken, or the state folder cannot hold the box key or journal."""
        streams = self.settings.streams
        if streams.mllp_port >= 0:
            loop = asyncio.get_running_loop()
            folder = state_dir(streams.state_dir, os.environ)
            try:
                await loop.run_in_executor(None, box_key, folder)
            except OSError as exc:
                raise OSError(
                    f"the state folder (streams.state_dir) cannot hold this box's key: {exc.strerror or exc}"
                ) from None
            if streams.journal:
                await self._restore(folder)
            host = streams.mllp_host or self.settings.server.host
            self.mllp = IngestProcess(
                self.beds.add, host, settings=streams, state=folder, security=self.settings.security,
                log_format=self.settings.server.log_format,
            )  # fmt: skip
            await self.mllp.start()
        if self.hl7_out is not None:
            self.hl7_out.start()
        self._tasks.append(asyncio.create_task(self.scorer.run()))

    async def _restore(self, folder: Path) -> None:
        """The per-bed windows from the journal, before the ingest starts. Read and rebuilt in a
        worker thread (a full journal is millions of rows); only the hand-over runs on the loop."""
        since = time.time() - self.settings.streams.max_observation_age_s
        started = time.monotonic()
        skipped = Skipped()
        rows = read_rows(folder / JOURNAL_FILE, since, self.keys, skipped)
        states = await asyncio.get_running_loop().run_in_executor(None, states_from, rows)
        self.beds.restore(states)
        self.restored = {
            "beds": len(states),
            "seconds": round(time.monotonic() - started, 3),
            "skipped": skipped.rows,  # rows that did not open (damaged, or sealed with a key no longer held)
        }

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
        journal = self.settings.streams.journal and self.mllp is not None
        return {
            "beds": len(self.beds),
            "beds_evicted": self.beds.evicted,
            "mllp": None if self.mllp is None else self.mllp.status(),
            "journal": {"sync": self.settings.streams.journal_sync, "restored": self.restored} if journal else None,
            "scoring": {
                "interval_s": self.settings.scoring.interval_s,
                "cycles": self.scorer.cycles,
                "model": self.settings.scoring.model,
                "model_p99_ms": _p99(self.scorer.latency),
                "scored_by_model": self.scorer.scored["model"],
                "degraded_to_rules": self.scorer.scored["rules"],
            },
            "ecg": {
                "windows": self.ecg.windows,
                "p99_ms": _p99(self.ecg.latency),
                "budget_ms": self.settings.ecg.budget_ms,
                "over_budget": self.ecg.over_budget,
                "degraded": self.ecg.degraded,
            },
            "alerts": {
                "published": self.bus.published,
                "by_level": {str(level): n for level, n in sorted(self.bus.alerts_by_level.items())},
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
