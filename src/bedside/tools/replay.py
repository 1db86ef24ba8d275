"""Feed recorded or generated HL7 and ECG streams into a running bedside, at real time or faster,
for demonstrations and load tests. Generated streams are SYNTHETIC (bedside.synthetic); recorded
ones are HL7 files and DICOM 12-lead ECGs (bedside.tools.ecgfile).

Each generated bed gets its own MLLP connection (vital signs as ORU^R01) and its own ECG WebSocket
(12-lead float32 chunks at 250 Hz); a recorded HL7 file goes over one connection, at its recorded
spacing, re-timed to the present (bedside.tools.hl7file). Every ACK is read: an answer that is not a
plain AA is counted by code and reason, so a replay never loses data silently. Every ECG result that
comes back is kept, so the summary can say how many windows met the 4 ms budget.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bedside.clinical.ecg import FS
from bedside.streams.mllp import END, frame
from bedside.synthetic.ecg import RHYTHMS, episodes
from bedside.synthetic.vitals import course
from bedside.tools.ecgfile import looped, read_dicom_ecg
from bedside.tools.hl7file import HL7FileError, read_hl7_file, schedule

__all__ = ["HL7FileError", "ReplayStats", "Unreachable", "read_hl7_file", "replay", "synthetic_vitals"]

VITAL_CODES = {
    "heart_rate": ("8867-4", "/min"),
    "respiratory_rate": ("9279-1", "/min"),
    "systolic_bp": ("8480-6", "mm[Hg]"),
    "diastolic_bp": ("8462-4", "mm[Hg]"),
    "spo2": ("59408-5", "%"),
    "temperature": ("8310-5", "Cel"),
}


_ESCAPES = {"\\F\\": "|", "\\S\\": "^", "\\R\\": "~", "\\T\\": "&", "\\E\\": "\\"}
_REFUSED = re.compile(r"([0-9]+) observations refused")
_OBX = re.compile(r"^OBX [0-9]+ [a-z_]+: ")  # the place an observation's ERR text starts with
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class Unreachable(Exception):
    """The server (its HTTP port, MLLP listener or ECG stream) cannot be reached: nothing to replay into."""


@dataclass
class Answer:
    """What an ACK says: MSA-1, MSA-3, and (ERR-4 severity, ERR-8 text) for each ERR segment."""

    code: str
    text: str
    errors: list[tuple[str, str]]

    @property
    def refused_observations(self) -> int:
        """Observations left out of an accepted message (the AA's MSA-3 counts them; the ERRs may be capped)."""
        if self.code not in ("AA", "CA"):
            return 0
        counted = _REFUSED.search(self.text)
        return int(counted.group(1)) if counted else sum(1 for severity, _ in self.errors if severity == "W")


def _unescape(text: str) -> str:
    for sequence, char in _ESCAPES.items():
        text = text.replace(sequence, char)
    return text


def read_ack(answer: str) -> Answer:
    code, text, errors = "??", "", []
    for segment in answer.replace("\n", "\r").split("\r"):
        fields = segment.split("|")
        if fields[0] == "MSA":
            code = fields[1] if len(fields) > 1 else "??"
            text = _unescape(fields[3]) if len(fields) > 3 else ""
        elif fields[0] == "ERR":
            severity = fields[4] if len(fields) > 4 else ""
            errors.append((severity, _unescape(fields[8]) if len(fields) > 8 else ""))
    return Answer(code, text, errors)


@dataclass
class ReplayStats:
    hl7_sent: int = 0
    hl7_acked: int = 0  # accepted (AA), with or without observations left out
    hl7_rejected: int = 0  # refused (AE, AR) or not understood
    observations_refused: int = 0  # left out of accepted messages
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, reason pattern): count
    examples: dict[tuple[str, str], str] = field(default_factory=dict)  # the first reason of each pattern
    ecg_chunks: int = 0
    ecg_results: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def _tally(self, kind: str, reason: str, count: int = 1) -> None:
        reason = _OBX.sub("", reason.strip()) or "no reason given"
        key = (kind, _NUMBER.sub("#", reason))
        self.answers[key] += count
        self.examples.setdefault(key, reason)

    def record(self, answer: Answer) -> None:
        """Count one ACK: a plain AA is only counted; anything else is kept by code and reason."""
        warnings = [text for severity, text in answer.errors if severity == "W"]
        if answer.code in ("AA", "CA"):
            self.hl7_acked += 1
            self.observations_refused += answer.refused_observations
            for text in warnings:
                self._tally(f"{answer.code} with warning", text)
            if not warnings and answer.text:
                self._tally(f"{answer.code} with note", answer.text)
        else:
            self.hl7_rejected += 1
            first_error = next((text for _, text in answer.errors if text), "")
            self._tally(answer.code, answer.text or first_error)

    def answer_lines(self) -> list[str]:
        """One line per kind of answer that is not a plain AA, most frequent first."""
        return [
            f"{count} x {kind}: {self.examples[(kind, pattern)]}"
            for (kind, pattern), count in self.answers.most_common()
        ]

    def refusal(self, keep_times: bool = False) -> str | None:
        """One line saying what was refused and why, with what to do about it; None if nothing was."""
        if not self.hl7_rejected and not self.observations_refused:
            return None
        parts = []
        if self.hl7_rejected:
            parts.append(f"{self.hl7_rejected} of {self.hl7_sent} messages were refused")
        if self.observations_refused:
            parts.append(f"{self.observations_refused} observations were left out of accepted messages")
        refused = [key for key in self.answers if not key[0].endswith("with note")]
        reason = self.examples[max(refused, key=self.answers.__getitem__)] if refused else "see the answers above"
        texts = " ".join(self.examples[key] for key in refused)
        if "behind this box's clock" in texts:
            hint = (
                "the recorded timestamps are older than the server accepts (streams.max_observation_age_s); "
                "drop --keep-times to re-time them to now"
                if keep_times
                else "even re-timed, the recording reaches further back than the server accepts "
                "(streams.max_observation_age_s); replay a shorter part of it, or at a lower --speed"
            )
        elif "ahead of this box's clock" in texts:
            hint = (
                "the recorded timestamps are ahead of the server's clock; drop --keep-times to re-time them"
                if keep_times
                else "the server's clock is behind this machine's; check both clocks"
            )
        else:
            hint = "see the answers listed in the summary"
        return f"{' and '.join(parts)}: {reason} — {hint}"

    def summary(self) -> dict:
        latencies = [r["latency_ms"] for r in self.ecg_results if r.get("latency_ms") is not None]
        within = sum(1 for r in self.ecg_results if r.get("within_budget"))
        return {
            "hl7_sent": self.hl7_sent,
            "hl7_acked": self.hl7_acked,
            "hl7_rejected": self.hl7_rejected,
            "hl7_observations_refused": self.observations_refused,
            "hl7_answers": self.answer_lines(),
            "ecg_chunks": self.ecg_chunks,
            "ecg_windows": len(self.ecg_results),
            "ecg_p50_ms": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
            "ecg_p99_ms": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
            "ecg_within_4ms": within,
            "ecg_degraded": sum(1 for r in self.ecg_results if r.get("degraded")),
            "errors": self.errors[:5],
        }


