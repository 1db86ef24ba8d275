"""Alerts out as HL7v2 ORU^R01 over MLLP, to a nurse-call system, alarm manager or interface engine.

Every alert on the bus becomes one message: PV1-3 carries the bed (never a patient identifier), OBR
names the alert, and OBX rows carry its level, NEWS2, qSOFA, model risk, source, the degraded flag
and the reason. Delivery is at least once and in order: an alert stays in a bounded outbox until
the receiver answers AA/CA; while it is unreachable the sender reconnects with backoff, and only
when the outbox is full does the oldest alert give way (counted and logged). AR (rejected) is not
retried; AE is retried a few times. The serving path never waits on any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from typing import Any

import hl7
from hl7.mllp import open_hl7_connection

from bedside.alerts.bus import AlertBus
from bedside.alerts.events import Alert
from bedside.settings import DEFAULTS

log = logging.getLogger("bedside.alerts.hl7")
ACK_TIMEOUT_S = 10.0
BACKOFF_S = (0.5, 30.0)
APPLICATION_ERROR_TRIES = 3
_ESCAPER = hl7.parse("MSH|^~\\&|BEDSIDE\rPID|1")  # the library's escaping, with the standard separators


def _stamp(when: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(when))


def _text(value: Any) -> str:
    return _ESCAPER.escape(str(value).replace("\r", " ").replace("\n", " "))


def alert_message(alert: Alert, control_id: str, facility: str = "") -> str:
    """The ORU^R01 for one alert (segments separated by CR, as HL7 wants)."""
    stamp = _stamp(alert.time or time.time())
    rows: list[tuple[str, str, str, Any]] = [("NM", "ALERT_LEVEL", "bedside alert level 0-3", alert.level)]
    for value, code, name in (
        (alert.news2, "NEWS2", "NEWS2 total score"),
        (alert.qsofa, "QSOFA", "qSOFA score"),
        (alert.risk, "MODEL_RISK", "model risk probability"),
    ):
        if value is not None:
            rows.append(("NM", code, name, value))
    rows += [
        ("ST", "SOURCE", "score source", alert.source),
        ("ST", "AI_DEGRADED", "AI assistance degraded", "Y" if alert.degraded else "N"),
        ("TX", "REASON", "alert reason", alert.reason),
    ]
    segments = [
        f"MSH|^~\\&|BEDSIDE|{_text(facility)}|||{_stamp(time.time())}||ORU^R01^ORU_R01|{control_id}|P|2.5",
        "PID|1",
        f"PV1|1|I|{_text(alert.bed)}",
        f"OBR|1|||BEDSIDE_ALERT^bedside alert^L|||{stamp}",
    ]
    for i, (kind, code, name, value) in enumerate(rows, 1):
        flag = "A" if code == "ALERT_LEVEL" and (value or 0) >= 2 else ""
        segments.append(f"OBX|{i}|{kind}|{code}^{name}^L||{_text(value)}||||{flag}||F|||{stamp}")
    return "\r".join(segments) + "\r"


class HL7AlertSender:
    def __init__(
        self, bus: AlertBus, host: str, port: int, facility: str = "", outbox: int = DEFAULTS.alerts.hl7_outbox
    ) -> None:
        self.bus, self.host, self.port, self.facility = bus, host, port, facility
        self.outbox: deque[Alert] = deque()
        self.capacity = outbox
        self.sent = self.rejected = self.dropped = 0
        self.connected = False
        self.last_error = ""
        self._ready = asyncio.Event()
        self._controls = itertools.count(1)
        self._backoff = BACKOFF_S[0]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        queue = self.bus.subscribe()
        self._tasks = [asyncio.create_task(self._collect(queue)), asyncio.create_task(self._deliver())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self) -> dict[str, Any]:
        return {
            "target": f"{self.host}:{self.port}",
            "connected": self.connected,
            "sent": self.sent,
            "pending": len(self.outbox),
            "rejected_by_receiver": self.rejected,
            "dropped_outbox_full": self.dropped,
            "last_error": self.last_error,
        }

    def enqueue(self, alert: Alert) -> None:
        if len(self.outbox) >= self.capacity:
            self.outbox.popleft()
            self.dropped += 1
            log.warning("HL7 alert outbox full (%d): the oldest undelivered alert was dropped", self.capacity)
        self.outbox.append(alert)
        self._ready.set()

    async def _collect(self, queue: asyncio.Queue[Any]) -> None:
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Alert):
                    self.enqueue(event)
        finally:
            self.bus.unsubscribe(queue)

    async def _deliver(self) -> None:
        while True:
            await self._ready.wait()
            try:
                reader, writer = await open_hl7_connection(self.host, self.port, encoding="utf-8")
            except OSError as exc:
                self._failed(f"cannot connect: {exc.strerror or exc}")
            else:
                self.connected = True
                try:
                    await self._drain(reader, writer)
                except Exception as exc:  # a broken link or a garbled answer: reconnect and resend, never stop
                    self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                finally:
                    self.connected = False
                    writer.close()
            await asyncio.sleep(self._backoff)
            self._backoff = min(2 * self._backoff, BACKOFF_S[1])

    async def _drain(self, reader: Any, writer: Any) -> None:
        """Send the outbox head first, one at a time, each waiting for its ACK; keep the connection."""
        tries = 0
        while True:
            if not self.outbox:
                self._ready.clear()
                await self._ready.wait()
            alert = self.outbox[0]
            control = f"BS{next(self._controls)}"
            writer.writemessage(hl7.parse(alert_message(alert, control, self.facility)))
            await writer.drain()
            answer = await asyncio.wait_for(reader.readmessage(), ACK_TIMEOUT_S)
            code = str(answer.segment("MSA")[1]).strip() if _has(answer, "MSA") else ""
            if code in ("AA", "CA"):
                self.outbox.popleft()
                self.sent, tries = self.sent + 1, 0
                self._backoff = BACKOFF_S[0]
            elif code in ("AR", "CR") or tries + 1 >= APPLICATION_ERROR_TRIES:  # AE / no MSA: a few tries
                self.outbox.popleft()
                self.rejected, tries = self.rejected + 1, 0
                log.error("receiver refused alert for bed %s: %s", alert.bed, str(answer).replace("\r", " | "))
            else:
                tries += 1
                self._failed(f"receiver answered {code or 'without MSA'}; retrying")
                await asyncio.sleep(BACKOFF_S[0])

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("HL7 alert delivery to %s:%d: %s", self.host, self.port, reason)
        self.last_error = reason


def _has(message: hl7.Message, segment: str) -> bool:
    try:
        message.segment(segment)
    except KeyError:
        return False
    return True
