"""Decode and encode OIP v2 inference bodies: JSON tensors and the binary tensor data extension.

The binary extension (header `Inference-Header-Content-Length`) puts a JSON header first and the raw
little-endian tensor bytes after it, in input order; tritonclient uses it by default, and it avoids
turning every float into text. BYTES elements are each prefixed by a 4-byte little-endian length.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from bedside.errors import InvalidInput
from bedside.protocol.datatypes import check_shape, numbers_as, numpy_dtype, oip_datatype
from bedside.protocol.types import InferRequest, InferResponse, RequestedOutput

_U32 = struct.Struct("<I")
_NUMPY_OPTS = orjson.OPT_SERIALIZE_NUMPY


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw_inputs:
        name, array, used = _decode_input(item, binary, offset)
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given more than once")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise InvalidInput(f"binary body has {len(binary)} bytes after the JSON header but the inputs declare {offset}")

    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    if "classification" in params:
        raise InvalidInput("the classification extension is not supported; request raw outputs")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return InferRequest(
        inputs=inputs,
        id=request_id,
        parameters=params,
        outputs=_decode_outputs(doc.get("outputs")),
        binary_output=bool(params.get("binary_data_output", False)),
    )


def _decode_input(item: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(item, dict):
        raise InvalidInput("each entry of 'inputs' must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("every input needs a 'name'")
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r} needs a 'datatype'")
    dtype = numpy_dtype(datatype)
    shape = item.get("shape")
    count = check_shape(name, shape)
    params = item.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None

    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input {name!r}: binary_data_size {size} runs past the {len(binary)} binary bytes")
        chunk = binary[offset : offset + size]
        if datatype == "BYTES":
            array = decode_bytes_elements(name, chunk, count)
        else:
            if size != count * dtype.itemsize:
                raise InvalidInput(
                    f"input {name!r}: shape {shape} of {datatype} needs "
                    f"{count * dtype.itemsize} bytes, binary_data_size is {size}"
                )
            array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"), count=count)
        return name, array.reshape(shape), size

    if "data" not in item:
        raise InvalidInput(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    data = item["data"]
    if datatype == "BYTES":
        try:
            array = np.array(_flatten(data), dtype=object)
        except ValueError:
            raise InvalidInput(f"input {name!r}: BYTES data must be strings") from None
    else:
        array = numbers_as(data, dtype, name, datatype)
    if array.size != count:
        raise InvalidInput(f"input {name!r}: shape {shape} needs {count} elements, data has {array.size}")
    return name, array.reshape(shape), 0


def _flatten(data: Any) -> list[str]:
    if not isinstance(data, list):
        data = [data]
    out: list[str] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            if not isinstance(value, str):
                raise ValueError("BYTES elements must be strings")
            out.append(value)
        else:
            stack.pop()
    return out


def decode_bytes_elements(name: str, chunk: bytes | memoryview, count: int) -> np.ndarray:
    values: list[str] = []
    pos, end = 0, len(chunk)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: truncated BYTES length prefix")
        (length,) = _U32.unpack_from(chunk, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(f"input {name!r}: BYTES element runs past its binary data")
        try:
            values.append(bytes(chunk[pos : pos + length]).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: BYTES element is not UTF-8 text") from None
        pos += length
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: shape needs {count} BYTES elements, got {len(values)}")
    return np.array(values, dtype=object)


def _decode_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    outputs = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each entry of 'outputs' needs a 'name'")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"output {item['name']!r}: 'parameters' must be an object")
        if "classification" in params:
            raise InvalidInput("the classification extension is not supported")
        binary = params.get("binary_data")
        outputs.append(RequestedOutput(item["name"], None if binary is None else bool(binary)))
    return outputs


def encode_response(response: InferResponse, request: InferRequest | None = None) -> tuple[bytes, int | None]:
    """Return the body and, when any output travels as binary, the JSON header length."""
    binary_for: dict[str, bool] = {}
    default_binary = False
    if request is not None:
        default_binary = request.binary_output
        if request.outputs is not None:
            binary_for = {o.name: default_binary if o.binary is None else o.binary for o in request.outputs}
    outs = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        datatype = oip_datatype(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary_for.get(name, default_binary):
            blob = tensor_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [_as_text(v) for v in array.reshape(-1).tolist()]
        else:
            flat = np.ascontiguousarray(array).reshape(-1)
            # orjson would write NaN/Infinity as null; spell them as protobuf's JSON mapping does
            spell = not response.finite and flat.dtype.kind == "f" and not np.isfinite(flat).all()
            entry["data"] = _spelled(flat) if spell else flat
        outs.append(entry)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outs,
    }
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    header = orjson.dumps(doc, option=_NUMPY_OPTS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _spelled(values: np.ndarray) -> list[float | str]:
    out: list[float | str] = []
    for value in values.tolist():
        if value != value:
            out.append("NaN")
        elif value in (float("inf"), float("-inf")):
            out.append("Infinity" if value > 0 else "-Infinity")
        else:
            out.append(value)
    return out


def tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1).tolist():
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(_U32.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def encode_tensor_json(name: str, array: np.ndarray) -> dict[str, Any]:
    """One input tensor in JSON form, for bedside's own clients and tests."""
    datatype = oip_datatype(array.dtype)
    data: Any = [_as_text(v) for v in array.reshape(-1).tolist()] if datatype == "BYTES" else array.reshape(-1).tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
