"""`/metrics` in the Prometheus text format (prometheus-client), built when scraped.

Nothing here runs per request: the scheduler's workers already count every request into the
model version's statistics (monitoring/latency.py, histogram buckets included), and a scrape turns
those counters into metric families. The figures are the ones the caller's role and tenant may see
(`Dataplane.statistics`), so a tenant's monitor scrapes only its own models and its own row on a
model shared with it. Labels are model, version, tenant, stage, state and outcome: never request
data, patient identifiers or paths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from bedside.dataplane.types import VersionStatistics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def render(rows: list[VersionStatistics], extra: Mapping[str, Any] | None = None) -> bytes:
    """The metrics text for these statistics rows and `extra` gauges (nested numbers, e.g. the
    streams' status and the audit log's counters: `bedside_<path>`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(rows, extra or {}))
    return generate_latest(registry)


class _Collector:
    def __init__(self, rows: list[VersionStatistics], extra: Mapping[str, Any]) -> None:
        self.rows, self.extra = rows, extra

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        by_tenant, by_state, by_priority = [*labels, "tenant"], [*labels, "state"], [*labels, "priority"]
        requests = CounterMetricFamily(
            "bedside_requests", "Requests by outcome (ok, failed, rejected:REASON)", labels=[*labels, "outcome"]
        )
        tenants = CounterMetricFamily("bedside_tenant_requests", "Answered requests per tenant", labels=by_tenant)
        priorities = CounterMetricFamily(
            "bedside_priority_requests",
            "Requests by priority (1: STAT) and outcome (ok, failed, or the rejection's reason)",
            labels=[*by_priority, "outcome"],
        )
        inferences = CounterMetricFamily("bedside_inferences", "Rows run through the model", labels=labels)
        executions = CounterMetricFamily("bedside_executions", "Model runs (a batch is one)", labels=labels)
        state = GaugeMetricFamily("bedside_model_state", "1 for the state a version is in", labels=by_state)
        depth = GaugeMetricFamily("bedside_queue_depth", "Requests waiting per priority level", labels=by_priority)
        described = {"request": "Admission to result", "queue": "Waiting in the queue", "compute": "Running the model"}
        seconds = {
            stage: HistogramMetricFamily(f"bedside_{stage}_duration_seconds", f"{text}, seconds", labels=labels)
            for stage, text in described.items()
        }
        tenant_seconds = HistogramMetricFamily(
            "bedside_tenant_request_duration_seconds", "Admission to result per tenant, seconds", labels=by_tenant
        )
        batch = HistogramMetricFamily("bedside_batch_size", "Rows per model run", labels=labels)
        drift = _DriftFamilies(labels)
        for row in self.rows:
            key = [row.name, row.version]
            detail = row.detail
            requests.add_metric([*key, "ok"], row.success.count)
            requests.add_metric([*key, "failed"], row.failure.count)
            for reason, n in (detail.get("rejected") or {}).items():
                requests.add_metric([*key, f"rejected:{reason}"], n)
            inferences.add_metric(key, row.inference_count)
            executions.add_metric(key, row.execution_count)
            state.add_metric([*key, row.state], 1)
            for level, n in row.queue_depth.items():
                depth.add_metric([*key, str(level)], n)
            for level, outcomes in (detail.get("priorities") or {}).items():
                for outcome, n in outcomes.items():
                    priorities.add_metric([*key, level, outcome], n)
            for stage, hist in (detail.get("histograms") or {}).items():
                if stage in seconds and hist is not None:  # request: end to end; compute: running the model
                    seconds[stage].add_metric(key, *_buckets(hist))
            for tenant, t in (detail.get("tenants") or {}).items():
                tenants.add_metric([*key, tenant], t.get("success_count", 0))
                if t.get("histogram") is not None:
                    tenant_seconds.add_metric([*key, tenant], *_buckets(t["histogram"]))
            if row.batch_sizes:
                batch.add_metric(key, *_batch_buckets(row.batch_sizes))
            _drift(drift, key, detail.get("drift"))
        yield from (requests, tenants, priorities, inferences, executions, state, depth)
        yield from (*seconds.values(), tenant_seconds, batch)
        yield from (drift.psi, drift.ks, drift.state, drift.rows)
        gauges = dict(self.extra)
        updates = gauges.pop("updates", None)
        if updates is not None:
            yield from _updates(updates)
        yield from _gauges("bedside", gauges)


