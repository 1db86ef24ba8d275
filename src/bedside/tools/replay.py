"""Feed recorded or generated HL7 and ECG streams into a running bedside, at real time or faster,
for demonstrations and load tests. Generated streams are SYNTHETIC (bedside.synthetic); recorded
ones are HL7 files and DICOM 12-lead ECGs (bedside.tools.ecgfile).

Each bed gets its own MLLP connection (vital signs as ORU^R01, checked ACK by ACK) and its own
ECG WebSocket (12-lead float32 chunks at 250 Hz); every ECG result that comes back is kept, so the
summary can say how many windows met the 4 ms budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from bedside.clinical.ecg import FS
from bedside.streams.mllp import END, START, frame
from bedside.synthetic.ecg import RHYTHMS, episodes
from bedside.synthetic.vitals import course
from bedside.tools.ecgfile import looped, read_dicom_ecg

VITAL_CODES = {
    "heart_rate": ("8867-4", "/min"),
    "respiratory_rate": ("9279-1", "/min"),
    "systolic_bp": ("8480-6", "mm[Hg]"),
    "diastolic_bp": ("8462-4", "mm[Hg]"),
    "spo2": ("59408-5", "%"),
    "temperature": ("8310-5", "Cel"),
}


@dataclass
class ReplayStats:
    hl7_sent: int = 0
    hl7_acked: int = 0
    hl7_naks: list[str] = field(default_factory=list)
    ecg_chunks: int = 0
    ecg_results: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        latencies = [r["latency_ms"] for r in self.ecg_results if r.get("latency_ms") is not None]
        within = sum(1 for r in self.ecg_results if r.get("within_budget"))
        return {
            "hl7_sent": self.hl7_sent,
            "hl7_acked": self.hl7_acked,
            "hl7_rejected": len(self.hl7_naks),
            "ecg_chunks": self.ecg_chunks,
            "ecg_windows": len(self.ecg_results),
            "ecg_p50_ms": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
            "ecg_p99_ms": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
            "ecg_within_4ms": within,
            "ecg_degraded": sum(1 for r in self.ecg_results if r.get("degraded")),
            "errors": self.errors[:5],
        }


def oru(
    bed: str, control: str, values: dict[str, float], when: float, consciousness: str = "A", o2_flow: float = 0.0
) -> str:
    ward, _, room = bed.partition("-")
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(when))
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


def read_hl7_file(path: Path) -> list[str]:
    """Messages from a file: MLLP-framed, or plain text with messages starting at each MSH line."""
    raw = path.read_bytes()
    if START in raw:
        return [part.split(END)[0].decode("utf-8", "replace") for part in raw.split(START)[1:]]
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    messages: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.startswith("MSH") and current:
            messages.append("\r".join(current) + "\r")
            current = []
        if line.strip():
            current.append(line)
    if current:
        messages.append("\r".join(current) + "\r")
    return messages


async def send_hl7(host: str, port: int, messages: list[tuple[float, str]], speed: float, stats: ReplayStats) -> None:
    """Send (offset seconds, message) pairs over one MLLP connection, paced by `speed`."""
    reader, writer = await asyncio.open_connection(host, port)
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
            msa = next((s for s in answer.split("\r") if s.startswith("MSA|")), "MSA|??")
            if msa.startswith("MSA|AA"):
                stats.hl7_acked += 1
            else:
                stats.hl7_naks.append(msa)
    finally:
        writer.close()


async def send_ecg(
    url: str, bed: str, ecg: np.ndarray, speed: float, stats: ReplayStats, chunk: int = 50, phase: float = 0.0
) -> None:
    """Stream [12, n] samples in chunks, paced at 250 Hz x speed, and collect the results. `phase`
    (seconds) delays the start: real monitors are not synchronised with each other."""
    from websockets.asyncio.client import connect

    ws_url = url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + f"/v2/streams/ecg/{bed}"
    expected = max(0, (ecg.shape[1] - 5 * FS) // FS + 1)
    async with connect(ws_url, max_queue=None, compression=None) as ws:  # samples barely compress

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
        await asyncio.sleep(phase / speed)
        start = time.monotonic()
        for i in range(0, ecg.shape[1], chunk):
            delay = start + i / FS / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(np.ascontiguousarray(ecg[:, i : i + chunk].T, dtype="<f4").tobytes())
            stats.ecg_chunks += 1
        await asyncio.wait_for(receiver, 30)


def _patient_ecg(index: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """SYNTHETIC ECG for one bed: sinus rhythm with an arrhythmia episode in the middle third (the
    rhythm depends on the bed, so a ward shows each kind), or sinus throughout for every fifth bed."""
    episode = RHYTHMS[index % len(RHYTHMS)]
    third = seconds / 3
    return episodes([("normal_sinus", third), (episode, third), ("normal_sinus", seconds - 2 * third)], rng)[0]


def synthetic_vitals(bed: str, seconds: float, every: float, seed: int) -> list[tuple[float, str]]:
    """(offset seconds, HL7 message) every `every` seconds for one bed: a SYNTHETIC course from
    bedside.synthetic.vitals (the generator the demo model is trained on), deteriorating over the
    whole replay, at full severity, for every third bed."""
    rng = np.random.default_rng(seed)
    steps = max(1, int(seconds / every))
    offsets = np.arange(steps) * every
    patient = course(rng, offsets, deteriorating=seed % 3 == 0, severity=1.0, onset=0.0)
    at: dict[float, dict[str, float]] = {}
    for vital, points in patient.readings.items():  # readings the monitor dropped are left out
        for offset, value in points:
            at.setdefault(offset, {})[vital] = min(value, 100.0) if vital == "spo2" else value  # a saturation
    now = time.time()
    out = []
    for k, offset in enumerate(patient.times.tolist()):
        message = oru(
            bed,
            f"{bed}-{k}",
            at.get(offset, {}),
            now - seconds + offset,
            "A" if patient.alert[k] else "V",
            2.0 if patient.on_oxygen[k] else 0.0,
        )
        out.append((offset, message))
    return out


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
) -> ReplayStats:
    """`ecg_file`: a recorded DICOM 12-lead ECG streamed (looped) for every bed instead of SYNTHETIC ECG."""
    stats = ReplayStats()
    tasks = []
    names = [f"REPLAY-{i + 1:03d}" for i in range(beds)]
    if mllp is not None:
        if hl7_file is not None:
            messages = read_hl7_file(hl7_file)
            tasks.append(send_hl7(*mllp, [(i * vitals_every, m) for i, m in enumerate(messages)], speed, stats))
        else:
            tasks += [
                send_hl7(*mllp, synthetic_vitals(bed, seconds, vitals_every, i), speed, stats)
                for i, bed in enumerate(names)
            ]
    if ecg:
        rng = np.random.default_rng(7)
        recorded = looped(read_dicom_ecg(ecg_file).samples, seconds) if ecg_file is not None else None
        for i, bed in enumerate(names):
            recording = recorded if recorded is not None else _patient_ecg(i, seconds, rng)
            tasks.append(send_ecg(url, bed, recording, speed, stats, chunk=chunk, phase=i / max(1, beds)))

    async def report() -> None:
        while progress is not None:
            progress(stats)
            await asyncio.sleep(0.25)

    reporter = asyncio.create_task(report())
    results = await asyncio.gather(*tasks, return_exceptions=True)
    reporter.cancel()
    stats.errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return stats