def oru(
    bed: str,
    control: str,
    values: dict[str, float],
    when: float,
    consciousness: str = "A",
    o2_flow: float = 0.0,
    utc_offset_min: int = 0,
) -> str:
    """An ORU^R01 with one OBX per vital sign, stamped `when` in the zone `utc_offset_min` minutes
    east of UTC, the offset written out (+0000 for UTC): never a naive time."""
    ward, _, room = bed.partition("-")
    local = datetime.fromtimestamp(when, timezone(timedelta(minutes=utc_offset_min)))
    stamp = local.strftime("%Y%m%d%H%M%S%z")
    lines = [
        f"MSH|^~\\&|REPLAY|{ward}|BEDSIDE|HOSP|{stamp}||ORU^R01|{control}|P|2.5",
        "PID|1||SYNTHETIC",
        f"PV1|1|I|{ward}^{room or '1'}",
    ]
    for i, (vital, value) in enumerate(values.items(), 1):
        code, unit = VITAL_CODES[vital]
        lines.append(f"OBX|{i}|NM|{code}^{vital}^LN||{value:.1f}|{unit}|||||F|||{stamp}")
    lines.append(f"OBX|{len(lines) - 2}|ST|67775-7^ACVPU^LN||{consciousness}||||||F")
    lines.append(f"OBX|{len(lines) - 2}|NM|3151-8^O2 flow^LN||{o2_flow:.1f}|L/min|||||F")
    return "\r".join(lines) + "\r"


