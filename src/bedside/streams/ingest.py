"""HL7 ingest in a process of its own beside the server.

The MLLP listener, HL7 parsing and the ACKs run in a child process, so a burst of messages (a
central station forwarding a whole ward in the same second, a monitor sending an hour of stored
vitals after a network outage) never delays the real-time ECG on the serving event loop. Parsing
with the `hl7` library costs ~0.4 ms a message; 200 beds reporting in the same second held the
serving loop ~100 ms when parsing ran there, and ECG window->score p99 went from 2.5 to 39 ms
(bench/streams.py, 200 beds).

The processes talk over a socketpair in length-prefixed orjson frames:
  child -> parent  {"port": N} once listening (or {"error": "..."}), then per parsed message
                   {"s": seq, "b": bed, "o": [[vital, value, time], ...]}, and counter changes
                   {"n": {"rejected": r, "connections": c, "open_connections": o}}
  parent -> child  9-byte records: seq (u64) and 0 = stored, 1 = failed
A monitor gets its AA only once the serving process holds the observations (acknowledgement on
commit): a vital sign acknowledged is a vital sign that will be scored. If the child dies, the
parent starts a new one on the same port; monitors reconnect and resend what was not ACKed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson

from bedside.settings import DEFAULTS
from bedside.streams.hl7v2 import HL7Error, Observation, VitalsMessage
from bedside.streams.mllp import MAX_FRAME, MLLPServer

log = logging.getLogger("bedside.ingest")
STORED, FAILED = 0, 1
START_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (0.5, 30.0)
SLICE = 16  # messages stored per turn of the serving loop


def _frame(doc: dict[str, Any]) -> bytes:
    body = orjson.dumps(doc)
    return len(body).to_bytes(4, "little") + body


# --- the serving side ----------------------------------------------------------------------


class IngestProcess:
    """Runs the MLLP listener in a child process and hands each parsed message to `on_message`
    on the serving loop. Counters mirror MLLPServer's, plus `restarts`."""

    def __init__(
        self,
        on_message: Callable[[VitalsMessage], None],
        host: str = DEFAULTS.server.host,
        port: int = DEFAULTS.streams.mllp_port,
        ack_timeout_s: float = DEFAULTS.streams.ack_timeout_s,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.on_message = on_message
        self.host, self.port, self.max_frame = host, port, max_frame
        self.ack_timeout_s = ack_timeout_s
        self.accepted = self.rejected = self.connections = self.open_connections = self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._link: _ParentLink | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        """Start the child and wait until it listens; raises OSError when it cannot."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._link is not None:
            self._link.close()  # the child exits when its link to the server closes
        if self._process is not None:
            await asyncio.get_running_loop().run_in_executor(None, _reap, self._process)

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bedside.streams.ingest",
                    f"--fd={theirs.fileno()}",
                    f"--host={self.host}",
                    f"--port={self.port}",
                    f"--max-frame={self.max_frame}",
                    f"--ack-timeout={self.ack_timeout_s}",
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        link = _ParentLink(self)
        await loop.create_connection(lambda: link, sock=ours)
        self._link = link
        try:
            self.port = await asyncio.wait_for(link.listening, START_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            link.close()
            await loop.run_in_executor(None, _reap, self._process)
            if isinstance(exc, TimeoutError):
                raise OSError(f"the HL7 ingest process did not listen within {START_TIMEOUT_S:.0f} s") from None
            raise

    async def _supervise(self) -> None:
        """Start a new child whenever the running one goes away (monitors reconnect and resend)."""
        backoff = RESTART_BACKOFF_S[0]
        while not self._closing:
            assert self._link is not None
            await self._link.lost
            if self._closing:
                return
            code = await asyncio.get_running_loop().run_in_executor(None, _reap, self._process)
            log.error("HL7 ingest process exited (code %s); starting a new one on port %d", code, self.port)
            while not self._closing:
                await asyncio.sleep(backoff)
                try:
                    await self._spawn()
                except OSError as exc:
                    log.error("HL7 ingest process could not restart: %s; retrying in %.0f s", exc, backoff)
                    backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
                    continue
                self.restarts += 1
                backoff = RESTART_BACKOFF_S[0]
                break

    def _store(self, doc: dict[str, Any]) -> int:
        try:
            observations = [Observation(vital, value, when) for vital, value, when in doc["o"]]
            self.on_message(VitalsMessage("", doc["b"], observations))
        except Exception:  # never lose a message silently: the monitor gets a NAK and resends
            log.exception("could not store HL7 observations for bed %r", doc.get("b"))
            return FAILED
        self.accepted += 1
        return STORED


def _reap(process: subprocess.Popen[bytes] | None) -> int | None:
    if process is None:
        return None
    try:
        return process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class _ParentLink(asyncio.Protocol):
    def __init__(self, owner: IngestProcess) -> None:
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
        """Store at most SLICE messages, then let the loop run: a ward's burst is spread over several
        loop turns instead of holding the ECG results back for all of it."""
        self.scheduled = False
        buffer = self.buffer
        answers = bytearray()
        for _ in range(SLICE):
            if len(buffer) < 4:
                break
            size = int.from_bytes(buffer[:4], "little")
            if len(buffer) < 4 + size:
                break
            doc = orjson.loads(bytes(buffer[4 : 4 + size]))
            del buffer[: 4 + size]
            if "s" in doc:
                answers += doc["s"].to_bytes(8, "little") + bytes((self.owner._store(doc),))
            elif "n" in doc:
                for key, value in doc["n"].items():
                    setattr(self.owner, key, value)
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


# --- the child process ---------------------------------------------------------------------


class _ChildLink:
    """The child's end: forwards parsed messages and waits for the server to store each one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ack_timeout_s: float) -> None:
        self.reader, self.writer = reader, writer
        self.ack_timeout_s = ack_timeout_s
        self.seq = 0
        self.pending: dict[int, asyncio.Future[int]] = {}
        self.server: MLLPServer | None = None

    def send(self, doc: dict[str, Any]) -> None:
        self.writer.write(_frame(doc))

    async def store(self, message: VitalsMessage) -> None:
        self.seq += 1
        seq = self.seq
        answer = self.pending[seq] = asyncio.get_running_loop().create_future()
        self.send({"s": seq, "b": message.bed, "o": [[o.vital, o.value, o.time] for o in message.observations]})
        try:
            outcome = await asyncio.wait_for(answer, self.ack_timeout_s)
        except TimeoutError:
            raise HL7Error(
                f"the server did not store the observations within {self.ack_timeout_s:g} s; send again",
                "AE",
                message.control_id,
            ) from None
        finally:
            self.pending.pop(seq, None)
        if outcome != STORED:
            raise HL7Error("the server could not store the observations; send again", "AE", message.control_id)

    def counters(self) -> None:
        server = self.server
        if server is not None:
            self.send(
                {
                    "n": {
                        "rejected": server.rejected,
                        "connections": server.connections,
                        "open_connections": server.open_connections,
                    }
                }
            )

    async def answers(self) -> None:
        """Resolve stored/failed answers until the server closes the link."""
        while True:
            try:
                record = await self.reader.readexactly(9)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            answer = self.pending.get(int.from_bytes(record[:8], "little"))
            if answer is not None and not answer.done():
                answer.set_result(record[8])


async def _child(fd: int, host: str, port: int, max_frame: int, ack_timeout_s: float) -> int:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    link = _ChildLink(reader, writer, ack_timeout_s)
    server = link.server = MLLPServer(link.store, host, port, max_frame, on_change=link.counters)
    try:
        await server.start()
    except OSError as exc:
        link.send({"error": f"cannot listen for HL7/MLLP on {host}:{port}: {exc.strerror or exc}"})
        await writer.drain()
        return 1
    link.send({"port": server.port})
    try:
        await link.answers()
    finally:
        with contextlib.suppress(TimeoutError):  # monitors still connected must not keep an orphan alive
            await asyncio.wait_for(server.close(), 1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bedside HL7/MLLP ingest (started by the server)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--host", default=DEFAULTS.server.host)
    parser.add_argument("--port", type=int, default=DEFAULTS.streams.mllp_port)
    parser.add_argument("--max-frame", type=int, default=MAX_FRAME)
    parser.add_argument("--ack-timeout", type=float, default=DEFAULTS.streams.ack_timeout_s)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then closes the link
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    return int(runner(_child(args.fd, args.host, args.port, args.max_frame, args.ack_timeout)))


if __name__ == "__main__":
    sys.exit(main())
