"""OIP v2 REST as a bare ASGI application over the dataplane.

No framework sits on the hot path: routing is a split of the path, bodies are read once, JSON goes
through orjson, nothing is logged per request. What a framework would add here (validation models,
middleware, per-request logging) costs more than the model itself for small clinical models.
The streams' routes (`/v2/beds`, `/v2/alerts`, `/v2/streams`) and their SSE and WebSocket
endpoints are here too, as thin adapters: the streams themselves know no protocol.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import orjson

from bedside.dataplane import Dataplane, call_context
from bedside.errors import BedsideError, InvalidInput, MethodNotAllowed, NotFound, TooLarge
from bedside.protocol.codec import decode_request, encode_response
from bedside.server.events import serve_ecg, serve_sse
from bedside.streams.service import Streams

log = logging.getLogger("bedside.server")

_JSON = [(b"content-type", b"application/json")]
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
    def __init__(self, dataplane: Dataplane, max_body_bytes: int, streams: Streams | None = None) -> None:
        self.dataplane = dataplane
        self.max_body = max_body_bytes
        self.streams = streams

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] == "/v2/alerts/stream" and self.streams is not None:
            await serve_sse(self.streams, receive, send)
        elif kind == "websocket":
            await serve_ecg(self.streams, scope, receive, send)
        elif kind == "http":
            response = await self._handle(scope, receive)
            headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            await send({"type": "http.response.body", "body": response.body})
        # no lifespan: server.run starts and stops the dataplane, the streams and gRPC itself

    async def _handle(self, scope: dict[str, Any], receive: Any) -> Response:
        try:
            return await self._route(scope, receive)
        except BedsideError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            return Response(500, b'{"error":"internal server error; see the server log"}')

    async def _route(self, scope: dict[str, Any], receive: Any) -> Response:
        parts = scope["path"].rstrip("/").split("/")[1:]
        method = scope["method"]
        if not parts or parts[0] != "v2":
            raise NotFound(f"no route {scope['path']}; the API lives under /v2")
        rest = parts[1:]
        dataplane = self.dataplane

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
                return await self._infer(scope, receive, name, version)
            _require(method, "GET", scope)
            if name == "stats" and version is None and not tail:
                return json_response(_statistics(dataplane, None, None))
            if action == "":
                return json_response(dataplane.model_metadata(name, version).to_dict())
            if action == "ready":
                ready = dataplane.model_ready(name, version)
                return json_response({"name": name, "ready": ready}, 200 if ready else 503)
            if action == "config":
                return json_response(dataplane.model_config(name, version).to_dict())
            if action == "stats":
                return json_response(_statistics(dataplane, name, version))
            raise NotFound(f"no route {scope['path']}")

        if not rest:
            _require(method, "GET", scope)
            return json_response(dataplane.server_metadata().to_dict())
        if rest[0] == "health" and len(rest) == 2:
            _require(method, "GET", scope)
            if rest[1] == "live":
                return json_response({"live": dataplane.live()})
            if rest[1] == "ready":
                ready = dataplane.ready()
                return json_response({"ready": ready}, 200 if ready else 503)
        if rest[0] in ("beds", "alerts", "streams") and self.streams is not None:
            _require(method, "GET", scope)
            if rest == ["beds"]:
                return json_response(self.streams.beds_view())
            if rest == ["alerts"]:
                return json_response(self.streams.recent_alerts())
            if rest == ["streams"]:
                return json_response(self.streams.status())
        if rest[0] == "repository":
            _require(method, "POST", scope)
            if rest[1:] == ["index"]:
                await self._read_body(scope, receive)
                return json_response([row.to_dict() for row in dataplane.repository_index()])
            if len(rest) == 4 and rest[1] == "models" and rest[3] in ("load", "unload"):
                await self._read_body(scope, receive)
                if rest[3] == "load":
                    await dataplane.load(rest[2])
                else:
                    await dataplane.unload(rest[2])
                return json_response({})
        raise NotFound(f"no route {method} {scope['path']}")

    async def _infer(self, scope: dict[str, Any], receive: Any, name: str, version: str | None) -> Response:
        self.dataplane.check_served(name, version)
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
        body = await self._read_body(scope, receive)
        if encoding and encoding != "identity":
            body = self._decompress(body, encoding)
        request = decode_request(body, header_length)
        context = call_context(
            request.parameters, tenant=tenant, priority=priority, timeout_ms=timeout_ms, transport="rest"
        )
        response = await self.dataplane.infer(name, version, request, context)
        payload, binary_header = encode_response(response, request)
        if binary_header is None:
            return Response(200, payload)
        return Response(
            200,
            payload,
            [(b"content-type", _OCTET), (b"inference-header-content-length", str(binary_header).encode())],
        )

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes:
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isascii() and value.isdigit() and int(value) > self.max_body:
                raise TooLarge(f"request body of {int(value)} bytes exceeds the limit of {self.max_body}")
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise TooLarge(f"request body exceeds the limit of {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        if encoding not in ("gzip", "deflate"):
            raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, self.max_body + 1)
        except zlib.error as exc:
            raise InvalidInput(f"body is not valid {encoding}: {exc}") from None
        if len(out) > self.max_body or inflater.unconsumed_tail:
            raise TooLarge(f"decompressed body exceeds the limit of {self.max_body} bytes")
        return out


def _require(method: str, expected: str, scope: dict[str, Any]) -> None:
    if method != expected:
        raise MethodNotAllowed(f"{scope['path']} takes {expected}, not {method}", {"Allow": expected})


def _statistics(dataplane: Dataplane, name: str | None, version: str | None) -> dict[str, Any]:
    return {"model_stats": [row.to_dict() for row in dataplane.statistics(name, version)]}
