"""Score every bed on a fixed cadence: NEWS2 and qSOFA always, the deterioration model when it can
be trusted. Model requests go through the same scheduler as HTTP traffic (priority: urgent).

A failing model never blocks alerts: when the model is missing, unloaded, overloaded, too slow or
its input too incomplete, the bed is scored by the rules alone, the event says `source: rules` and
`degraded: true`, and the reason tells clinicians that AI assistance is reduced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from bedside.alerts.bus import AlertBus
from bedside.alerts.rules import Vitals, news2, qsofa
from bedside.engine import Engine
from bedside.errors import BedsideError
from bedside.protocol.types import InferRequest
from bedside.streams.beds import Beds

log = logging.getLogger("bedside.streams")
LEVELS = {"low": 0, "low-medium": 1, "medium": 2, "high": 3}
SLICE = 16  # beds handled between two yields of the event loop


class VitalsScorer:
    def __init__(
        self,
        engine: Engine,
        beds: Beds,
        bus: AlertBus,
        model: str = "vitals_deterioration",
        interval_s: float = 15.0,
        timeout_s: float = 0.5,
        threshold: float = 0.5,
        min_completeness: float = 0.5,
    ) -> None:
        self.engine, self.beds, self.bus = engine, beds, bus
        self.model, self.interval_s, self.timeout_s = model, interval_s, timeout_s
        self.threshold, self.min_completeness = threshold, min_completeness
        self.last_level: dict[str, tuple[int, str, bool]] = {}
        self.cycles = 0
        self.latencies_ms: list[float] = []

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.score_all()
            except Exception:  # one bad cycle must not end scoring for every bed
                log.exception("scoring cycle failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def score_all(self, now: float | None = None) -> list[dict[str, Any]]:
        """One cycle: snapshot every bed, one batched model request for all of them, then rules and
        alerts per bed. The loop is yielded every SLICE beds, so a ward-wide cycle never stalls the
        ECG and HL7 streams that share it."""
        now = time.time() if now is None else now
        self.beds.prune(now)
        self.cycles += 1
        snapshots = []
        for i, (bed, state) in enumerate(self.beds.items()):
            vector, completeness = state.features(now)
            snapshots.append((bed, state.vitals(now), vector, completeness))
            if i % SLICE == SLICE - 1:
                await asyncio.sleep(0)
        usable = [k for k, snap in enumerate(snapshots) if snap[3] >= self.min_completeness]
        risks, source, model_problem = await self._model_risks([snapshots[k][2] for k in usable])
        risk_of = dict(zip(usable, risks, strict=True)) if risks is not None else {}
        events = []
        for k, (bed, vitals, _, completeness) in enumerate(snapshots):
            if k in risk_of:
                problem = ""
            elif completeness < self.min_completeness:
                problem = f"vital signs too incomplete for the model ({completeness:.0%} present)"
            else:
                problem = model_problem
            events.append(self._publish(bed, now, vitals, risk_of.get(k), source if k in risk_of else "rules", problem))
            if k % SLICE == SLICE - 1:
                await asyncio.sleep(0)
        return events

    async def _model_risks(self, vectors: list[np.ndarray]) -> tuple[list[float] | None, str, str]:
        """Risk per vector from one batched request (split at the model's max batch size)."""
        if not vectors:
            return [], "rules", ""
        started = time.perf_counter()
        try:
            queue = self.engine.route(self.model, None)
            step = queue.model.config.max_batch_size or 1
            risks: list[float] = []
            version = ""
            for i in range(0, len(vectors), step):
                batch = np.stack(vectors[i : i + step]) if queue.model.config.max_batch_size else vectors[i][None, :]
                request = InferRequest(
                    {"features": batch}, priority="urgent", tenant="streams", timeout_us=int(self.timeout_s * 1e6)
                )
                response = await asyncio.wait_for(self.engine.infer(queue, request), self.timeout_s)
                risks += np.asarray(response.outputs["probabilities"])[:, -1].astype(float).tolist()
                version = response.model_version
            self.latencies_ms.append((time.perf_counter() - started) * 1e3)
            del self.latencies_ms[:-4096]
            return risks, f"{self.model} v{version}", ""
        except TimeoutError:
            return None, "rules", f"model {self.model!r} did not answer within {self.timeout_s * 1e3:.0f} ms"
        except BedsideError as exc:
            return None, "rules", exc.message
        except Exception as exc:  # whatever the model does, the rules still alert
            return None, "rules", f"model failed: {type(exc).__name__}"

    def _publish(
        self, bed: str, now: float, vitals: Vitals, risk: float | None, source: str, problem: str
    ) -> dict[str, Any]:
        early_warning, sepsis = news2(vitals), qsofa(vitals)
        event: dict[str, Any] = {
            "type": "score",
            "bed": bed,
            "time": now,
            "news2": early_warning.score,
            "news2_risk": early_warning.risk,
            "news2_complete": early_warning.complete,
            "qsofa": sepsis.score,
            "qsofa_positive": sepsis.positive,
            "risk": None if risk is None else round(risk, 4),
            "source": source,
            "degraded": bool(problem),
        }
        if problem:
            event["reason"] = f"AI assistance degraded: {problem}; scored by NEWS2/qSOFA rules"
        self.bus.publish(event)
        self._maybe_alert(bed, now, event, early_warning.reason(), sepsis.criteria)
        return event

    def _maybe_alert(
        self, bed: str, now: float, event: dict[str, Any], news_reason: str, sepsis: tuple[str, ...]
    ) -> None:
        """Raise an alert when a bed's level rises, or what drives it changes (model, rules, degraded);
        not again every cycle. The rules always count: a model may add alerts, never silence NEWS2."""
        rules_level = max(LEVELS[event["news2_risk"]], 2 if event["qsofa_positive"] else 0)
        rules_reason = news_reason + (f"; qSOFA positive ({', '.join(sepsis)})" if event["qsofa_positive"] else "")
        model_level = 3 if event["risk"] is not None and event["risk"] >= self.threshold else 0
        level = max(rules_level, model_level)
        if model_level and model_level >= rules_level:
            source, reason = (
                event["source"],
                f"model risk {event['risk']:.2f} (threshold {self.threshold}); {rules_reason}",
            )
        else:
            source, reason = "rules", rules_reason
        key = (level, source, event["degraded"])
        previous = self.last_level.get(bed)
        self.last_level[bed] = key
        if level == 0 or (previous is not None and level <= previous[0] and previous[1:] == key[1:]):
            return
        alert = {k: event[k] for k in ("bed", "time", "risk", "news2", "qsofa", "degraded")}
        text = f"{event['reason']}. {reason}" if event.get("reason") else reason
        alert.update(type="alert", level=level, source=source, reason=text)
        self.bus.publish(alert)
