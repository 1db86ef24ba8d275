"""An MLLP listener (Minimal Lower Layer Protocol: <VT> message <FS><CR>) for HL7v2 over TCP.

Each connection is read frame by frame: bytes before a start block are discarded, and every
complete frame gets an ACK or a NAK. Nothing a monitor sends can stop the listener: errors end at
the frame or the connection they came from.

What connections can make the listener hold is bounded (200 connections each sending 1 MB with no
end block once grew the ingest process from 25 to 232 MB): at most `max_connections` are open (a
further one is closed at once), one silent for `idle_timeout_s` is closed, a frame larger than
`max_frame` is answered AR and its connection closed, and all unfinished frames together hold at
most `max_buffered` bytes; beyond that the connection with the largest unfinished frame is answered
AR and closed. A closed connection's buffer is released at once.

Over TLS with security.auth on (streams.mllp_auth), a connection whose client certificate names
no device caller gets one AR naming the reason and is closed; a message for a bed outside the
device's patterns gets an AR and is not stored. Both are counted (refused_connections, rejected).
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from bedside.settings import DEFAULTS, StreamsSettings
from bedside.streams.hl7v2 import DEFAULT_POLICY, HL7Error, HL7Policy, VitalsMessage, accepted_ack, ack, nak, parse_oru
from bedside.streams.mllp_auth import BED_NOT_ALLOWED, OPEN, ListenerSecurity

if TYPE_CHECKING:
    from bedside.security.callers import Peer

START, END = b"\x0b", b"\x1c\x0d"
READ_SIZE = 65536
COUNTERS = ("accepted", "rejected", "connections", "open_connections", "refused_connections", "idle_closed", "shed")
_DEFAULT = DEFAULTS.streams
TRIM_AFTER = 4 << 20  # bytes of frames released before the C heap is trimmed (at most every TRIM_EVERY_S)
TRIM_EVERY_S = 0.5
HANDSHAKE_TIMEOUT_S = 10.0  # a TLS handshake not done by then is dropped: half-open handshakes are bounded too
log = logging.getLogger("bedside.mllp")


def _heap_trimmer() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere. Freed frame buffers stay in glibc's heap, not the
    system's: after 200 unfinished 1 MB frames were closed the ingest process kept 97 MB more than
    at its start; trimmed, under 1 MB more (tests/test_ingest.py)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _heap_trimmer()


def frame(text: str) -> bytes:
    return START + text.encode("utf-8") + END


class Framer:
    """Splits one connection's bytes into MLLP payloads. Every byte is searched a bounded number of
    times (the end block only in the bytes just read, never the whole frame again), so a 1 MB frame
    in 64 KB reads costs O(1 MB), not O(1 MB²/64 KB). A start block inside an unfinished frame begins
    a new frame: MLLP payloads cannot hold one, and the sender has evidently started over."""

    __slots__ = ("frame", "max_frame", "too_large")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.frame: bytearray | None = None  # the unfinished frame's payload so far, None between frames
        self.too_large = False

    @property
    def pending(self) -> int:
        return 0 if self.frame is None else len(self.frame)

    def reset(self) -> None:
        self.frame = None  # a new bytearray for the next frame: the large one's memory goes back now

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads `chunk` completes. After a frame over the limit, `too_large` is set and
        nothing more is read (the frames before it are still returned)."""
        out: list[bytes] = []
        pos, size, view = 0, len(chunk), memoryview(chunk)
        while pos < size and not self.too_large:
            current = self.frame
            if current is None:
                start = chunk.find(START, pos)
                if start < 0:
                    break  # noise between frames
                self.frame, pos = bytearray(), start + 1
                continue
            if pos == 0 and current and current[-1] == END[0] and chunk[0] == END[1]:
                del current[-1]  # the end block was split across two reads
                out.append(self._finish())
                pos = 1
                continue
            end = chunk.find(END, pos)
            stop = size if end < 0 else end
            restart = chunk.rfind(START, pos, stop)
            if restart >= 0:
                current = self.frame = bytearray()
                pos = restart + 1
            current += view[pos:stop]
            if len(current) > self.max_frame:
                self.too_large = True
                self.reset()
                break
            if end < 0:
                break
            out.append(self._finish())
            pos = end + 2
        return out

    def _finish(self) -> bytes:
        payload = bytes(self.frame or b"")
        self.reset()
        return payload


