"""Alerts out as HL7 ORU^R01 over MLLP: the message a receiver parses, delivery in order once the
receiver comes up, AR not retried, and a bounded outbox."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import hl7
from hl7.mllp import start_hl7_server

from bedside.alerts.bus import AlertBus
from bedside.alerts.events import Alert, VitalsScore
from bedside.alerts.hl7out import HL7AlertSender, alert_message
from tests.conftest import free_port

ALERT = Alert(
    bed="ICU-7-A",
    time=1_800_000_000.0,
    level=3,
    news2=9,
    qsofa=2,
    risk=0.83,
    source="vitals_deterioration v1",
    degraded=False,
    reason="NEWS2 9 (high): RR 27 | SpO2 90 ^ on O2 & febrile",
)
SCORE = VitalsScore("X", 0.0, 1, "low", True, 0, False, None, "rules", True)


def obx(message: hl7.Message) -> dict[str, str]:
    return {str(s[3][0][0]): message.unescape(str(s[5])) for s in message.segments("OBX")}


def test_an_alert_becomes_an_oru_a_receiver_can_parse():
    message = hl7.parse(alert_message(ALERT, "BS1", "WARD-EAST"))
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(message.segment("MSH")[10]) == "BS1"
    assert str(message.segment("PV1")[3]) == "ICU-7-A"
    values = obx(message)
    assert values == {
        "ALERT_LEVEL": "3",
        "NEWS2": "9",
        "QSOFA": "2",
        "MODEL_RISK": "0.83",
        "SOURCE": "vitals_deterioration v1",
        "AI_DEGRADED": "N",
        "REASON": ALERT.reason,  # separators in the text are escaped, and come back whole
    }
    assert str(message.segment("PID")) == "PID|1"  # no patient identifier leaves the box
    ecg = obx(hl7.parse(alert_message(Alert("B1", 0.0, 2, "ecg_rhythm v1", "AF"), "BS2")))
    assert "NEWS2" not in ecg and ecg["REASON"] == "AF" and ecg["ALERT_LEVEL"] == "2"


async def _wait(condition, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_alerts_wait_for_the_receiver_and_arrive_in_order_once_each():
    received: list[hl7.Message] = []
    answers = iter(["AA", "AR", "AA", "AA"])

    async def receiver(reader, writer) -> None:
        try:
            while True:
                message = await reader.readmessage()
                received.append(message)
                control = str(message.segment("MSH")[10])
                writer.writemessage(
                    hl7.parse(f"MSH|^~\\&|RX|||||20261123||ACK|A{control}|P|2.5\rMSA|{next(answers)}|{control}")
                )
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass

    async def main() -> tuple[HL7AlertSender, list[str]]:
        port = free_port()
        bus = AlertBus()
        sender = HL7AlertSender(bus, "127.0.0.1", port)
        sender.start()
        await asyncio.sleep(0)
        bus.publish(SCORE)  # scores are not alerts: not sent
        for i in range(3):
            bus.publish(replace(ALERT, bed=f"ICU-{i}"))
        await _wait(lambda: "cannot connect" in sender.last_error)  # nobody listening yet: kept, not lost
        assert sender.status()["pending"] == 3
        server = await start_hl7_server(receiver, "127.0.0.1", port, encoding="utf-8")
        await _wait(lambda: sender.sent + sender.rejected == 3)
        bus.publish(replace(ALERT, bed="ICU-9"))
        await _wait(lambda: sender.sent == 3)
        status = sender.status()
        await sender.close()
        server.close()
        return sender, [str(m.segment("PV1")[3]) for m in received], status

    sender, beds, status = asyncio.run(main())
    assert beds == ["ICU-0", "ICU-1", "ICU-2", "ICU-9"]  # in order; the AR'd one (ICU-1) not resent
    assert sender.sent == 3 and sender.rejected == 1 and status["pending"] == 0 and status["connected"]


def test_a_full_outbox_drops_the_oldest_and_counts_it():
    async def main() -> HL7AlertSender:
        sender = HL7AlertSender(AlertBus(), "127.0.0.1", free_port(), outbox=2)
        for i in range(5):
            sender.enqueue(replace(ALERT, bed=f"B{i}"))
        return sender

    sender = asyncio.run(main())
    assert [a.bed for a in sender.outbox] == ["B3", "B4"] and sender.dropped == 3
