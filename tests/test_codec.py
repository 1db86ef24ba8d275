from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bedside.errors import InvalidInput
from bedside.protocol.codec import decode_request, encode_response
from bedside.protocol.datatypes import OIP_TO_NUMPY
from bedside.protocol.types import InferRequest, InferResponse, RequestedOutput


def body(*inputs, **extra) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def test_decodes_flat_and_nested_json_data():
    flat = decode_request(body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}))
    nested = decode_request(body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}))
    for req in (flat, nested):
        assert req.inputs["x"].dtype == np.float32
        np.testing.assert_array_equal(req.inputs["x"], [[1, 2], [3, 4]])


def test_keeps_id_parameters_and_output_selection():
    req = decode_request(
        body(
            {"name": "x", "datatype": "INT64", "shape": [1], "data": [7]},
            id="abc",
            parameters={"binary_data_output": True, "priority": 1},
            outputs=[{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        )
    )
    assert req.id == "abc" and req.binary_output is True and req.parameters["priority"] == 1
    assert req.outputs == [RequestedOutput("y", False), RequestedOutput("z", None)]


def test_bytes_from_json_and_binary():
    req = decode_request(body({"name": "s", "datatype": "BYTES", "shape": [2], "data": ["héllo", "x"]}))
    assert req.inputs["s"].tolist() == ["héllo", "x"]
    raw = b"".join(struct.pack("<I", len(v)) + v for v in ("héllo".encode(), b"x"))
    header = orjson.dumps(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}]}
    )
    req = decode_request(header + raw, len(header))
    assert req.inputs["s"].tolist() == ["héllo", "x"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (orjson.dumps({"inputs": []}), "non-empty 'inputs'"),
        (body({"datatype": "FP32", "shape": [1], "data": [1]}), "every input needs a 'name'"),
        (body({"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}), "unknown datatype 'FLOAT'"),
        (body({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}), "non-negative integers"),
        (body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}), "needs 4 elements, data has 3"),
        (body({"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}), "must be numbers"),
        (body({"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}), "not a regular"),
        (body({"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}), "BYTES data must be strings"),
        # values that numpy would wrap, truncate, parse from text or fail on with a 500 (issue 10)
        (body({"name": "x", "datatype": "INT8", "shape": [1], "data": [1000]}), "outside the INT8 range"),
        (body({"name": "x", "datatype": "INT64", "shape": [1], "data": [18446744073709551615]}), "outside the INT64"),
        (body({"name": "x", "datatype": "UINT64", "shape": [1], "data": [-1]}), "outside the UINT64 range"),
        (body({"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}), "must be integers"),
        (body({"name": "x", "datatype": "INT32", "shape": [1], "data": ["7"]}), "must be integers"),
        (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [True]}), "must be numbers"),
        (body({"name": "x", "datatype": "FP32", "shape": [1], "data": ["1.5"]}), "must be numbers"),
        (body({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}), "true or false"),
        (body({"name": "x", "datatype": "FP32", "shape": [1] * 70, "data": [1]}), "at most 32"),
        (body({"name": "x", "datatype": "FP32", "shape": [0, 1 << 62, 1 << 62], "data": []}), "at most 2147483647"),
        (body({"name": "x", "datatype": "FP32", "shape": [0, 1 << 30, 1 << 30], "data": []}), "larger than any tensor"),
        (body({"name": "x", "datatype": "FP32", "shape": [1]}), "neither 'data' nor a binary_data_size"),
        (
            body(
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
            ),
            "more than once",
        ),
        (
            body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, parameters={"classification": 2}),
            "classification",
        ),
    ],
)
def test_malformed_requests_are_rejected_with_a_reason(doc, message):
    with pytest.raises(InvalidInput, match=message):
        decode_request(doc)


def test_binary_size_mismatches_are_caught():
    header = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}
    )
    with pytest.raises(InvalidInput, match="runs past"):
        decode_request(header + b"\0" * 4, len(header))
    with pytest.raises(InvalidInput, match="declare 8"):
        decode_request(header + b"\0" * 12, len(header))
    with pytest.raises(InvalidInput, match="outside the body"):
        decode_request(header, len(header) + 5)
    bad = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 8}}]}
    )
    with pytest.raises(InvalidInput, match="needs 12 bytes"):
        decode_request(bad + b"\0" * 8, len(bad))


def test_encodes_json_and_binary_outputs():
    out = {"p": np.array([[0.25, 0.75]], dtype=np.float32), "label": np.array([1], dtype=np.int64)}
    resp = InferResponse("m", "1", out, id="r")
    payload, header_len = encode_response(resp, InferRequest({}, outputs=None))
    assert header_len is None
    doc = orjson.loads(payload)
    assert doc["id"] == "r" and doc["model_version"] == "1"
    assert doc["outputs"][0] == {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}

    req = InferRequest({}, outputs=[RequestedOutput("p", True), RequestedOutput("label", False)])
    payload, header_len = encode_response(InferResponse("m", "1", out), req)
    doc = orjson.loads(payload[:header_len])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(payload[header_len:], dtype="<f4").tolist() == [0.25, 0.75]
    assert doc["outputs"][1]["data"] == [1]


DTYPES = [k for k in OIP_TO_NUMPY if k != "BYTES"]


@settings(max_examples=150, deadline=None)
@given(
    datatype=st.sampled_from(DTYPES),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    binary=st.booleans(),
    data=st.data(),
)
def test_round_trip_through_both_encodings(datatype, shape, binary, data):
    dtype = OIP_TO_NUMPY[datatype]
    elements = {"allow_nan": False, "allow_infinity": False} if dtype.kind == "f" else None
    array = data.draw(hnp.arrays(dtype, shape, elements=elements))
    # encode as a response, then decode the same tensor as a request: the wire format is symmetric
    req = InferRequest({}, outputs=[RequestedOutput("t", binary)])
    payload, header_len = encode_response(InferResponse("m", "1", {"t": array}), req)
    header = orjson.loads(payload if header_len is None else payload[:header_len])
    out = header["outputs"][0]
    wire = {"inputs": [{k: v for k, v in out.items()}]}
    if header_len is None:
        decoded = decode_request(orjson.dumps(wire)).inputs["t"]
    else:
        new_header = orjson.dumps(wire)
        decoded = decode_request(new_header + payload[header_len:], len(new_header)).inputs["t"]
    assert decoded.dtype == dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
