"""The serving process's end of the socketpair to the HL7 ingest child (streams.ingest): it reads
the child's length-prefixed orjson frames, hands each parsed message to the owner in slices, and
answers each with a 9-byte record (seq, stored or failed)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import orjson

SLICE = 16  # messages stored per turn of the serving loop
SLICE_OBSERVATIONS = 4096  # ... and observations: one huge message is stored whole, the next waits a turn


class LinkOwner(Protocol):
    """What the link needs of streams.ingest.IngestProcess."""

    counters: dict[str, int]

    def _store(self, doc: dict[str, Any]) -> int: ...


class ParentLink(asyncio.Protocol):
    def __init__(self, owner: LinkOwner) -> None:
        loop = asyncio.get_running_loop()
        self.owner = owner
        self.listening: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.scheduled:
            self._take()

    def _take(self) -> None:
        """Store at most SLICE messages (SLICE_OBSERVATIONS observations), then let the loop run: a
        ward's burst is spread over several loop turns instead of holding the ECG results back."""
        self.scheduled = False
        buffer = self.buffer
        answers = bytearray()
        messages, observations = 0, 0
        while messages < SLICE and observations < SLICE_OBSERVATIONS:
            if len(buffer) < 4:
                break
            size = int.from_bytes(buffer[:4], "little")
            if len(buffer) < 4 + size:
                break
            doc = orjson.loads(bytes(buffer[4 : 4 + size]))
            del buffer[: 4 + size]
            if "s" in doc:
                answers += doc["s"].to_bytes(8, "little") + bytes((self.owner._store(doc),))
                messages += 1
                observations += len(doc["o"])
            elif "n" in doc:
                counters = self.owner.counters
                counters.update((k, int(v)) for k, v in doc["n"].items() if k in counters)
            elif "port" in doc and not self.listening.done():
                self.listening.set_result(doc["port"])
            elif "error" in doc and not self.listening.done():
                self.listening.set_exception(OSError(doc["error"]))
        else:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._take)
        if answers and self.transport is not None:
            self.transport.write(bytes(answers))  # one write for the messages of this turn

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.listening.done():
            self.listening.set_exception(OSError("the HL7 ingest process exited before it was listening"))
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
