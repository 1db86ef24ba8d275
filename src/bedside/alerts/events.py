"""What the streams publish: a score per bed and cycle, an ECG rhythm result per window, and alerts.
One typed shape each, so SSE, `GET /v2/alerts` and the HL7 sender read the same fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class VitalsScore:
    """One bed scored in one cycle: NEWS2 and qSOFA always, the model's risk when it could be used."""

    bed: str
    time: float
    news2: int
    news2_risk: str  # low | low-medium | medium | high
    news2_complete: bool
    qsofa: int
    qsofa_positive: bool
    risk: float | None  # the model's risk of deterioration, None when scored by the rules alone
    source: str  # "<model> v<version>" or "rules"
    degraded: bool
    reason: str = ""  # why AI assistance is degraded, when it is
    kind: Literal["score"] = "score"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["type"] = doc.pop("kind")
        if not self.reason:
            del doc["reason"]
        return doc


@dataclass(frozen=True, slots=True)
class Alert:
    """Something a clinician should look at now. Carries the bed and never a patient identifier."""

    bed: str
    time: float
    level: int  # 1 low-medium .. 3 high (NEWS2 bands; 2 for a positive qSOFA or a rhythm change)
    source: str  # the model that raised it ("ecg_rhythm v1") or "rules"
    reason: str
    degraded: bool = False
    risk: float | None = None
    news2: int | None = None
    qsofa: int | None = None
    kind: Literal["alert"] = "alert"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["type"] = doc.pop("kind")
        if self.news2 is None:  # not a vitals alert (a rhythm alert): no vitals fields, as before
            for key in ("risk", "news2", "qsofa"):
                del doc[key]
        return doc


Event = VitalsScore | Alert
