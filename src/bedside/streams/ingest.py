"""HL7 ingest in a process of its own beside the server.

The MLLP listener, HL7 parsing and the ACKs run in a child process, so a burst of messages (a
central station forwarding a whole ward in the same second, a monitor sending an hour of stored
vitals after a network outage) never delays the real-time ECG on the serving event loop. Parsing
with the `hl7` library costs ~0.4 ms a message; 200 beds reporting in the same second held the
serving loop ~100 ms when parsing ran there, and ECG window->score p99 went from 2.5 to 39 ms
(bench/streams.py, 200 beds).

The processes talk over a socketpair in length-prefixed orjson frames:
  child -> parent  {"port": N} once listening (or {"error": "..."}), then per parsed message
                   {"s": seq, "b": bed, "o": [[vital, value, time], ...]}, and the counters
                   {"n": {"rejected": r, "connections": c, ...}} at most once a loop turn
  parent -> child  9-byte records: seq (u64) and 0 = stored, 1 = failed
A monitor gets its AA only once the observations are in the journal (streams.journal; written by
the child, see journal.py) and the serving process holds them (acknowledgement on commit): a vital
sign acknowledged is one that will be scored, after a crash too. If the child dies, the parent
starts a new one on the same port; monitors reconnect and resend what was not ACKed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bedside.monitoring import redact
from bedside.security.keys import load_keyring
from bedside.settings import DEFAULTS, SecuritySettings, StreamsSettings
from bedside.streams import hl7v2
from bedside.streams.hl7v2 import HL7Error, Observation, VitalsMessage
from bedside.streams.identity import box_key
from bedside.streams.ingest_link import ParentLink
from bedside.streams.journal import COUNTERS as JOURNAL_COUNTERS
from bedside.streams.journal import JOURNAL_FILE, JournalWriter
from bedside.streams.mllp import COUNTERS, MLLPServer
from bedside.streams.mllp_auth import listener_security

log = logging.getLogger("bedside.ingest")
STORED, FAILED = 0, 1
START_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (0.5, 30.0)
KEEP_PER_VITAL = 720  # beds.MAX_POINTS, not imported: beds needs numpy, and the child stays lean
CHILD_COUNTERS = tuple(name for name in (*COUNTERS, *JOURNAL_COUNTERS) if name != "accepted")
CUMULATIVE = [name for name in CHILD_COUNTERS if name != "open_connections"]


def _frame(doc: dict[str, Any]) -> bytes:
    body = orjson.dumps(doc)
    return len(body).to_bytes(4, "little") + body


def newest(observations: list[Observation], limit: int = KEEP_PER_VITAL) -> list[Observation]:
    """Per vital sign the `limit` newest observations: a bed keeps no more, so a message with an
    hour of 1 Hz readings costs the journal and the serving loop no more than a bed's window."""
    if len(observations) <= limit:
        return observations
    keep: list[Observation] = []
    for vital in dict.fromkeys(o.vital for o in observations):
        keep += sorted((o for o in observations if o.vital == vital), key=lambda o: o.time)[-limit:]
    return keep


# --- the serving side ----------------------------------------------------------------------


