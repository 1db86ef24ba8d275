"""One gRPC call as plain data, and bedside's own servicer run on it in memory (see server.inproc
for REST): a cluster replica answers the front's gRPC calls exactly as a single box's gRPC port
would, with the same handlers, parsing, errors and trailing metadata, and no socket in between."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from bedside.server.grpc.service import SERVICE

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class GRPCCall:
    method: str  # "ModelInfer", "ModelMetadata", ...
    request: bytes  # the serialized request message
    metadata: Metadata = ()


@dataclass(frozen=True, slots=True)
class GRPCAnswer:
    response: bytes  # the serialized response message (empty when code is not OK)
    code: str = "OK"  # grpc.StatusCode name
    details: str = ""
    trailing: Metadata = ()


class _Aborted(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class _Context:
    """What the servicer asks of grpc.aio's context, in memory: the caller's metadata, no client
    certificate (the front holds the connection), and abort as an exception."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata
        self._trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def set_trailing_metadata(self, trailing: Metadata) -> None:
        self._trailing = tuple(trailing)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing: Metadata = ()) -> None:
        raise _Aborted(code, details, tuple(trailing) or self._trailing)


class _Details:
    def __init__(self, method: str, metadata: Metadata) -> None:
        self.method = f"/{SERVICE}/{method}"
        self.invocation_metadata = metadata


async def call_service(handler: grpc.GenericRpcHandler, call: GRPCCall) -> GRPCAnswer:
    found: Any = handler.service(_Details(call.method, call.metadata))
    if found is None:
        return GRPCAnswer(b"", "UNIMPLEMENTED", f"method {call.method[:64]} is not served")
    try:
        response = await found.unary_unary(call.request, _Context(call.metadata))
    except _Aborted as aborted:
        return GRPCAnswer(b"", aborted.code.name, aborted.details, aborted.trailing)
    return GRPCAnswer(found.response_serializer(response))
