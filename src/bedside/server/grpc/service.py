"""The OIP v2 gRPC service, `inference.GRPCInferenceService`, over the dataplane (grpc.aio).

It runs on the server's one event loop beside REST. Handlers are registered by hand under the
service path clients call ("/inference.GRPCInferenceService/<Method>"); see oip.proto for why the
messages live in their own protobuf package. The RPCs bedside does not serve (streaming inference,
shared memory, trace and log settings) answer UNIMPLEMENTED, as gRPC does for any unknown method.

Caller context: metadata `x-bedside-tenant`, `x-bedside-priority` and `x-bedside-timeout-ms`, and
the request parameters `priority` and `timeout` (µs), exactly as the REST headers and parameters.

Errors: a `BedsideError` becomes the status code of its class (its most specific class with a
code), its message the status details and its headers (e.g. retry-after) trailing metadata. Anything
else is INTERNAL "internal server error; see the server log" and is logged without its message,
which could carry request data.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from bedside.dataplane import CallContext, Dataplane, call_context
from bedside.dataplane.context import PRIORITY_KEY, TENANT_KEY, TIMEOUT_MS_KEY
from bedside.errors import (
    BedsideError,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    MethodNotAllowed,
    ModelLoadError,
    NotFound,
    Overloaded,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from bedside.monitoring.redact import describe_exception
from bedside.protocol.types import ANONYMOUS, Caller
from bedside.security.callers import Peer
from bedside.security.tls import GrpcTLS
from bedside.server.grpc import codec
from bedside.server.grpc import oip_pb2 as pb
from bedside.settings import DEFAULTS

SERVICE = "inference.GRPCInferenceService"
INTERNAL_MESSAGE = "internal server error; see the server log"
log = logging.getLogger("bedside.server.grpc")

# Looked up along the error's class hierarchy, so the most specific class wins (DeadlineExceeded is
# an Unavailable; Retired, also an Unavailable, is UNAVAILABLE).
STATUS_CODES: dict[type[BedsideError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    MethodNotAllowed: grpc.StatusCode.UNIMPLEMENTED,
    TooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
}

_DEFAULT_CONTEXT = call_context(None, transport="grpc", caller=ANONYMOUS)
_CONTEXT_KEYS = (TENANT_KEY, PRIORITY_KEY, TIMEOUT_MS_KEY)


def status_code(exc: BedsideError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: BedsideError) -> None:
    trailing = tuple((key.lower(), str(value)) for key, value in exc.headers.items())
    await context.abort(status_code(exc), exc.message, trailing)


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    # The message stays out of the log (it could hold tensor values or ids), and so do host paths.
    incident = secrets.token_hex(6)  # our own id to find the log line by
    log.error("unexpected error in gRPC %s: %s", method, describe_exception(exc), extra={"request_id": incident})
    await context.abort(grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE}, request {incident}")


def caller_context(parameters: dict[str, Any], metadata: Any, caller: Caller = ANONYMOUS) -> CallContext:
    """The call's tenant, priority and deadline from its metadata and request parameters."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in _CONTEXT_KEYS:
            found[key] = value if isinstance(value, str) else value.decode("latin-1")
    if not found and "priority" not in parameters and "timeout" not in parameters and caller is ANONYMOUS:
        return _DEFAULT_CONTEXT
    return call_context(
        parameters,
        tenant=found.get(TENANT_KEY),
        priority=found.get(PRIORITY_KEY),
        timeout_ms=found.get(TIMEOUT_MS_KEY),
        transport="grpc",
        caller=caller,
    )


