"""The arrays a pipeline step is given (export sample, held-out and calibration sets), checked
against the model before anything runs: a mismatch is named in one line (what the model takes,
what the file holds, how to fix it) instead of surfacing as an ONNX Runtime error."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bedside.errors import InvalidInput

LABELS = "y"
# ONNX Runtime's input types -> NumPy
ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _open(path: Path, option: str) -> Any:
    if not path.is_file():
        raise InvalidInput(f"{option} {path}: No such file or directory")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInput(
            f"{option} {path}: not a NumPy .npy or .npz file ({str(exc).splitlines()[0][:120]})"
        ) from None


def load_npz(path: Path, option: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file by name; a lone .npy array is refused with what to do instead."""
    loaded = _open(path, option)
    if isinstance(loaded, np.ndarray):
        raise InvalidInput(
            f"{option} {path.name} holds one unnamed array; it needs an .npz with one array per model input, "
            "named after the input, and the labels as `y`: np.savez(FILE, <input name>=x, y=labels)"
        )
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def load_sample(path: Path, option: str = "--sample") -> np.ndarray | dict[str, np.ndarray]:
    """An export sample: one array (.npy), or one per input (.npz)."""
    loaded = _open(path, option)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def match_inputs(
    inputs: list[Any],
    arrays: dict[str, np.ndarray],
    what: str,
    labels: np.ndarray | None = None,
    labelled: bool = True,
) -> dict[str, np.ndarray]:
    """`arrays` fitted to the model's inputs (ONNX Runtime NodeArgs): the same names, one row count
    (shared with `labels`), rows of the input's shape, numbers cast to the input's type where that
    loses nothing that matters (float64 -> float32, int -> float). Anything else: InvalidInput.
    `labelled`: the file is one that holds labels too (held-out data), which the message says."""
    expected = [i.name for i in inputs]
    if sorted(arrays) != sorted(expected):
        example = ", ".join([*(f"{n}=..." for n in expected), *([f"{LABELS}=labels"] if labelled else [])])
        besides = f" (besides the labels `{LABELS}`)" if labels is not None else ""
        raise InvalidInput(
            f"{what} has arrays {sorted(arrays)}{besides}; the model takes inputs {expected}. Save one array per "
            "model input under the input's name"
            + (f", and the labels (one per row) as `{LABELS}`" if labelled else "")
            + f": np.savez(FILE, {example})"
        )
    rows = {n: len(a) if a.ndim else 0 for n, a in arrays.items()}
    if labels is not None:
        rows[LABELS] = len(labels) if labels.ndim else 0
    if len(set(rows.values())) != 1 or not next(iter(rows.values())):
        raise InvalidInput(f"{what}: every array needs the same number of rows, at least one; found {rows}")
    fitted = {}
    for spec in inputs:
        array, want = arrays[spec.name], ORT_DTYPES.get(spec.type)
        if want is not None and array.dtype != want:
            castable = np.dtype(want).kind == "f" and array.dtype.kind in "fiub"
            castable |= np.dtype(want).kind in "iu" and array.dtype.kind in "iu"
            if not castable:
                raise InvalidInput(
                    f"{what}: `{spec.name}` holds {array.dtype.name}; the model's input {spec.name!r} is {spec.type}"
                )
            array = array.astype(want)
        dims = list(spec.shape[1:]) if spec.shape else []
        row = list(array.shape[1:])
        fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
        if len(row) != len(dims) or any(f is not None and f != r for f, r in zip(fixed, row, strict=False)):
            shown = ["?" if f is None else f for f in fixed]
            raise InvalidInput(
                f"{what}: `{spec.name}` has rows of shape {row}; the model's input {spec.name!r} takes rows of {shown}"
            )
        fitted[spec.name] = np.ascontiguousarray(array)
    return fitted


def check_tabular_sample(model: Any, sample: Any) -> None:
    """A scikit-learn / LightGBM / XGBoost sample: 2-D, as wide as the model was trained."""
    if not isinstance(sample, np.ndarray):
        raise InvalidInput(f"{type(model).__name__} takes one feature matrix: give the sample as one 2-D .npy array")
    width = getattr(model, "n_features_in_", None)
    if sample.ndim != 2:
        wanted = f"[rows, {width}]" if isinstance(width, int) else "[rows, features]"
        raise InvalidInput(f"the sample has shape {list(sample.shape)}; {type(model).__name__} takes {wanted}")
    if isinstance(width, (int, np.integer)) and sample.shape[1] != width:
        raise InvalidInput(
            f"the sample has {sample.shape[1]} features per row; {type(model).__name__} was trained on {int(width)}"
        )
    if sample.dtype.kind not in "fiub":
        raise InvalidInput(f"the sample holds {sample.dtype.name}; tabular models take numbers")
