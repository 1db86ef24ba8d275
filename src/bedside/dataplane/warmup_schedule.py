"""When the scheduled warm-up runs: pure functions of a clock reading, so the schedule is tested
without sleeping or waiting for 06:30.

Two kinds of run (settings `warmup.*`):
  - at each of `times` (local wall-clock HH:MM), every model is loaded if it is not ready and
    exercised once: the first request of the morning round then finds it loaded and hot;
  - inside the `keep_hot` window, a model version with no request for `keep_hot_idle_s` is exercised
    again, so a quiet ward does not let it go cold between rounds (real traffic resets the idle clock,
    so a busy model is never disturbed).

Times are naive local datetimes (`datetime.now()`): an operator thinks in the ward's clock. A DST
change is not special-cased: a skipped 02:30 fires when the wall clock passes it, a repeated one once.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from bedside.settings import WarmupSettings, parse_window

K = TypeVar("K", bound=Hashable)
MINUTES_A_DAY = 24 * 60
# The longest the scheduler sleeps at once: a wall-clock step (NTP, DST, a suspended VM) is noticed
# within this, instead of sleeping through 06:30 on a monotonic timer computed before the step.
MAX_NAP_S = 60.0


def parse_times(text: str) -> tuple[int, ...]:
    """'06:30,18:30' as sorted distinct minutes after midnight; () for an empty text. Empty items
    ('06:30,') are ignored. ValueError says which item is wrong (settings refuses the same ones)."""
    minutes = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        hh, sep, mm = item.partition(":")
        digits = hh.isascii() and hh.isdigit() and mm.isascii() and mm.isdigit()
        if not (sep and digits and len(hh) <= 2 and len(mm) == 2 and int(hh) <= 23 and int(mm) <= 59):
            raise ValueError(f"{item!r} is not a time of day HH:MM")
        minutes.add(int(hh) * 60 + int(mm))
    return tuple(sorted(minutes))


def _at_minute(day: datetime, minute: int) -> datetime:
    return day.replace(hour=minute // 60, minute=minute % 60, second=0, microsecond=0)


def next_fire(times: tuple[int, ...], now: datetime) -> datetime | None:
    """The first scheduled time strictly after `now`: a later one today, else tomorrow's first.
    None when there are no times. Strictly after, so a run that ends within its own minute does
    not fire again."""
    if not times:
        return None
    for minute in times:
        at = _at_minute(now, minute)
        if at > now:
            return at
    return _at_minute(now + timedelta(days=1), times[0])


def in_window(window: tuple[int, int] | None, now: datetime) -> bool:
    """Whether `now` is inside [start, end) (minutes after midnight; end < start spans midnight)."""
    if window is None:
        return False
    start, end = window
    minute = now.hour * 60 + now.minute
    return start <= minute < end if start < end else (minute >= start or minute < end)


def seconds_to_window(window: tuple[int, int], now: datetime) -> float:
    """Seconds from `now` until the window next opens (0 inside it)."""
    if in_window(window, now):
        return 0.0
    opens = _at_minute(now, window[0])
    if opens <= now:
        opens += timedelta(days=1)
    return (opens - now).total_seconds()


def idle_due(last_ms: Mapping[K, int], now_ms: int, idle_s: float) -> tuple[list[K], float | None]:
    """Which of these (model versions, by their last inference in wall-clock ms; 0: never) have been
    idle for at least `idle_s`, and the seconds until the next of the others becomes so (None: no
    others). Any request counts, a warm-up's too: that is what keeps it hot."""
    idle_ms = idle_s * 1000
    due, wait_ms = [], None
    for key, last in last_ms.items():
        left = last + idle_ms - now_ms if last > 0 else 0
        if left <= 0:
            due.append(key)
        elif wait_ms is None or left < wait_ms:
            wait_ms = left
    return due, None if wait_ms is None else wait_ms / 1000


@dataclass(frozen=True)
class Schedule:
    times: tuple[int, ...] = ()
    keep_hot: tuple[int, int] | None = None
    idle_s: float = WarmupSettings().keep_hot_idle_s

    @classmethod
    def from_settings(cls, settings: WarmupSettings) -> Schedule:
        """The schedule the (already checked) settings describe."""
        return cls(parse_times(settings.times), parse_window(settings.keep_hot), settings.keep_hot_idle_s)

    @property
    def active(self) -> bool:
        """Whether anything is scheduled at all (if not, no task is started)."""
        return bool(self.times) or self.keep_hot is not None

    def next_fire(self, now: datetime) -> datetime | None:
        return next_fire(self.times, now)

    def hot(self, now: datetime) -> bool:
        return in_window(self.keep_hot, now)

    def nap(self, now: datetime, fire_at: datetime | None, keep_hot_wait: float | None) -> float:
        """How long to sleep before looking again: until the next scheduled time, the window's
        opening, or (inside it) the next model going idle; never longer than MAX_NAP_S."""
        waits = [MAX_NAP_S]
        if fire_at is not None:
            waits.append((fire_at - now).total_seconds())
        if self.keep_hot is not None:
            if not self.hot(now):
                waits.append(seconds_to_window(self.keep_hot, now))
            else:
                waits.append(self.idle_s if keep_hot_wait is None else keep_hot_wait)
        return max(0.0, min(waits))