class _Connection:
    __slots__ = ("framer", "idle", "peer", "revoked", "shed", "since", "timer", "waiting", "writer")

    def __init__(self, framer: Framer, writer: asyncio.StreamWriter, peer: Peer | None = None) -> None:
        self.framer, self.writer, self.peer = framer, writer, peer
        self.waiting = self.idle = self.shed = False  # waiting: on the peer (to send, or to read our answers)
        self.revoked = False  # its device was removed from the callers file while it was connected
        self.since = 0.0
        self.timer: asyncio.TimerHandle | None = None


class MLLPServer:
    """`on_message` stores a parsed message (it may be a coroutine); the ACK goes out only when it
    returns, and an HL7Error it raises becomes the NAK. `on_change` hears of every counter change."""

    def __init__(
        self,
        on_message: Callable[[VitalsMessage], Awaitable[None] | None],
        host: str = DEFAULTS.server.host,
        port: int = _DEFAULT.mllp_port,
        max_frame: int = _DEFAULT.mllp_max_frame_kb << 10,
        on_change: Callable[[], None] | None = None,
        *,
        max_connections: int = _DEFAULT.mllp_max_connections,
        idle_timeout_s: float = _DEFAULT.mllp_idle_timeout_s,
        max_buffered: int = _DEFAULT.mllp_max_buffered_mb << 20,
        policy: HL7Policy = DEFAULT_POLICY,
        guard: ListenerSecurity = OPEN,
    ) -> None:
        self.on_message = on_message
        self.on_change = on_change
        self.host, self.port, self.max_frame = host, port, max_frame
        self.max_connections, self.idle_timeout_s, self.max_buffered = max_connections, idle_timeout_s, max_buffered
        self.policy, self.guard = policy, guard
        self.accepted = self.rejected = self.connections = self.open_connections = 0
        self.refused_connections = self.idle_closed = self.shed = 0
        self.buffered = 0  # bytes in all unfinished frames
        self._released = 0  # bytes of frames let go since the heap was last trimmed
        self._trimming = False
        self._open: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    @classmethod
    def from_settings(
        cls,
        on_message: Callable[[VitalsMessage], Awaitable[None] | None],
        host: str,
        port: int,
        settings: StreamsSettings,
        on_change: Callable[[], None] | None = None,
        policy: HL7Policy = DEFAULT_POLICY,
        guard: ListenerSecurity = OPEN,
    ) -> MLLPServer:
        return cls(
            on_message,
            host,
            port,
            settings.mllp_max_frame_kb << 10,
            on_change,
            max_connections=settings.mllp_max_connections,
            idle_timeout_s=settings.mllp_idle_timeout_s,
            max_buffered=settings.mllp_max_buffered_mb << 20,
            policy=policy,
            guard=guard,
        )

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    async def start(self) -> None:
        # the stream's own buffer stays small: frames are gathered (and bounded) by the Framer
        tls = self.guard.ssl
        self._server = await asyncio.start_server(
            self._connection,
            self.host,
            self.port,
            limit=READ_SIZE,
            ssl=tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if tls is not None else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            self._changed()
            writer.close()  # nothing read, nothing held
            return
        peer = self.guard.peer(writer.get_extra_info("ssl_object"))
        _, refusal = self.guard.device(peer)
        if refusal:
            self.refused_connections += 1
            self._changed()
            writer.write(frame(ack("", "AR", refusal)))  # the reason, so the device's log says why
            writer.close()
            return
        self.connections += 1
        self.open_connections += 1
        self._changed()
        conn = _Connection(Framer(self.max_frame), writer, peer)
        self._open.add(conn)
        loop = asyncio.get_running_loop()
        conn.timer = loop.call_later(self.idle_timeout_s, self._check_idle, conn)
        try:
            while not conn.shed:
                conn.waiting, conn.since = True, loop.time()
                chunk = await reader.read(READ_SIZE)
                conn.waiting = False
                if not chunk or conn.shed or conn.idle:  # ended, or refused or timed out while it waited
                    return
                before = conn.framer.pending
                payloads = conn.framer.feed(chunk)
                self.buffered += conn.framer.pending - before
                if self.buffered > self.max_buffered:
                    self._shed()
                for payload in payloads:
                    writer.write(frame(await self._answer(payload, conn)))
                    self._release(len(payload))
                    if conn.revoked:
                        return  # its NAK says why; nothing after it is read
                if conn.framer.too_large:
                    self._refuse(conn, f"frame exceeds {self.max_frame} bytes")
                    return
                conn.waiting, conn.since = True, loop.time()
                await writer.drain()  # a peer that never reads its answers is idle too
                conn.waiting = False
                if conn.idle:
                    return
            self._refuse(conn, self._shed_reason())
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except Exception:
            log.exception("MLLP connection failed; the listener keeps running")
        finally:
            if conn.timer is not None:
                conn.timer.cancel()
            if conn.idle:
                self.idle_closed += 1
            self.buffered -= conn.framer.pending
            self._release(conn.framer.pending)
            conn.framer.reset()
            self._open.discard(conn)
            self.open_connections -= 1
            self._changed()
            writer.close()

    def _check_idle(self, conn: _Connection) -> None:
        """Close a connection whose peer has sent nothing (or read nothing of ours) for
        idle_timeout_s; time spent answering it does not count (the monitor waits for us then)."""
        loop = asyncio.get_running_loop()
        if conn.waiting and loop.time() - conn.since >= self.idle_timeout_s:
            conn.idle = True
            # abort, not close: a close waits for unsent answers the peer may never read. The
            # pending read or drain then ends, and so does the handler.
            conn.writer.transport.abort()
            return
        due = conn.since + self.idle_timeout_s if conn.waiting else loop.time() + self.idle_timeout_s
        conn.timer = loop.call_at(due, self._check_idle, conn)

    def _shed(self) -> None:
        """Drop the largest unfinished frames until the total is within max_buffered."""
        while self.buffered > self.max_buffered and self._open:
            victim = max(self._open, key=lambda c: c.framer.pending)
            self.buffered -= victim.framer.pending
            self._release(victim.framer.pending)
            victim.framer.reset()
            victim.shed = True
            self.shed += 1
            if victim.waiting:  # all its earlier frames are answered: the NAK can go now
                self._refuse(victim, self._shed_reason())
                victim.writer.close()
            # otherwise its handler answers what it is working on, then sends the NAK and ends

    def _release(self, size: int) -> None:
        self._released += size
        if self._released >= TRIM_AFTER and not self._trimming and _TRIM is not None:
            self._trimming = True
            asyncio.get_running_loop().call_later(TRIM_EVERY_S, self._trim)

    def _trim(self) -> None:
        self._released, self._trimming = 0, False
        if _TRIM is not None:
            _TRIM(0)

    def _shed_reason(self) -> str:
        return f"unfinished messages exceed the listener's {self.max_buffered >> 20} MiB; send again"

    def _refuse(self, conn: _Connection, reason: str) -> None:
        if not conn.writer.is_closing():
            conn.writer.write(frame(ack("", "AR", reason)))
        self.rejected += 1
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _check_device(self, conn: _Connection, message: VitalsMessage) -> None:
        """HL7Error (AR) unless the connection's device may feed the message's bed."""
        if self.guard.identify is None:
            return
        caller, refusal = self.guard.device(conn.peer)
        if caller is None:
            conn.revoked = True
            raise HL7Error(refusal, "AR", message.control_id)
        if not caller.may_feed(message.bed):
            raise HL7Error(BED_NOT_ALLOWED, "AR", message.control_id)

    async def _answer(self, payload: bytes, conn: _Connection) -> str:
        text = payload.decode("utf-8", errors="replace")
        try:
            message = parse_oru(text, policy=self.policy)
            self._check_device(conn, message)
            stored = self.on_message(message)
            if inspect.isawaitable(stored):
                await stored
        except HL7Error as exc:
            self.rejected += 1
            self._changed()
            return nak(text, exc)
        except Exception as exc:  # a bug handling one message must not cost the others
            log.exception("failed to process an HL7 message")
            self.rejected += 1
            self._changed()
            return ack(text, "AE", f"internal error: {type(exc).__name__}")
        self.accepted += 1
        return accepted_ack(text, message)
