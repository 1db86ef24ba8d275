"""OIP v2 over gRPC: tritonclient.grpc, sync and asyncio, unchanged, against a bedside server process.

Requests tritonclient cannot make (typed `contents`, malformed tensors) are built with tritonclient's
own generated messages and stub, so what bedside parses is exactly what Triton's proto defines.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from sklearn.datasets import load_breast_cancer
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bedside.dataplane import Dataplane
from bedside.errors import (
    BedsideError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    MethodNotAllowed,
    ModelLoadError,
    NotFound,
    Overloaded,
    Retired,
    TooLarge,
    Unavailable,
)
from bedside.protocol.datatypes import OIP_TO_NUMPY
from bedside.server.grpc import oip_pb2, start_grpc_server
from bedside.server.grpc.codec import decode_request
from bedside.server.grpc.service import INTERNAL_MESSAGE, _guard, status_code
from tests.conftest import Server, free_port, start_server
from tests.models import ALL_TYPES

BREAST = "breast_mass_malignancy"
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def grpc_server(serving_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    port = free_port()
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    srv = start_server(serving_repo, log, "--grpc-port", str(port), "--max-body-mb", "1")
    yield srv, port
    srv.process.terminate()
    try:
        srv.process.wait(10)
    except subprocess.TimeoutExpired:
        srv.process.kill()


@pytest.fixture(scope="module")
def address(grpc_server: tuple[Server, int]) -> str:
    return f"127.0.0.1:{grpc_server[1]}"


@pytest.fixture
def client(address: str) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(address)
    yield c
    c.close()


@pytest.fixture
def stub(address: str) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """tritonclient's generated stub, for requests its client class does not build."""
    with grpc.insecure_channel(address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _features(rows: int = 4) -> np.ndarray:
    return load_breast_cancer().data[:rows].astype(np.float32)


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def _status(exc: InferenceServerException) -> str:
    return exc.status()


def _rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value


# --- the wire contract ----------------------------------------------------------------------------


def _assert_same_fields(ours: Descriptor, theirs: Descriptor) -> None:
    by_number = {f.number: f for f in theirs.fields}
    for field in ours.fields:
        other = by_number.get(field.number)
        where = f"{ours.name}.{field.name} = {field.number}"
        assert other is not None, f"{where}: Triton has no field {field.number}"
        assert (field.name, field.type, field.is_repeated) == (other.name, other.type, other.is_repeated), where
        assert (field.containing_oneof is None) == (other.containing_oneof is None), where
        if field.message_type is not None:
            _assert_same_fields(field.message_type, other.message_type)
        if field.enum_type is not None:
            _assert_same_enum(field.enum_type, other.enum_type)


def _assert_same_enum(ours: EnumDescriptor, theirs: EnumDescriptor) -> None:
    theirs_values = {v.number: v.name for v in theirs.values}
    for value in ours.values:
        assert theirs_values.get(value.number) == value.name, f"{ours.name}.{value.name}"


def test_every_message_matches_tritons_wire_format():
    triton = {**service_pb2.DESCRIPTOR.message_types_by_name, **model_config_pb2.DESCRIPTOR.message_types_by_name}
    ours = oip_pb2.DESCRIPTOR.message_types_by_name
    assert set(ours) <= set(triton)
    for name, descriptor in ours.items():
        _assert_same_fields(descriptor, triton[name])
    _assert_same_enum(oip_pb2.DESCRIPTOR.enum_types_by_name["DataType"], model_config_pb2.DataType.DESCRIPTOR)
    methods = {m.name: m for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    for method in oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        assert (method.input_type.name, method.output_type.name) == (
            methods[method.name].input_type.name,
            methods[method.name].output_type.name,
        )


# --- health and metadata --------------------------------------------------------------------------


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "bedside"
    assert {"model_repository", "statistics", "model_configuration"} <= set(meta.extensions)


def test_model_ready_follows_triton(client):
    assert client.is_model_ready(BREAST)
    assert client.is_model_ready("scale", "2")
    # Triton answers ready=false (status OK) for what it does not serve: unknown models and versions
    assert not client.is_model_ready("scale", "1")  # the version policy serves only the latest
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("corrupt")
    assert not client.is_model_ready("missing_file")


def test_model_metadata(client):
    meta = client.get_model_metadata(BREAST)
    assert meta.name == BREAST and list(meta.versions) == ["1"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("features", "FP32", [-1, 30])]
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    assert outputs["probabilities"] == ("FP32", [-1, 2])
    assert "label" in outputs
    scale = client.get_model_metadata("scale", "2")
    assert list(scale.versions) == ["2"] and list(scale.inputs[0].shape) == [-1, 4]


def test_model_metadata_errors(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert _status(info.value) == str(Code.NOT_FOUND) and "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("corrupt")
    assert _status(info.value) == str(Code.UNAVAILABLE) and "corrupt" in info.value.message()


def test_model_config_in_tritons_terms(client):
    config = client.get_model_config("scale").config
    assert config.name == "scale" and config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", model_config_pb2.TYPE_FP32, [4])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("y", model_config_pb2.TYPE_FP32, [4])]
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    assert config.instance_group[0].count >= 1
    batching = config.dynamic_batching
    assert batching.priority_levels == 3 and batching.default_priority_level == 3
    assert sorted(batching.priority_queue_policy) == [1, 2, 3]
    assert batching.priority_queue_policy[1].max_queue_size > 0
    as_json = client.get_model_config("all_types", as_json=True)["config"]
    types = {i["name"]: i["data_type"] for i in as_json["input"]}
    assert types["in_BYTES"] == "TYPE_STRING" and types["in_FP16"] == "TYPE_FP16"


# --- inference ------------------------------------------------------------------------------------


def test_infer_raw_matches_rest_and_echoes_id(client, grpc_server):
    x = _features(16)
    result = client.infer(BREAST, [_input("features", x, "FP32")], request_id="case-17")
    proba, label = result.as_numpy("probabilities"), result.as_numpy("label")
    assert proba.shape == (16, 2) and proba.dtype == np.float32
    assert (label == (proba[:, 1] > 0.5)).all()
    response = result.get_response()
    assert response.id == "case-17" and response.model_name == BREAST and response.model_version == "1"
    rest_client = grpc_server[0].client()
    rest = {o["name"]: o for o in rest_client.infer(BREAST, {"features": x})["outputs"]}
    rest_client.close()
    np.testing.assert_allclose(proba, np.asarray(rest["probabilities"]["data"]).reshape(16, 2), rtol=1e-6)


def test_requested_outputs_only(client):
    result = client.infer(
        BREAST, [_input("features", _features(2), "FP32")], outputs=[grpcclient.InferRequestedOutput("label")]
    )
    assert [o.name for o in result.get_response().outputs] == ["label"]
    assert result.as_numpy("probabilities") is None and result.as_numpy("label").shape == (2,)
    with pytest.raises(InferenceServerException) as info:
        client.infer(
            BREAST, [_input("features", _features(2), "FP32")], outputs=[grpcclient.InferRequestedOutput("nope")]
        )
    assert _status(info.value) == str(Code.INVALID_ARGUMENT) and "nope" in info.value.message()


def test_versions(client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    latest = client.infer("scale", [_input("x", x, "FP32")])
    v2 = client.infer("scale", [_input("x", x, "FP32")], model_version="2")
    np.testing.assert_array_equal(latest.as_numpy("y"), x * 3)
    np.testing.assert_array_equal(v2.as_numpy("y"), x * 3)
    assert v2.get_response().model_version == "2"
    with pytest.raises(InferenceServerException) as info:
        client.infer("scale", [_input("x", x, "FP32")], model_version="1")
    assert _status(info.value) == str(Code.NOT_FOUND)


def _all_types_values(rows: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    values: dict[str, np.ndarray] = {}
    for name in ALL_TYPES:
        dtype = OIP_TO_NUMPY[name]
        if name == "BYTES":
            values[name] = np.array([["a", "bé", ""], ["π ≈ 3.14", "e", "f"]][:rows], dtype=object)
        elif name == "BOOL":
            values[name] = rng.integers(0, 2, (rows, 3)).astype(bool)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            values[name] = np.array([[info.min, info.max, 1]] * rows, dtype=dtype)
        else:
            values[name] = rng.standard_normal((rows, 3)).astype(dtype)
    return values


def test_every_datatype_round_trips_raw(client):
    values = _all_types_values()
    inputs = [_input(f"in_{name}", array, name) for name, array in values.items()]
    result = client.infer("all_types", inputs)
    for name, array in values.items():
        got = result.as_numpy(f"out_{name}")
        assert result.get_output(f"out_{name}").datatype == name
        if name == "BYTES":
            assert [[v.decode() for v in row] for row in got] == array.tolist()
        else:
            assert got.dtype == array.dtype, name
            np.testing.assert_array_equal(got, array, err_msg=name)


_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def test_typed_contents_of_every_datatype_decode_exactly():
    """Typed contents, as tritonclient's own messages encode them, for every datatype that has a
    typed list (all but FP16). Decoded in process: the all_types model needs FP16 too, and FP16 can
    only go raw, and raw is for every input or none."""
    values = _all_types_values()
    request = service_pb2.ModelInferRequest(model_name="all_types", id="typed-1")
    for name, array in values.items():
        if name == "FP16":
            continue
        tensor = request.inputs.add(name=f"in_{name}", datatype=name, shape=array.shape)
        flat = array.reshape(-1).tolist()
        getattr(tensor.contents, _CONTENTS_FIELD[name]).extend([v.encode() for v in flat] if name == "BYTES" else flat)
    request.parameters["priority"].uint64_param = 2
    request.parameters["note"].string_param = "x"
    request.parameters["flag"].bool_param = True
    request.parameters["ratio"].double_param = 0.5
    request.parameters["timeout"].int64_param = 5000
    decoded, parameters = decode_request(oip_pb2.ModelInferRequest.FromString(request.SerializeToString()))
    assert decoded.id == "typed-1" and decoded.outputs is None
    assert parameters == {"priority": 2, "note": "x", "flag": True, "ratio": 0.5, "timeout": 5000}
    assert decoded.parameters == parameters
    assert len(decoded.inputs) == len(values) - 1
    for name, array in values.items():
        if name == "FP16":
            continue
        got = decoded.inputs[f"in_{name}"]
        assert got.shape == array.shape, name
        if name == "BYTES":
            assert got.tolist() == array.tolist()
        else:
            assert got.dtype == array.dtype, name
            np.testing.assert_array_equal(got, array, err_msg=name)


def test_typed_contents_round_trip(stub):
    x = np.array([[1.5, -2, 3, 0.25], [4, 5, 6, 7]], dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="scale", id="typed-scale")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request)
    assert response.id == "typed-scale"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("y", "FP32", [2, 4])]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 4), x * 3)


@pytest.mark.parametrize(
    ("tensor", "contents", "raw", "reason"),
    [
        ({"datatype": "FP32", "shape": [1, 4]}, {"fp32_contents": [1, 2, 3]}, None, "needs 4 elements, contents has 3"),
        ({"datatype": "FP32", "shape": [1, 4]}, None, b"\0" * 12, "needs 16 bytes, raw_input_contents[0] has 12"),
        ({"datatype": "FP32", "shape": [1, 4]}, {"fp32_contents": [1, 2, 3, 4]}, b"\0" * 16, "both contents and raw"),
        ({"datatype": "FP32", "shape": [1, 4]}, {"int_contents": [1, 2, 3, 4]}, None, "goes in contents.fp32_contents"),
        ({"datatype": "FP32", "shape": [1, -4]}, {"fp32_contents": [1, 2, 3, 4]}, None, "non-negative integers"),
        ({"datatype": "FP32", "shape": [1 << 40, 0]}, {}, None, "non-negative integers"),
        ({"datatype": "FLOAT", "shape": [1, 4]}, {"fp32_contents": [1, 2, 3, 4]}, None, "unknown datatype 'FLOAT'"),
        ({"datatype": "FP32", "shape": [1, 4]}, None, None, "has no data"),
        ({"datatype": "FP16", "shape": [1, 4]}, {"fp32_contents": [1, 2, 3, 4]}, None, "FP16 has no typed contents"),
        ({"datatype": "INT8", "shape": [1, 2]}, {"int_contents": [1, 300]}, None, "outside the INT8 range -128..127"),
        ({"datatype": "UINT16", "shape": [1, 1]}, {"uint_contents": [70000]}, None, "outside the UINT16 range"),
        ({"datatype": "BYTES", "shape": [1, 2]}, None, b"\x01\0\0\0a\x05\0\0\0b", "BYTES element runs past"),
        ({"datatype": "FP32", "shape": [1, 4]}, {"fp32_contents": [1, 2, 3, 4]}, None, "shared-memory extension"),
    ],
)
def test_malformed_tensors_are_refused_with_the_reason(stub, tensor, contents, raw, reason):
    request = service_pb2.ModelInferRequest(model_name="scale")
    inp = request.inputs.add(name="x", **tensor)
    if contents is not None:
        inp.contents.SetInParent()
        for field, values in contents.items():
            getattr(inp.contents, field).extend(values)
    if raw is not None:
        request.raw_input_contents.append(raw)
    if reason == "shared-memory extension":
        inp.parameters["shared_memory_region"].string_param = "region0"
    error = _rpc_error(stub.ModelInfer, request)
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert reason in error.details() and "'x'" in error.details()


def test_request_level_refusals(stub):
    request = service_pb2.ModelInferRequest(model_name="scale")
    assert "no inputs" in _rpc_error(stub.ModelInfer, request).details()
    for _ in range(2):
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    assert "given more than once" in _rpc_error(stub.ModelInfer, request).details()
    request.inputs[1].name = "z"
    request.raw_input_contents.append(b"\0" * 16)
    assert "raw_input_contents has 1 entries for 2 inputs" in _rpc_error(stub.ModelInfer, request).details()
    del request.inputs[1]
    del request.raw_input_contents[:]
    request.outputs.add(name="y")
    request.outputs.add(name="y")
    assert "requested more than once" in _rpc_error(stub.ModelInfer, request).details()


def test_model_errors(client):
    x = np.zeros((1, 29), np.float32)
    with pytest.raises(InferenceServerException) as info:
        client.infer(BREAST, [_input("features", x, "FP32")])
    assert _status(info.value) == str(Code.INVALID_ARGUMENT)
    assert "expected shape [-1, 30]" in info.value.message() and "'features'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", [_input("features", x, "FP32")])
    assert (
        _status(info.value) == str(Code.NOT_FOUND)
        and "model 'no_such_model' is not in the repository" in info.value.message()
    )
    for broken in ("corrupt", "mismatch", "missing_file"):
        with pytest.raises(InferenceServerException) as info:
            client.infer(broken, [_input("x", np.zeros((1, 4), np.float32), "FP32")])
        assert _status(info.value) == str(Code.UNAVAILABLE), broken
        assert f"model {broken!r} is not ready" in info.value.message()
    with pytest.raises(InferenceServerException) as info:  # beyond max_batch_size 8
        client.infer("scale", [_input("x", np.zeros((9, 4), np.float32), "FP32")])
    assert _status(info.value) == str(Code.INVALID_ARGUMENT) and "exceeds max_batch_size 8" in info.value.message()


