"""NEWS2 and qSOFA, scored exactly as published.

NEWS2: Royal College of Physicians, National Early Warning Score (NEWS) 2, 2017, chart 1 (the
scoring table) and the clinical-response thresholds (aggregate 5-6 medium, >= 7 high, a single
parameter scoring 3 calls for an urgent ward-based response). SpO2 scale 2 is for patients with
hypercapnic respiratory failure whose prescribed target is 88-92 %.
qSOFA: Seymour et al., JAMA 2016 (Sepsis-3): respiratory rate >= 22/min, altered mentation,
systolic blood pressure <= 100 mmHg; two or more is positive.

Observations arrive as floats; each band is applied by its upper bound, so values between the
table's integer rows (e.g. a pulse of 90.5) fall in the next band up, as on a paper chart rounded
to the device's resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONSCIOUSNESS = ("A", "C", "V", "P", "U")  # ACVPU: alert, new confusion, voice, pain, unresponsive


@dataclass(frozen=True)
class Vitals:
    respiratory_rate: float | None = None  # breaths/min
    spo2: float | None = None  # %
    on_oxygen: bool | None = None  # supplemental oxygen
    systolic_bp: float | None = None  # mmHg
    heart_rate: float | None = None  # beats/min
    consciousness: str | None = None  # one of ACVPU
    temperature: float | None = None  # degrees C
    spo2_scale_2: bool = False  # hypercapnic respiratory failure, prescribed target 88-92 %


def _band(value: float, bands: tuple[tuple[float, int], ...], above: int) -> int:
    for upper, points in bands:
        if value <= upper:
            return points
    return above


def respiratory_rate_points(rr: float) -> int:
    return _band(rr, ((8, 3), (11, 1), (20, 0), (24, 2)), 3)


def spo2_points(spo2: float, on_oxygen: bool, scale_2: bool = False) -> int:
    if not scale_2:
        return _band(spo2, ((91, 3), (93, 2), (95, 1)), 0)
    if spo2 <= 92 or not on_oxygen:  # scale 2: >= 93 % on air scores 0
        return _band(spo2, ((83, 3), (85, 2), (87, 1)), 0)
    return _band(spo2, ((94, 1), (96, 2)), 3)  # >= 93 % on oxygen scores upwards


def oxygen_points(on_oxygen: bool) -> int:
    return 2 if on_oxygen else 0


def systolic_points(sbp: float) -> int:
    return _band(sbp, ((90, 3), (100, 2), (110, 1), (219, 0)), 3)


def pulse_points(hr: float) -> int:
    return _band(hr, ((40, 3), (50, 1), (90, 0), (110, 1), (130, 2)), 3)


def consciousness_points(level: str) -> int:
    level = level.upper()
    if level not in CONSCIOUSNESS:
        raise ValueError(f"consciousness {level!r} is not one of ACVPU")
    return 0 if level == "A" else 3


def temperature_points(temp: float) -> int:
    return _band(temp, ((35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1)), 2)


@dataclass(frozen=True)
class News2:
    score: int
    parameters: dict[str, int]
    missing: tuple[str, ...] = field(default=())
    risk: str = "low"  # low | low-medium | medium | high
    complete: bool = True

    def reason(self) -> str:
        parts = [f"{k}={v}" for k, v in self.parameters.items() if v]
        text = f"NEWS2 {self.score} ({self.risk})" + (f": {', '.join(parts)}" if parts else "")
        if self.missing:
            text += f"; missing {', '.join(self.missing)}"
        return text


# (parameter, how to read it, its points); SpO2's points also depend on oxygen and scale 2
_NEWS2_PARAMETERS: tuple[tuple[str, Callable[[Vitals], Any], Callable[..., int]], ...] = (
    ("respiratory_rate", lambda v: v.respiratory_rate, respiratory_rate_points),
    ("spo2", lambda v: v.spo2, lambda x, v: spo2_points(x, bool(v.on_oxygen), v.spo2_scale_2)),
    ("air_or_oxygen", lambda v: v.on_oxygen, oxygen_points),
    ("systolic_bp", lambda v: v.systolic_bp, systolic_points),
    ("pulse", lambda v: v.heart_rate, pulse_points),
    ("consciousness", lambda v: v.consciousness, consciousness_points),
    ("temperature", lambda v: v.temperature, temperature_points),
)


def news2(v: Vitals) -> News2:
    points: dict[str, int] = {}
    missing: list[str] = []
    for name, read, score in _NEWS2_PARAMETERS:
        value = read(v)
        if value is None:
            missing.append(name)
        else:
            points[name] = score(value, v) if name == "spo2" else score(value)
    total = sum(points.values())
    if total >= 7:
        risk = "high"
    elif total >= 5:
        risk = "medium"
    elif any(p == 3 for p in points.values()):
        risk = "low-medium"
    else:
        risk = "low"
    return News2(total, points, tuple(missing), risk, not missing)


@dataclass(frozen=True)
class QSofa:
    score: int
    positive: bool
    criteria: tuple[str, ...]
    missing: tuple[str, ...]


def qsofa(v: Vitals) -> QSofa:
    met, missing = [], []
    if v.respiratory_rate is None:
        missing.append("respiratory_rate")
    elif v.respiratory_rate >= 22:
        met.append("respiratory_rate>=22")
    if v.consciousness is None:
        missing.append("mentation")
    elif v.consciousness.upper() != "A":
        met.append("altered_mentation")
    if v.systolic_bp is None:
        missing.append("systolic_bp")
    elif v.systolic_bp <= 100:
        met.append("systolic_bp<=100")
    return QSofa(len(met), len(met) >= 2, tuple(met), tuple(missing))
