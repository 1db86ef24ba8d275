"""The `[cache]` table of a model or graph config: answers kept for identical inputs.

Off unless the config asks for it (a cached answer is only right for a deterministic model, and only
the model's owner knows it is one). Bounded by entries and bytes, each under the box-wide ceilings
in settings (limits.cache_max_entries, limits.cache_max_mb).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bedside.errors import ModelLoadError
from bedside.settings import DEFAULTS

DEFAULT_ENTRIES = 1024
DEFAULT_MB = 16.0


@dataclass(frozen=True, slots=True)
class CacheSpec:
    max_entries: int = DEFAULT_ENTRIES
    max_bytes: int = int(DEFAULT_MB * 1024 * 1024)

    def to_dict(self) -> dict[str, Any]:
        return {"max_entries": self.max_entries, "max_mb": round(self.max_bytes / 1024 / 1024, 3)}


def parse_cache(raw: Any) -> CacheSpec | None:
    """None: no cache (no table, `cache = false` or `enabled = false`)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return CacheSpec()
    limits = DEFAULTS.limits
    if not isinstance(raw, dict) or set(raw) - {"max_entries", "max_mb", "enabled"}:
        raise ModelLoadError("cache takes enabled, max_entries and max_mb")
    if raw.get("enabled", True) is False:
        return None
    entries = raw.get("max_entries", DEFAULT_ENTRIES)
    if not isinstance(entries, int) or isinstance(entries, bool) or not 1 <= entries <= limits.cache_max_entries:
        raise ModelLoadError(f"cache.max_entries must be an integer from 1 to {limits.cache_max_entries}")
    megabytes = raw.get("max_mb", DEFAULT_MB)
    number = isinstance(megabytes, (int, float)) and not isinstance(megabytes, bool)
    if not number or not 0 < megabytes <= limits.cache_max_mb:
        raise ModelLoadError(f"cache.max_mb must be a number above 0, at most {limits.cache_max_mb}")
    return CacheSpec(entries, int(megabytes * 1024 * 1024))
