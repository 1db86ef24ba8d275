"""Real-time 12-lead ECG, one session per bed: chunks of samples in, one rhythm result per window out.

A session knows nothing of the transport: the server's WebSocket hands it the bytes of each message
and sends back what it returns. Windows of 5 s every 1 s are classified by the rhythm model through
the dataplane (priority STAT); the model's input and labels come from its config (`[contract]`), so
a hospital's own rhythm model drops in without code changes. When the model cannot answer, the
heart rate from R-peak detection still goes out, flagged `source: rules`, `degraded: true`.

Wire format of a chunk: float32 little-endian millivolts, sample-interleaved, [n, 12], at 250 Hz.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bedside.alerts.bus import AlertBus
from bedside.alerts.policies import RhythmAlert
from bedside.clinical.ecg import FS, LEAD_II, LEADS, confirmed, r_peaks, rate_from_peaks, rr_irregularity
from bedside.dataplane import CallContext, Dataplane, ModelContract
from bedside.errors import BedsideError, Unavailable
from bedside.monitoring.latency import LatencyWindow
from bedside.protocol.types import InferRequest
from bedside.settings import DEFAULTS, ECGSettings

WINDOW = 5 * FS
HOP = FS
STAT = CallContext(tenant="streams", priority="stat", transport="ecg")


class ChunkError(ValueError):
    pass


def decode_chunk(data: bytes, max_seconds: float = DEFAULTS.ecg.max_chunk_s) -> np.ndarray:
    """[n, 12] samples of one chunk. A chunk is bounded in time: 700 s sent at once were classified
    back to back (695 windows) and held every other bed's window latency at 56 ms."""
    if len(data) > int(max_seconds * FS) * 4 * len(LEADS):
        raise ChunkError(
            f"a chunk holds {len(data) // (4 * len(LEADS)) / FS:g} s of ECG; at most {max_seconds:g} s "
            "(ecg.max_chunk_s): send the stream as it is recorded"
        )
    if len(data) == 0 or len(data) % (4 * len(LEADS)):
        raise ChunkError(
            f"a chunk must hold float32 samples for {len(LEADS)} leads "
            f"({4 * len(LEADS)} bytes per sample); got {len(data)} bytes"
        )
    chunk = np.frombuffer(data, dtype="<f4").reshape(-1, len(LEADS))
    if not np.isfinite(chunk).all():
        raise ChunkError("a chunk holds NaN or infinite samples")
    return chunk


