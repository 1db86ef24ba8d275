"""The vitals scorer uses whatever model the config names, reading its input, score output and
positive class from the model's `[contract]`: a hospital's own model needs no code change."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
from onnx import TensorProto, helper

from bedside.alerts.bus import AlertBus
from bedside.clinical.features import WIDTH
from bedside.dataplane import Dataplane
from bedside.protocol.types import ANONYMOUS
from bedside.settings import DEFAULTS
from bedside.streams.beds import Beds
from bedside.streams.hl7v2 import Observation, VitalsMessage
from bedside.streams.scorer import VitalsScorer
from tests.models import _save, write_config

NOW = 1_800_000_000.0
CONFIG = f"""
max_batch_size = 4
[[inputs]]
name = "vitals"
datatype = "FP32"
shape = [{WIDTH}]
[[outputs]]
name = "aux"
datatype = "FP32"
shape = [1]
[[outputs]]
name = "scores"
datatype = "FP32"
shape = [2]
[contract]
score_output = "scores"
labels = ["deteriorating", "stable"]
positive_class = "deteriorating"
"""


def site_model(path, risk: float) -> None:
    """scores = [risk, 1 - risk] for every row, whatever the vital signs; aux = 0."""
    x = helper.make_tensor_value_info("vitals", TensorProto.FLOAT, ["batch", WIDTH])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2])
    aux = helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["batch", 1])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [WIDTH, 2], [0.0] * (WIDTH * 2))
    zero1 = helper.make_tensor("zero1", TensorProto.FLOAT, [WIDTH, 1], [0.0] * WIDTH)
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [2], [risk, 1 - risk])
    nodes = [
        helper.make_node("MatMul", ["vitals", "zero"], ["z"]),
        helper.make_node("Add", ["z", "bias"], ["scores"]),
        helper.make_node("MatMul", ["vitals", "zero1"], ["aux"]),
    ]
    _save(helper.make_graph(nodes, "site", [x], [aux, scores], [zero, zero1, bias]), path)


def test_scorer_reads_the_contract_and_batches_at_the_models_limit(tmp_path):
    write_config(tmp_path / "site_deterioration", CONFIG)
    site_model(tmp_path / "site_deterioration" / "1" / "model.onnx", risk=0.9)
    dataplane = Dataplane(tmp_path)
    dataplane.start()
    beds = Beds()
    vitals = {"heart_rate": 80, "respiratory_rate": 16, "systolic_bp": 120, "spo2": 97, "temperature": 37.0}
    for i in range(6):  # more beds than max_batch_size: two requests
        beds.add(VitalsMessage("c", f"B{i}", [Observation(k, v, NOW) for k, v in vitals.items()]))
    bus = AlertBus()
    settings = dataclasses.replace(DEFAULTS.scoring, model="site_deterioration", risk_threshold=0.8)
    try:
        events = asyncio.run(VitalsScorer(dataplane, beds, bus, settings).score_all(NOW))
    finally:
        dataplane.close()
    assert len(events) == 6 and {e.source for e in events} == {"site_deterioration v1"}
    assert all(np.isclose(e.risk, 0.9) and not e.degraded for e in events)  # column 0, the positive class
    assert len(bus.recent) == 6 and all("model risk 0.90 (threshold 0.8)" in a.reason for a in bus.recent)
    (stats,) = dataplane.statistics("site_deterioration", None, ANONYMOUS)
    assert stats.execution_count == 2 and stats.batch_sizes == {4: 1, 2: 1}
