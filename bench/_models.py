"""Benchmark models built with onnx.helper: a 1D-CNN over a 12-lead ECG window at 250 Hz.

Weights are random (He initialisation): the benchmark measures serving cost, not accuracy. The
trained ECG classifier is built by the model pipeline; this one needs neither torch nor data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LEADS = 12
CLASSES = 5


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def ecg_cnn(path: Path, samples: int = 1250, channels: tuple[int, ...] = (32, 64, 128, 128), seed: int = 0) -> Path:
    """Conv1d(k7,s2)+ReLU blocks, global average pool, linear head: [N, 12, samples] -> [N, 5]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, c_in = "ecg", LEADS
    for i, c_out in enumerate(channels):
        k = 7 if i < 2 else 5
        w = (rng.standard_normal((c_out, c_in, k)) * np.sqrt(2 / (c_in * k))).astype(np.float32)
        b = np.zeros(c_out, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(
            helper.make_node(
                "Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[k], strides=[2], pads=[k // 2, k // 2]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, c_in = f"r{i}", c_out
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    wh = (rng.standard_normal((c_in, CLASSES)) * np.sqrt(1 / c_in)).astype(np.float32)
    inits += [numpy_helper.from_array(wh, "wh"), numpy_helper.from_array(np.zeros(CLASSES, np.float32), "bh")]
    nodes.append(helper.make_node("Gemm", ["flat", "wh", "bh"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "ecg_cnn",
        [helper.make_tensor_value_info("ecg", TensorProto.FLOAT, ["batch", LEADS, samples])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    return _save(graph, path)


def params(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def vitals_lstm(path: Path, steps: int = 60, features: int = 8, hidden: int = 128, seed: int = 0) -> Path:
    """One LSTM layer over a vital-sign window and a linear head: [N, steps, features] -> [N, 1] risk."""
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(hidden)
    w = (rng.uniform(-scale, scale, (1, 4 * hidden, features))).astype(np.float32)
    r = (rng.uniform(-scale, scale, (1, 4 * hidden, hidden))).astype(np.float32)
    b = np.zeros((1, 8 * hidden), np.float32)
    wh = (rng.standard_normal((hidden, 1)) * scale).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in (
            (w, "W"),
            (r, "R"),
            (b, "B"),
            (wh, "wh"),
            (np.zeros(1, np.float32), "bh"),
            (np.array([-1, hidden], np.int64), "flat_shape"),
        )
    ]
    nodes = [
        helper.make_node("Transpose", ["vitals"], ["tmajor"], perm=[1, 0, 2]),  # LSTM wants [steps, N, features]
        helper.make_node("LSTM", ["tmajor", "W", "R", "B"], ["", "h_last"], hidden_size=hidden),
        helper.make_node("Reshape", ["h_last", "flat_shape"], ["h"]),
        helper.make_node("Gemm", ["h", "wh", "bh"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["risk"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vitals_lstm",
        [helper.make_tensor_value_info("vitals", TensorProto.FLOAT, ["batch", steps, features])],
        [helper.make_tensor_value_info("risk", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    return _save(graph, path)
