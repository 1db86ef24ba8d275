"""The streams' push endpoints in their wire forms: Server-Sent Events for scores and alerts, and
the ECG WebSocket. Framing, handshakes and disconnects live here; what is computed lives in the
streams, which know no protocol."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson

from bedside.errors import BedsideError
from bedside.streams.ecg import ChunkError
from bedside.streams.service import Streams

ECG_PREFIX = "/v2/streams/ecg/"
POLICY_VIOLATION = 1008
MIN_GAP_S = 0.2  # a live status snapshot at most this often, however many events come
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
TOO_BIG = 1009


async def serve_ecg(
    streams: Streams | None, scope: dict[str, Any], receive: Any, send: Any, may_feed: Callable[[str], None]
) -> None:
    """/v2/streams/ecg/{bed}: binary float32 [n, 12] chunks in, one JSON result per window out.
    A bad chunk gets an error message and the connection stays. `may_feed(bed)` raises (401/403)
    unless the caller is a device allowed to feed the bed: refused before the socket is accepted."""
    if (await receive())["type"] != "websocket.connect":
        return
    path: str = scope["path"].rstrip("/")
    if streams is None or not path.startswith(ECG_PREFIX):
        await _close(send, POLICY_VIOLATION, "no WebSocket here; the ECG stream is /v2/streams/ecg/{bed}")
        return
    bed = path[len(ECG_PREFIX) :]
    try:
        may_feed(bed)
    except BedsideError as exc:  # 401 / 403 as an HTTP answer to the upgrade, with its reason
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": orjson.dumps({"error": exc.message})})
        return
    try:
        session = streams.open_ecg(bed)
    except BedsideError as exc:
        await _close(send, POLICY_VIOLATION, f"use /v2/streams/ecg/{{bed}}: {exc.message}")
        return
    limit = streams.settings.limits.max_ws_message_kb << 10
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            may_feed(bed)  # again for every chunk: a revoked device stops within a second (~1 µs a check)
        except BedsideError as exc:
            await _close(send, POLICY_VIOLATION, exc.message)
            return
        data = message.get("bytes")
        if data is None:
            await _send_json(send, {"type": "error", "error": "send binary float32 chunks [n, 12]"})
            continue
        if len(data) > limit:
            await _close(send, TOO_BIG, f"a chunk may hold at most {limit} bytes")
            return
        try:
            results = await session.push(data)
        except ChunkError as exc:
            await _send_json(send, {"type": "error", "error": str(exc)})
            continue
        for result in results:
            await _send_json(send, result.to_dict())


async def serve_sse(streams: Streams, receive: Any, send: Any, allowed: Callable[[], None]) -> None:
    """Server-Sent Events: every score and alert as it happens, until the client goes away or
    `allowed()` (checked before each event and keep-alive) raises: its caller was revoked."""
    queue = streams.subscribe()
    keepalive = streams.settings.alerts.keepalive_s
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    await send({"type": "http.response.body", "body": b": bedside alert stream\n\n", "more_body": True})

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":  # the (empty) request body comes first
            pass

    disconnected = asyncio.ensure_future(until_disconnect())
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, disconnected}, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
            if disconnected in done:
                getter.cancel()
                return
            try:
                allowed()
            except BedsideError:
                getter.cancel()
                return
            if getter in done:
                event = getter.result()
                body = b"event: " + event.kind.encode() + b"\ndata: " + orjson.dumps(event.to_dict()) + b"\n\n"
            else:
                getter.cancel()
                body = b": keep-alive\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})
    except OSError:
        return
    finally:
        streams.unsubscribe(queue)
        disconnected.cancel()
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def serve_status(
    snapshot: Callable[[], bytes],
    streams: Streams | None,
    interval_s: float,
    receive: Any,
    send: Any,
    allowed: Callable[[], None],
) -> None:
    """The status page's live feed (SSE): a snapshot at once, then every `interval_s`, and at once
    (at most every MIN_GAP_S) when an alert or score is published. `snapshot()` runs off the event
    loop (it computes percentiles and drift); `allowed()` ends the feed of a revoked caller."""
    loop = asyncio.get_running_loop()
    queue = streams.subscribe() if streams is not None else None
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    disconnected = asyncio.ensure_future(until_disconnect())
    try:
        while True:
            try:
                allowed()
            except BedsideError:
                return
            body = await loop.run_in_executor(None, snapshot)
            await send({"type": "http.response.body", "body": b"event: snapshot\ndata: " + body + b"\n\n",
                        "more_body": True})  # fmt: skip
            waiters: set[asyncio.Future[Any]] = {disconnected}
            if queue is not None:
                waiters.add(asyncio.ensure_future(queue.get()))
            done, _ = await asyncio.wait(waiters, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters - {disconnected}:
                waiter.cancel()
            if disconnected in done:
                return
            if queue is not None:
                while not queue.empty():  # a burst of scores becomes one snapshot
                    queue.get_nowait()
                await asyncio.sleep(MIN_GAP_S)
    except OSError:
        return
    finally:
        if streams is not None and queue is not None:
            streams.unsubscribe(queue)
        disconnected.cancel()
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_json(send: Any, doc: dict[str, Any]) -> None:
    await send({"type": "websocket.send", "text": orjson.dumps(doc).decode()})


async def _close(send: Any, code: int, reason: str) -> None:
    await send({"type": "websocket.close", "code": code, "reason": reason})