def test_message_size_limit(client):
    big = np.zeros((8, 40_000), np.float32)  # 1.2 MiB; the server takes 1 MiB
    inp = grpcclient.InferInput("x", list(big.shape), "FP32")
    inp.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as info:
        client.infer("scale", [inp])
    assert _status(info.value) == str(Code.RESOURCE_EXHAUSTED)


def test_unserved_rpcs_are_unimplemented(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status()
    assert _status(info.value) == str(Code.UNIMPLEMENTED)


# --- caller context: priority, deadline, tenant -------------------------------------------------------


def test_priority_parameter(client):
    x = np.ones((1, 4), np.float32)
    result = client.infer("scale", [_input("x", x, "FP32")], priority=1)
    np.testing.assert_array_equal(result.as_numpy("y"), x * 3)
    with pytest.raises(InferenceServerException) as info:
        client.infer("scale", [_input("x", x, "FP32")], priority=9)
    assert _status(info.value) == str(Code.INVALID_ARGUMENT) and "outside 1..3" in info.value.message()
    result = client.infer("scale", [_input("x", x, "FP32")], headers={"x-bedside-priority": "stat"})
    np.testing.assert_array_equal(result.as_numpy("y"), x * 3)
    with pytest.raises(InferenceServerException) as info:
        client.infer("scale", [_input("x", x, "FP32")], headers={"x-bedside-priority": "soonish"})
    assert _status(info.value) == str(Code.INVALID_ARGUMENT) and "soonish" in info.value.message()


def test_deadline_that_cannot_be_met(client, stub):
    x = np.ones((1, 4), np.float32)
    client.infer("scale", [_input("x", x, "FP32")])  # the queue now knows what one execution costs
    with pytest.raises(InferenceServerException) as info:
        client.infer("scale", [_input("x", x, "FP32")], timeout=1)  # 1 µs
    assert _status(info.value) == str(Code.DEADLINE_EXCEEDED) and "deadline" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("scale", [_input("x", x, "FP32")], timeout=-5)
    assert _status(info.value) == str(Code.INVALID_ARGUMENT) and "'timeout'" in info.value.message()

    # the same deadline from metadata; its Retry-After travels as trailing metadata
    request = service_pb2.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(x.tobytes())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=(("x-bedside-timeout-ms", "0.001"),))
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=(("x-bedside-timeout-ms", "soon"),))
    assert err.value.code() == Code.INVALID_ARGUMENT and "x-bedside-timeout-ms" in err.value.details().lower()
    assert stub.ModelInfer(request, metadata=(("x-bedside-timeout-ms", "10000"),)).model_name == "scale"


