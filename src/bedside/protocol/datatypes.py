"""OIP datatype names <-> numpy dtypes <-> ONNX Runtime element types."""

from __future__ import annotations

import warnings
from math import prod
from typing import Any

import numpy as np

from bedside.errors import InvalidInput

# BYTES travels as numpy object arrays of str (what ONNX Runtime takes for string tensors).
OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NUMPY.items()}

ORT_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

DATATYPES = frozenset(OIP_TO_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return OIP_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInput(f"unknown datatype {datatype!r}; expected one of {', '.join(sorted(DATATYPES))}") from None


def oip_datatype(dtype: np.dtype) -> str:
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


MAX_DIMS = 32
MAX_DIM = 2**31 - 1  # a dimension beyond this is a client bug, not a tensor
MAX_SPAN = 2**40  # product of the non-zero dimensions: numpy refuses shapes whose byte size overflows
# A float beyond FP16/FP32's range becomes an infinity in the cast, which the signature refuses with
# the reason; numpy's warning about it would only add a log line (np.errstate per request costs 1 µs).
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
# JSON spellings of the non-finite floats (as in protobuf's JSON mapping); numbers are never quoted otherwise
NON_FINITE_TEXT = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def check_shape(name: str, shape: Any) -> int:
    """The element count of a client's `shape`, or InvalidInput when it cannot be a tensor's."""
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise InvalidInput(
            f"input {name!r}: 'shape' must be a list of at most {MAX_DIMS} non-negative integers, "
            f"each at most {MAX_DIM}"
        )
    if prod(d or 1 for d in shape) > MAX_SPAN:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} is larger than any tensor this server holds")
    return prod(shape)


def numbers_as(data: Any, dtype: np.dtype, name: str, datatype: str) -> np.ndarray:
    """JSON numbers (a flat or nested list) as an array of `dtype`, refusing every conversion that
    would change a value: text for numbers, booleans for numbers and numbers for booleans, fractions
    for integers, integers outside the type's range (a list mixing booleans with numbers is read as
    numbers, as numpy does). Floats beyond FP16/FP32's range become
    infinities here and are refused with the other non-finite values by the model's signature."""
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: 'data' is not a regular (non-ragged) list of numbers") from None
    kind = raw.dtype.kind
    if raw.size == 0:
        return raw.astype(dtype)
    if dtype.kind == "b":
        if kind != "b":
            raise InvalidInput(f"input {name!r}: {datatype} data must be true or false")
        return raw
    if dtype.kind in "iu":
        if kind not in "iu":  # numpy reads [0, 2**64 - 1] as floats: look at the values themselves
            raw = _exact_integers(data, raw.shape, name, datatype)
        limits = np.iinfo(dtype)
        if int(raw.min()) < limits.min or int(raw.max()) > limits.max:
            raise InvalidInput(f"input {name!r}: a value is outside the {datatype} range {limits.min}..{limits.max}")
        return raw.astype(dtype, copy=False)
    if kind in "USO":
        raw = _spelled_floats(data, raw.shape, name, datatype)
    elif kind not in "iuf":
        raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
    return raw.astype(dtype, copy=False)


def _elements(data: Any, shape: tuple[int, ...], name: str) -> list[Any]:
    """The elements of `data` as they came from JSON (the slow paths look at each one)."""
    values = np.array(data, dtype=object)
    if values.shape != shape:
        raise InvalidInput(f"input {name!r}: 'data' is not a regular (non-ragged) list of numbers")
    return values.reshape(-1).tolist()


def _exact_integers(data: Any, shape: tuple[int, ...], name: str, datatype: str) -> np.ndarray:
    flat = _elements(data, shape, name)
    if not all(type(v) is int for v in flat):
        raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
    low, high = min(flat), max(flat)
    limits = np.iinfo(OIP_TO_NUMPY[datatype])
    if low < limits.min or high > limits.max:
        raise InvalidInput(f"input {name!r}: a value is outside the {datatype} range {limits.min}..{limits.max}")
    return np.array(flat, dtype=OIP_TO_NUMPY[datatype]).reshape(shape)


def _spelled_floats(data: Any, shape: tuple[int, ...], name: str, datatype: str) -> np.ndarray:
    """Numbers mixed with "NaN"/"Infinity"/"-Infinity" (the slow path; anything else is refused)."""
    values = _elements(data, shape, name)
    out = np.empty(shape, dtype=np.float64)
    flat = out.reshape(-1)
    for i, value in enumerate(values):
        if isinstance(value, str) and value in NON_FINITE_TEXT:
            flat[i] = NON_FINITE_TEXT[value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                flat[i] = value
            except OverflowError:
                flat[i] = float("inf") if value > 0 else float("-inf")
        else:
            raise InvalidInput(f'input {name!r}: {datatype} data must be numbers (or "NaN", "Infinity", "-Infinity")')
    return out