class _DriftFamilies:
    def __init__(self, labels: list[str]) -> None:
        by_feature = [*labels, "feature"]
        self.psi = GaugeMetricFamily("bedside_drift_psi", "Population stability index vs training", labels=by_feature)
        self.ks = GaugeMetricFamily("bedside_drift_ks", "Kolmogorov-Smirnov distance vs training", labels=by_feature)
        self.state = GaugeMetricFamily(
            "bedside_drift_state", "1 for the drift state of a feature or the score", labels=[*by_feature, "state"]
        )
        self.rows = GaugeMetricFamily("bedside_drift_window_rows", "Live rows compared", labels=labels)


def _drift(families: _DriftFamilies, key: list[str], drift: Mapping[str, Any] | None) -> None:
    """Per feature (and `(score)`): PSI, KS and the state; never a value of the window."""
    if not drift:
        return
    families.rows.add_metric(key, drift["window_rows"])
    parts = dict(drift["features"])
    if "score" in drift:
        parts["(score)"] = drift["score"]
    for feature, figures in parts.items():
        if figures["psi"] is not None:
            families.psi.add_metric([*key, feature], figures["psi"])
            families.ks.add_metric([*key, feature], figures["ks"])
        families.state.add_metric([*key, feature, figures["state"]], 1)


def _updates(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The update agent: per model, the last pass's action and the last change's action and version."""
    labels = ["model", "action"]
    now = GaugeMetricFamily("bedside_update_pass", "1 for what the agent's last pass did to a model", labels=labels)
    last = GaugeMetricFamily("bedside_update_last_change", "1 for a model's last update change", labels=labels)
    version = GaugeMetricFamily("bedside_update_version", "Version of a model's last update change", labels=["model"])
    for model, entry in (status.get("models") or {}).items():
        if entry.get("now"):
            now.add_metric([model, entry["now"]], 1)
        if entry.get("last"):
            last.add_metric([model, entry["last"]], 1)
        if isinstance(entry.get("version"), int):
            version.add_metric([model], entry["version"])
    yield from (now, last, version)
    yield CounterMetricFamily("bedside_update_reports", "Update reports sent", value=status.get("reports_sent", 0))


def _buckets(hist: Mapping[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs in seconds, +Inf last, and the sum in seconds."""
    out, running = [], 0
    for bound, n in zip([*hist["le_ms"], None], hist["counts"], strict=True):
        running += n
        out.append(("+Inf" if bound is None else repr(bound / 1000), float(running)))
    return out, float(hist["sum_ms"]) / 1000


def _batch_buckets(sizes: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    out = [(str(b), float(sum(n for s, n in sizes.items() if s <= b))) for b in BATCH_BOUNDS]
    out.append(("+Inf", float(sum(sizes.values()))))
    return out, float(sum(s * n for s, n in sizes.items()))


def _gauges(prefix: str, values: Mapping[str, Any]) -> Iterator[Metric]:
    """A gauge per number in a nested mapping (text and None are left out; True/False are 1/0)."""
    for key, value in values.items():
        name = f"{prefix}_{''.join(c if c.isalnum() else '_' for c in str(key))}"
        if isinstance(value, Mapping):
            yield from _gauges(name, value)
        elif isinstance(value, (int, float)):
            yield GaugeMetricFamily(name, f"{name[len('bedside_') :].replace('_', ' ')}", value=float(value))