def test_tenant_metadata(client, grpc_server):
    x = np.ones((1, 4), np.float32)
    for _ in range(3):
        client.infer("scale", [_input("x", x, "FP32")], headers={"x-bedside-tenant": "ward-7"})
    rest_client = grpc_server[0].client()
    rest = rest_client.request("GET", "/v2/models/scale/stats")
    rest_client.close()
    assert rest["model_stats"][0]["tenants"]["ward-7"]["success_count"] == 3
    with pytest.raises(InferenceServerException) as info:
        client.infer("scale", [_input("x", x, "FP32")], headers={"x-bedside-tenant": "ward 7; drop"})
    assert _status(info.value) == str(Code.INVALID_ARGUMENT) and "x-bedside-tenant" in info.value.message().lower()


# --- statistics and the repository ---------------------------------------------------------------------


def _stats(client, model: str) -> service_pb2.ModelStatistics:
    (row,) = client.get_inference_statistics(model).model_stats
    return row


def test_statistics_count_inferences(client):
    before = _stats(client, "diabetes_progression")
    meta = client.get_model_metadata("diabetes_progression").inputs[0]
    width = int(meta.shape[-1])
    for rows in (1, 3, 2):
        x = np.zeros((rows, width), OIP_TO_NUMPY[meta.datatype])
        client.infer("diabetes_progression", [_input(meta.name, x, meta.datatype)])
    after = _stats(client, "diabetes_progression")
    assert after.name == "diabetes_progression" and after.version == "1"
    assert after.inference_count - before.inference_count == 6
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.execution_count - before.execution_count == 3  # one at a time: nothing to batch together
    assert after.last_inference >= before.last_inference and after.last_inference > 0
    runs_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    runs_after = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert {size: runs_after[size] - runs_before.get(size, 0) for size in (1, 2, 3)} == {1: 1, 2: 1, 3: 1}
    every = client.get_inference_statistics()
    assert {"diabetes_progression", BREAST} <= {s.name for s in every.model_stats}
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("no_such_model")
    assert _status(info.value) == str(Code.NOT_FOUND)


