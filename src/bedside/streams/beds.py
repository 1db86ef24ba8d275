"""Per-bed state: a bounded, time-ordered window of recent vital signs for each bed."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

import numpy as np

from bedside.alerts.rules import Vitals
from bedside.clinical import features
from bedside.settings import DEFAULTS
from bedside.streams.hl7v2 import Observation, VitalsMessage

WINDOW_S = 3600.0
MAX_POINTS = 720  # per vital sign per bed: one reading every 5 s for an hour
STALE_S = {"temperature": 6 * 3600.0, "consciousness": 4 * 3600.0, "on_oxygen": 4 * 3600.0}
DEFAULT_STALE_S = 900.0  # a reading older than this no longer describes the patient
FLAGS = {"consciousness", "on_oxygen", "oxygen_flow", "fio2"}  # only the latest counts
EVICTION_LOG_S = 60.0  # at most one eviction warning a minute, with the count since the last
log = logging.getLogger("bedside.streams")
Point = tuple[float, float]
_time = itemgetter(0)


def _one_per_time(points: Iterable[tuple[float, Any]]) -> list[tuple[float, Any]]:
    """Time-ordered readings with one per time stamp, the last sent (a resend after a NAK replaces
    its first copy instead of doubling it). A dict keeps the first position and the last value."""
    return list(dict(points).items())


class BedState:
    __slots__ = ("consciousness", "oxygen", "series", "updated")

    def __init__(self) -> None:
        self.series: dict[str, deque[Point]] = {}
        self.consciousness: tuple[float, str] | None = None
        self.oxygen: tuple[float, bool] | None = None
        self.updated = 0.0

    def add(self, vital: str, value: float | str | bool, when: float) -> None:
        """One reading. In time order this is an append; the journal's restore relies on that."""
        series = self.series.get(vital)
        if series is not None and series and when > series[-1][0]:
            series.append((when, float(value)))
            self.updated = max(self.updated, when)
        else:
            self._merge(vital, [(when, value)])

    def merge(self, observations: Iterable[Observation]) -> None:
        """A message's readings: sorted once per vital sign and merged with the window, so a message
        costs O(n log n) in any time order (re-sorting the window for each late reading held the
        serving loop 324 ms for 18,000 readings in descending time, 6 ms ascending)."""
        by_vital: dict[str, list[tuple[float, float | str | bool]]] = {}
        for obs in observations:
            by_vital.setdefault(obs.vital, []).append((obs.time, obs.value))
        for vital, points in by_vital.items():
            points.sort(key=_time)  # stable: of equal times, the one sent later stays later
            self._merge(vital, points)

    def _merge(self, vital: str, points: list[tuple[float, float | str | bool]]) -> None:
        when, value = points[-1]
        self.updated = max(self.updated, when)
        if vital in FLAGS:
            if vital == "consciousness":
                if self.consciousness is None or when >= self.consciousness[0]:
                    self.consciousness = (when, str(value))
                return
            flag = bool(value) if vital == "on_oxygen" else float(value) > (0 if vital == "oxygen_flow" else 21)
            if self.oxygen is None or when >= self.oxygen[0]:
                self.oxygen = (when, flag)
            return
        new = [(t, float(v)) for t, v in _one_per_time(points)[-MAX_POINTS:]]
        series = self.series.get(vital)
        if series is None:
            series = self.series[vital] = deque(maxlen=MAX_POINTS)
        if not series or new[0][0] > series[-1][0]:
            series.extend(new)  # the usual case: newer than everything held
            return
        # late readings: Timsort merges the two sorted runs in O(window + message); stable, so of
        # equal times the new reading comes last and is the one kept
        merged = _one_per_time(sorted([*series, *new], key=_time))
        series.clear()
        series.extend(merged[-MAX_POINTS:])

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


def states_from(rows: Iterable[tuple[str, str, object, float]]) -> list[tuple[str, BedState]]:
    """Bed states from (bed, vital, value, time) rows in time order: the journal read at start."""
    states: dict[str, BedState] = {}
    for bed, vital, value, when in rows:
        state = states.get(bed)
        if state is None:
            state = states[bed] = BedState()
        state.add(vital, value, when)  # type: ignore[arg-type]  # values are as the parser made them
    return list(states.items())


class Beds:
    """All beds, least recently updated evicted first when the table is full (counted, and logged
    at most once a minute: a ward silently missing from the scores would otherwise go unnoticed)."""

    def __init__(self, max_beds: int = DEFAULTS.streams.max_beds) -> None:
        self.max_beds = max_beds
        self._beds: OrderedDict[str, BedState] = OrderedDict()
        self.evicted = 0
        self._unreported = 0
        self._reported_at = -math.inf

    def add(self, message: VitalsMessage) -> None:
        state = self._beds.get(message.bed)
        if state is None:
            if len(self._beds) >= self.max_beds:
                self._beds.popitem(last=False)
                self.evicted += 1
                self._unreported += 1
                self._report()
            state = self._beds[message.bed] = BedState()
        self._beds.move_to_end(message.bed)
        state.merge(message.observations)

    def restore(self, states: Iterable[tuple[str, BedState]]) -> None:
        """Put back beds read from the journal: the `max_beds` most recently heard, in the order
        they were heard, so the least recently heard is still the first to go."""
        newest_first = sorted(states, key=lambda item: item[1].updated, reverse=True)
        for bed, state in newest_first[: max(0, self.max_beds - len(self._beds))]:
            if bed not in self._beds:  # a bed heard since the start is newer than its journal
                self._beds[bed] = state
                self._beds.move_to_end(bed, last=False)

    def _report(self) -> None:
        # the count only: never a bed name, which may derive from a patient identifier
        now = time.monotonic()
        if self._unreported and now - self._reported_at >= EVICTION_LOG_S:
            log.warning(
                "bed table full (streams.max_beds = %d): %d least recently heard beds forgotten since the last report",
                self.max_beds,
                self._unreported,
            )
            self._unreported, self._reported_at = 0, now

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
        self._report()  # evictions of the last minute still unreported
