"""Scheduling policy of one model: priority levels, per-level queue limits and deadlines, dynamic
batching, and per-tenant quotas. Parsed from the model's config.toml.

Levels are numbered from 1 (most urgent, STAT) to `priority_levels` (routine) on the wire, as in
Triton; inside bedside they are 0-based.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bedside.errors import InvalidInput, ModelLoadError

LEVEL_NAMES_3 = {"stat": 1, "urgent": 2, "routine": 3}


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    max_queue_size: int = 1024  # requests waiting at this level; beyond it: 429
    default_timeout_us: int = 0  # 0: no deadline unless the request sets one
    allow_timeout_override: bool = True
    timeout_action: str = "reject"  # reject | delay (run after all work that is still on time)


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    enabled: bool = True
    max_queue_delay_us: int = 0  # 0: take what is queued now, never wait for more
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    max_in_flight: int = 256
    share: float = 1.0  # weight in the fair split of capacity among tenants at one level
    default_priority: int | None = None


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    priority_levels: int = 3
    default_priority: int = 3
    aging_us: int = 1_000_000  # a waiting request climbs one level per this much waiting; 0: never
    reserved_instances: int = 0  # instances that run only STAT (level 1) work, so STAT never waits behind routine
    # OS niceness of the other instances' threads (Linux): the kernel then lets STAT and the HTTP loop
    # preempt routine compute. Takes effect with threads = 1, where all compute runs on bedside's thread.
    routine_nice: int = 0
    levels: tuple[QueuePolicy, ...] = (QueuePolicy(), QueuePolicy(), QueuePolicy())
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    tenants: dict[str, TenantPolicy] = field(default_factory=dict)
    default_tenant: TenantPolicy = field(default_factory=TenantPolicy)

    def tenant(self, name: str) -> TenantPolicy:
        return self.tenants.get(name, self.default_tenant)

    def level_of(self, priority: Any, tenant: str) -> int:
        """0-based level for a wire priority (number or name); the tenant's or model's default if None."""
        if priority is None or priority == "" or priority == 0:
            chosen = self.tenant(tenant).default_priority or self.default_priority
            return chosen - 1
        if isinstance(priority, str):
            text = priority.strip().lower()
            if text.isdigit():
                priority = int(text)
            elif self.priority_levels == 3 and text in LEVEL_NAMES_3:
                priority = LEVEL_NAMES_3[text]
            elif text == "stat":
                priority = 1
            elif text == "routine":
                priority = self.priority_levels
            else:
                raise InvalidInput(
                    f"priority {priority!r} is not a level 1..{self.priority_levels} or a name ({self._names()})"
                )
        if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= self.priority_levels:
            raise InvalidInput(f"priority {priority!r} is outside 1..{self.priority_levels} (1 = STAT, most urgent)")
        return priority - 1

    def _names(self) -> str:
        return "stat, urgent, routine" if self.priority_levels == 3 else "stat, routine"

    def to_dict(self) -> dict[str, Any]:
        """The config-file sections this policy parses from, so a config round-trips."""

        def tenant(t: TenantPolicy) -> dict[str, Any]:
            doc: dict[str, Any] = {"max_in_flight": t.max_in_flight, "share": t.share}
            if t.default_priority is not None:
                doc["default_priority"] = t.default_priority
            return doc

        return {
            "scheduling": {
                "priority_levels": self.priority_levels,
                "default_priority": self.default_priority,
                "aging_us": self.aging_us,
                "reserved_instances": self.reserved_instances,
                "routine_nice": self.routine_nice,
            },
            "dynamic_batching": {
                "enabled": self.batching.enabled,
                "max_queue_delay_us": self.batching.max_queue_delay_us,
                "preferred_batch_sizes": list(self.batching.preferred_batch_sizes),
            },
            "queue_policy": [
                {
                    "level": i + 1,
                    "max_queue_size": q.max_queue_size,
                    "default_timeout_us": q.default_timeout_us,
                    "allow_timeout_override": q.allow_timeout_override,
                    "timeout_action": q.timeout_action,
                }
                for i, q in enumerate(self.levels)
            ],
            "tenants": {name: tenant(t) for name, t in {"*": self.default_tenant, **self.tenants}.items()},
        }


# The parsers take their defaults from the dataclasses, so each default is written once.
_SCHED, _QUEUE, _BATCH, _TENANT = SchedulingPolicy(), QueuePolicy(), BatchingPolicy(), TenantPolicy()


def parse_policy(scheduling: Any, batching: Any, queues: Any, tenants: Any) -> SchedulingPolicy:
    sched = _table(
        scheduling,
        "scheduling",
        {"priority_levels", "default_priority", "aging_us", "reserved_instances", "routine_nice"},
    )
    levels = _int(sched, "priority_levels", _SCHED.priority_levels, 1, "scheduling")
    default = _int(sched, "default_priority", levels, 1, "scheduling")
    if default > levels:
        raise ModelLoadError(f"scheduling.default_priority {default} is above priority_levels {levels}")
    per_level = [QueuePolicy() for _ in range(levels)]
    if queues is not None:
        if not isinstance(queues, list):
            raise ModelLoadError("queue_policy must be a list of [[queue_policy]] tables")
        for raw in queues:
            q = _table(
                raw,
                "queue_policy",
                {"level", "max_queue_size", "default_timeout_us", "allow_timeout_override", "timeout_action"},
            )
            level = _int(q, "level", 0, 1, "queue_policy")
            if level > levels:
                raise ModelLoadError(f"queue_policy level {level} is above priority_levels {levels}")
            action = q.get("timeout_action", _QUEUE.timeout_action)
            if action not in ("reject", "delay"):
                raise ModelLoadError("queue_policy.timeout_action must be 'reject' or 'delay'")
            per_level[level - 1] = QueuePolicy(
                max_queue_size=_int(q, "max_queue_size", _QUEUE.max_queue_size, 1, "queue_policy"),
                default_timeout_us=_int(q, "default_timeout_us", _QUEUE.default_timeout_us, 0, "queue_policy"),
                allow_timeout_override=bool(q.get("allow_timeout_override", _QUEUE.allow_timeout_override)),
                timeout_action=action,
            )
    b = _table(batching, "dynamic_batching", {"enabled", "max_queue_delay_us", "preferred_batch_sizes"})
    preferred = b.get("preferred_batch_sizes", [])
    if not isinstance(preferred, list) or not all(isinstance(p, int) and p > 0 for p in preferred):
        raise ModelLoadError("dynamic_batching.preferred_batch_sizes must list positive integers")
    tenant_table = _table(tenants, "tenants", None)
    parsed = {name: _tenant(name, raw, levels) for name, raw in tenant_table.items()}
    return SchedulingPolicy(
        priority_levels=levels,
        default_priority=default,
        aging_us=_int(sched, "aging_us", _SCHED.aging_us, 0, "scheduling"),
        reserved_instances=_int(sched, "reserved_instances", _SCHED.reserved_instances, 0, "scheduling"),
        routine_nice=_nice(sched),
        levels=tuple(per_level),
        batching=BatchingPolicy(
            enabled=bool(b.get("enabled", _BATCH.enabled)),
            max_queue_delay_us=_int(b, "max_queue_delay_us", _BATCH.max_queue_delay_us, 0, "dynamic_batching"),
            preferred_batch_sizes=tuple(sorted(set(preferred))),
        ),
        tenants={k: v for k, v in parsed.items() if k != "*"},
        default_tenant=parsed.get("*", TenantPolicy()),
    )


def _tenant(name: str, raw: Any, levels: int) -> TenantPolicy:
    t = _table(raw, f"tenants.{name}", {"max_in_flight", "share", "default_priority"})
    share = t.get("share", _TENANT.share)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or share <= 0:
        raise ModelLoadError(f"tenants.{name}.share must be a positive number")
    default = t.get("default_priority")
    if default is not None and (not isinstance(default, int) or not 1 <= default <= levels):
        raise ModelLoadError(f"tenants.{name}.default_priority must be in 1..{levels}")
    return TenantPolicy(_int(t, "max_in_flight", _TENANT.max_in_flight, 1, f"tenants.{name}"), float(share), default)


def _table(raw: Any, where: str, keys: set[str] | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where} must be a table")
    if keys is not None and set(raw) - keys:
        raise ModelLoadError(
            f"{where} has unknown keys {', '.join(sorted(set(raw) - keys))}; it takes {', '.join(sorted(keys))}"
        )
    return raw


def _int(doc: dict[str, Any], key: str, default: int, minimum: int, where: str) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelLoadError(f"{where}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _nice(sched: dict[str, Any]) -> int:
    value = _int(sched, "routine_nice", _SCHED.routine_nice, 0, "scheduling")
    if value > 19:
        raise ModelLoadError("scheduling.routine_nice must be 0..19 (a higher value yields more to STAT work)")
    return value
