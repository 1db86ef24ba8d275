"""The workload a plan is for: a TOML file, one table per model or graph.

```toml
seconds = 60                              # optional: simulated seconds (--seconds wins)

[breast_mass_malignancy]                  # a model of the repository
rate = 20                                 # requests per second
priorities = { 1 = 0.1, 3 = 0.9 }         # fraction of the requests per level, 1 = STAT; they add up to 1
target_p99_ms = { 1 = 5, 3 = 50 }         # p99 inside the server (queue + compute) per level, or one number
rows = 1                                  # rows per request (default 1)

[triage]                                  # a graph (its folder has graph.toml): the models it calls,
rate = 5                                  # and how often per request of the graph
calls = { vitals_deterioration = 1, breast_mass_malignancy = 2 }
target_p99_ms = 20
```

A `[site]` table (optional) describes a hospital for `bench/cluster_sizing.py`, which splits it over
several boxes: `beds`, `ward_beds` (a box serves whole wards), and `central`, the demands served by
central boxes rather than per ward; every other demand's rate is the whole site's, carried by the
ward boxes in proportion to their beds. `bedside plan` ignores it.

Without `priorities`, every request is at the model's default priority. Without a target a level is
predicted but not judged. A graph's p99 is judged as the sum of its calls' p99s (count times each):
an upper bound, as if every call ran after the one before and each hit its own p99.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.errors import BedsideError

_KEYS = {"rate", "priorities", "target_p99_ms", "rows", "calls"}
_SITE_KEYS = {"beds", "ward_beds", "central"}
SITE = "site"  # the reserved table that describes the hospital, not a model
EVERY_LEVEL = 0  # the key of a target that applies to every level


class WorkloadError(BedsideError):
    """A workload file that cannot be used: one line, exit 2 on the command line."""

    status = 400


@dataclass(frozen=True, slots=True)
class Demand:
    """The load on one model or graph."""

    name: str
    rate: float  # requests per second
    priorities: dict[int, float] | None  # level -> fraction; None: the model's default level
    targets_ms: dict[int, float]  # level -> p99 target; EVERY_LEVEL: any level without its own
    rows: int = 1
    calls: dict[str, int] | None = None  # a graph: model -> calls per request

    def target(self, level: int) -> float | None:
        return self.targets_ms.get(level, self.targets_ms.get(EVERY_LEVEL))


@dataclass(frozen=True, slots=True)
class Site:
    """A hospital split over boxes: `beds` in wards of `ward_beds` (the last ward takes what is left);
    the demands named in `central` go to central boxes, the others to the ward boxes."""

    beds: int
    ward_beds: int
    central: tuple[str, ...] = ()

    def wards(self) -> list[int]:
        """Beds per ward, the full wards first."""
        full, rest = divmod(self.beds, self.ward_beds)
        return [self.ward_beds] * full + ([rest] if rest else [])


@dataclass(frozen=True, slots=True)
class Workload:
    demands: list[Demand]
    seconds: float | None = None
    site: Site | None = None

    def models_called(self) -> set[str]:
        out: set[str] = set()
        for d in self.demands:
            out |= set(d.calls) if d.calls is not None else {d.name}
        return out


def load_workload(path: Path) -> Workload:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"cannot read the workload {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise WorkloadError(f"the workload {path} is not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WorkloadError(f"the workload {path.name} is not valid TOML: {exc}") from None
    return parse_workload(doc, path.name)


def parse_workload(doc: dict[str, Any], where: str = "workload") -> Workload:
    seconds = doc.get("seconds")
    if seconds is not None and (not _number(seconds) or seconds <= 0):
        raise WorkloadError(f"{where}: seconds must be a number above 0, got {seconds!r}")
    demands = []
    for name, raw in doc.items():
        if name in ("seconds", SITE):
            continue
        if not isinstance(raw, dict):
            raise WorkloadError(f"{where}: {name!r} must be a table ([{name}]) of rate, priorities, target_p99_ms")
        demands.append(_demand(name, raw, where))
    if not demands:
        raise WorkloadError(f"{where} names no model: add a table such as [my_model] with rate = 10")
    site = _site(doc[SITE], {d.name for d in demands}, where) if SITE in doc else None
    return Workload(demands, None if seconds is None else float(seconds), site)


def _site(raw: Any, names: set[str], where: str) -> Site:
    at = f"{where} [{SITE}]"
    if not isinstance(raw, dict):
        raise WorkloadError(f"{at} must be a table of beds, ward_beds, central")
    unknown = set(raw) - _SITE_KEYS
    if unknown:
        raise WorkloadError(f"{at}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(_SITE_KEYS))})")
    beds, ward_beds = raw.get("beds"), raw.get("ward_beds")
    for key, value in (("beds", beds), ("ward_beds", ward_beds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise WorkloadError(f"{at}: {key} must be a whole number of 1 or more, got {value!r}")
    assert isinstance(beds, int) and isinstance(ward_beds, int)
    central = raw.get("central", [])
    if not isinstance(central, list) or not all(isinstance(n, str) for n in central):
        raise WorkloadError(f'{at}: central is a list of the demands central boxes serve, e.g. ["imaging"]')
    stray = sorted(set(central) - names)
    if stray:
        raise WorkloadError(f"{at}: central names {', '.join(stray)}, which the workload has no table for")
    return Site(beds, ward_beds, tuple(central))


def _demand(name: str, raw: dict[str, Any], where: str) -> Demand:
    at = f"{where} [{name}]"
    unknown = set(raw) - _KEYS
    if unknown:
        raise WorkloadError(f"{at}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(_KEYS))})")
    rate = raw.get("rate")
    if not isinstance(rate, int | float) or not _number(rate) or rate < 0:
        raise WorkloadError(f"{at}: rate (requests per second) must be a number of 0 or more, got {rate!r}")
    rows = raw.get("rows", 1)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise WorkloadError(f"{at}: rows must be a whole number of 1 or more, got {rows!r}")
    priorities = None
    if "priorities" in raw:
        priorities = {level: float(f) for level, f in _per_level(raw["priorities"], at, "priorities").items()}
        if any(f < 0 for f in priorities.values()) or not math.isclose(sum(priorities.values()), 1.0, abs_tol=1e-6):
            raise WorkloadError(f"{at}: priorities are fractions of the requests: 0 or more, adding up to 1")
    target = raw.get("target_p99_ms", {})
    targets = {EVERY_LEVEL: target} if _number(target) else _per_level(target, at, "target_p99_ms")
    if any(t <= 0 for t in targets.values()):
        raise WorkloadError(f"{at}: target_p99_ms must be above 0 ms")
    calls = None
    if "calls" in raw:
        calls_raw = raw["calls"]
        if not isinstance(calls_raw, dict) or not calls_raw:
            raise WorkloadError(f"{at}: calls names the models a graph calls: calls = {{model = count}}")
        calls = {}
        for model, count in calls_raw.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise WorkloadError(f"{at}: calls.{model} must be a whole number of calls per request, 1 or more")
            calls[model] = count
    return Demand(name, float(rate), priorities, {k: float(v) for k, v in targets.items()}, rows, calls)


def _per_level(raw: Any, at: str, key: str) -> dict[int, float]:
    if not isinstance(raw, dict):
        raise WorkloadError(f"{at}: {key} must be a table of level = value, e.g. {{ 1 = 0.2, 3 = 0.8 }}")
    out = {}
    for level, value in raw.items():
        if not (level.isascii() and level.isdigit() and int(level) >= 1):
            raise WorkloadError(f"{at}: {key} level {level!r} is not a priority level (1 = STAT, 2, 3, ...)")
        if not _number(value):
            raise WorkloadError(f"{at}: {key}.{level} must be a number, got {value!r}")
        out[int(level)] = float(value)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