def test_repository_index(client, stub):
    rows = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert rows[(BREAST, "1")].state == "READY"
    corrupt = [m for (name, _), m in rows.items() if name == "corrupt"]
    assert corrupt and corrupt[0].state == "UNAVAILABLE" and corrupt[0].reason
    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True)).models
    assert {m.state for m in ready} == {"READY"} and BREAST in {m.name for m in ready}


def test_unload_and_load(client):
    x = np.ones((1, 4), np.float32)
    client.unload_model("scale")
    try:
        assert not client.is_model_ready("scale")
        with pytest.raises(InferenceServerException) as info:
            client.infer("scale", [_input("x", x, "FP32")])
        assert _status(info.value) == str(Code.UNAVAILABLE)
    finally:
        client.load_model("scale")
    assert client.is_model_ready("scale")
    np.testing.assert_array_equal(client.infer("scale", [_input("x", x, "FP32")]).as_numpy("y"), x * 3)


def test_load_errors(client):
    with pytest.raises(InferenceServerException) as info:
        client.load_model("corrupt")
    assert _status(info.value) == str(Code.FAILED_PRECONDITION) and "corrupt" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.load_model("no_such_model")
    assert _status(info.value) == str(Code.NOT_FOUND)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("scale", config='{"max_batch_size": 4}')
    assert _status(info.value) == str(Code.UNIMPLEMENTED) and "not supported" in info.value.message()


