"""Make an ONNX model smaller or faster: INT8 (static, calibrated; or dynamic), FP16, graph fusion.

Each method writes a new file and leaves the source alone; whether the result may replace the
original is for the accuracy gate (gate.py) to decide.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bedside.errors import BedsideError

METHODS = ("int8-static", "int8-dynamic", "fp16", "graph")


class OptimizeError(BedsideError):
    status = 400


def optimize_file(src: Path, dst: Path, method: str, calibration: dict[str, np.ndarray] | None = None) -> Path:
    if method == "int8-static":
        if not calibration:
            raise OptimizeError("int8-static needs a calibration set: representative inputs, by input name")
        return int8_static(src, dst, calibration)
    if method == "int8-dynamic":
        return int8_dynamic(src, dst)
    if method == "fp16":
        return fp16(src, dst)
    if method == "graph":
        return graph(src, dst)
    raise OptimizeError(f"unknown optimization {method!r}; choose one of {', '.join(METHODS)}")


class _Batches:
    """ONNX Runtime's calibration reader protocol over in-memory arrays."""

    def __init__(self, data: dict[str, np.ndarray], batch: int) -> None:
        rows = len(next(iter(data.values())))
        self._it: Iterator[dict[str, np.ndarray]] = (
            {k: np.ascontiguousarray(v[i : i + batch]) for k, v in data.items()} for i in range(0, rows, batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _preprocessed(src: Path, workdir: Path) -> Path:
    """Shape inference and graph cleanup that the quantizer relies on."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "pre.onnx"
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    except Exception:  # some graphs (tree ensembles, string ops) do not pre-process; quantize as is
        return src
    return out


def int8_static(src: Path, dst: Path, calibration: dict[str, np.ndarray], batch: int = 8) -> Path:
    """Post-training static quantization: weights and activations to INT8, ranges from calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        source = _preprocessed(src, Path(tmp))
        try:
            quantize_static(
                str(source),
                str(dst),
                _Batches(calibration, batch),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=_output_nodes(source),
            )
        except Exception as exc:
            raise OptimizeError(f"static INT8 quantization failed: {str(exc).splitlines()[0][:300]}") from None
    return dst


def _output_nodes(path: Path) -> list[str]:
    """Nodes that produce the model's outputs stay in float: 8-bit probabilities or risk scores
    collapse into 256 steps, and clinical metrics (AUROC, calibration) depend on their resolution."""
    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return [node.name for node in graph.node if node.name and outputs.intersection(node.output)]


def int8_dynamic(src: Path, dst: Path) -> Path:
    """Dynamic quantization: INT8 weights, activations quantized per run (MatMul, LSTM, attention)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source = _preprocessed(src, Path(tmp))
        try:
            quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, per_channel=False)
        except Exception as exc:
            raise OptimizeError(f"dynamic INT8 quantization failed: {str(exc).splitlines()[0][:300]}") from None
    return dst


def fp16(src: Path, dst: Path) -> Path:
    """Half-precision weights and compute for GPU targets; inputs and outputs stay FP32."""
    from onnxconverter_common import float16

    try:
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    except Exception as exc:
        raise OptimizeError(f"FP16 conversion failed: {str(exc).splitlines()[0][:300]}") from None
    onnx.save(model, str(dst))
    return dst


def graph(src: Path, dst: Path) -> Path:
    """ONNX Runtime's portable graph fusions, saved so they are not redone at every load."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst
