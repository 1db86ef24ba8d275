"""One HTTP exchange as plain data, and bedside's own ASGI app run on it in memory.

A cluster replica receives a request that the front has already read off the wire (method, path,
headers, body) and must answer exactly as a single box would: it hands the exchange to the same
`App` that serves REST on the box, with no socket in between. The answer is plain data again, so
it crosses process boundaries (Ray) as bytes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class HTTPCall:
    method: str
    path: str
    query: bytes
    headers: Headers  # lower-case names, as ASGI gives them
    body: bytes


@dataclass(frozen=True, slots=True)
class HTTPAnswer:
    status: int
    headers: Headers
    body: bytes


async def call_app(app: Any, call: HTTPCall, client: tuple[str, int] = ("127.0.0.1", 0)) -> HTTPAnswer:
    """Run an ASGI app on one exchange. The body arrives in one message; a later receive waits
    until the answer is complete (the client never hangs up on an in-memory call)."""
    done = asyncio.Event()
    sent_body = False
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers.extend((bytes(k), bytes(v)) for k, v in message.get("headers", ()))
        elif message["type"] == "http.response.body":
            parts.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query,
        "root_path": "",
        "headers": list(call.headers),
        "client": client,
        "server": ("127.0.0.1", 0),
    }
    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return HTTPAnswer(status, tuple(headers), b"".join(parts))
