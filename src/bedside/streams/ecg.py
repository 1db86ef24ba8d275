"""Real-time 12-lead ECG: samples arrive in chunks, sliding windows are classified by the rhythm
model through the scheduler, and each result carries its latency against the 4 ms budget.

Wire format of a chunk (WebSocket binary message): float32 little-endian millivolts, sample-
interleaved, shape [n, 12] in the order I, II, III, aVR, aVL, aVF, V1-V6, at 250 Hz.
When the model cannot answer, the heart rate from R-peak detection on lead II still goes out,
flagged `source: rules`, `degraded: true`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bedside.engine import Engine
from bedside.errors import BedsideError
from bedside.protocol.types import InferRequest
from bedside.synthetic.ecg import FS, LEADS, RHYTHMS

WINDOW = 5 * FS
HOP = FS
BUDGET_MS = 4.0
AF_MIN_IRREGULARITY = 0.08
LEAD_II = LEADS.index("II")


class ChunkError(ValueError):
    pass


def decode_chunk(data: bytes) -> np.ndarray:
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


def r_peaks(lead: np.ndarray, fs: int = FS) -> list[int]:
    """R-peak sample positions: slope energy over 120 ms, adaptive threshold, 250 ms refractory."""
    slope = np.diff(lead.astype(np.float64)) ** 2
    width = int(0.12 * fs)
    summed = np.cumsum(slope)
    energy = np.empty(len(summed) - width + 1)  # 120 ms moving sum (a constant shift, same intervals)
    energy[0] = summed[width - 1]
    energy[1:] = summed[width:] - summed[:-width]
    top = int(0.99 * (len(energy) - 1))
    threshold = 0.3 * np.partition(energy, top)[top]  # the 99th percentile, without a full sort
    middle = energy[1:-1]
    candidates = np.flatnonzero((middle > threshold) & (middle >= energy[:-2]) & (middle >= energy[2:])) + 1
    peaks, last = [], -fs
    for i in candidates.tolist():  # a few dozen local maxima, not every sample
        if i - last > 0.25 * fs:
            peaks.append(i)
            last = i
    return peaks


def rate_from_peaks(peaks: list[int], fs: int = FS) -> float | None:
    """Beats per minute from the median R-R interval."""
    return float(60.0 * fs / np.median(np.diff(peaks))) if len(peaks) >= 2 else None


def heart_rate(lead: np.ndarray, fs: int = FS) -> float | None:
    return rate_from_peaks(r_peaks(lead, fs), fs)


def rr_irregularity(peaks: list[int]) -> float | None:
    """Coefficient of variation of the R-R intervals (sinus rhythm ~0.02-0.05, atrial fibrillation
    mostly above 0.1); None with fewer than three intervals to judge by."""
    if len(peaks) < 4:
        return None
    intervals = np.diff(peaks)
    return float(intervals.std() / intervals.mean())


def confirmed(rhythm: str | None, irregularity: float | None) -> bool:
    """Whether the R-R intervals bear the rhythm out. Atrial fibrillation is irregularly irregular by
    definition: a model calling it on regular beats is not raised as an alert (the result still says
    what the model saw). Other rhythms are taken as the model gives them."""
    if rhythm != "atrial_fibrillation":
        return True
    return irregularity is not None and irregularity >= AF_MIN_IRREGULARITY


def _as_probabilities(scores: np.ndarray) -> np.ndarray:
    """A rhythm model may end in softmax or give logits; alerts compare probabilities."""
    if scores.min() >= 0 and abs(float(scores.sum()) - 1.0) < 1e-3:
        return scores
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


async def classify(engine: Engine, model: str, bed: str, end_sample: int, window: np.ndarray) -> dict[str, Any]:
    started = time.perf_counter()  # the window is complete: window -> score starts here
    result: dict[str, Any] = {"type": "ecg", "bed": bed, "sample_end": end_sample, "heart_rate": None}
    peaks = r_peaks(window[LEAD_II])
    irregularity = rr_irregularity(peaks)
    rate = rate_from_peaks(peaks)
    result["heart_rate"] = None if rate is None else round(rate, 1)
    result["rr_irregularity"] = None if irregularity is None else round(irregularity, 3)
    try:
        queue = engine.route(model, None)
        response = await engine.infer(queue, InferRequest({"ecg": window[None]}, priority="stat", tenant="streams"))
        scores = np.asarray(next(iter(response.outputs.values())))[0]
        probabilities = _as_probabilities(scores)
        latency = (time.perf_counter() - started) * 1e3
        top = int(np.argmax(probabilities))
        rhythm = RHYTHMS[top] if top < len(RHYTHMS) else str(top)
        result.update(
            rhythm=rhythm,
            probability=round(float(probabilities[top]), 4),
            confirmed=confirmed(rhythm, irregularity),
            source=f"{model} v{response.model_version}",
            degraded=False,
            latency_ms=round(latency, 3),
            within_budget=latency <= BUDGET_MS,
        )
    except BedsideError as exc:
        result.update(
            rhythm=None,
            source="rules",
            degraded=True,
            reason=f"AI rhythm analysis unavailable: {exc.message}; heart rate from R-peak detection only",
        )
    return result
