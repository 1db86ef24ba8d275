"""Score every bed on a fixed cadence: NEWS2 and qSOFA always, the deterioration model when it can
be trusted. Model requests go through the dataplane like any other caller (priority: urgent), and
the model's score output and positive class come from its config (`[contract]`).

A failing model never blocks alerts: when the model is missing, unloaded, overloaded, too slow or
its input too incomplete, the bed is scored by the rules alone, the event says `source: rules` and
`degraded: true`, and the reason tells clinicians that AI assistance is reduced.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from bedside.alerts.bus import AlertBus
from bedside.alerts.events import VitalsScore
from bedside.alerts.policies import VitalsEscalation
from bedside.alerts.rules import Vitals, news2, qsofa
from bedside.clinical.features import WIDTH
from bedside.dataplane import CallContext, Dataplane
from bedside.errors import BedsideError
from bedside.monitoring.latency import LatencyWindow
from bedside.protocol.types import InferRequest
from bedside.settings import DEFAULTS, ScoringSettings
from bedside.streams.beds import Beds

log = logging.getLogger("bedside.streams")
SLICE = 16  # beds handled between two yields of the event loop


class VitalsScorer:
    def __init__(
        self, dataplane: Dataplane, beds: Beds, bus: AlertBus, settings: ScoringSettings = DEFAULTS.scoring
    ) -> None:
        self.dataplane, self.beds, self.bus, self.settings = dataplane, beds, bus, settings
        self.policy = VitalsEscalation(settings.risk_threshold)
        self.context = CallContext(
            tenant="streams", priority="urgent", timeout_us=int(settings.timeout_ms * 1000), transport="scorer"
        )
        self.cycles = 0
        self.latency = LatencyWindow()  # one batched model call per cycle
        self.scored = {"model": 0, "rules": 0}  # bed scorings by the model, and degraded to the rules
        self.latest: dict[str, VitalsScore] = {}  # each held bed's last score, for the status page

    async def run(self) -> None:
        # The first cycle waits (at most one interval) for the repository to finish loading, so
        # beds restored from the journal are not reported "AI assistance degraded" on every
        # normal start; if loading is slower than that, the rules score them meanwhile.
        deadline = time.monotonic() + self.settings.interval_s
        while not self.dataplane.ready() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        while True:
            started = time.monotonic()
            try:
                await self.score_all()
            except Exception:  # one bad cycle must not end scoring for every bed
                log.exception("scoring cycle failed")
            await asyncio.sleep(max(0.0, self.settings.interval_s - (time.monotonic() - started)))

    async def score_all(self, now: float | None = None) -> list[VitalsScore]:
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
        held = {snap[0] for snap in snapshots}
        self.policy.forget(held)
        for bed in [b for b in self.latest if b not in held]:  # as bounded as the beds are
            del self.latest[bed]
        minimum = self.settings.min_completeness
        usable = [k for k, snap in enumerate(snapshots) if snap[3] >= minimum]
        risks, source, model_problem = await self._model_risks([snapshots[k][2] for k in usable])
        risk_of = dict(zip(usable, risks, strict=True)) if risks is not None else {}
        events = []
        for k, (bed, vitals, _, completeness) in enumerate(snapshots):
            if k in risk_of:
                problem = ""
            elif completeness < minimum:
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
        model, timeout_s = self.settings.model, self.settings.timeout_ms / 1e3
        started = time.perf_counter()
        try:
            contract = self.dataplane.contract(model)
            spec = contract.input
            if spec.datatype != "FP32" or spec.shape[1:] not in ((WIDTH,), (-1,)):
                return (
                    None,
                    "rules",
                    (
                        f"model {model!r} input {spec.name!r} is {spec.datatype} {list(spec.shape)}; "
                        f"the scorer feeds FP32 [batch, {WIDTH}] vital-sign features"
                    ),
                )
            column = contract.positive_index()
            step = contract.max_batch_size or 1
            risks: list[float] = []
            version = contract.version
            for i in range(0, len(vectors), step):
                batch = np.stack(vectors[i : i + step])
                request = InferRequest({spec.name: batch})
                response = await asyncio.wait_for(self.dataplane.infer(model, None, request, self.context), timeout_s)
                version = response.model_version
                risks += np.asarray(response.outputs[contract.score_output])[:, column].astype(float).tolist()
            self.latency.record(int((time.perf_counter() - started) * 1e9))
            return risks, f"{model} v{version}", ""
        except TimeoutError:
            return None, "rules", f"model {model!r} did not answer within {timeout_s * 1e3:.0f} ms"
        except BedsideError as exc:
            return None, "rules", exc.message
        except Exception as exc:  # whatever the model does, the rules still alert
            return None, "rules", f"model failed: {type(exc).__name__}"

    def _publish(
        self, bed: str, now: float, vitals: Vitals, risk: float | None, source: str, problem: str
    ) -> VitalsScore:
        early_warning, sepsis = news2(vitals), qsofa(vitals)
        score = VitalsScore(
            bed=bed,
            time=now,
            news2=early_warning.score,
            news2_risk=early_warning.risk,
            news2_complete=early_warning.complete,
            qsofa=sepsis.score,
            qsofa_positive=sepsis.positive,
            risk=None if risk is None else round(risk, 4),
            source=source,
            degraded=bool(problem),
            reason=f"AI assistance degraded: {problem}; scored by NEWS2/qSOFA rules" if problem else "",
        )
        self.scored["rules" if problem else "model"] += 1
        self.latest[bed] = score
        self.bus.publish(score)
        alert = self.policy.decide(score, early_warning.reason(), sepsis.criteria)
        if alert is not None:
            self.bus.publish(alert)
        return score