@functools.lru_cache(maxsize=1024)
def _peer(common_name: bytes, pem: bytes) -> Peer:
    """A client certificate as the callers file knows it; cached, as a connection's calls repeat it."""
    der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    return Peer(common_name.decode("utf-8", "replace"), hashlib.sha256(der).hexdigest())


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class InferenceServicer:
    def __init__(self, dataplane: Dataplane, inline_decode_bytes: int = DEFAULTS.server.inline_decode_kb << 10) -> None:
        self.dataplane = dataplane
        self.inline_decode = inline_decode_bytes
        # typed `contents` are turned into arrays element by element: a large request does that off
        # the event loop (as REST does with large bodies), so it does not stall every other caller
        self._decoder = ThreadPoolExecutor(2, thread_name_prefix="bedside-grpc-decode")

    # --- the hot path: no logging, no copies beyond the codec's -------------------------------------

    async def model_infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            caller = self._caller(context)
            self.dataplane.check_served(
                request.model_name, request.model_version, caller, "grpc"
            )  # 404 before the body
            try:
                if request.ByteSize() <= self.inline_decode:
                    infer_request, parameters = codec.decode_request(request)
                else:
                    loop = asyncio.get_running_loop()
                    infer_request, parameters = await loop.run_in_executor(self._decoder, codec.decode_request, request)
                call = caller_context(parameters, context.invocation_metadata(), caller)
            except BedsideError as exc:  # refused before the dataplane saw it: still on the audit record
                self.dataplane.refused(request.model_name, request.model_version, caller, "grpc", exc)
                raise
            response = await self.dataplane.infer(request.model_name, request.model_version, infer_request, call)
            return codec.encode_response(response)
        except BedsideError as exc:
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, "ModelInfer", exc)

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who makes this call: its `authorization` metadata ("Bearer <token>") or, over mutual TLS,
        its verified client certificate; with authentication off, the one anonymous caller."""
        if not self.dataplane.auth_required:
            return ANONYMOUS
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                if authorization is not None:  # which one counts would be a guess: refuse both
                    raise InvalidInput("send one authorization metadata entry, not several")
                authorization = value if isinstance(value, str) else value.decode("latin-1")
        peer = None
        if authorization is None:
            found = context.auth_context()
            names, pems = found.get("x509_common_name"), found.get("x509_pem_cert")
            if names and pems:
                peer = _peer(names[0], pems[0])
        return self.dataplane.authenticate(authorization, peer, "grpc")

    # --- health and metadata -------------------------------------------------------------------------

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        # As Triton: a model or version the server does not know (or another tenant's) is simply not ready.
        caller = self._caller(context)
        try:
            ready = self.dataplane.model_ready(request.name, request.version, caller, "grpc")
        except NotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        meta = self.dataplane.server_metadata(self._caller(context))
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return codec.model_metadata(
            self.dataplane.model_metadata(request.name, request.version, self._caller(context), "grpc")
        )

    async def model_config(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return codec.model_config(
            self.dataplane.model_config(request.name, request.version, self._caller(context), "grpc")
        )

    async def model_statistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        caller = self._caller(context)
        return codec.statistics(
            self.dataplane.statistics(request.name or None, request.version or None, caller, "grpc")
        )

    # --- repository control ----------------------------------------------------------------------------

    async def repository_index(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return codec.repository_index(self.dataplane.repository_index(self._caller(context), "grpc"), request.ready)

    async def repository_model_load(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        caller = self._caller(context)
        if request.parameters:
            raise MethodNotAllowed(
                f"load parameters ({', '.join(sorted(request.parameters))[:200]}) are not supported: bedside "
                "loads a model as its repository folder has it (no config override, no uploaded files)"
            )
        await self.dataplane.load(request.model_name, caller, "grpc")
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        caller = self._caller(context)
        # tritonclient always sends unload_dependents; bedside has no ensembles, so there are none to unload
        unsupported = sorted(set(request.parameters) - {"unload_dependents"})
        if unsupported:
            raise MethodNotAllowed(f"unload parameters ({', '.join(unsupported)[:200]}) are not supported")
        await self.dataplane.unload(request.model_name, caller, "grpc")
        return pb.RepositoryModelUnloadResponse()

    # --- registration -----------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(behaviour: Handler, request: Any, response: Any) -> grpc.RpcMethodHandler:
            # Parsed here, not by grpc's deserializer: grpc answers a message that is not protobuf
            # with UNKNOWN and a logged traceback per call; the caller gets INVALID_ARGUMENT instead.
            async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                try:
                    message = request.FromString(raw)
                except DecodeError:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.DESCRIPTOR.name}"
                    )
                return await behaviour(message, context)

            return grpc.unary_unary_rpc_method_handler(parsed, response_serializer=response.SerializeToString)

        guarded: list[tuple[str, Handler, Any, Any]] = [
            ("ServerLive", self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            ("ServerReady", self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            ("ModelReady", self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            ("ServerMetadata", self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            ("ModelMetadata", self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            ("ModelConfig", self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            ("ModelStatistics", self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            ("RepositoryIndex", self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            (
                "RepositoryModelLoad",
                self.repository_model_load,
                pb.RepositoryModelLoadRequest,
                pb.RepositoryModelLoadResponse,
            ),
            (
                "RepositoryModelUnload",
                self.repository_model_unload,
                pb.RepositoryModelUnloadRequest,
                pb.RepositoryModelUnloadResponse,
            ),
        ]
        methods = {name: unary(_guard(name, fn), req, resp) for name, fn, req, resp in guarded}
        methods["ModelInfer"] = unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse)
        return grpc.method_handlers_generic_handler(SERVICE, methods)


def _guard(method: str, behaviour: Handler) -> Handler:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except BedsideError as exc:
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, method, exc)

    return handle


async def start_grpc_server(
    dataplane: Dataplane,
    host: str,
    port: int,
    max_message_bytes: int,
    idle_s: float = DEFAULTS.server.keepalive_s,
    max_calls: int = DEFAULTS.server.max_connections,
    inline_decode_bytes: int = DEFAULTS.server.inline_decode_kb << 10,
    tls: GrpcTLS | None = None,
) -> grpc.aio.Server:
    """Bind, start and return the server on the running event loop; stop it with `await server.stop(grace)`.

    `max_message_bytes` bounds what a client may send (a larger request fails RESOURCE_EXHAUSTED
    before it is read into memory); replies are not bounded here. Beyond `max_calls` calls in
    progress a new one fails RESOURCE_EXHAUSTED; a connection idle for `idle_s` is closed, so
    neither calls nor connections pile up. Metadata stays within gRPC's own 8 KiB default. Raises
    OSError when the address cannot be bound. With `tls`, the port serves TLS only: mutual TLS with
    security.client_cert=required; with "optional" grpcio asks for no client certificate at all, so
    gRPC callers authenticate with the `authorization` metadata."""
    server = grpc.aio.server(
        maximum_concurrent_rpcs=max_calls,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_connection_idle_ms", int(idle_s * 1000)),
            # gRPC sets SO_REUSEPORT by default on Linux: a second server would then share a taken
            # port silently instead of failing to start.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((InferenceServicer(dataplane, inline_decode_bytes).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.private_key, tls.certificate_chain)],
                root_certificates=tls.root_certificates,
                require_client_auth=tls.require_client_auth,
            )
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # newer grpcio raises where older ones returned 0
        bound = 0
    if not bound:
        await server.stop(None)
        raise OSError(f"cannot listen on {address}: the port is in use or the address is not local")
    await server.start()
    return server