# --- the asyncio client ----------------------------------------------------------------------------------


def test_asyncio_client(address):
    async def main() -> None:
        client = aioclient.InferenceServerClient(address)
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready(BREAST) and not await client.is_model_ready("no_such_model")
            assert (await client.get_model_metadata(BREAST)).inputs[0].name == "features"
            assert (await client.get_model_config("scale")).config.max_batch_size == 8

            async def one(i: int) -> None:
                x = np.full((1, 4), i, np.float32)
                inp = aioclient.InferInput("x", [1, 4], "FP32")
                inp.set_data_from_numpy(x)
                result = await client.infer("scale", [inp], request_id=f"r{i}", priority=1 + i % 3)
                assert result.get_response().id == f"r{i}"
                np.testing.assert_array_equal(result.as_numpy("y"), x * 3)

            await asyncio.gather(*(one(i) for i in range(32)))  # concurrent: batched together, split right

            inp = aioclient.InferInput("features", [1, 29], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 29), np.float32))
            with pytest.raises(InferenceServerException) as info:
                await client.infer(BREAST, [inp])
            assert _status(info.value) == str(Code.INVALID_ARGUMENT) and "expected shape" in info.value.message()
            with pytest.raises(InferenceServerException) as info:
                await client.infer("corrupt", [inp])
            assert _status(info.value) == str(Code.UNAVAILABLE)
            stats = await client.get_inference_statistics("scale")
            assert stats.model_stats[0].inference_count >= 32
            assert any(m.name == "scale" for m in (await client.get_model_repository_index()).models)
        finally:
            await client.close()

    asyncio.run(main())


