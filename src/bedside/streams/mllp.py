"""An MLLP listener (Minimal Lower Layer Protocol: <VT> message <FS><CR>) for HL7v2 over TCP.

Each connection is read frame by frame: bytes before a start block are discarded, a frame larger
than the limit is answered with a NAK and the connection closed, and every complete frame gets an
ACK or a NAK. Nothing a monitor sends can stop the listener: errors end at the frame or the
connection they came from.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

from bedside.settings import DEFAULTS
from bedside.streams.hl7v2 import HL7Error, VitalsMessage, accepted_ack, ack, parse_oru

START, END = b"\x0b", b"\x1c\x0d"
MAX_FRAME = 1 << 20
log = logging.getLogger("bedside.mllp")


def frame(text: str) -> bytes:
    return START + text.encode("utf-8") + END


class MLLPServer:
    """`on_message` stores a parsed message (it may be a coroutine); the ACK goes out only when it
    returns, and an HL7Error it raises becomes the NAK. `on_change` hears of every counter change."""

    def __init__(
        self,
        on_message: Callable[[VitalsMessage], Awaitable[None] | None],
        host: str = DEFAULTS.server.host,
        port: int = DEFAULTS.streams.mllp_port,
        max_frame: int = MAX_FRAME,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_change = on_change
        self.host, self.port, self.max_frame = host, port, max_frame
        self.accepted = self.rejected = self.connections = self.open_connections = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=self.max_frame + 16)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        self._changed()
        buffer = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
                while True:
                    start = buffer.find(START)
                    if start < 0:
                        buffer = b""  # noise between frames
                        break
                    end = buffer.find(END, start)
                    if end < 0:
                        buffer = buffer[start:]
                        if len(buffer) > self.max_frame:
                            writer.write(frame(ack("", "AR", f"frame exceeds {self.max_frame} bytes")))
                            await writer.drain()
                            self.rejected += 1
                            self._changed()
                            return
                        break
                    payload, buffer = buffer[start + 1 : end], buffer[end + 2 :]
                    writer.write(frame(await self._answer(payload)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except Exception:
            log.exception("MLLP connection failed; the listener keeps running")
        finally:
            self.open_connections -= 1
            self._changed()
            writer.close()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _answer(self, payload: bytes) -> str:
        text = payload.decode("utf-8", errors="replace")
        try:
            message = parse_oru(text)
            stored = self.on_message(message)
            if inspect.isawaitable(stored):
                await stored
        except HL7Error as exc:
            self.rejected += 1
            self._changed()
            return ack(text, exc.code, str(exc), exc.control_id)
        except Exception as exc:  # a bug handling one message must not cost the others
            log.exception("failed to process an HL7 message")
            self.rejected += 1
            self._changed()
            return ack(text, "AE", f"internal error: {type(exc).__name__}")
        self.accepted += 1
        return accepted_ack(text, message)
