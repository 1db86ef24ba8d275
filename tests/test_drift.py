"""Drift on the box, against the training reference the demo models ship: real held-out WDBC rows
are not drift, the same rows with one feature shifted are, and only that feature (and the score it
moves) is named. Only PSI, KS and states leave the box, never a value."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from bedside.dataplane import Dataplane
from bedside.dataplane.dataplane import metrics_text
from bedside.monitoring.drift import REFERENCE_FILE, DriftMonitor, make_reference, parse_reference
from bedside.protocol.types import ANONYMOUS, InferRequest

MODEL = "breast_mass_malignancy"


@pytest.fixture(scope="module")
def held_out():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = (data.target == 0).astype(np.int64)
    x_tr, x_te, *_ = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)  # the demo's split
    return x_tr, x_te, list(data.feature_names)


def drift_after(repo, rows: np.ndarray) -> tuple[dict, bytes]:
    dataplane = Dataplane(repo)
    dataplane.start()
    try:

        async def send() -> None:
            for start in range(0, len(rows), 8):
                await dataplane.infer(MODEL, None, InferRequest({"features": rows[start : start + 8]}))

        asyncio.run(send())
        [row] = dataplane.statistics(MODEL, None, ANONYMOUS)
        return row.detail["drift"], metrics_text(dataplane, ANONYMOUS)
    finally:
        dataplane.close()


@pytest.fixture
def repo(demo_repo, tmp_path):
    shutil.copytree(demo_repo / MODEL, tmp_path / MODEL)
    assert (tmp_path / MODEL / "1" / REFERENCE_FILE).is_file()  # the demo ships its reference
    return tmp_path


def test_held_out_real_rows_are_not_drift(repo, held_out):
    _, x_te, _ = held_out
    drift, _ = drift_after(repo, x_te)
    assert drift["window_rows"] == len(x_te) and drift["drifted"] == []
    assert drift["state"] in ("stable", "watch")


def test_a_shifted_feature_is_drift_and_named_and_no_value_leaves(repo, held_out):
    x_tr, x_te, names = held_out
    shifted = x_te.copy()
    column = names.index("mean texture")
    shifted[:, column] += 2 * x_tr[:, column].std()
    drift, metrics = drift_after(repo, shifted)
    assert drift["drifted"] == ["mean texture"] and drift["state"] == "drift"
    assert drift["features"]["mean texture"]["psi"] >= 0.25
    assert (
        b'bedside_drift_state{feature="mean texture",model="breast_mass_malignancy",state="drift",version="1"} 1.0'
        in metrics
    )
    value = f"{shifted[0, column]:.4f}".encode()
    assert value not in metrics  # a live value is never exported


def test_too_few_rows_say_insufficient_and_a_bad_reference_is_refused():
    x = np.random.default_rng(0).normal(size=(500, 3))
    monitor = DriftMonitor(parse_reference(make_reference(x, "x")), 64)
    monitor.observe({"x": x[:10]}, {})
    assert monitor.summary()["state"] == "insufficient"
    monitor.observe({"x": np.ones((4, 5))}, {})  # another shape: skipped
    assert monitor.seen == 10
    monitor.observe({"x": x[:200]}, {})  # more rows than the window: the last ones are kept
    assert monitor.summary()["window_rows"] == 64
    from bedside.monitoring.drift import DriftReferenceError

    with pytest.raises(DriftReferenceError):
        parse_reference(b'{"input": "x", "features": [{"name": "a", "edges": [1, 2], "counts": [1]}]}')