# --- in-process: binding, error mapping, logging -----------------------------------------------------------


def test_taken_port_is_an_oserror(serving_repo):
    async def main() -> None:
        dataplane = Dataplane(serving_repo)  # not started: binding is all this checks
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                sock.listen()
                port = sock.getsockname()[1]
                with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
                    await start_grpc_server(dataplane, "127.0.0.1", port, 1 << 20)
            server = await start_grpc_server(dataplane, "127.0.0.1", free_port(), 1 << 20)
            await server.stop(None)
        finally:
            dataplane.close()

    asyncio.run(main())


def test_status_codes_by_class():
    expected = {
        InvalidInput: Code.INVALID_ARGUMENT,
        NotFound: Code.NOT_FOUND,
        MethodNotAllowed: Code.UNIMPLEMENTED,
        TooLarge: Code.INVALID_ARGUMENT,
        Overloaded: Code.RESOURCE_EXHAUSTED,
        DeadlineExceeded: Code.DEADLINE_EXCEEDED,
        Unavailable: Code.UNAVAILABLE,
        Retired: Code.UNAVAILABLE,
        ModelLoadError: Code.FAILED_PRECONDITION,
        InferenceFailed: Code.INTERNAL,
        BedsideError: Code.INTERNAL,
    }
    for cls, code in expected.items():
        assert status_code(cls("x")) == code, cls.__name__