class ECGWindows:
    """The last WINDOW samples of one bed; yields a window every HOP samples once it is full.
    Samples are appended into spare room and the tail moved to the front only when it runs out,
    so a chunk costs one copy of itself, not a shift of the whole window."""

    def __init__(self, window: int = WINDOW, hop: int = HOP, spare: int = 5 * HOP) -> None:
        self.window, self.hop = window, hop
        self.storage = np.zeros((len(LEADS), window + spare), dtype=np.float32)
        self.end = 0  # samples held: storage[:, :end]
        self.samples = 0
        self._next = window

    def push(self, chunk: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Append samples [n, 12]; windows end exactly every `hop` samples, whatever the chunking."""
        ready = []
        pos = 0
        capacity = self.storage.shape[1]
        while pos < len(chunk):
            take = min(len(chunk) - pos, self._next - self.samples, capacity - self.window)
            if self.end + take > capacity:
                keep = min(self.end, self.window)
                self.storage[:, :keep] = self.storage[:, self.end - keep : self.end]
                self.end = keep
            self.storage[:, self.end : self.end + take] = chunk[pos : pos + take].T
            self.end += take
            self.samples += take
            pos += take
            if self.samples == self._next:
                ready.append((self.samples, self.storage[:, self.end - self.window : self.end].copy()))
                self._next += self.hop
        return ready


@dataclass(slots=True)
class RhythmResult:
    bed: str
    sample_end: int
    heart_rate: float | None
    rr_irregularity: float | None
    rhythm: str | None = None
    probability: float | None = None
    confirmed: bool = False
    source: str = "rules"
    degraded: bool = True
    latency_ms: float | None = None
    within_budget: bool | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        # by hand, not dataclasses.asdict: this runs for every window and asdict deep-copies (11 -> 2 us)
        doc: dict[str, Any] = {
            "type": "ecg",
            "bed": self.bed,
            "sample_end": self.sample_end,
            "heart_rate": self.heart_rate,
            "rr_irregularity": self.rr_irregularity,
            "rhythm": self.rhythm,
            "source": self.source,
            "degraded": self.degraded,
        }
        if self.degraded:
            doc["reason"] = self.reason
        else:
            doc.update(
                probability=self.probability,
                confirmed=self.confirmed,
                latency_ms=self.latency_ms,
                within_budget=self.within_budget,
            )
        return doc


class ECGStats:
    """Windows classified and their window-to-score latency, across all beds."""

    def __init__(self) -> None:
        self.windows = 0
        self.over_budget = 0  # windows the model scored later than ecg.budget_ms
        self.degraded = 0  # windows without the model (heart rate from R peaks only)
        self.latency = LatencyWindow()

    def record(self, latency_ms: float | None, within_budget: bool | None = None) -> None:
        self.windows += 1
        if latency_ms is None:
            self.degraded += 1
        else:
            self.latency.record(int(latency_ms * 1e6))
            self.over_budget += within_budget is False


class ECGSession:
    """One bed's ECG stream."""

    def __init__(self, dataplane: Dataplane, settings: ECGSettings, bed: str, bus: AlertBus, stats: ECGStats) -> None:
        self.dataplane, self.settings, self.bed, self.bus, self.stats = dataplane, settings, bed, bus, stats
        self.windows = ECGWindows()
        self.policy = RhythmAlert(bed, settings.alert_probability)

    async def push(self, data: bytes) -> list[RhythmResult]:
        """Take one chunk; return a result for every window it completes. Raises ChunkError for a
        chunk that is not [n, 12] finite float32 samples (the session carries on)."""
        results = []
        for end, window in self.windows.push(decode_chunk(data, self.settings.max_chunk_s)):
            result = await self.classify(end, window)
            self.stats.record(result.latency_ms, result.within_budget)
            alert = self.policy.decide(
                result.rhythm, result.probability or 0.0, result.confirmed, result.source, time.time()
            )
            if alert is not None:
                self.bus.publish(alert)
            results.append(result)
        return results

    async def classify(self, end_sample: int, window: np.ndarray) -> RhythmResult:
        started = time.perf_counter()  # the window is complete: window -> score starts here
        peaks = r_peaks(window[LEAD_II])
        irregularity = rr_irregularity(peaks)
        rate = rate_from_peaks(peaks)
        result = RhythmResult(
            self.bed,
            end_sample,
            None if rate is None else round(rate, 1),
            None if irregularity is None else round(irregularity, 3),
        )
        model = self.settings.model
        try:
            contract = self.dataplane.contract(model)
            feed = _feed(contract, window)
            response = await self.dataplane.infer(model, None, InferRequest(feed), STAT)
            probabilities = _as_probabilities(np.asarray(response.outputs[contract.score_output])[0])
            latency = (time.perf_counter() - started) * 1e3
            top = int(np.argmax(probabilities))
            if top >= len(contract.labels):
                raise Unavailable(
                    f"model {model!r} gives {len(probabilities)} scores for {len(contract.labels)} labels"
                )
            rhythm = contract.labels[top]
            result.rhythm = rhythm
            result.probability = round(float(probabilities[top]), 4)
            result.confirmed = confirmed(rhythm, irregularity, self.settings.af_min_irregularity)
            result.source = f"{model} v{response.model_version}"
            result.degraded = False
            result.latency_ms = round(latency, 3)
            result.within_budget = latency <= self.settings.budget_ms
        except BedsideError as exc:
            result.reason = f"AI rhythm analysis unavailable: {exc.message}; heart rate from R-peak detection only"
        return result


def _feed(contract: ModelContract, window: np.ndarray) -> dict[str, np.ndarray]:
    """The window in the shape the model's contract asks for, or a clear reason why it cannot be."""
    spec = contract.input
    fits = len(spec.shape) == 3 and all(
        d in (-1, want) for d, want in zip(spec.shape, (1, len(LEADS), WINDOW), strict=True)
    )
    if spec.datatype != "FP32" or not fits:
        raise Unavailable(
            f"model {contract.name!r} input {spec.name!r} is {spec.datatype} {list(spec.shape)}; the ECG stream "
            f"feeds FP32 [1, {len(LEADS)}, {WINDOW}] windows"
        )
    if not contract.labels:
        raise Unavailable(f"model {contract.name!r} names no rhythm labels ([contract] labels in its config)")
    return {spec.name: window[None]}


def _as_probabilities(scores: np.ndarray) -> np.ndarray:
    """A rhythm model may end in softmax or give logits; alerts compare probabilities."""
    if scores.min() >= 0 and abs(float(scores.sum()) - 1.0) < 1e-3:
        return scores
    shifted = np.exp(scores - scores.max())
    return np.asarray(shifted / shifted.sum())
