"""/metrics: Prometheus text that the Prometheus parser reads, real latency histograms whose counts
move with the requests a test sends, the access rules of the statistics, and no request data."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bedside.dataplane import Dataplane, call_context
from bedside.dataplane.dataplane import metrics_text
from bedside.monitoring.latency import BUCKETS_MS, LatencyWindow
from bedside.protocol.types import ANONYMOUS, InferRequest
from tests.models import SCALE_CONFIG, scale_model, write_config


def families(text: bytes) -> dict[str, dict[tuple, float]]:
    """metric family -> {(sample name, sorted labels): value}"""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out.setdefault(family.name, {})[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(found: dict, family: str, name: str, **labels: str) -> float:
    return found[family].get((name, tuple(sorted(labels.items()))), 0.0)


def test_histogram_buckets_count_every_sample_where_it_falls():
    window = LatencyWindow(8)
    for ms in (0.01, 0.05, 0.07, 3.0, 3.0, 2000.0):
        window.record(int(ms * 1e6))
    hist = window.histogram()
    assert hist["le_ms"] == list(BUCKETS_MS) and sum(hist["counts"]) == 6
    assert hist["counts"][0] == 2 and hist["counts"][1] == 1 and hist["counts"][-1] == 1  # 0.05 is in le=0.05
    assert hist["counts"][BUCKETS_MS.index(5.0)] == 2


def test_metrics_parse_and_move_with_the_requests_sent(tmp_path):
    write_config(tmp_path / "scale", SCALE_CONFIG)
    scale_model(tmp_path / "scale" / "1" / "model.onnx")
    dataplane = Dataplane(tmp_path)
    dataplane.start()
    try:
        before = families(metrics_text(dataplane, ANONYMOUS))
        request = InferRequest({"x": np.full((1, 4), 3.14159, np.float32)})

        async def send(n: int) -> None:
            for _ in range(n):
                await dataplane.infer("scale", None, request)

        asyncio.run(send(25))
        stat = call_context({}, priority="stat", transport="test", caller=ANONYMOUS)

        async def send_stat(n: int) -> None:
            for _ in range(n):
                await dataplane.infer("scale", None, request, stat)

        asyncio.run(send_stat(4))
        text = metrics_text(dataplane, ANONYMOUS)
        after = families(text)
    finally:
        dataplane.close()
    key = {"model": "scale", "version": "1"}
    assert sample(after, "bedside_requests", "bedside_requests_total", **key, outcome="ok") == 29
    assert sample(before, "bedside_requests", "bedside_requests_total", **key, outcome="ok") == 0
    by_priority = "bedside_priority_requests"
    assert sample(after, by_priority, f"{by_priority}_total", **key, priority="1", outcome="ok") == 4  # STAT
    routine = sum(v for (_, labels), v in after[by_priority].items() if dict(labels)["priority"] != "1")
    assert routine == 25
    for stage in ("request", "queue", "compute"):
        family = f"bedside_{stage}_duration_seconds"
        assert sample(after, family, f"{family}_count", **key) == 29
        buckets = sorted(
            (float(dict(labels)["le"]), value) for (name, labels), value in after[family].items()
            if name.endswith("_bucket")
        )  # fmt: skip
        assert [b for b, _ in buckets] == [*[b / 1000 for b in BUCKETS_MS], float("inf")]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == 29  # cumulative, +Inf holds all
        assert sample(after, family, f"{family}_sum", **key) > 0
    assert sample(after, "bedside_model_state", "bedside_model_state", **key, state="READY") == 1
    assert sample(after, "bedside_batch_size", "bedside_batch_size_count", **key) >= 1
    assert b"3.14" not in text and b"6.28" not in text  # neither an input nor an answer (2x) is exported


def test_the_metrics_endpoint_serves_prometheus_text(server):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    for _ in range(3):
        urllib.request.urlopen(
            urllib.request.Request(f"{server.url}/v2/models/scale/infer", body.encode(), method="POST"), timeout=10
        ).read()
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = response.read()
    found = families(text)
    assert sample(found, "bedside_requests", "bedside_requests_total", model="scale", version="2", outcome="ok") >= 3
    assert "bedside_streams_beds" in found or "bedside_audit_written" in found
    assert b"[1, 2, 3, 4]" not in text


def test_histograms_off_counts_requests_without_buckets_or_drift(tmp_path):
    write_config(tmp_path / "scale", SCALE_CONFIG)
    scale_model(tmp_path / "scale" / "1" / "model.onnx")
    dataplane = Dataplane(tmp_path, histograms=False)
    dataplane.start()
    try:
        request = InferRequest({"x": np.ones((1, 4), np.float32)})

        async def send(n: int) -> None:
            for _ in range(n):
                await dataplane.infer("scale", None, request)

        asyncio.run(send(5))
        found = families(metrics_text(dataplane, ANONYMOUS))
        (row,) = dataplane.statistics("scale", None, ANONYMOUS)
    finally:
        dataplane.close()
    key = {"model": "scale", "version": "1"}
    assert sample(found, "bedside_requests", "bedside_requests_total", **key, outcome="ok") == 5
    assert not found.get("bedside_request_duration_seconds") and not found.get("bedside_priority_requests")
    assert "histograms" not in row.detail and row.detail["latency"]["count"] == 5  # percentiles stay


def test_update_agent_figures_are_labelled_families_not_names():
    from bedside.dataplane.metrics import render

    updates = {"models": {"vitals": {"now": "watching", "last": "installed", "version": 3}}, "reports_sent": 4}
    found = families(render([], {"updates": updates, "streams": {"beds": 2}}))
    assert sample(found, "bedside_update_pass", "bedside_update_pass", model="vitals", action="watching") == 1
    assert (
        sample(found, "bedside_update_last_change", "bedside_update_last_change", model="vitals", action="installed")
        == 1
    )
    assert sample(found, "bedside_update_version", "bedside_update_version", model="vitals") == 3
    assert sample(found, "bedside_update_reports", "bedside_update_reports_total") == 4
    assert sample(found, "bedside_streams_beds", "bedside_streams_beds") == 2
