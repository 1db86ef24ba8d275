"""OIP v2 REST as a bare ASGI application.

No framework sits on the hot path: routing is a split of the path, bodies are read once, JSON goes
through orjson, nothing is logged per request. What a framework would add here (validation models,
middleware, per-request logging) costs more than the model itself for small clinical models.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from typing import Any

import orjson

from bedside.engine import Engine
from bedside.errors import BedsideError, InvalidInput, MethodNotAllowed, NotFound, TooLarge
from bedside.protocol.codec import decode_request, encode_response
from bedside.streams.service import Streams

log = logging.getLogger("bedside.server")

MAX_BODY_BYTES = 64 << 20
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
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
    def __init__(self, engine: Engine, max_body_bytes: int = MAX_BODY_BYTES, streams: Streams | None = None) -> None:
        self.engine = engine
        self.max_body = max_body_bytes
        self.streams = streams
        self._startup: asyncio.Future[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] == "/v2/alerts/stream" and self.streams is not None:
            await self.streams.sse(receive, send)
        elif kind == "websocket" and self.streams is not None:
            await self.streams.websocket(scope, receive, send)
        elif kind == "http":
            response = await self._handle(scope, receive)
            headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            await send({"type": "http.response.body", "body": response.body})
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Listen at once (liveness answers) and load models beside it (readiness waits).
                self._startup = asyncio.get_running_loop().run_in_executor(None, self.engine.start)
                if self.streams is not None:
                    try:
                        await self.streams.start()
                    except OSError as exc:  # e.g. the MLLP port is taken: say so and do not start half a server
                        await send({"type": "lifespan.startup.failed", "message": f"streams: {exc}"})
                        return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.streams is not None:
                    await self.streams.close()
                self.engine.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

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
        engine = self.engine

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
                return json_response(engine.statistics(None, None))
            if action == "":
                return json_response(engine.model_metadata(name, version))
            if action == "ready":
                ready = engine.model_ready(name, version)
                return json_response({"name": name, "ready": ready}, 200 if ready else 503)
            if action == "config":
                return json_response(engine.model_config(name, version))
            if action == "stats":
                return json_response(engine.statistics(name, version))
            raise NotFound(f"no route {scope['path']}")

        if not rest:
            _require(method, "GET", scope)
            return json_response(engine.server_metadata())
        if rest[0] == "health" and len(rest) == 2:
            _require(method, "GET", scope)
            if rest[1] == "live":
                return json_response({"live": True})
            if rest[1] == "ready":
                ready = engine.started
                return json_response({"ready": ready}, 200 if ready else 503)
        if rest[0] in ("beds", "alerts", "streams") and self.streams is not None:
            _require(method, "GET", scope)
            if rest == ["beds"]:
                return json_response(self.streams.beds_view())
            if rest == ["alerts"]:
                return json_response(list(self.streams.bus.recent))
            if rest == ["streams"]:
                return json_response(self.streams.status())
        if rest[0] == "repository":
            _require(method, "POST", scope)
            if rest[1:] == ["index"]:
                await self._read_body(scope, receive)
                return json_response(engine.index())
            if len(rest) == 4 and rest[1] == "models" and rest[3] in ("load", "unload"):
                await self._read_body(scope, receive)
                if rest[3] == "load":
                    await engine.load(rest[2])
                else:
                    await engine.unload(rest[2])
                return json_response({})
        raise NotFound(f"no route {method} {scope['path']}")

    async def _infer(self, scope: dict[str, Any], receive: Any, name: str, version: str | None) -> Response:
        queue = self.engine.route(name, version)
        header_length = None
        encoding = tenant = priority = timeout_ms = None
        for key, value in scope["headers"]:
            if key == b"inference-header-content-length":
                try:
                    header_length = int(value)
                except ValueError:
                    raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
            elif key == b"content-encoding":
                encoding = value.decode("latin-1").strip().lower()
            elif key.startswith(b"x-bedside-"):
                if key == b"x-bedside-tenant":
                    tenant = value.decode("latin-1").strip()
                elif key == b"x-bedside-priority":
                    priority = value.decode("latin-1").strip()
                elif key == b"x-bedside-timeout-ms":
                    timeout_ms = value
        body = await self._read_body(scope, receive)
        if encoding and encoding != "identity":
            body = self._decompress(body, encoding)
        request = decode_request(body, header_length)
        if tenant:
            if not _TENANT.fullmatch(tenant):
                raise InvalidInput("X-Bedside-Tenant must be 1-64 letters, digits, '.', '_' or '-'")
            request.tenant = tenant
        if priority and request.priority is None:  # a priority in the body is the more specific one
            request.priority = priority
        if timeout_ms is not None and request.timeout_us is None:
            try:
                request.timeout_us = int(float(timeout_ms) * 1000)
            except ValueError:
                raise InvalidInput("X-Bedside-Timeout-Ms must be a number of milliseconds") from None
        response = await self.engine.infer(queue, request, version)
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
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body:
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
