"""SYNTHETIC vital-sign courses of ward patients, some of whom deteriorate: the one generator behind
the demonstration deterioration model's training set (`dataset`) and the vital signs that
`bedside replay` sends as HL7 (bedside.tools.replay). No labelled in-hospital deterioration time
series ships in any package here.

Stable patients vary around individual baselines (some chronically abnormal, e.g. on oxygen with a
low SpO2 target). Deteriorating patients drift from an onset (by default random, some before the
window opens, so they are already abnormal), as in early sepsis or respiratory failure: heart and
respiratory rates rise, blood pressure and SpO2 fall, temperature moves, some are put on oxygen
and consciousness may decline late. Monitors drop readings, and some vital signs are not monitored
at all. Label 1 = deteriorating within the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bedside.clinical.features import vector

WINDOW_S = np.arange(0, 60 * 60 + 1, 5 * 60, dtype=float)  # the training window: one hour, every 5 minutes
# change at full deterioration (temperature: a fever or hypothermia, drawn per patient)
DRIFT = {"heart_rate": 35, "respiratory_rate": 10, "systolic_bp": -35, "diastolic_bp": -18, "spo2": -6}
NOISE = {
    "heart_rate": 3,
    "respiratory_rate": 1.2,
    "systolic_bp": 5,
    "diastolic_bp": 4,
    "spo2": 0.8,
    "temperature": 0.1,
}
DROPPED = 0.15  # share of readings a monitor drops
UNMONITORED = 0.05  # share of vital signs not monitored at all
OXYGEN_FROM = 0.5  # deterioration progress at which a patient who needs it is put on oxygen
CONFUSED_FROM = 0.8  # progress at which a patient whose consciousness declines stops being alert


@dataclass(frozen=True)
class Course:
    """One SYNTHETIC patient over `times` (seconds from the start of the window)."""

    times: np.ndarray
    readings: dict[str, list[tuple[float, float]]]  # (time, value) per vital sign; dropped ones left out
    on_oxygen: np.ndarray  # bool per time
    alert: np.ndarray  # bool per time: ACVPU "A", otherwise new confusion or worse
    deteriorating: bool
    severity: float  # 0 for a stable patient; the share of the full deterioration reached


def course(
    rng: np.random.Generator,
    times: Sequence[float] | np.ndarray = WINDOW_S,
    deteriorating: bool = False,
    *,
    severity: float | None = None,
    onset: float | None = None,
) -> Course:
    """A patient's vital signs at `times`. `severity` (0-1) and `onset` (a share of the window;
    negative: before it opens) are drawn at random unless given."""
    t = np.asarray(times, dtype=float)
    base = {
        "heart_rate": rng.normal(78, 12),
        "respiratory_rate": rng.normal(16, 2.5),
        "systolic_bp": rng.normal(125, 15),
        "diastolic_bp": rng.normal(75, 9),
        "spo2": min(100.0, rng.normal(96.5, 1.5)),
        "temperature": rng.normal(36.9, 0.35),
    }
    chronic_o2 = bool(rng.random() < 0.12)
    if chronic_o2:
        base["spo2"] = rng.normal(91, 1.5)
    if not deteriorating:
        severity = 0.0
    elif severity is None:
        severity = float(rng.uniform(0.05, 1.0))
    start = (rng.uniform(-1.5, 0.9) if onset is None else onset) * t[-1]
    drift = dict(DRIFT, temperature=rng.choice([1.8, -1.2]))
    progress = np.clip((t - start) / max(t[-1] - start, 1), 0, 1) * severity
    if start < 0:
        progress = np.clip((t - start) / (t[-1] - 1.5 * start), 0, 1) * severity * 1.3
    readings: dict[str, list[tuple[float, float]]] = {}
    for vital, level in base.items():
        values = level + drift[vital] * progress + rng.normal(0, NOISE[vital], len(t))
        keep = rng.random(len(t)) > DROPPED
        readings[vital] = [(float(a), float(b)) for a, b, k in zip(t, values, keep, strict=True) if k]
        if rng.random() < UNMONITORED:
            readings[vital] = []
    # (the order of the draws below keeps the training set as it always was)
    needs_oxygen = not chronic_o2 and deteriorating and severity > 0.7 and rng.random() < 0.5
    confused = deteriorating and severity > 0.8 and rng.random() < 0.4
    return Course(
        times=t,
        readings=readings,
        on_oxygen=chronic_o2 | (needs_oxygen & (progress >= OXYGEN_FROM)),
        alert=~(confused & (progress > CONFUSED_FROM)),
        deteriorating=deteriorating,
        severity=severity,
    )


def dataset(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Feature vectors at the end of each SYNTHETIC hour-long course, and the deterioration label."""
    rng = np.random.default_rng(seed)
    y = (rng.random(count) < 0.3).astype(np.int64)
    rows = []
    for label in y:
        patient = course(rng, WINDOW_S, bool(label))
        rows.append(vector(patient.readings, bool(patient.on_oxygen[-1]), bool(patient.alert[-1]))[0])
    return np.stack(rows), y
