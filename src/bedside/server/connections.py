"""HTTP connections that a slow or hostile client cannot hold: uvicorn's httptools protocol with
read timeouts, header bounds and a cap on open connections.

uvicorn only times out a connection that is idle *between* requests. A client that connects and
sends half a request line, or headers one byte a second, or a body that never ends, would hold a
connection (and the memory under it) forever; 2,200 of them were all kept open. Here:
  - the request line and headers must arrive within `header_timeout_s` of the connection, or of
    the first read that left them incomplete, else 408 and the connection is closed;
  - the body must arrive within `body_timeout_s` of the first read that left it incomplete, else 408;
  - headers are bounded in bytes and in count (431), so neither 100,000 headers nor one 64 MiB
    header is buffered;
  - beyond `max_connections` open at once, the connection that has waited longest without sending
    a whole request (no request yet, or a stalled body) is closed to make room (408); only when
    every connection is busy being answered does the new one get 503.
Every refusal is a short JSON error with `Connection: close`, never a silent drop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from bedside.security.callers import Peer
from bedside.security.tls import peer_of
from bedside.settings import ServerSettings

log = logging.getLogger("bedside.server")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_REASONS[503] = b"Service Unavailable"
PEER_KEY = "bedside.peer"  # scope key: the verified client certificate (a security.callers.Peer), or None


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_header_bytes: int
    max_headers: int

    @classmethod
    def from_settings(cls, server: ServerSettings) -> ConnectionLimits:
        return cls(
            server.header_timeout_s,
            server.body_timeout_s,
            server.max_connections,
            server.max_header_kb << 10,
            server.max_headers,
        )


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class GuardedHTTPProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection; `limits` is set on the subclass `protocol_for` makes."""

    limits: ConnectionLimits
    refused = 0  # connections and requests refused by the guards, over all connections
    _ticks = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_headers = True
        self._header_bytes = 0
        self._message_done = True
        self._closed_by_guard = False
        self._since = 0  # order of the connection, or of its last request's start (`_tick`)
        self._peer: Peer | None = None

    # --- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # over mutual TLS the client certificate is verified once, in the handshake: read it once
        ssl_object = transport.get_extra_info("ssl_object")
        self._peer = None if ssl_object is None else peer_of(ssl_object)
        limits = self.limits
        self._since = self._tick()
        if len(self.connections) > limits.max_connections and not self._make_room():
            self._refuse(503, f"the server has {limits.max_connections} connections open, its limit; retry shortly")
            return
        self._arm(limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[PEER_KEY] = self._peer  # type: ignore[literal-required]

    def data_received(self, data: bytes) -> None:
        if self._closed_by_guard:
            return
        if self._in_headers:
            self._header_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refusal = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            if refusal is None:
                self._refuse(400, "malformed HTTP request")
            else:
                self._refuse(refusal.status, refusal.reason)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._refuse(400, "malformed HTTP request")
            return
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"request line and headers exceed {self.limits.max_header_bytes >> 10} KiB")
        elif self._timer is None and (self._header_bytes if self._in_headers else not self._message_done):
            # part of a request is still to come: from now on it has a deadline. A request that
            # arrived whole (the usual case) never arms a timer, so the guard costs no timer churn.
            self._arm(self.limits.header_timeout_s if self._in_headers else self.limits.body_timeout_s)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the connection is the WebSocket protocol's from here on
        super().handle_websocket_upgrade()

    # --- parser callbacks -------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        # counted here, not per header: the byte bound already caps what a flood of headers can hold
        if len(self.headers) > self.limits.max_headers:
            raise _Refused(431, f"more than {self.limits.max_headers} headers")
        self._since = self._tick()  # an upload ages from its headers
        self._disarm()
        self._in_headers = False
        self._message_done = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._since = self._tick()  # an idle keep-alive connection ages from its last request
        self._disarm()
        self._in_headers = True  # what follows on this connection is the next request's headers
        self._header_bytes = 0
        self._message_done = True
        super().on_message_complete()

    # --- guards -----------------------------------------------------------------------------

    @classmethod
    def _tick(cls) -> int:
        """An ever-growing count: only the order of events matters for making room, not their time."""
        cls._ticks += 1
        return cls._ticks

    def _make_room(self) -> bool:
        """At the cap, close the connection that has waited longest for a request that has not
        arrived, or else the longest-stalled upload, so that 1,000 half-open connections cannot lock
        out a nurse station whose requests arrive whole. A request being answered is never cut.
        False when every connection is busy being answered."""
        waiting, uploading = [], []
        for c in self.connections:
            if not isinstance(c, GuardedHTTPProtocol) or c is self or c._closed_by_guard:
                continue
            if c._in_headers and (c.cycle is None or c.cycle.response_complete):
                waiting.append(c)
            elif not c._in_headers and not c._message_done:
                uploading.append(c)
        victims = waiting or uploading
        if not victims:
            return False
        oldest = min(victims, key=lambda c: c._since)
        oldest._refuse(408, "closed to make room: the request did not arrive in time")
        self.connections.discard(oldest)
        return True

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._in_headers:
            self._refuse(408, f"request headers not received within {self.limits.header_timeout_s:g} s")
        elif self.cycle is not None and self.cycle.response_started:
            self.transport.close()
        else:
            self._refuse(408, f"request body not received within {self.limits.body_timeout_s:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer `status` with the reason and close; the request (if any) is not run."""
        type(self).refused += 1
        self._closed_by_guard = True
        self._disarm()
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": reason})
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
        ]
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()


class PeerWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with the verified client certificate in the scope as for HTTP."""

    async def run_asgi(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object")
        self.scope[PEER_KEY] = None if ssl_object is None else peer_of(ssl_object)  # type: ignore[literal-required]
        await super().run_asgi()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # an HTTP answer to the upgrade (401/403) ends the handshake: uvicorn would otherwise log
            # an error for every refused client, a log any anonymous caller could flood
            self.handshake_complete = True


def protocol_for(server: ServerSettings) -> type[GuardedHTTPProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to these settings."""
    return type("BedsideHTTPProtocol", (GuardedHTTPProtocol,), {"limits": ConnectionLimits.from_settings(server)})
