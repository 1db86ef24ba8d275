"""The per-bed feature vector a vitals model sees: for each vital sign its last value (imputed with a
normal value when missing), its trend per hour over the window, and a missing flag; then oxygen
and consciousness. One definition for training and for scoring, so they cannot drift apart."""

from __future__ import annotations

import numpy as np

NUMERIC = ("heart_rate", "respiratory_rate", "systolic_bp", "diastolic_bp", "spo2", "temperature")
NORMAL = {
    "heart_rate": 75.0,
    "respiratory_rate": 16.0,
    "systolic_bp": 120.0,
    "diastolic_bp": 75.0,
    "spo2": 97.0,
    "temperature": 37.0,
}
NAMES = (*tuple(f"{v}_{k}" for v in NUMERIC for k in ("last", "trend_per_h", "missing")), "on_oxygen", "not_alert")
WIDTH = len(NAMES)


def vector(series: dict[str, list[tuple[float, float]]], on_oxygen: bool, alert: bool) -> tuple[np.ndarray, float]:
    """Features from (time, value) series; returns (vector, share of vital signs present)."""
    out = np.zeros(WIDTH, dtype=np.float32)
    present = 0
    for i, vital in enumerate(NUMERIC):
        points = series.get(vital) or []
        if points:
            present += 1
            times = np.fromiter((t for t, _ in points), float)
            values = np.fromiter((v for _, v in points), float)
            out[3 * i] = values[-1]
            if len(points) > 1 and times[-1] - times[0] > 60:  # least-squares slope, per hour
                centred = (times - times.mean()) / 3600.0
                out[3 * i + 1] = float(centred @ (values - values.mean()) / (centred @ centred))
        else:
            out[3 * i] = NORMAL[vital]
            out[3 * i + 2] = 1.0
    out[-2] = float(on_oxygen)
    out[-1] = float(not alert)
    return out, present / len(NUMERIC)
