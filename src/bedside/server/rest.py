"""OIP v2 REST as a bare ASGI application over the dataplane.

No framework sits on the hot path: routing is a split of the path, bodies are read once, JSON goes
through orjson, nothing is logged per request. What a framework would add here (validation models,
middleware, per-request logging) costs more than the model itself for small clinical models.
The streams' routes (`/v2/beds`, `/v2/alerts`, `/v2/streams`) and their SSE and WebSocket
endpoints are here too, as thin adapters: the streams themselves know no protocol.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from bedside.dataplane import CallContext, Dataplane, call_context
from bedside.dataplane.access import MONITOR
from bedside.dataplane.dataplane import metrics_text
from bedside.dataplane.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from bedside.errors import BedsideError, InvalidInput, MethodNotAllowed, NotFound, TooLarge, Unavailable
from bedside.monitoring.redact import describe_exception
from bedside.protocol.codec import decode_request, encode_response
from bedside.protocol.types import ANONYMOUS, Caller, InferRequest
from bedside.server.connections import PEER_KEY
from bedside.server.events import serve_ecg, serve_sse, serve_status
from bedside.server.status import PAGE_POLICY, StatusBoard, page_asset
from bedside.settings import ServerSettings
from bedside.streams.service import Streams

log = logging.getLogger("bedside.server")

_JSON = [(b"content-type", b"application/json")]
JSON_BYTES_PER_ELEMENT = 64  # "-1.2345678901234567e-308, " pretty-printed, one per line, with room
HEADER_ALLOWANCE = 64 << 10  # names, shapes, parameters, id of a request
SMALL_BODY = 64 << 10
CONTROL_BODY = 64 << 10  # repository calls take an optional small JSON object
DECODE_THREADS = 2
_OCTET = b"application/octet-stream"


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else _JSON


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(doc))


def error_response(exc: BedsideError) -> Response:
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    return Response(exc.status, orjson.dumps({"error": exc.message}), _JSON + extra)


class App:
    def __init__(
        self,
        dataplane: Dataplane,
        settings: ServerSettings,
        streams: Streams | None = None,
        board: StatusBoard | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.board = board or StatusBoard(dataplane, streams)
        self.max_body = settings.max_body_mb << 20
        self.max_bodies = settings.max_bodies_mb << 20
        self.inline_decode = settings.inline_decode_kb << 10
        self.streams = streams
        self.bodies_held = 0  # bytes of large bodies being received or served, over all requests
        # Large decodes leave the event loop (zlib releases the GIL; orjson yields it every 5 ms
        # switch interval), so one client's 60 MiB of numbers does not stall every STAT request.
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="bedside-decode")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] == "/v2/alerts/stream" and self.streams is not None:

            def allowed() -> None:  # checked again on every event: a revoked caller's stream ends
                self.dataplane.require(self._caller(scope, "sse"), MONITOR, "sse")

            try:
                _require(scope["method"], "GET", scope)
                allowed()
            except BedsideError as exc:
                await _send(send, error_response(exc))
                return
            await serve_sse(self.streams, receive, send, allowed)
        elif kind == "http" and scope["path"] == "/status/stream":
            await self._status_stream(scope, receive, send)
        elif kind == "websocket":
            await serve_ecg(self.streams, scope, receive, send, self._feeder(scope))
        elif kind == "http":
            await _send(send, await self._handle(scope, receive))
        # no lifespan: server.run starts and stops the dataplane, the streams and gRPC itself

    async def _status_stream(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The status page's live snapshots (SSE, monitor role)."""
        try:
            _require(scope["method"], "GET", scope)
            caller = self._caller(scope, "status")
            self.dataplane.require(caller, MONITOR, "status")
        except BedsideError as exc:
            await _send(send, error_response(exc))
            return

        def allowed() -> None:  # checked again before every snapshot: a revoked caller's feed ends
            self.dataplane.require(self._caller(scope, "status"), MONITOR, "status")

        def snapshot() -> bytes:
            return self.board.snapshot_bytes(caller)

        interval = self.board.monitoring.status_interval_s
        await serve_status(snapshot, self.streams, interval, receive, send, allowed)

    def _caller(self, scope: dict[str, Any], transport: str) -> Caller:
        """Who sends this request: with authentication on, the caller its bearer token or (over
        mutual TLS) its client certificate names; else the one anonymous caller, at no cost."""
        if not self.dataplane.auth_required:
            return ANONYMOUS
        authorization = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                if authorization is not None:  # which one counts would be a guess: refuse both
                    raise InvalidInput("send one Authorization header, not several")
                authorization = value.decode("latin-1")
        return self.dataplane.authenticate(authorization, scope.get(PEER_KEY), transport)

    def _feeder(self, scope: dict[str, Any]) -> Callable[[str], None]:
        """The check that this WebSocket's caller may feed a bed (401 / 403 as BedsideError)."""

        def check(bed: str) -> None:
            self.dataplane.may_feed(self._caller(scope, "ecg"), bed, "ecg")

        return check

    async def _handle(self, scope: dict[str, Any], receive: Any) -> Response:
        call = _Call(scope, receive)
        try:
            return await self._route(call)
        except BedsideError as exc:
            return error_response(exc)
        except Exception as exc:
            # an id of our own to find the log line by (the request's own `id` may carry anything)
            incident = secrets.token_hex(6)
            log.error(
                "unexpected error on %s: %s", scope["method"], describe_exception(exc), extra={"request_id": incident}
            )
            body = orjson.dumps({"error": f"internal server error; see the server log, request {incident}"})
            return Response(500, body, [*_JSON, (b"x-request-id", incident.encode())])
        finally:
            self.bodies_held -= call.held

    async def _route(self, call: _Call) -> Response:
        scope = call.scope
        parts = scope["path"].rstrip("/").split("/")[1:]
        method = scope["method"]
        if parts == ["metrics"]:  # Prometheus's usual path; rendered off the event loop
            _require(method, "GET", scope)
            caller = self._caller(scope, "rest")
            extra = {"streams": self.streams.status()} if self.streams is not None else {}
            if self.board.updates is not None:
                extra["updates"] = self.board.updates()
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(None, metrics_text, self.dataplane, caller, "rest", extra)
            return Response(200, text, [(b"content-type", METRICS_CONTENT_TYPE.encode())])
        if parts[:1] == ["status"] and len(parts) <= 2:  # the page itself holds no data: anyone may load it
            _require(method, "GET", scope)
            asset = page_asset(parts[1] if len(parts) == 2 else "")
            if asset is None:
                raise NotFound(f"no route {scope['path']}")
            headers = [(b"content-type", asset[1].encode()), (b"content-security-policy", PAGE_POLICY.encode())]
            return Response(200, asset[0], [*headers, (b"x-content-type-options", b"nosniff")])
        if not parts or parts[0] != "v2":
            raise NotFound(f"no route {scope['path']}; the API lives under /v2 (and /metrics, /status)")
        rest = parts[1:]
        dataplane = self.dataplane
        if rest[:1] == ["health"] and len(rest) == 2:  # probes answer anyone: they say nothing but up / ready
            _require(method, "GET", scope)
            if rest[1] == "live":
                return json_response({"live": dataplane.live()})
            if rest[1] == "ready":
                ready = dataplane.ready()
                return json_response({"ready": ready}, 200 if ready else 503)
        caller = self._caller(scope, "rest")

        if rest and rest[0] == "models" and len(rest) >= 2:
            name = rest[1]
            tail = rest[2:]
            version = None
            if len(tail) >= 2 and tail[0] == "versions":
                version, tail = tail[1], tail[2:]
            action = tail[0] if tail else ""
            if len(tail) > 1:
                raise NotFound(f"no route {scope['path']}")
            if action == "infer":
                _require(method, "POST", scope)
                return await self._infer(call, name, version, caller)
            _require(method, "GET", scope)
            if name == "stats" and version is None and not tail:
                return json_response(_statistics(dataplane, None, None, caller))
            if action == "":
                return json_response(dataplane.model_metadata(name, version, caller, "rest").to_dict())
            if action == "ready":
                ready = dataplane.model_ready(name, version, caller, "rest")
                return json_response({"name": name, "ready": ready}, 200 if ready else 503)
            if action == "config":
                return json_response(dataplane.model_config(name, version, caller, "rest").to_dict())
            if action == "stats":
                return json_response(_statistics(dataplane, name, version, caller))
            raise NotFound(f"no route {scope['path']}")

        if not rest:
            _require(method, "GET", scope)
            return json_response(dataplane.server_metadata(caller).to_dict())
        if rest in (["status"], ["aggregate"]):  # computed off the event loop (percentiles, drift)
            _require(method, "GET", scope)
            view = self.board.snapshot if rest == ["status"] else self.board.export
            doc = await asyncio.get_running_loop().run_in_executor(None, view, caller, "rest")
            return json_response(doc)
        if rest[0] in ("beds", "alerts", "streams") and self.streams is not None:
            _require(method, "GET", scope)
            dataplane.require(caller, MONITOR, "rest")
            if rest == ["beds"]:
                return json_response(self.streams.beds_view())
            if rest == ["alerts"]:
                return json_response(self.streams.recent_alerts())
            if rest == ["streams"]:
                return json_response(self.streams.status())
        if rest[0] == "repository":
            _require(method, "POST", scope)
            if rest[1:] == ["index"]:
                await self._read_body(call, CONTROL_BODY)
                return json_response([row.to_dict() for row in dataplane.repository_index(caller, "rest")])
            if len(rest) == 4 and rest[1] == "models" and rest[3] in ("load", "unload"):
                await self._read_body(call, CONTROL_BODY)
                if rest[3] == "load":
                    await dataplane.load(rest[2], caller, "rest")
                else:
                    await dataplane.unload(rest[2], caller, "rest")
                return json_response({})
        raise NotFound(f"no route {method} {scope['path']}")

    async def _infer(self, call: _Call, name: str, version: str | None, caller: Caller) -> Response:
        max_elements = self.dataplane.check_served(name, version, caller, "rest")
        try:
            request, context = await self._request(call, max_elements, caller)
        except BedsideError as exc:  # refused before the dataplane saw it: still on the audit record
            self.dataplane.refused(name, version, caller, "rest", exc)
            raise
        response = await self.dataplane.infer(name, version, request, context)
        if sum(a.nbytes for a in response.outputs.values()) <= self.inline_decode:
            payload, binary_header = encode_response(response, request)
        else:  # a large answer (an image mask, logits) is written off the event loop, as large bodies are read
            loop = asyncio.get_running_loop()
            payload, binary_header = await loop.run_in_executor(self._decoder, encode_response, response, request)
        if binary_header is None:
            return Response(200, payload)
        return Response(
            200,
            payload,
            [(b"content-type", _OCTET), (b"inference-header-content-length", str(binary_header).encode())],
        )

    async def _request(self, call: _Call, max_elements: int | None, caller: Caller) -> tuple[InferRequest, CallContext]:
        """The request body decoded, and its caller context from the headers and parameters."""
        scope = call.scope
        # no valid request to this model is larger than its inputs written as JSON numbers
        limit = self.max_body if max_elements is None else min(self.max_body, bound_for(max_elements))
        header_length = None
        encoding = tenant = priority = timeout_ms = None
        for key, value in scope["headers"]:
            if key == b"inference-header-content-length":
                if not (value.isascii() and value.isdigit()) or len(value) > 12:
                    raise InvalidInput("Inference-Header-Content-Length must be a non-negative integer")
                header_length = int(value)
            elif key == b"content-encoding":
                encoding = value.decode("latin-1").strip().lower()
            elif key.startswith(b"x-bedside-"):
                if key == b"x-bedside-tenant":
                    tenant = value.decode("latin-1")
                elif key == b"x-bedside-priority":
                    priority = value.decode("latin-1")
                elif key == b"x-bedside-timeout-ms":
                    timeout_ms = value.decode("latin-1")
        body = await self._read_body(call, limit)
        if encoding == "identity":
            encoding = None
        if encoding is not None and encoding not in ("gzip", "deflate"):
            raise InvalidInput(f"Content-Encoding {encoding[:32]!r} is not supported; use gzip or deflate")
        if encoding is None and len(body) <= self.inline_decode:
            request = decode_request(body, header_length)  # the hot path: small JSON, no thread hop
        else:
            loop = asyncio.get_running_loop()
            request = await loop.run_in_executor(self._decoder, _decode, body, encoding, limit, header_length)
        context = call_context(
            request.parameters, tenant=tenant, priority=priority, timeout_ms=timeout_ms, transport="rest", caller=caller
        )
        return request, context

    async def _read_body(self, call: _Call, limit: int) -> bytes:
        """The whole body, at most `limit` bytes (413 beyond). A body larger than SMALL_BODY is counted
        against the memory all bodies in flight may hold (503 beyond): ten stalled 60 MB uploads
        must not take the box's memory. Small bodies are not counted, so STAT requests never wait."""
        for key, value in call.scope["headers"]:
            if key == b"content-length" and value.isascii() and value.isdigit():
                declared = int(value)
                if declared > limit:
                    raise TooLarge(f"request body of {declared} bytes exceeds the limit of {limit} for this request")
                if declared > SMALL_BODY:
                    self._hold(call, declared)
        chunks = []
        size = 0
        while True:
            message = await call.receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"request body exceeds the limit of {limit} bytes for this request")
            if size > max(call.held, SMALL_BODY):  # no (or a false) Content-Length: count as it comes
                self._hold(call, size - call.held)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _hold(self, call: _Call, size: int) -> None:
        if self.bodies_held + size > self.max_bodies:
            raise Unavailable(
                f"the server is receiving {self.bodies_held / (1 << 20):.1f} MiB of request bodies and this one "
                f"would pass the limit of {self.max_bodies >> 20} MiB (server.max_bodies_mb); retry shortly",
                {"Retry-After": "1"},
            )
        self.bodies_held += size
        call.held += size


