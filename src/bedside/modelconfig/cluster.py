"""The `[cluster]` table of a model or graph config: how it is served on a Ray Serve cluster.

Read only by `bedside cluster`; the single box ignores it. Each key left out takes the `cluster`
settings' default (min_replicas, max_replicas, target_queue_ms, replica_cpus), so a repository
that says nothing is served with the site's defaults. `memory_mb` overrides the estimate made from
the model files' size, for a model whose runtime memory the estimate gets wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bedside.errors import ModelLoadError

_KEYS = {"min_replicas", "max_replicas", "target_queue_ms", "cpus", "memory_mb"}


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    min_replicas: int | None = None  # None: the cluster settings' default
    max_replicas: int | None = None
    target_queue_ms: float | None = None
    cpus: float | None = None
    memory_mb: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k in sorted(_KEYS) if (v := getattr(self, k)) is not None}


def parse_cluster(raw: Any) -> ClusterSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - _KEYS:
        raise ModelLoadError(f"cluster takes {', '.join(sorted(_KEYS))}")
    low = _integer(raw, "min_replicas", 0)
    high = _integer(raw, "max_replicas", 1)
    if low is not None and high is not None and low > high:
        raise ModelLoadError(f"cluster.min_replicas {low} is above cluster.max_replicas {high}")
    return ClusterSpec(low, high, _number(raw, "target_queue_ms"), _number(raw, "cpus"), _integer(raw, "memory_mb", 1))


def _integer(raw: dict[str, Any], key: str, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= 1 << 20:
        raise ModelLoadError(f"cluster.{key} must be an integer of at least {minimum}")
    return value


def _number(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1e6:
        raise ModelLoadError(f"cluster.{key} must be a number above 0")
    return float(value)
