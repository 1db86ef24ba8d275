"""Export PyTorch, scikit-learn, LightGBM and XGBoost models to ONNX, checked numerically.

Every export is validated with the ONNX checker and then run with ONNX Runtime on the sample
inputs; each output must match the source model within the tolerance, |ONNX - source| <= 1e-5 +
1e-5 x |source| by default (the relative part covers float32 rounding of outputs far from 0, such as a
regression on a clinical scale), or the export fails with an error naming the output and the
difference. An export that only "loads" is not trusted at a bedside.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bedside.errors import BedsideError, InvalidInput
from bedside.pipeline.data import check_tabular_sample

TOLERANCE = 1e-5
RTOL = 1e-5
SUPPORTED_OPSETS = range(13, 22)


class ExportError(BedsideError):
    status = 400


class ExportMismatch(ExportError):
    """The ONNX model does not reproduce the source model."""


class SampleMismatch(ExportError, InvalidInput):
    """The sample does not fit the model (its shape or type): the caller's to fix."""


@dataclass
class ExportResult:
    model: onnx.ModelProto
    framework: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()


def verify(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    tolerance: float = TOLERANCE,
    rtol: float = RTOL,
) -> dict[str, float]:
    """ONNX checker, then ONNX Runtime against the source model's outputs: every value within
    `tolerance` + `rtol` x |source value|. Returns max |diff| per output."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    graph_inputs = sorted(i.name for i in session.get_inputs())
    if graph_inputs != sorted(feeds):
        raise ExportError(
            f"the exported graph takes inputs {graph_inputs}, the model was given {sorted(feeds)}: an input the "
            "graph dropped means the traced outputs do not depend on it (Python or NumPy code inside forward?)"
        )
    names = list(expected)
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    diffs = {}
    for name, want in expected.items():
        got = outputs[name]
        if got.shape != want.shape:
            raise ExportMismatch(
                f"output {name!r}: ONNX gives shape {list(got.shape)}, the source model {list(want.shape)}"
            )
        if want.dtype.kind in "iub":
            wrong = int(np.count_nonzero(got != want))
            if wrong:
                raise ExportMismatch(f"output {name!r}: {wrong} of {want.size} values differ from the source model")
            diffs[name] = 0.0
            continue
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
        diff = float(np.max(error)) if want.size else 0.0
        if not np.all(error <= tolerance + rtol * np.abs(want.astype(np.float64))):
            raise ExportMismatch(
                f"output {name!r}: ONNX differs from the source model by up to {diff:.3g} "
                f"(allowed {tolerance:g} + {rtol:g} x |source value|)"
            )
        diffs[name] = diff
    return diffs


def _check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")


def export_torch(
    module: Any,
    sample: np.ndarray | dict[str, np.ndarray],
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset: int = 17,
    dynamo: bool = False,
    tolerance: float = TOLERANCE,
    rtol: float = RTOL,
) -> ExportResult:
    """Export with a dynamic batch axis on every input and output."""
    import torch

    _check_opset(opset)
    samples = sample if isinstance(sample, dict) else {(input_names or ["input"])[0]: sample}
    input_names = list(samples)
    module = module.eval()
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in samples.values())
    try:
        with torch.no_grad():
            reference = module(*tensors)
    except Exception as exc:  # a shape or dtype the module does not take
        shapes = ", ".join(f"{n} {v.dtype} {list(v.shape)}" for n, v in samples.items())
        raise SampleMismatch(
            f"the module cannot run on the sample ({shapes}): {str(exc).splitlines()[0][:200]}"
        ) from None
    ref_list = list(reference) if isinstance(reference, (tuple, list)) else [reference]
    output_names = output_names or (["output"] if len(ref_list) == 1 else [f"output_{i}" for i in range(len(ref_list))])
    if len(output_names) != len(ref_list):
        raise ExportError(f"the module returns {len(ref_list)} outputs but {len(output_names)} output names were given")
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic: dict[str, Any]
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=4096)
                dynamic = {"opset_version": max(opset, 18), "dynamic_shapes": tuple({0: batch} for _ in tensors)}
            else:
                dynamic = {
                    "opset_version": opset,
                    "dynamic_axes": {n: {0: "batch"} for n in input_names + output_names},
                }
            torch.onnx.export(
                module,
                tensors,
                buffer,  # type: ignore[arg-type]  # torch writes to a file object as well as a path
                input_names=input_names,
                output_names=output_names,
                dynamo=dynamo,
                **dynamic,
            )
    except Exception as exc:  # the exporters raise many types for unsupported operators
        raise ExportError(
            f"PyTorch cannot export this module to ONNX opset {opset}: {str(exc).splitlines()[0][:300]}"
        ) from None
    model = onnx.load_from_string(buffer.getvalue())
    expected = {n: r.detach().numpy() for n, r in zip(output_names, ref_list, strict=True)}
    return ExportResult(model, "pytorch", verify(model, samples, expected, tolerance, rtol))


def _classifier_outputs(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "label": np.asarray(model.predict(x)),
        "probabilities": np.asarray(model.predict_proba(x), dtype=np.float32),
    }


def export_sklearn(
    model: Any, sample: np.ndarray, opset: int = 15, tolerance: float = TOLERANCE, rtol: float = RTOL
) -> ExportResult:
    from skl2onnx import to_onnx

    _check_opset(opset)
    check_tabular_sample(model, sample)
    x = np.ascontiguousarray(sample)
    try:
        options = {"zipmap": False} if hasattr(model, "predict_proba") else None
        onx = to_onnx(model, x[:1], target_opset=opset, options=options)
    except Exception as exc:
        raise ExportError(f"skl2onnx cannot convert {type(model).__name__}: {str(exc).splitlines()[0][:300]}") from None
    _rename_io(onx, inputs=["features"], outputs=["label", "probabilities"] if options else ["prediction"])
    if options:
        expected = _classifier_outputs(model, x)
        expected["label"] = (
            expected["label"].astype(np.int64) if expected["label"].dtype.kind in "iub" else expected["label"]
        )
    else:
        out = np.asarray(model.predict(x))
        expected = {"prediction": out.reshape(-1, 1).astype(x.dtype) if out.ndim == 1 else out.astype(x.dtype)}
    return ExportResult(onx, "scikit-learn", verify(onx, {"features": x}, expected, tolerance, rtol))


def _export_tree_booster(
    model: Any, sample: np.ndarray, convert: Any, framework: str, opset: int, tolerance: float, rtol: float
) -> ExportResult:
    from onnxmltools.convert.common.data_types import FloatTensorType

    _check_opset(opset)
    check_tabular_sample(model, sample)
    x = np.ascontiguousarray(sample, dtype=np.float32)
    classifier = hasattr(model, "predict_proba")
    try:
        kwargs = {"zipmap": False} if classifier and framework == "LightGBM" else {}
        onx = convert(
            model,
            initial_types=[("features", FloatTensorType([None, x.shape[1]]))],
            target_opset=min(opset, 15),
            **kwargs,
        )
    except Exception as exc:
        raise ExportError(
            f"{framework} model {type(model).__name__} cannot be converted: {str(exc).splitlines()[0][:300]}"
        ) from None
    for output in onx.graph.output:  # the converters declare per-row outputs with a fixed first dimension
        dims = output.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "batch"
    if classifier:
        _rename_io(onx, outputs=["label", "probabilities"])
        expected = _classifier_outputs(model, x)
        expected["label"] = expected["label"].astype(np.int64)
    else:
        _rename_io(onx, outputs=["prediction"])
        expected = {"prediction": np.asarray(model.predict(x), dtype=np.float32).reshape(-1, 1)}
    return ExportResult(onx, framework, verify(onx, {"features": x}, expected, tolerance, rtol))


def export_lightgbm(
    model: Any, sample: np.ndarray, opset: int = 15, tolerance: float = TOLERANCE, rtol: float = RTOL
) -> ExportResult:
    from onnxmltools import convert_lightgbm

    return _export_tree_booster(model, sample, convert_lightgbm, "LightGBM", opset, tolerance, rtol)


def export_xgboost(
    model: Any, sample: np.ndarray, opset: int = 15, tolerance: float = TOLERANCE, rtol: float = RTOL
) -> ExportResult:
    from onnxmltools import convert_xgboost

    return _export_tree_booster(model, sample, convert_xgboost, "XGBoost", opset, tolerance, rtol)


class UnsupportedModel(ExportError, InvalidInput):
    """Not a model of a library bedside exports."""


def framework_of(model: Any) -> str:
    """pytorch, LightGBM, XGBoost or scikit-learn; UnsupportedModel for anything else."""
    module = type(model).__module__.split(".")[0]
    if module == "torch" or any(c.__module__.startswith("torch.nn") for c in type(model).__mro__):
        return "pytorch"
    if module == "lightgbm":
        return "LightGBM"
    if module == "xgboost":
        return "XGBoost"
    if module == "sklearn" or hasattr(model, "_sklearn_tags") or hasattr(model, "get_params"):
        return "scikit-learn"
    raise UnsupportedModel(
        f"no exporter for {type(model).__module__}.{type(model).__name__}: "
        "bedside exports PyTorch, scikit-learn, LightGBM and XGBoost models"
    )


def export_model(model: Any, sample: Any, **kwargs: Any) -> ExportResult:
    """Pick the exporter from the model's library."""
    exporter: dict[str, Callable[..., ExportResult]] = {
        "pytorch": export_torch,
        "LightGBM": export_lightgbm,
        "XGBoost": export_xgboost,
        "scikit-learn": export_sklearn,
    }
    return exporter[framework_of(model)](model, sample, **kwargs)


def _rename_io(model: onnx.ModelProto, inputs: list[str] | None = None, outputs: list[str] | None = None) -> None:
    renames: dict[str, str] = {}
    if inputs:
        renames.update({v.name: n for v, n in zip(model.graph.input, inputs, strict=False)})
    if outputs:
        renames.update({v.name: n for v, n in zip(model.graph.output, outputs, strict=False)})
    renames = {k: v for k, v in renames.items() if k != v}
    if not renames:
        return
    for value in [*model.graph.input, *model.graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
