"""The aggregate export's disclosure rules: counts under k are withheld, histogram bins are merged
until none holds a small count, times are whole windows, and nothing names a tenant or a bed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bedside.cli import app
from bedside.monitoring.aggregate import aggregate, coarsen, suppress, window_start


@pytest.mark.parametrize(("n", "shown"), [(0, 0), (1, None), (9, None), (10, 10), (5000, 5000), (None, None)])
def test_a_count_under_k_is_withheld(n, shown):
    assert suppress(n, 10) == shown


def test_bins_merge_until_none_holds_a_small_count():
    bounds = [1, 2, 3, 4, 5, None]
    coarse = coarsen(bounds, [0, 4, 3, 12, 1, 2], k=5)
    assert coarse is not None
    assert sum(coarse["counts"]) == 22  # nothing lost, only merged
    assert all(n == 0 or n >= 5 for n in coarse["counts"])
    assert coarse["le"][-1] is None  # the small tail went into the bin before it, which now reaches +Inf
    assert coarse == {"le": [1, 3, None], "counts": [0, 7, 15]}


def test_a_histogram_of_fewer_than_k_samples_is_withheld_whole():
    assert coarsen([1, 2, None], [1, 2, 1], k=5) is None
    assert coarsen([1, 2, None], [0, 0, 0], k=5) == {"le": [1, 2, None], "counts": [0, 0, 0]}


def test_times_are_whole_windows():
    assert window_start(1_795_566_820.0, 60) == "2026-11-25T00:00Z"
    assert window_start(1_795_566_820.0, 15) == "2026-11-25T00:30Z"


def row(**extra):
    base = {
        "name": "m",
        "version": "1",
        "state": "READY",
        "success_count": 42,
        "failure_count": 2,
        "rejected": {"Overloaded": 12, "DeadlineExceeded": 1},
        "inference_count": 50,
        "execution_count": 20,
        "tenants": {"ward-7-cardiology": {}, "vendor-acme": {}},
        "priorities": {"1": {"ok": 3}, "2": {"ok": 39, "failed": 2}},
        "batch_size_histogram": {"1": 15, "2": 3, "4": 2},
        "histograms": {"request": {"le_ms": [0.1, 1.0], "counts": [30, 10, 2], "sum_ms": 20.0}},
    }
    return {**base, **extra}


def test_the_export_withholds_small_counts_and_names_no_tenant_or_bed():
    streams = {
        "beds": 14,
        "mllp": {"accepted": 300, "rejected": 2, "port": 2575, "ingest_pid": 4242},
        "alerts": {"published": 40, "by_level": {"1": 7, "3": 2}},
        "ecg": {"windows": 0, "p99_ms": None},
    }
    doc = aggregate([row()], streams, None, started=0.0, now=7200.0, k=10, window_min=60, server_version="x")
    (model,) = doc["models"]
    assert model["requests"] == {"ok": 42, "failed": None, "rejected": {"DeadlineExceeded": None, "Overloaded": 12}}
    assert model["tenants"] == 2 and "ward-7" not in json.dumps(doc) and "acme" not in json.dumps(doc)
    assert model["priorities"] == {"1": {"ok": None}, "2": {"failed": None, "ok": 39}}
    assert model["latency_ms"]["request"] == {"le_ms": [0.1, None], "counts": [30, 12]}
    assert model["batch_size"] == {"le": [4], "counts": [20]}  # 2 and 4 rows: too few, merged into "up to 4"
    assert doc["period"] == {"from": "1970-01-01T00:00Z", "until": "1970-01-01T02:00Z"}
    assert doc["streams"]["beds"] == 14 and doc["streams"]["alerts"]["by_level"] == {"1": None, "3": None}
    assert "port" not in doc["streams"]["mllp"] and "ingest_pid" not in doc["streams"]["mllp"]
    assert doc["streams"]["mllp"] == {"accepted": 300, "rejected": None}


def test_drift_goes_out_by_decile_without_values():
    drift = {
        "state": "drift",
        "window_rows": 120,
        "drifted": ["age"],
        "features": {"age": {"psi": 0.4, "ks": 0.3, "state": "drift", "bins": [0, 0, 2, 5, 10, 20, 30, 40, 8, 5]}},
    }
    doc = aggregate([row(drift=drift)], None, None, started=0, now=0, k=10, window_min=60, server_version="x")
    age = doc["models"][0]["drift"]["features"]["age"]
    assert age["psi"] == 0.4 and age["state"] == "drift"
    assert age["deciles"] == {"up_to_decile": [1, 2, 5, 6, 7, 8, 10], "rows": [0, 0, 17, 20, 30, 40, 13]}


def test_the_cli_says_in_one_line_when_the_server_is_not_there():
    result = CliRunner().invoke(app, ["aggregate", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1 and "cannot reach" in result.output and "Traceback" not in result.output