async def send_hl7(host: str, port: int, messages: list[tuple[float, str]], speed: float, stats: ReplayStats) -> None:
    """Send (offset seconds, message) pairs over one MLLP connection, paced by `speed`; every ACK is
    read and counted (ReplayStats.record)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc.strerror or str(exc)
        raise Unreachable(
            f"cannot reach the HL7 listener at {host}:{port} ({reason}); "
            "is `bedside serve` running with its MLLP listener on that port?"
        ) from None
    start = time.monotonic()
    try:
        for offset, message in messages:
            delay = start + offset / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the replay clock
            writer.write(frame(message))
            await writer.drain()
            stats.hl7_sent += 1
            answer = (await asyncio.wait_for(reader.readuntil(END), 10)).decode("utf-8", "replace")
            stats.record(read_ack(answer))
    finally:
        writer.close()


async def send_ecg(
    url: str, bed: str, ecg: np.ndarray, speed: float, stats: ReplayStats, chunk: int = 50, phase: float = 0.0
) -> None:
    """Stream [12, n] samples in chunks, paced at 250 Hz x speed, and collect the results. `phase`
    (seconds) delays the start: real monitors are not synchronised with each other."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidURI

    ws_url = url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + f"/v2/streams/ecg/{bed}"
    expected = max(0, (ecg.shape[1] - 5 * FS) // FS + 1)
    try:
        ws = await connect(ws_url, max_queue=None, compression=None)  # samples barely compress
    except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
        raise Unreachable(f"cannot open the ECG stream at {ws_url}: {exc}") from None
    async with ws:

        async def receive() -> None:
            received = 0
            while received < expected:
                doc = orjson.loads(await ws.recv())
                if doc.get("type") == "error":
                    stats.errors.append(doc["error"])
                else:
                    stats.ecg_results.append(doc)
                    received += 1

        receiver = asyncio.create_task(receive())
        try:
            await asyncio.sleep(phase / speed)
            start = time.monotonic()
            for i in range(0, ecg.shape[1], chunk):
                delay = start + i / FS / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(np.ascontiguousarray(ecg[:, i : i + chunk].T, dtype="<f4").tobytes())
                stats.ecg_chunks += 1
            await asyncio.wait_for(receiver, 30)
        finally:
            receiver.cancel()


def _patient_ecg(index: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """SYNTHETIC ECG for one bed: sinus rhythm with an arrhythmia episode in the middle third (the
    rhythm depends on the bed, so a ward shows each kind), or sinus throughout for every fifth bed."""
    episode = RHYTHMS[index % len(RHYTHMS)]
    third = seconds / 3
    return episodes([("normal_sinus", third), (episode, third), ("normal_sinus", seconds - 2 * third)], rng)[0]


def synthetic_vitals(
    bed: str, seconds: float, every: float, seed: int, start: float | None = None, utc_offset_min: int = 0
) -> list[tuple[float, str]]:
    """(offset seconds, HL7 message) every `every` seconds for one bed: a SYNTHETIC course from
    bedside.synthetic.vitals (the generator the demo model is trained on), deteriorating over the
    whole replay, at full severity, for every third bed. `start`: the unix time of the first
    message (default: `seconds` ago, so the course ends now)."""
    rng = np.random.default_rng(seed)
    steps = max(1, int(seconds / every))
    offsets = np.arange(steps) * every
    patient = course(rng, offsets, deteriorating=seed % 3 == 0, severity=1.0, onset=0.0)
    at: dict[float, dict[str, float]] = {}
    for vital, points in patient.readings.items():  # readings the monitor dropped are left out
        for offset, value in points:
            at.setdefault(offset, {})[vital] = min(value, 100.0) if vital == "spo2" else value  # a saturation
    first = time.time() - seconds if start is None else start
    out = []
    for k, offset in enumerate(patient.times.tolist()):
        message = oru(
            bed,
            f"{bed}-{k}",
            at.get(offset, {}),
            first + offset,
            "A" if patient.alert[k] else "V",
            2.0 if patient.on_oxygen[k] else 0.0,
            utc_offset_min,
        )
        out.append((offset, message))
    return out


def check_server(url: str, timeout: float = 5.0) -> None:
    """Unreachable unless something answers HTTP at `url` (any status: a bedside that is starting
    or not ready still answers)."""
    import http.client

    from bedside.tools.client import Client, ServerError

    client = Client(url, timeout=timeout)
    try:
        client.request("GET", "/v2/health/live")
    except ServerError:
        pass
    except (OSError, http.client.HTTPException, ValueError):
        raise Unreachable(f"cannot reach bedside at {url} (is `bedside serve` running?)") from None
    finally:
        client.close()


async def replay(
    url: str,
    mllp: tuple[str, int] | None,
    beds: int,
    seconds: float,
    speed: float,
    vitals_every: float = 15.0,
    ecg: bool = True,
    hl7_file: Path | None = None,
    progress: Callable[[ReplayStats], None] | None = None,
    chunk: int = 50,
    ecg_file: Path | None = None,
    keep_times: bool = False,
    stats: ReplayStats | None = None,
) -> ReplayStats:
    """`hl7_file`: recorded HL7 messages sent instead of SYNTHETIC vitals, paced by their recorded
    spacing and re-timed to the present unless `keep_times` (bedside.tools.hl7file.schedule).
    `ecg_file`: a recorded DICOM 12-lead ECG streamed (looped) for every bed instead of SYNTHETIC ECG.
    `stats`: filled in as the replay goes (what was done so far, if it is cancelled). Raises
    HL7FileError / ECGFileError for a file that cannot be replayed (before anything is sent), and
    Unreachable when the server cannot be reached (the other streams are then stopped)."""
    stats = stats if stats is not None else ReplayStats()
    names = [f"REPLAY-{i + 1:03d}" for i in range(beds)]
    recorded_hl7 = read_hl7_file(hl7_file) if hl7_file is not None and mllp is not None else None
    recorded_ecg = looped(read_dicom_ecg(ecg_file).samples, seconds) if ecg and ecg_file is not None else None
    coroutines: list[Coroutine[Any, Any, None]] = []  # made only once every file has been read
    if mllp is not None:
        if recorded_hl7 is not None:
            coroutines.append(send_hl7(*mllp, schedule(recorded_hl7, speed, time.time(), keep_times), speed, stats))
        else:
            coroutines += [
                send_hl7(*mllp, synthetic_vitals(bed, seconds, vitals_every, i), speed, stats)
                for i, bed in enumerate(names)
            ]
    if ecg:
        rng = np.random.default_rng(7)
        for i, bed in enumerate(names):
            recording = recorded_ecg if recorded_ecg is not None else _patient_ecg(i, seconds, rng)
            coroutines.append(send_ecg(url, bed, recording, speed, stats, chunk=chunk, phase=i / max(1, beds)))

    async def report() -> None:
        while progress is not None:
            progress(stats)
            await asyncio.sleep(0.25)

    tasks = [asyncio.create_task(c) for c in coroutines]
    reporter = asyncio.create_task(report())
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if isinstance(exc, Unreachable):
                    raise exc
                if exc is not None:
                    stats.errors.append(f"{type(exc).__name__}: {exc}")
    finally:  # stopped early (unreachable, cancelled): no stream is left running
        for task in [*tasks, reporter]:
            task.cancel()
        await asyncio.gather(*tasks, reporter, return_exceptions=True)
    return stats
