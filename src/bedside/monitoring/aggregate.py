"""The aggregate export: what a central dashboard may learn from this box, de-identified.

Built from the statistics the box already keeps (per model version, the streams, updates), and
nothing else: no bed, tenant, caller, request id, input or output value, and no time finer than
`monitoring.export_window_min` minutes. Small counts are disclosure risks, so every count under
`k` (`monitoring.export_k`) is withheld (written as null) and every histogram is coarsened first:
adjacent bins are merged until each holds 0 or at least k samples; a histogram with fewer than k
samples in all is withheld. Drift goes out as PSI, KS and state per feature with the live rows
binned by the training deciles (merged the same way), never as a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

FORMAT = "bedside-aggregate/1"
# the streams' counters a dashboard needs; ports, process ids and bed names stay on the box
STREAM_COUNTERS = {
    # HL7 messages ACKed and NAKed, shed under load; connections taken, refused at the bound, idled out
    "mllp": ("accepted", "rejected", "shed", "connections", "refused_connections", "idle_closed", "journal_failures"),
    "scoring": ("cycles", "scored_by_model", "degraded_to_rules", "model_p99_ms"),
    "ecg": ("windows", "over_budget", "degraded", "p99_ms", "budget_ms"),
    "alerts": ("published", "dropped_by_slow_subscribers"),
}
NOT_COUNTS = {"model_p99_ms", "p99_ms", "budget_ms"}  # figures, not counts of events: never suppressed


def suppress(n: int | float | None, k: int) -> int | None:
    """A count as it may leave the box: itself when 0 or at least k, else withheld (None)."""
    if n is None:
        return None
    n = int(n)
    return n if n == 0 or n >= k else None


def coarsen(bounds: Sequence[float | None], counts: Sequence[int], k: int) -> dict[str, Any] | None:
    """Bins merged left to right until each holds 0 or at least k samples (a small tail joins the
    bin before it); None when all together hold fewer than k. `bounds[i]` is bin i's upper bound
    (None: unbounded). Returns {"le": [upper bounds], "counts": [samples]}."""
    total = sum(counts)
    if 0 < total < k:
        return None
    le: list[float | None] = []
    out: list[int] = []
    running = 0
    for bound, n in zip(bounds, counts, strict=True):
        running += n
        if running == 0 or running >= k:
            le.append(bound)
            out.append(running)
            running = 0
    if running:  # a small last group: into the bin before it (there is one: total >= k)
        out[-1] += running
        le[-1] = bounds[-1]
    return {"le": le, "counts": out}


def window_start(when: float, minutes: int) -> str:
    """`when` floored to a whole window, UTC, to the minute."""
    step = minutes * 60
    floored = math.floor(when / step) * step
    return datetime.fromtimestamp(floored, UTC).strftime("%Y-%m-%dT%H:%MZ")


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    streams: Mapping[str, Any] | None,
    updates: Mapping[str, Any] | None,
    *,
    started: float,
    now: float,
    k: int,
    window_min: int,
    server_version: str,
) -> dict[str, Any]:
    """The export document. `rows`: statistics rows as `/v2/models/stats` gives them."""
    return {
        "format": FORMAT,
        "server_version": server_version,
        "k": k,
        "window_minutes": window_min,
        # the counts are cumulative since the server started, within these whole windows
        "period": {"from": window_start(started, window_min), "until": window_start(now, window_min)},
        "models": [_model(row, k) for row in rows],
        "streams": _streams(streams, k) if streams is not None else None,
        "updates": _updates(updates) if updates is not None else None,
        "withheld": f"null: a count under {k}, withheld (or a histogram of fewer than {k} samples)",
    }


def _model(row: Mapping[str, Any], k: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": row["name"],
        "version": row["version"],
        "state": row["state"],
        "requests": {
            "ok": suppress(row.get("success_count", 0), k),
            "failed": suppress(row.get("failure_count", 0), k),
            "rejected": {reason: suppress(n, k) for reason, n in sorted((row.get("rejected") or {}).items())},
        },
        "inferences": suppress(row.get("inference_count", 0), k),
        "executions": suppress(row.get("execution_count", 0), k),
        "tenants": suppress(len(row.get("tenants") or {}), 1),  # how many, never which
    }
    priorities = row.get("priorities")
    if priorities:
        out["priorities"] = {
            level: {outcome: suppress(n, k) for outcome, n in sorted(outcomes.items())}
            for level, outcomes in sorted(priorities.items())
        }
    histograms = row.get("histograms") or {}
    out["latency_ms"] = {stage: _latency(hist, k) for stage, hist in sorted(histograms.items()) if hist}
    sizes = {int(size): n for size, n in (row.get("batch_size_histogram") or {}).items()}
    if sizes:
        ordered = sorted(sizes)
        out["batch_size"] = coarsen(ordered, [sizes[s] for s in ordered], k)
    if row.get("drift"):
        out["drift"] = _drift(row["drift"], k)
    return out


def _latency(hist: Mapping[str, Any], k: int) -> dict[str, Any] | None:
    coarse = coarsen([*hist["le_ms"], None], list(hist["counts"]), k)
    if coarse is None:
        return None
    return {"le_ms": coarse["le"], "counts": coarse["counts"]}


def _drift(drift: Mapping[str, Any], k: int) -> dict[str, Any]:
    """PSI, KS and state per feature; the live rows per training decile, coarsened (bins are
    named by decile numbers, 1-10: the training edges are not sent either)."""
    parts = dict(drift.get("features") or {})
    if "score" in drift:
        parts["(score)"] = drift["score"]
    features = {}
    for name, figures in parts.items():
        entry = {"psi": figures.get("psi"), "ks": figures.get("ks"), "state": figures.get("state")}
        bins = figures.get("bins")
        if bins:
            coarse = coarsen(list(range(1, len(bins) + 1)), bins, k)
            entry["deciles"] = None if coarse is None else {"up_to_decile": coarse["le"], "rows": coarse["counts"]}
        features[name] = entry
    return {
        "state": drift.get("state"),
        "window_rows": suppress(drift.get("window_rows"), k),
        "drifted": list(drift.get("drifted") or []),
        "features": features,
    }


def _streams(status: Mapping[str, Any], k: int) -> dict[str, Any]:
    out: dict[str, Any] = {"beds": suppress(status.get("beds"), k)}
    for section, names in STREAM_COUNTERS.items():
        values = status.get(section)
        if not isinstance(values, Mapping):
            continue
        out[section] = {
            name: values[name] if name in NOT_COUNTS else suppress(values[name], k)
            for name in names
            if isinstance(values.get(name), (int, float))
        }
    by_level = (status.get("alerts") or {}).get("by_level") or {}
    if by_level:
        out.setdefault("alerts", {})["by_level"] = {level: suppress(n, k) for level, n in sorted(by_level.items())}
    return out


def _updates(status: Mapping[str, Any]) -> dict[str, Any]:
    """Per model: the update agent's last pass and last change with their versions; no device id,
    no repository address, no reason text."""
    models = status.get("models") or {}
    return {
        "models": {
            str(name): {key: entry.get(key) for key in ("now", "last", "version", "serving")}
            for name, entry in sorted(models.items())
        },
        "reports_sent": suppress(status.get("reports_sent"), 1),
    }
