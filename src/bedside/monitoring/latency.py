"""Per model-version statistics: latency over a sliding window, where the time went, batch sizes,
rejections, and the same per tenant.

Recording is a list store and a few integer adds under no lock: each store is atomic under the GIL,
and a reader that sees a half-updated window is off by one sample, which a percentile tolerates.
Percentiles are computed only when someone asks. Each window also counts every sample into fixed
histogram buckets (0.05 ms to 1 s; one bisect and one add, ~0.1 µs), cumulative since load, so
/metrics can export real histograms that a central Prometheus can aggregate across boxes.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import Any

import numpy as np

from bedside.monitoring.drift import DriftMonitor
from bedside.settings import DEFAULTS

WINDOW = 4096
MAX_TENANTS = DEFAULTS.limits.max_tenant_stats  # the last slot counts the rest together
OTHER_TENANTS = "(other tenants)"
# Upper bounds of the latency buckets, ms (Prometheus `le`): resolve 0.05-100 ms, the range of a
# bedside model's answer, and show what is slower.
BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)
_BOUNDS_NS = tuple(int(b * 1e6) for b in BUCKETS_MS)


class LatencyWindow:
    __slots__ = ("_next", "_ring", "buckets", "count", "max_ns", "total_ns")

    def __init__(self, size: int = WINDOW, bucketed: bool = True) -> None:
        self._ring = [0] * size
        self._next = 0
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0
        # samples per bucket since load; the last: beyond 1 s. None: not counted (monitoring.histograms off)
        self.buckets: list[int] | None = [0] * (len(_BOUNDS_NS) + 1) if bucketed else None

    def record(self, ns: int) -> None:
        buckets = self.buckets
        if buckets is not None:
            buckets[bisect_left(_BOUNDS_NS, ns)] += 1
        ring = self._ring
        ring[self._next] = ns
        self._next = (self._next + 1) % len(ring)
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns

    def histogram(self) -> dict[str, Any] | None:
        """Samples per bucket since load (`counts[i]`: at most `le_ms[i]`, above the one before;
        the last: above every bound), and their sum; None when buckets are not counted."""
        if self.buckets is None:
            return None
        return {"le_ms": list(BUCKETS_MS), "counts": list(self.buckets), "sum_ms": round(self.total_ns / 1e6, 4)}

    def summary(self) -> dict[str, Any]:
        n = min(self.count, len(self._ring))
        if n == 0:
            return {
                "count": 0,
                "window": 0,
                "mean_ms": None,
                "p50_ms": None,
                "p95_ms": None,
                "p99_ms": None,
                "max_ms": None,
            }
        window = np.asarray(self._ring[:n], dtype=np.float64) / 1e6
        p50, p95, p99 = np.percentile(window, [50, 95, 99])
        return {
            "count": self.count,
            "window": n,
            "mean_ms": round(float(window.mean()), 4),
            "p50_ms": round(float(p50), 4),
            "p95_ms": round(float(p95), 4),
            "p99_ms": round(float(p99), 4),
            "max_ms": round(float(window.max()), 4),
            "max_ever_ms": round(self.max_ns / 1e6, 4),
        }


class TenantStats:
    __slots__ = ("latency", "rejected")

    def __init__(self, bucketed: bool = True) -> None:
        self.latency = LatencyWindow(1024, bucketed)
        self.rejected = 0


class ModelStats:
    """What one model version has done: requests, failures, rejections, and where the time went."""

    __slots__ = (
        "batch_sizes",
        "by_priority",
        "compute",
        "detailed",
        "drift",
        "executions",
        "failures",
        "inferences",
        "last_inference_ms",
        "max_tenants",
        "queue",
        "rejected",
        "request",
        "tenants",
    )

    def __init__(self, max_tenants: int = MAX_TENANTS, detailed: bool = True) -> None:
        """`detailed` (monitoring.histograms): latency buckets and per-priority outcomes are counted."""
        self.max_tenants = max_tenants
        self.detailed = detailed
        self.request = LatencyWindow(bucketed=detailed)  # admission to result, as seen inside the server
        self.queue = LatencyWindow(bucketed=detailed)
        self.compute = LatencyWindow(bucketed=detailed)
        # (priority level, outcome) -> requests: "ok", "failed" or the rejection's reason
        self.by_priority: Counter[tuple[int, str]] = Counter()
        self.failures = 0
        self.inferences = 0  # rows
        self.executions = 0  # model runs
        self.last_inference_ms = 0  # wall clock of the last execution, ms since the epoch
        self.batch_sizes: Counter[int] = Counter()  # rows per execution
        self.rejected: Counter[str] = Counter()
        self.tenants: dict[str, TenantStats] = {}
        self.drift: DriftMonitor | None = None  # when the version ships a drift reference

    def _tenant(self, name: str) -> TenantStats:
        found = self.tenants.get(name)
        if found is None:
            if len(self.tenants) >= self.max_tenants - 1:  # the last slot holds the rest
                name = OTHER_TENANTS  # tenant names come from callers: keep the table bounded
                found = self.tenants.get(name)
            if found is None:
                found = self.tenants[name] = TenantStats(self.detailed)
        return found

    def record_execution(self, rows: int) -> None:
        self.executions += 1
        self.inferences += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.batch_sizes[rows] += 1

    def record_request(self, tenant: str, level: int, queue_ns: int, compute_ns: int, total_ns: int) -> None:
        self.queue.record(queue_ns)
        self.compute.record(compute_ns)
        self.request.record(total_ns)
        self._tenant(tenant).latency.record(total_ns)
        if self.detailed:
            self.by_priority[level, "ok"] += 1

    def record_failure(self, level: int) -> None:
        self.failures += 1
        if self.detailed:
            self.by_priority[level, "failed"] += 1

    def reject(self, tenant: str, reason: str, level: int | None = None) -> None:
        self.rejected[reason] += 1
        self._tenant(tenant).rejected += 1
        if self.detailed and level is not None:
            self.by_priority[level, reason] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "inference_count": self.inferences,
            "execution_count": self.executions,
            "success_count": self.request.count,
            "failure_count": self.failures,
            "rejected": dict(self.rejected),
            "latency": self.request.summary(),
            "queue": self.queue.summary(),
            "compute": self.compute.summary(),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            **(
                {
                    "histograms": {
                        "request": self.request.histogram(),
                        "queue": self.queue.histogram(),
                        "compute": self.compute.histogram(),
                    },
                    # priority as users name it: 1 (STAT) is the most urgent
                    "priorities": _by_priority(self.by_priority),
                }
                if self.detailed
                else {}
            ),
            **({"drift": self.drift.summary()} if self.drift is not None else {}),
            "tenants": {
                name: {
                    "success_count": t.latency.count,
                    "rejected": t.rejected,
                    "latency": t.latency.summary(),
                    **({"histogram": t.latency.histogram()} if self.detailed else {}),
                }
                for name, t in sorted(self.tenants.items())
            },
        }


def _by_priority(counts: Counter[tuple[int, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (level, outcome), n in sorted(list(counts.items())):  # a copy: workers may add while this reads
        out.setdefault(str(level + 1), {})[outcome] = n
    return out
