"""Make an ONNX model smaller or faster: INT8 (static, calibrated; or dynamic), FP16, graph fusion.

Each method writes a new file and leaves the source alone; whether the result may replace the
original is for the accuracy gate (gate.py) to decide.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bedside.errors import BedsideError, InvalidInput

METHODS = ("int8-static", "int8-dynamic", "fp16", "graph")
# operators whose weights and arithmetic INT8 makes smaller and faster (and their fused forms,
# e.g. com.microsoft FusedConv / FusedMatMul in a graph-optimized model)
QUANTIZABLE = ("Conv", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention", "Einsum")
# operators that only a quantized graph holds (QDQ, QOperator or dynamic quantization)
INT8_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QGemm"}
)
ML_DOMAIN = "ai.onnx.ml"


class OptimizeError(BedsideError):
    status = 400


class NotApplicable(OptimizeError, InvalidInput):
    """The method cannot do anything sound for this model or these arguments (the caller's to fix)."""


def optimize_file(src: Path, dst: Path, method: str, calibration: dict[str, np.ndarray] | None = None) -> Path:
    if method not in METHODS:
        raise NotApplicable(f"unknown optimization {method!r}; choose one of {', '.join(METHODS)}")
    refusal = why_not(onnx.load(str(src), load_external_data=False), method)
    if refusal:
        raise NotApplicable(refusal)
    if method == "int8-static":
        if not calibration:
            raise NotApplicable("int8-static needs a calibration set: representative inputs, by input name")
        int8_static(src, dst, calibration)
    elif method == "int8-dynamic":
        int8_dynamic(src, dst)
    elif method == "fp16":
        fp16(src, dst)
    else:
        graph(src, dst)
    try:  # a method can write a graph that does not load (e.g. FP16 beside float-only operators)
        ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OptimizeError(
            f"{method} wrote a model ONNX Runtime cannot load: {str(exc).splitlines()[0][:300]}"
        ) from None
    return dst


def is_int8(model: onnx.ModelProto) -> bool:
    """Already quantized: QDQ pairs, QLinear* operators or dynamic quantization."""
    return any(n.op_type in INT8_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def reduced_precision(model: onnx.ModelProto) -> str | None:
    """INT8 or FP16 if an earlier optimization already lowered the precision; None for FP32 (or FP64)."""
    if is_int8(model):
        return "INT8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "FP16"
    return None


def why_not(model: onnx.ModelProto, method: str) -> str | None:
    """Why `method` cannot help this model (one line), or None if it applies."""
    if method == "graph":
        return None  # fusions keep the precision: sound for any graph, quantized or not
    lowered = reduced_precision(model)
    if lowered:
        return f"the model is already {lowered} (an optimized version); optimize its FP32 version instead"
    compute = any(n.domain != ML_DOMAIN and any(k in n.op_type for k in QUANTIZABLE) for n in model.graph.node)
    ml_ops = sorted({n.op_type for n in model.graph.node if n.domain == ML_DOMAIN})
    if ml_ops and not compute:
        what = "a tree ensemble" if any(op.startswith("TreeEnsemble") for op in ml_ops) else "a classical ML model"
        precision = "INT8 quantization" if method.startswith("int8") else "FP16"
        return (
            f"the model is {what} ({ML_DOMAIN} operators: {', '.join(ml_ops)}): {precision} has no convolution, "
            "matrix multiply or recurrent layer to make smaller or faster here; the method that applies is graph"
        )
    if method.startswith("int8") and not compute:
        return (
            "the graph has no convolution, matrix multiply or recurrent layer (the operators INT8 quantization "
            "speeds up); the methods that apply are fp16 and graph"
        )
    return None


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
        with warnings.catch_warnings():  # it warns for every weight below FP16's smallest step
            warnings.simplefilter("ignore")
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
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OptimizeError(f"graph optimization failed: {str(exc).splitlines()[0][:300]}") from None
    return dst
