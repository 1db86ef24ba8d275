"""The streams side of the server: the MLLP listener, per-bed state, periodic scoring, the alert
bus, and the HTTP routes that expose them (`/v2/beds`, `/v2/alerts`, `/v2/alerts/stream`)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bedside.alerts.bus import AlertBus
from bedside.alerts.hl7out import HL7AlertSender
from bedside.engine import Engine
from bedside.streams.beds import Beds
from bedside.streams.ecg import ChunkError, ECGWindows, classify, decode_chunk
from bedside.streams.ingest import IngestProcess
from bedside.streams.scorer import VitalsScorer

KEEPALIVE_S = 15.0
_BED = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _p99(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 99)), 3) if values else None


async def _send_json(send: Any, doc: dict[str, Any]) -> None:
    await send({"type": "websocket.send", "text": orjson.dumps(doc).decode()})


@dataclass
class StreamsConfig:
    mllp_host: str = "127.0.0.1"
    mllp_port: int | None = 2575  # None: no listener
    score_interval_s: float = 15.0
    vitals_model: str = "vitals_deterioration"
    ecg_model: str = "ecg_rhythm"
    alerts_hl7: tuple[str, int] | None = None  # send alerts as HL7 ORU^R01 over MLLP to (host, port)


class Streams:
    def __init__(self, engine: Engine, config: StreamsConfig | None = None) -> None:
        self.engine = engine
        self.config = config or StreamsConfig()
        self.beds = Beds()
        self.bus = AlertBus()
        self.scorer = VitalsScorer(engine, self.beds, self.bus, self.config.vitals_model, self.config.score_interval_s)
        self.mllp: IngestProcess | None = None
        self.hl7_out = HL7AlertSender(self.bus, *self.config.alerts_hl7) if self.config.alerts_hl7 else None
        self.ecg_results = 0
        self.ecg_latencies_ms: list[float] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.config.mllp_port is not None:
            self.mllp = IngestProcess(self.beds.add, self.config.mllp_host, self.config.mllp_port)
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
                "interval_s": self.config.score_interval_s,
                "cycles": self.scorer.cycles,
                "model": self.config.vitals_model,
                "model_p99_ms": _p99(self.scorer.latencies_ms),
            },
            "ecg": {"windows": self.ecg_results, "p99_ms": _p99(self.ecg_latencies_ms)},
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

    async def websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """/v2/streams/ecg/{bed}: binary chunks in, one JSON result per window out."""
        parts = scope["path"].strip("/").split("/")
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if len(parts) != 4 or parts[:3] != ["v2", "streams", "ecg"] or not _BED.fullmatch(parts[3]):
            await send(
                {
                    "type": "websocket.close",
                    "code": 1008,
                    "reason": "use /v2/streams/ecg/{bed}, bed: 1-64 of A-Z a-z 0-9 . _ -",
                }
            )
            return
        bed = parts[3]
        await send({"type": "websocket.accept"})
        windows = ECGWindows()
        last_rhythm = "normal_sinus"
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                await _send_json(send, {"type": "error", "error": "send binary float32 chunks [n, 12]"})
                continue
            try:
                chunk = decode_chunk(data)
            except ChunkError as exc:
                await _send_json(send, {"type": "error", "error": str(exc)})
                continue
            for end, window in windows.push(chunk):
                result = await classify(self.engine, self.config.ecg_model, bed, end, window)
                self.ecg_results += 1
                if result.get("latency_ms") is not None:
                    self.ecg_latencies_ms.append(result["latency_ms"])
                    del self.ecg_latencies_ms[:-4096]
                await _send_json(send, result)
                rhythm = result.get("rhythm")
                if (
                    rhythm
                    and rhythm != last_rhythm
                    and rhythm != "normal_sinus"
                    and result["probability"] >= 0.8
                    and result["confirmed"]  # AF only on irregular R-R intervals
                ):
                    self.bus.publish(
                        {
                            "type": "alert",
                            "bed": bed,
                            "time": time.time(),
                            "source": result["source"],
                            "degraded": False,
                            "level": 2,
                            "reason": f"ECG rhythm {rhythm} (p={result['probability']:.2f})",
                        }
                    )
                if rhythm and result["confirmed"]:
                    last_rhythm = rhythm

    async def sse(self, receive: Any, send: Any) -> None:
        """Server-Sent Events: every score and alert as it happens, until the client goes away."""
        queue = self.bus.subscribe()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b": bedside alert stream\n\n", "more_body": True})

        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":  # the (empty) request body comes first
                pass

        disconnected = asyncio.ensure_future(until_disconnect())
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, disconnected}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                )
                if disconnected in done:
                    getter.cancel()
                    return
                if getter in done:
                    event = getter.result()
                    body = b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
                else:
                    getter.cancel()
                    body = b": keep-alive\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError:
            return
        finally:
            self.bus.unsubscribe(queue)
            disconnected.cancel()
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