class _Aborted(Exception):
    pass


class _FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple | None = None

    async def abort(self, code, details="", trailing_metadata=()):
        self.aborted = (code, details, tuple(trailing_metadata))
        raise _Aborted


def test_unexpected_errors_are_internal_and_logged_without_request_data(caplog):
    secret = "patient MRN-0042 value 3.14159"  # what a request could carry into an exception message

    async def leaky(request, context):
        raise ValueError(secret)

    async def overloaded(request, context):
        raise Overloaded("queue full", {"Retry-After": "2"})

    async def main() -> tuple[_FakeContext, _FakeContext]:
        first, second = _FakeContext(), _FakeContext()
        with pytest.raises(_Aborted):
            await _guard("ModelMetadata", leaky)(SimpleNamespace(), first)
        with pytest.raises(_Aborted):
            await _guard("ModelMetadata", overloaded)(SimpleNamespace(), second)
        return first, second

    with caplog.at_level(logging.ERROR, logger="bedside.server.grpc"):
        first, second = asyncio.run(main())
    code, message, trailing = first.aborted
    assert code == Code.INTERNAL and message.startswith(INTERNAL_MESSAGE) and trailing == ()
    incident = message.rsplit(" ", 1)[1]  # the id the operator finds the log line by
    assert [r.request_id for r in caplog.records] == [incident] and len(incident) == 12
    assert "ValueError" in caplog.text and "ModelMetadata" in caplog.text
    assert "MRN-0042" not in caplog.text and "3.14159" not in caplog.text
    assert second.aborted == (Code.RESOURCE_EXHAUSTED, "queue full", (("retry-after", "2"),))


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "RepositoryModelLoad"])
def test_bytes_that_are_not_protobuf_are_invalid_argument_and_not_logged(address, grpc_server, method):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff garbage", timeout=10)
        assert info.value.code() == Code.INVALID_ARGUMENT and "not a valid" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # an empty message is valid protobuf: it names no model
            call(b"", timeout=10)
        assert info.value.code() == Code.NOT_FOUND
    assert "Traceback" not in grpc_server[0].log.read_text()


def test_a_large_typed_request_is_decoded_off_the_loop_and_answered(stub):
    """Above the inline threshold the element-by-element conversion of `contents` runs in a thread."""
    x = np.linspace(-1, 1, 8 * 4, dtype=np.float32).reshape(8, 4)
    request = service_pb2.ModelInferRequest(model_name="scale", id="p" * 300_000)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[8, 4])  # the id takes it past 256 KiB
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    reply = stub.ModelInfer(request)
    got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(8, 4)
    assert reply.id == request.id and np.allclose(got, x * 3)  # scale v2: x 3