class IngestProcess:
    """Runs the MLLP listener in a child process and hands each parsed message to `on_message`
    on the serving loop. `state` is the state folder (box key, journal); None: neither, so a
    message without a bed, only a patient identifier, is refused (tests)."""

    def __init__(
        self,
        on_message: Callable[[VitalsMessage], None],
        host: str = DEFAULTS.server.host,
        port: int | None = None,
        settings: StreamsSettings = DEFAULTS.streams,
        state: Path | None = None,
        security: SecuritySettings = DEFAULTS.security,
        log_format: str = DEFAULTS.server.log_format,
    ) -> None:
        self.on_message = on_message
        self.log_format = log_format  # the child logs as the server does (text or JSON lines)
        self.host, self.port = host, settings.mllp_port if port is None else port
        self.settings, self.state, self.security = settings, state, security
        self.accepted = self.restarts = 0
        self.counters = dict.fromkeys(CHILD_COUNTERS, 0)  # the running child's, accepted excepted
        self._earlier = dict.fromkeys(CUMULATIVE, 0)  # what children before it counted
        self._process: subprocess.Popen[bytes] | None = None
        self._link: ParentLink | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def status(self) -> dict[str, Any]:
        counters = {name: self._earlier.get(name, 0) + value for name, value in self.counters.items()}
        return {"port": self.port, **counters, "accepted": self.accepted, "ingest_pid": self.pid} | {
            "ingest_restarts": self.restarts
        }

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

    def _config(self) -> str:
        """Everything the child needs, as one JSON argument."""
        return orjson.dumps(
            {
                "host": self.host,
                "port": self.port,
                "state": None if self.state is None else str(self.state),
                "streams": dataclasses.asdict(self.settings),
                "security": dataclasses.asdict(self.security),  # TLS and device identity for MLLP
                "log_format": self.log_format,
            }
        ).decode()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "bedside.streams.ingest", f"--fd={theirs.fileno()}"]
        try:
            self._process = subprocess.Popen(
                [*command, f"--config={self._config()}"], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        link = ParentLink(self)
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
            for name in CUMULATIVE:  # counters stay cumulative across children
                self._earlier[name] += self.counters[name]
            self.counters = dict.fromkeys(CHILD_COUNTERS, 0)
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
            log.exception("could not store HL7 observations")  # no bed: it may derive from a patient identifier
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


# --- the child process ---------------------------------------------------------------------


class _ChildLink:
    """The child's end: journals each parsed message, forwards it, and waits for the server to
    store it before the MLLP server sends the AA."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout_s: float,
        journal: JournalWriter | None,
    ) -> None:
        self.reader, self.writer, self.ack_timeout_s, self.journal = reader, writer, timeout_s, journal
        self.seq = 0
        self.pending: dict[int, asyncio.Future[int]] = {}
        self.server: MLLPServer | None = None
        self.counting = False

    def send(self, doc: dict[str, Any]) -> None:
        self.writer.write(_frame(doc))

    async def store(self, message: VitalsMessage) -> None:
        """Journal, then hand to the server; an HL7Error (the NAK) unless both happened in time."""
        observations = newest(message.observations)
        seq = 0
        try:
            async with asyncio.timeout(self.ack_timeout_s):  # a stuck disk gets a NAK too, not silence
                if self.journal is not None:
                    try:
                        await self.journal.write(message.bed, observations)  # with others arriving now: one commit
                    finally:
                        self.counters()
                self.seq = seq = self.seq + 1
                answer = self.pending[seq] = asyncio.get_running_loop().create_future()
                self.send({"s": seq, "b": message.bed, "o": [[o.vital, o.value, o.time] for o in observations]})
                outcome = await answer
        except TimeoutError:
            late = f"the observations were not stored within {self.ack_timeout_s:g} s; send again"
            raise HL7Error(late, "AE", message.control_id) from None
        except OSError as exc:  # the journal could not be written
            raise HL7Error(f"{exc}; send again", "AE", message.control_id) from None
        finally:
            self.pending.pop(seq, None)
        if outcome != STORED:
            raise HL7Error("the server could not store the observations; send again", "AE", message.control_id)

    def counters(self) -> None:
        """Send the counters once this loop turn is over: a flood of connections is one frame a turn."""
        if not self.counting:
            self.counting = True
            asyncio.get_running_loop().call_soon(self._send_counters)

    def _send_counters(self) -> None:
        self.counting = False
        counters = {} if self.server is None else self.server.counters()
        counters.pop("accepted", None)  # the server counts what it stored
        self.send({"n": counters | ({} if self.journal is None else self.journal.counters())})

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


def _prepare(config: dict[str, Any]) -> tuple[StreamsSettings, hl7v2.HL7Policy, JournalWriter | None]:
    """The settings, the parser's policy and the started journal; OSError: no box key or journal."""
    settings = dataclasses.replace(DEFAULTS.streams, **config["streams"])
    state = None if config["state"] is None else Path(config["state"])
    policy = hl7v2.policy_from_settings(settings, b"" if state is None else box_key(state))
    journal = None
    if state is not None and settings.journal:
        # security.key is where the key comes from (a spec, never the key): the child reads it itself
        keys = load_keyring(config.get("security", {}).get("key", ""), os.environ)  # KeyProviderError: ValueError
        journal = JournalWriter(
            state / JOURNAL_FILE, settings.journal_sync, settings.max_observation_age_s, settings.journal_max_rows, keys
        )
        journal.start()
    return settings, policy, journal


async def _child(fd: int, config: dict[str, Any]) -> int:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    host, port = config["host"], config["port"]
    try:
        state = None if config["state"] is None else Path(config["state"])  # TLS first: no journal to undo
        guard = listener_security(dataclasses.replace(DEFAULTS.security, **config["security"]), state)
        settings, policy, journal = _prepare(config)
    except (OSError, ValueError) as exc:
        writer.write(_frame({"error": str(exc)}))
        await writer.drain()
        return 1
    link = _ChildLink(reader, writer, settings.ack_timeout_s, journal)
    server = link.server = MLLPServer.from_settings(link.store, host, port, settings, link.counters, policy, guard)
    try:
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
    finally:
        if journal is not None:
            journal.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bedside HL7/MLLP ingest (started by the server)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="JSON: host, port, state folder, streams settings")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then closes the link
    config = orjson.loads(args.config)
    redact.install("warning", str(config.get("log_format", "text")))  # as the server: no messages, no paths
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    return int(runner(_child(args.fd, config)))


if __name__ == "__main__":
    sys.exit(main())
