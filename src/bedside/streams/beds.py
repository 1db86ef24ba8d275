"""Per-bed state: a bounded, time-ordered window of recent vital signs for each bed."""

from __future__ import annotations

import time
from collections import OrderedDict, deque

import numpy as np

from bedside.alerts.rules import Vitals
from bedside.clinical import features
from bedside.settings import DEFAULTS
from bedside.streams.hl7v2 import VitalsMessage

WINDOW_S = 3600.0
MAX_POINTS = 720  # per vital sign per bed: one reading every 5 s for an hour
STALE_S = {"temperature": 6 * 3600.0, "consciousness": 4 * 3600.0, "on_oxygen": 4 * 3600.0}
DEFAULT_STALE_S = 900.0  # a reading older than this no longer describes the patient


class BedState:
    __slots__ = ("consciousness", "oxygen", "series", "updated")

    def __init__(self) -> None:
        self.series: dict[str, deque[tuple[float, float]]] = {}
        self.consciousness: tuple[float, str] | None = None
        self.oxygen: tuple[float, bool] | None = None
        self.updated = 0.0

    def add(self, vital: str, value: float | str | bool, when: float) -> None:
        self.updated = max(self.updated, when)
        if vital == "consciousness":
            self.consciousness = (when, str(value))
        elif vital == "on_oxygen":
            self.oxygen = (when, bool(value))
        elif vital == "oxygen_flow":
            self.oxygen = (when, float(value) > 0)
        elif vital == "fio2":
            self.oxygen = (when, float(value) > 21)
        else:
            series = self.series.get(vital)
            if series is None:
                series = self.series[vital] = deque(maxlen=MAX_POINTS)
            if series and when < series[-1][0]:  # late arrival: keep the window ordered
                items = sorted([*series, (when, float(value))])
                series.clear()
                series.extend(items[-MAX_POINTS:])
            else:
                series.append((when, float(value)))

    def _recent(self, vital: str, now: float) -> list[tuple[float, float]]:
        series = self.series.get(vital)
        if not series:
            return []
        while series and series[0][0] < now - WINDOW_S:
            series.popleft()
        stale = STALE_S.get(vital, DEFAULT_STALE_S)
        return list(series) if series and series[-1][0] >= now - stale else []

    def _latest(self, vital: str, now: float) -> float | None:
        recent = self._recent(vital, now)
        return recent[-1][1] if recent else None

    def _flag(self, item: tuple[float, object] | None, key: str, now: float) -> object | None:
        return item[1] if item and item[0] >= now - STALE_S[key] else None

    def vitals(self, now: float) -> Vitals:
        return Vitals(
            respiratory_rate=self._latest("respiratory_rate", now),
            spo2=self._latest("spo2", now),
            on_oxygen=self._flag(self.oxygen, "on_oxygen", now),  # type: ignore[arg-type]
            systolic_bp=self._latest("systolic_bp", now),
            heart_rate=self._latest("heart_rate", now),
            consciousness=self._flag(self.consciousness, "consciousness", now),  # type: ignore[arg-type]
            temperature=self._latest("temperature", now),
        )

    def features(self, now: float) -> tuple[np.ndarray, float]:
        series = {v: self._recent(v, now) for v in features.NUMERIC}
        level = self._flag(self.consciousness, "consciousness", now)
        return features.vector(series, bool(self._flag(self.oxygen, "on_oxygen", now)), level in (None, "A"))


class Beds:
    """All beds, least recently updated evicted first when the table is full."""

    def __init__(self, max_beds: int = DEFAULTS.streams.max_beds) -> None:
        self.max_beds = max_beds
        self._beds: OrderedDict[str, BedState] = OrderedDict()
        self.evicted = 0

    def add(self, message: VitalsMessage) -> None:
        state = self._beds.get(message.bed)
        if state is None:
            if len(self._beds) >= self.max_beds:
                self._beds.popitem(last=False)
                self.evicted += 1
            state = self._beds[message.bed] = BedState()
        self._beds.move_to_end(message.bed)
        for obs in message.observations:
            state.add(obs.vital, obs.value, obs.time)

    def __len__(self) -> int:
        return len(self._beds)

    def items(self) -> list[tuple[str, BedState]]:
        return list(self._beds.items())

    def get(self, bed: str) -> BedState | None:
        return self._beds.get(bed)

    def prune(self, now: float | None = None) -> None:
        """Forget beds with no reading for a day (a discharged patient's data does not linger)."""
        now = time.time() if now is None else now
        for bed in [b for b, s in self._beds.items() if s.updated < now - 86400]:
            del self._beds[bed]
