"""The front of a bedside cluster: OIP v2 REST read off the wire and sent to the replicas that
serve the model named in the path, which answer as a single box would (see server.inproc).

The gateway knows the protocol, not the cluster: a `Backend` (cluster.front) routes, queues STAT
first and retries. What the gateway answers itself is what no one replica can: liveness,
readiness of the whole, and the repository index and statistics gathered from every replica.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from bedside.dataplane.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from bedside.errors import BedsideError, Conflict, MethodNotAllowed, NotFound, TooLarge
from bedside.server.inproc import HTTPAnswer, HTTPCall

_JSON = ((b"content-type", b"application/json"),)
NOT_IN_A_CLUSTER = (
    "is not served by a bedside cluster: the streams (HL7, ECG, alerts) and the status page run on each "
    "ward's box; the cluster serves /v2 inference, metadata, health, statistics, the repository index and /metrics"
)


class Backend(Protocol):
    async def forward(self, model: str, priority: Any, call: HTTPCall) -> HTTPAnswer:
        """The answer of a replica serving `model`; `priority` is as the caller wrote it (None: the default)."""

    async def forward_any(self, call: HTTPCall) -> HTTPAnswer:
        """The answer of any one replica (server metadata: every replica gives the same)."""

    async def gather(self, call: HTTPCall) -> list[HTTPAnswer]:
        """The answers of one replica of every model and graph."""

    async def ready(self) -> bool:
        """Whether every model and graph has a replica that is ready."""


def answer(status: int, doc: Any, extra: tuple[tuple[bytes, bytes], ...] = ()) -> HTTPAnswer:
    return HTTPAnswer(status, _JSON + extra, orjson.dumps(doc))


def error_answer(exc: BedsideError) -> HTTPAnswer:
    extra = tuple((k.lower().encode(), v.encode()) for k, v in exc.headers.items())
    return answer(exc.status, {"error": exc.message}, extra)


class Gateway:
    def __init__(self, backend: Backend, max_body: int) -> None:
        self.backend = backend
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # Ray Serve runs the ingress app's lifespan; there is nothing to start
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind == "websocket":  # the ECG stream lives on the ward's box
            await send({"type": "websocket.close", "code": 1008, "reason": "ECG streams are served by the ward's box"})
            return
        try:
            result = await self._route(scope, receive)
        except BedsideError as exc:
            result = error_answer(exc)
        headers = [*result.headers, (b"content-length", str(len(result.body)).encode())]
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        await send({"type": "http.response.body", "body": result.body})

    async def _route(self, scope: dict[str, Any], receive: Any) -> HTTPAnswer:
        path, method = scope["path"], scope["method"]
        parts = path.rstrip("/").split("/")[1:]
        if parts[:1] != ["v2"] and parts != ["metrics"]:
            raise NotFound(f"{path[:64]} {NOT_IN_A_CLUSTER}")
        rest = parts[1:]
        if parts == ["metrics"]:
            _require(method, "GET", path)
            return merged_metrics(await self.backend.gather(await self._read(scope, receive)))
        if rest[:1] == ["health"] and len(rest) == 2 and rest[1] in ("live", "ready"):
            _require(method, "GET", path)
            if rest[1] == "live":
                return answer(200, {"live": True})
            ready = await self.backend.ready()
            return answer(200 if ready else 503, {"ready": ready})
        call = await self._read(scope, receive)
        if rest[:1] == ["models"] and len(rest) >= 2:
            if rest[1:] == ["stats"]:
                return _merged(await self.backend.gather(call), "model_stats")
            return await self.backend.forward(rest[1], _priority(call), call)
        if not rest:
            return await self.backend.forward_any(call)
        if rest == ["repository", "index"]:
            _require(method, "POST", path)
            return _merged(await self.backend.gather(call), None)
        if rest[:2] == ["repository", "models"] and len(rest) == 4 and rest[3] in ("load", "unload"):
            raise Conflict(
                f"a cluster does not {rest[3]} models one replica at a time: its placement is its deployment; "
                "change the repository and run `bedside cluster up` again"
            )
        raise NotFound(f"{path[:64]} {NOT_IN_A_CLUSTER}")

    async def _read(self, scope: dict[str, Any], receive: Any) -> HTTPCall:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise TooLarge(f"request body exceeds the limit of {self.max_body} bytes (server.max_body_mb)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        headers = tuple((bytes(k).lower(), bytes(v)) for k, v in scope["headers"])
        return HTTPCall(scope["method"], scope["path"], scope.get("query_string", b""), headers, b"".join(chunks))


def _require(method: str, expected: str, path: str) -> None:
    if method != expected:
        raise MethodNotAllowed(f"{path[:64]} takes {expected}, not {method}", {"Allow": expected})


def _priority(call: HTTPCall) -> Any:
    """The priority the caller asked for, cheaply: the X-Bedside-Priority header, else the request's
    `parameters.priority` (read only when the body mentions it). None: the model's default. A value
    that is not valid is left to the replica, which refuses it with the box's words."""
    for key, value in call.headers:
        if key == b"x-bedside-priority":
            return value.decode("latin-1").strip()
    if call.method != "POST" or b'"priority"' not in call.body:
        return None
    header_length = next((v for k, v in call.headers if k == b"inference-header-content-length"), None)
    text = call.body
    if header_length is not None and header_length.isdigit():
        text = text[: int(header_length)]
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    parameters = doc.get("parameters") if isinstance(doc, dict) else None
    return parameters.get("priority") if isinstance(parameters, dict) else None


def _merged(answers: list[HTTPAnswer], key: str | None) -> HTTPAnswer:
    """One list from every replica's (a refusal, such as a 403 for a caller without the monitor
    role, is every replica's: the first is given), ordered by model name and version. A model a
    graph's replicas also load is listed once, from its own deployment (the answers come first)."""
    rows: list[Any] = []
    seen = set()
    for one in answers:
        if one.status != 200:
            return one
        doc = orjson.loads(one.body)
        for row in doc[key] if key is not None else doc:
            if (row.get("name"), row.get("version")) not in seen:
                seen.add((row.get("name"), row.get("version")))
                rows.append(row)
    rows.sort(key=lambda row: (str(row.get("name", "")), str(row.get("version", ""))))
    return answer(200, {key: rows} if key is not None else rows)


def merged_metrics(answers: list[HTTPAnswer]) -> HTTPAnswer:
    """One Prometheus text from every deployment's: a model's samples from its own deployment (the
    answers come first; a graph's replicas load models too), server-wide ones (the audit log's
    counters, no model label) summed over the replicas that reported them."""
    for one in answers:
        if one.status != 200:
            return one
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for one in answers:
        seen_here: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
        for family in text_string_to_metric_families(one.body.decode()):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                    seen_here.add(key)
                elif "model" not in sample.labels and key not in seen_here:
                    values[key] += sample.value
    for (family_name, name, labels), value in values.items():
        families[family_name].add_sample(name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return HTTPAnswer(200, ((b"content-type", METRICS_CONTENT_TYPE.encode()),), generate_latest(registry))


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
