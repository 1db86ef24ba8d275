"""SYNTHETIC vital-sign trajectories of ward patients, some of whom deteriorate, for a demonstration
deterioration model. No labelled in-hospital deterioration time series ships in any package here.

Stable patients vary around individual baselines (some chronically abnormal, e.g. on oxygen with a
low SpO2 target). Deteriorating patients drift from a random onset (some before the window opens,
so they are already abnormal), as in early sepsis or
respiratory failure: heart and respiratory rates rise, blood pressure and SpO2 fall, temperature
moves, and consciousness may decline late. Label 1 = deteriorating within the window.
"""

from __future__ import annotations

import numpy as np

from bedside.streams.features import vector


def trajectory(
    deteriorating: bool, rng: np.random.Generator, minutes: int = 60, every: int = 5
) -> tuple[dict[str, list[tuple[float, float]]], bool, bool]:
    t = np.arange(0, minutes * 60 + 1, every * 60, dtype=float)
    base = {
        "heart_rate": rng.normal(78, 12),
        "respiratory_rate": rng.normal(16, 2.5),
        "systolic_bp": rng.normal(125, 15),
        "diastolic_bp": rng.normal(75, 9),
        "spo2": min(100.0, rng.normal(96.5, 1.5)),
        "temperature": rng.normal(36.9, 0.35),
    }
    chronic_o2 = rng.random() < 0.12
    if chronic_o2:
        base["spo2"] = rng.normal(91, 1.5)
    severity = rng.uniform(0.05, 1.0) if deteriorating else 0.0
    # onsets before the window (negative) are patients already deteriorating when it opens
    onset = rng.uniform(-1.5, 0.9) * t[-1]
    drift = {
        "heart_rate": 35,
        "respiratory_rate": 10,
        "systolic_bp": -35,
        "diastolic_bp": -18,
        "spo2": -6,
        "temperature": rng.choice([1.8, -1.2]),
    }
    noise = {
        "heart_rate": 3,
        "respiratory_rate": 1.2,
        "systolic_bp": 5,
        "diastolic_bp": 4,
        "spo2": 0.8,
        "temperature": 0.1,
    }
    progress = np.clip((t - onset) / max(t[-1] - onset, 1), 0, 1) * severity
    if onset < 0:
        progress = np.clip((t - onset) / (t[-1] - 1.5 * onset), 0, 1) * severity * 1.3
    series: dict[str, list[tuple[float, float]]] = {}
    for vital, start in base.items():
        values = start + drift[vital] * progress + rng.normal(0, noise[vital], len(t))
        keep = rng.random(len(t)) > 0.15  # monitors drop readings
        series[vital] = [(float(a), float(b)) for a, b, k in zip(t, values, keep, strict=True) if k]
        if rng.random() < 0.05:
            series[vital] = []  # a vital sign not monitored at all
    on_oxygen = chronic_o2 or (deteriorating and severity > 0.7 and rng.random() < 0.5)
    alert = not (deteriorating and severity > 0.8 and rng.random() < 0.4)
    return series, on_oxygen, alert


def dataset(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Feature vectors at the end of each SYNTHETIC trajectory, and the deterioration label."""
    rng = np.random.default_rng(seed)
    y = (rng.random(count) < 0.3).astype(np.int64)
    rows = []
    for label in y:
        series, on_oxygen, alert = trajectory(bool(label), rng)
        rows.append(vector(series, on_oxygen, alert)[0])
    return np.stack(rows), y
