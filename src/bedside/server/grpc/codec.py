"""OIP v2 gRPC messages <-> bedside's protocol-neutral types.

Requests: each input comes either as typed `contents` or as one entry of `raw_input_contents`
(little-endian, row-major; a BYTES element as a 4-byte little-endian length and its bytes, as Triton
sends it). Raw data is viewed in place with `np.frombuffer`, not copied. FP16 travels only raw: the
protocol has no typed list for it. Replies always carry `raw_output_contents`, which tritonclient
reads directly and which costs one `tobytes` per output.

Every malformed request raises `InvalidInput` naming the tensor and what is wrong with it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from bedside.dataplane.types import ModelMetadata, RepositoryEntry, TensorMetadata, VersionStatistics
from bedside.errors import InvalidInput
from bedside.modelconfig.model import ModelConfig
from bedside.modelconfig.scheduling import QueuePolicy

# Shared with the REST codec: BYTES elements with 4-byte little-endian length prefixes (see report:
# these two belong under public names in bedside.protocol).
from bedside.protocol.codec import decode_bytes_elements, tensor_bytes
from bedside.protocol.datatypes import DATATYPES, OIP_TO_NUMPY, check_shape, oip_datatype
from bedside.protocol.types import InferRequest, InferResponse, RequestedOutput
from bedside.server.grpc import oip_pb2 as pb

_LITTLE = sys.byteorder == "little"

# Raw data is little-endian on the wire whatever the host.
_RAW_DTYPE: dict[str, np.dtype] = {k: v.newbyteorder("<") for k, v in OIP_TO_NUMPY.items() if k != "BYTES"}

# Which typed list carries a datatype, and the numpy type of that list. The lists are wider than
# INT8/16 and UINT8/16 tensors, so those are range-checked (_NARROW) before they are narrowed.
_CONTENTS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
_NARROW = {name: np.iinfo(OIP_TO_NUMPY[name]) for name in ("INT8", "INT16", "UINT8", "UINT16")}
_UNSUPPORTED_PARAMS = {
    "shared_memory_region": "the shared-memory extension is not supported; send the data in the request",
    "shared_memory_byte_size": "the shared-memory extension is not supported; send the data in the request",
    "shared_memory_offset": "the shared-memory extension is not supported; send the data in the request",
    "classification": "the classification extension is not supported; request raw outputs",
}

# --- requests ------------------------------------------------------------------------------------


def decode_request(msg: pb.ModelInferRequest) -> tuple[InferRequest, dict[str, Any]]:
    """The request and its parameters as plain Python values (also in `InferRequest.parameters`)."""
    tensors = msg.inputs
    if not tensors:
        raise InvalidInput("request has no inputs")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; "
            "give every input's data there, in input order, or give none there"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise InvalidInput(f"input {index} has no name")
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given more than once")
        if tensor.parameters:
            _refuse_unsupported(tensor.parameters, f"input {name!r}")
        inputs[name] = _decode_input(tensor, raw[index] if raw else None, index)
    parameters = parameters_dict(msg.parameters) if msg.parameters else {}
    outputs = _requested_outputs(msg.outputs) if msg.outputs else None
    request = InferRequest(inputs, msg.id or None, parameters, outputs, binary_output=True)
    return request, parameters


def _decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, index: int) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype[:32]!r}; expected one of {', '.join(sorted(DATATYPES))}"
        )
    shape = tuple(tensor.shape)
    count = check_shape(name, shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input {name!r} has both contents and raw_input_contents; give one")
        if datatype == "BYTES":
            return decode_bytes_elements(name, memoryview(raw), count).reshape(shape)
        dtype = _RAW_DTYPE[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
                f"raw_input_contents[{index}] has {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if not tensor.HasField("contents"):
        raise InvalidInput(f"input {name!r} has no data: give contents or raw_input_contents")
    return _from_contents(name, datatype, shape, count, tensor.contents)


def _from_contents(
    name: str, datatype: str, shape: tuple[int, ...], count: int, contents: pb.InferTensorContents
) -> np.ndarray:
    if datatype not in _CONTENTS:
        raise InvalidInput(f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents")
    field, wire = _CONTENTS[datatype]
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field:
            raise InvalidInput(f"input {name!r}: {datatype} data goes in contents.{field}, not {descriptor.name}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} elements, contents has {len(values)}")
    if datatype == "BYTES":
        texts = []
        for value in values:
            try:
                texts.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput(f"input {name!r}: BYTES element is not UTF-8 text") from None
        return np.array(texts, dtype=object).reshape(shape)
    array = np.fromiter(values, dtype=wire, count=count)
    limits = _NARROW.get(datatype)
    if limits is not None and count and (int(array.min()) < limits.min or int(array.max()) > limits.max):
        raise InvalidInput(f"input {name!r}: a value is outside the {datatype} range {limits.min}..{limits.max}")
    target = OIP_TO_NUMPY[datatype]
    return (array if array.dtype == target else array.astype(target)).reshape(shape)


def _requested_outputs(
    requested: Any,  # repeated ModelInferRequest.InferRequestedOutputTensor
) -> list[RequestedOutput]:
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for item in requested:
        if not item.name:
            raise InvalidInput("a requested output has no name")
        if item.name in seen:
            raise InvalidInput(f"output {item.name!r} is requested more than once")
        if item.parameters:
            _refuse_unsupported(item.parameters, f"output {item.name!r}")
        seen.add(item.name)
        outputs.append(RequestedOutput(item.name))
    return outputs


def _refuse_unsupported(parameters: Mapping[str, pb.InferParameter], where: str) -> None:
    for key in parameters:
        if key in _UNSUPPORTED_PARAMS:
            raise InvalidInput(f"{where}: {_UNSUPPORTED_PARAMS[key]}")


def parameters_dict(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """An InferParameter map as plain values: bool, int, str or float (None: no value set)."""
    out: dict[str, Any] = {}
    for key, param in parameters.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, which) if which else None
    return out


def _set_parameter(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if value >= 1 << 63:
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


# --- replies -------------------------------------------------------------------------------------


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    add = msg.outputs.add
    raws = []
    for name, array in response.outputs.items():
        datatype = oip_datatype(array.dtype)
        add(name=name, datatype=datatype, shape=array.shape)
        # tobytes: one row-major copy, already little-endian for what ONNX Runtime returns on this host
        raws.append(
            array.tobytes()
            if _LITTLE and array.dtype.isnative and datatype != "BYTES"
            else tensor_bytes(array, datatype)
        )
    msg.raw_output_contents.extend(raws)
    if response.parameters:
        for key, value in response.parameters.items():
            _set_parameter(msg.parameters[key], value)
    return msg


def model_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[_tensor_metadata(t) for t in meta.inputs],
        outputs=[_tensor_metadata(t) for t in meta.outputs],
    )


def _tensor_metadata(t: TensorMetadata) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)


# Triton's config names BYTES "TYPE_STRING".
_CONFIG_TYPE = {name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in DATATYPES}


def model_config(config: ModelConfig) -> pb.ModelConfigResponse:
    """bedside's config in Triton's terms: dims without the batch dimension when max_batch_size > 0,
    priority levels numbered from 1 (most urgent), per-level queue policies."""
    policy = config.version_policy
    if policy.all:
        versions = pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())
    elif policy.specific:
        versions = pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=policy.specific))
    else:
        versions = pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=policy.latest or 1))
    msg = pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend="onnxruntime",
        version_policy=versions,
        max_batch_size=config.max_batch_size,
        input=[pb.ModelInput(name=s.name, data_type=_CONFIG_TYPE[s.datatype], dims=s.shape) for s in config.inputs],
        output=[pb.ModelOutput(name=s.name, data_type=_CONFIG_TYPE[s.datatype], dims=s.shape) for s in config.outputs],
        instance_group=[pb.ModelInstanceGroup(name=config.name, count=config.instances)],
    )
    scheduling = config.scheduling
    if config.max_batch_size > 0 and scheduling.batching.enabled:
        default = scheduling.levels[scheduling.default_priority - 1]
        msg.dynamic_batching.CopyFrom(
            pb.ModelDynamicBatching(
                preferred_batch_size=scheduling.batching.preferred_batch_sizes,
                max_queue_delay_microseconds=scheduling.batching.max_queue_delay_us,
                priority_levels=scheduling.priority_levels,
                default_priority_level=scheduling.default_priority,
                default_queue_policy=_queue_policy(default),
                priority_queue_policy={i + 1: _queue_policy(level) for i, level in enumerate(scheduling.levels)},
            )
        )
    return pb.ModelConfigResponse(config=msg)


def _queue_policy(level: QueuePolicy) -> pb.ModelQueuePolicy:
    return pb.ModelQueuePolicy(
        timeout_action=pb.ModelQueuePolicy.DELAY if level.timeout_action == "delay" else pb.ModelQueuePolicy.REJECT,
        default_timeout_microseconds=level.default_timeout_us,
        allow_timeout_override=level.allow_timeout_override,
        max_queue_size=level.max_queue_size,
    )


def statistics(rows: list[VersionStatistics]) -> pb.ModelStatisticsResponse:
    """Triton's statistics from bedside's counters. bedside times compute as one span, so it goes in
    compute_infer; compute_input and compute_output carry the same count and no time. Per batch size
    bedside counts executions, not their time."""
    stats = []
    for row in rows:
        compute_count = row.compute.count
        stats.append(
            pb.ModelStatistics(
                name=row.name,
                version=row.version,
                last_inference=row.last_inference_ms,
                inference_count=row.inference_count,
                execution_count=row.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(row.success.count, row.success.ns),
                    fail=_duration(row.failure.count, row.failure.ns),
                    queue=_duration(row.queue.count, row.queue.ns),
                    compute_input=_duration(compute_count, 0),
                    compute_infer=_duration(compute_count, row.compute.ns),
                    compute_output=_duration(compute_count, 0),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=size,
                        compute_input=_duration(runs, 0),
                        compute_infer=_duration(runs, 0),
                        compute_output=_duration(runs, 0),
                    )
                    for size, runs in sorted(row.batch_sizes.items())
                ],
            )
        )
    return pb.ModelStatisticsResponse(model_stats=stats)


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=max(count, 0), ns=max(ns, 0))


def _index_reason(row: RepositoryEntry) -> str:
    """The proto's index has no provenance field: a version trained on synthetic data, or not
    trained at all, says so in its reason."""
    if row.provenance in (None, "trained"):
        return row.reason
    return "; ".join(part for part in (f"{row.provenance} weights", row.provenance_note, row.reason) if part)


def repository_index(rows: list[RepositoryEntry], ready_only: bool) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=row.name, version=row.version or "", state=row.state, reason=_index_reason(row)
            )
            for row in rows
            if not ready_only or row.state == "READY"
        ]
    )