class _Call:
    """One HTTP request being handled: its scope, its receive channel and the body bytes it holds."""

    __slots__ = ("held", "receive", "scope")

    def __init__(self, scope: dict[str, Any], receive: Any) -> None:
        self.scope = scope
        self.receive = receive
        self.held = 0


def bound_for(max_elements: int) -> int:
    return max_elements * JSON_BYTES_PER_ELEMENT + HEADER_ALLOWANCE


def _decode(body: bytes, encoding: str | None, limit: int, header_length: int | None) -> InferRequest:
    """Off the event loop: inflate (capped at `limit`) and decode."""
    if encoding is not None:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise InvalidInput(f"body is not valid {encoding}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise TooLarge(f"decompressed body exceeds the limit of {limit} bytes for this request")
    return decode_request(body, header_length)


def _require(method: str, expected: str, scope: dict[str, Any]) -> None:
    if method != expected:
        raise MethodNotAllowed(f"{scope['path']} takes {expected}, not {method}", {"Allow": expected})


def _statistics(dataplane: Dataplane, name: str | None, version: str | None, caller: Caller) -> dict[str, Any]:
    return {"model_stats": [row.to_dict() for row in dataplane.statistics(name, version, caller, "rest")]}


async def _send(send: Any, response: Response) -> None:
    headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
