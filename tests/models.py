"""Tiny ONNX graphs built in the tests, so each case owns exactly the model it needs."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

ALL_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def scale_model(path: Path, width: int = 4, factor: float = 2.0, batch: str | int = "batch", weights: int = 0) -> Path:
    """y = x * factor, x: FP32 [batch, width]. `weights`: that many more fixed FP32 values, added to y
    as zeros, so the file has the bulk of a real model whose other weights do not change."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [factor])
    if not weights:
        node = helper.make_node("Mul", ["x", "k"], ["y"])
        return _save(helper.make_graph([node], "scale", [x], [y], [k]), path)
    values = [((i * 7919) % 1000) / 1000.0 for i in range(weights)]
    w = helper.make_tensor("w", TensorProto.FLOAT, [weights], values)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0),
        helper.make_node("Mul", ["w_sum", "zero"], ["nothing"]),
        helper.make_node("Mul", ["x", "k"], ["scaled"]),
        helper.make_node("Add", ["scaled", "nothing"], ["y"]),
    ]
    return _save(helper.make_graph(nodes, "scale", [x], [y], [k, w, zero]), path)


def all_types_model(path: Path) -> Path:
    """One Identity per OIP datatype: in_<TYPE> -> out_<TYPE>, shape [batch, 3]."""
    inputs, outputs, nodes = [], [], []
    for name, code in ALL_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", code, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", code, ["batch", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return _save(helper.make_graph(nodes, "all_types", inputs, outputs), path)


def write_config(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(text, encoding="utf-8")


SCALE_CONFIG = """
max_batch_size = 8
description = "doubles its input"
[[inputs]]
name = "x"
datatype = "FP32"
shape = [4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [4]
"""


def rhythm_model(path: Path, classes: int = 5, leads: int = 12, samples: int = 1250, favour: int = 0) -> Path:
    """A stand-in rhythm classifier: softmax over a fixed projection of each lead's mean, biased
    so that class `favour` wins; x: FP32 [batch, leads, samples] -> probabilities [batch, classes]."""
    x = helper.make_tensor_value_info("ecg", TensorProto.FLOAT, ["batch", leads, samples])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])
    weights = helper.make_tensor("w", TensorProto.FLOAT, [leads, classes], [0.0] * (leads * classes))
    bias = helper.make_tensor("b", TensorProto.FLOAT, [classes], [4.0 if c == favour else 0.0 for c in range(classes)])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    nodes = [
        helper.make_node("ReduceMean", ["ecg", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return _save(helper.make_graph(nodes, "rhythm", [x], [y], [weights, bias, axes]), path, opset=18)


def rhythm_config(labels: list[str] | None, samples: int = 1250) -> str:
    text = (
        f'max_batch_size = 8\n[[inputs]]\nname = "ecg"\ndatatype = "FP32"\nshape = [12, {samples}]\n'
        f'[[outputs]]\nname = "probabilities"\ndatatype = "FP32"\nshape = [{len(labels or []) or 5}]\n'
    )
    if labels:
        text += "[contract]\nlabels = [" + ", ".join(f'"{label}"' for label in labels) + "]\n"
    return text


def log_model(path: Path, width: int = 4) -> Path:
    """y = log(x), x: FP32 [batch, width]: right for x > 0, NaN below (a model that degrades on real traffic)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    return _save(helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log", [x], [y]), path)
