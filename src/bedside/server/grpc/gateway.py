"""The front of a bedside cluster for gRPC (Ray Serve's gRPC proxy hands it each call): the call is
sent to a replica of the model it names, which answers it with the box's own servicer (see
server.grpc.inproc). What no one replica can answer (liveness, readiness of the whole, the
repository index and all statistics) is answered here, as server.gateway does for REST."""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from bedside.errors import BedsideError, Conflict
from bedside.server.grpc import oip_pb2 as pb
from bedside.server.grpc.inproc import GRPCAnswer, GRPCCall, Metadata
from bedside.server.grpc.service import SERVICE, status_code

# the messages of every method the cluster serves, as the box's servicer registers them
REQUESTS: dict[str, type[Message]] = {
    "ServerLive": pb.ServerLiveRequest,
    "ServerReady": pb.ServerReadyRequest,
    "ServerMetadata": pb.ServerMetadataRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelConfig": pb.ModelConfigRequest,
    "ModelStatistics": pb.ModelStatisticsRequest,
    "ModelInfer": pb.ModelInferRequest,
    "RepositoryIndex": pb.RepositoryIndexRequest,
    "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
    "RepositoryModelUnload": pb.RepositoryModelUnloadRequest,
}
RESPONSES: dict[str, type[Message]] = {name: getattr(pb, name + "Response") for name in REQUESTS}


class GRPCBackend(Protocol):
    def serves(self, model: str) -> bool: ...

    async def forward_grpc(self, model: str, priority: Any, call: GRPCCall) -> GRPCAnswer: ...

    async def forward_grpc_any(self, call: GRPCCall) -> GRPCAnswer: ...

    async def gather_grpc(self, call: GRPCCall) -> list[GRPCAnswer]: ...

    async def ready(self) -> bool: ...


def add_inference_service(servicer: Any, server: Any) -> None:
    """`grpc_servicer_functions` for Ray Serve's gRPC proxy: the OIP v2 service's methods and
    messages (the proxy sends each call to the ingress deployment's method of the same name)."""

    def handler(name: str) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name, None),
            request_deserializer=REQUESTS[name].FromString,
            response_serializer=RESPONSES[name].SerializeToString,
        )

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {n: handler(n) for n in REQUESTS}),))


def error_answer(exc: BedsideError) -> GRPCAnswer:
    trailing = tuple((key.lower(), str(value)) for key, value in exc.headers.items())
    return GRPCAnswer(b"", status_code(exc).name, exc.message, trailing)


class GRPCGateway:
    def __init__(self, backend: GRPCBackend) -> None:
        self.backend = backend

    async def reply(self, method: str, request: Message, context: Any) -> Any:
        """Answer a call through a context that carries the status (Ray Serve's gRPC context):
        the response (already serialized) or the status, details and trailing metadata."""
        metadata = tuple(
            (str(k), v if isinstance(v, str) else v.decode("latin-1")) for k, v in context.invocation_metadata()
        )
        answer = await self.call(method, request, metadata)
        if answer.code != "OK":
            context.set_code(grpc.StatusCode[answer.code])
            context.set_details(answer.details)
            if answer.trailing:
                context.set_trailing_metadata(list(answer.trailing))
            return RESPONSES[method]()
        return Serialized(answer.response)

    async def call(self, method: str, request: Message, metadata: Metadata) -> GRPCAnswer:
        try:
            return await self._route(method, request, metadata)
        except BedsideError as exc:
            return error_answer(exc)

    async def _route(self, method: str, request: Any, metadata: Metadata) -> GRPCAnswer:
        call = GRPCCall(method, request.SerializeToString(), metadata)
        backend = self.backend
        if method == "ServerLive":
            return _ok(pb.ServerLiveResponse(live=True))
        if method == "ServerReady":
            return _ok(pb.ServerReadyResponse(ready=await backend.ready()))
        if method == "ServerMetadata":
            return await backend.forward_grpc_any(call)
        if method == "ModelInfer":
            return await backend.forward_grpc(request.model_name, _priority(request, metadata), call)
        if method == "ModelReady" and not backend.serves(request.name):
            return _ok(pb.ModelReadyResponse(ready=False))  # as the box: an unknown model is not ready
        if method in ("ModelReady", "ModelMetadata", "ModelConfig") or (method == "ModelStatistics" and request.name):
            return await backend.forward_grpc(request.name, None, call)
        if method in ("ModelStatistics", "RepositoryIndex"):
            return _merged(method, await backend.gather_grpc(call))
        action = "load" if method == "RepositoryModelLoad" else "unload"
        raise Conflict(
            f"a cluster does not {action} models one replica at a time: its placement is its deployment; "
            "change the repository and run `bedside cluster up` again"
        )


def _ok(message: Message) -> GRPCAnswer:
    return GRPCAnswer(message.SerializeToString())


def _priority(request: Any, metadata: Metadata) -> Any:
    for key, value in metadata:
        if key == "x-bedside-priority":
            return value.strip()
    if "priority" in request.parameters:
        parameter = request.parameters["priority"]
        choice = parameter.WhichOneof("parameter_choice")
        return getattr(parameter, choice) if choice else None
    return None


def _merged(method: str, answers: list[GRPCAnswer]) -> GRPCAnswer:
    """Every replica's rows in one answer, ordered by name and version, a model listed once."""
    field = "model_stats" if method == "ModelStatistics" else "models"
    merged = RESPONSES[method]()
    rows: dict[tuple[str, str], Any] = {}
    for one in answers:
        if one.code != "OK":
            return one  # a refusal (e.g. no monitor role) is every replica's
        for row in getattr(RESPONSES[method].FromString(one.response), field):
            rows.setdefault((row.name, row.version), row)
    getattr(merged, field).extend(rows[key] for key in sorted(rows))
    return _ok(merged)


class Serialized:
    """A replica's answer, already serialized: the proxy asks a result for its bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # protobuf's name
        return self.data
