"""HL7 messages per second through the ingest (MLLP -> parse -> journal -> serving process -> AA)
with the observation journal off, with synchronous=NORMAL and with FULL (fsync before every ACK),
and how long the windows of a full ward take to come back from the journal at start.

    python bench/hl7_ingest.py [--monitors 1,16,64] [--seconds 8] [--quick]

Each monitor is one MLLP connection that sends an ORU^R01 with 7 vital signs and waits for its ACK
before sending the next, as monitors do; M monitors run at once (a central station forwarding a
ward). Each (journal, monitors) level gets a fresh server with an empty state folder on the same
disk as bench/results. The load generator is this process (uvloop); the server and its ingest
child are two more, all on the box's two cores. Messages are SYNTHETIC.
Prints tables; writes bench/results/hl7_ingest.json (--quick: 4 short levels and the smallest restore,
results in bench/results/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    console,
    free_port,
    machine,
    main_guard,
    parse_args,
    plural,
    results_dir,
    run_async,
    say,
    server,
    table,
    write_results,
)

# isort: split
import numpy as np
import orjson

from bedside.streams.beds import Beds, states_from
from bedside.streams.journal import JOURNAL_FILE, open_journal, read_rows
from bedside.streams.mllp import END, frame

JOURNALS = {"off": ("false", "full"), "normal": ("true", "normal"), "full": ("true", "full")}
VITALS = [
    ("8867-4^HR^LN", "/min", "heart_rate", (60, 110)),
    ("9279-1^RR^LN", "/min", "respiratory_rate", (10, 24)),
    ("8480-6^SBP^LN", "mm[Hg]", "systolic_bp", (95, 150)),
    ("8462-4^DBP^LN", "mm[Hg]", "diastolic_bp", (55, 95)),
    ("59408-5^SpO2^LN", "%", "spo2", (90, 100)),
    ("8310-5^Temp^LN", "Cel", "temperature", (36, 38)),
    ("3151-8^O2 flow^LN", "L/min", "oxygen_flow", (0, 4)),
]


def oru(bed: int, control: str, rng: random.Random) -> bytes:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    obx = [
        f"OBX|{i + 1}|NM|{code}||{rng.randint(*span)}|{unit}|||||F|||{stamp}"
        for i, (code, unit, _, span) in enumerate(VITALS)
    ]
    head = [f"MSH|^~\\&|MON|WARD|BEDSIDE|HOSP|{stamp}||ORU^R01|{control}|P|2.5", "PID|1||X1", f"PV1|1|I|BENCH^{bed}"]
    return frame("\r".join(head + obx) + "\r")


async def monitor(port: int, bed: int, stop: float, latencies: list[float], failures: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rng = random.Random(bed)
    n = 0
    while time.perf_counter() < stop:
        n += 1
        message = oru(bed, f"B{bed}M{n}", rng)
        started = time.perf_counter()
        writer.write(message)
        answer = await reader.readuntil(END)
        latencies.append(time.perf_counter() - started)
        if b"MSA|AA|" not in answer:
            failures.append(answer.decode(errors="replace")[:200])
    writer.close()


def load(port: int, monitors: int, seconds: float) -> tuple[list[float], list[str], float]:
    async def main() -> tuple[list[float], list[str], float]:
        latencies: list[float] = []
        failures: list[str] = []
        start = time.perf_counter()
        await asyncio.gather(*(monitor(port, bed, start + seconds, latencies, failures) for bed in range(monitors)))
        return latencies, failures, time.perf_counter() - start

    return run_async(main())


def status(port: int) -> dict:
    return orjson.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/streams").read())


def level(repo: Path, state: Path, journal: str, monitors: int, seconds: float) -> dict:
    enabled, sync = JOURNALS[journal]
    os.environ |= {
        "BEDSIDE_STREAMS_STATE_DIR": str(state),
        "BEDSIDE_STREAMS_JOURNAL": enabled,
        "BEDSIDE_STREAMS_JOURNAL_SYNC": sync,
    }
    mllp = free_port()
    with server(repo, "--mllp-port", str(mllp)) as (_, port):
        say(f"  journal {journal}, {monitors} monitors: {seconds:g} s... ", end="")
        latencies, failures, wall = load(mllp, monitors, seconds)
        mllp_status = status(port)["mllp"]
    ms = np.asarray(latencies) * 1e3
    commits = mllp_status["journal_commits"]
    return {
        "journal": journal,
        "monitors": monitors,
        "messages": len(latencies),
        "messages_per_s": round(len(latencies) / wall, 1),
        "ack_p50_ms": round(float(np.percentile(ms, 50)), 2),
        "ack_p99_ms": round(float(np.percentile(ms, 99)), 2),
        "journal_commits": commits,
        "messages_per_commit": round(len(latencies) / commits, 1) if commits else None,
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
    }


def restore_levels(state: Path, beds: int, readings: int) -> dict:
    """A journal of `beds` beds with `readings` readings of each of the 7 vital signs, spread over
    the last hour: the time to read it back into bed windows (in a worker thread at start) and the
    part that runs on the serving loop (handing the beds over)."""
    say(f"  {beds:,} beds, {beds * readings * len(VITALS):,} rows: writing the journal, then reading it back...")
    path = state / JOURNAL_FILE
    path.unlink(missing_ok=True)
    db = open_journal(path, "normal")
    now = time.time()
    step = 3500 / readings
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO observations VALUES (?, ?, ?, ?)",
        (
            (f"BENCH-{bed}", vital, 70.0 + r % 7, now - 3500 + r * step + bed * 1e-4)
            for r in range(readings)
            for bed in range(beds)
            for _, _, vital, _ in VITALS
        ),
    )
    db.execute("COMMIT")
    db.close()
    size_mb = path.stat().st_size / 2**20
    started = time.perf_counter()
    states = states_from(read_rows(path, now - 3600))
    read_s = time.perf_counter() - started
    target = Beds(max_beds=beds)
    started = time.perf_counter()
    target.restore(states)
    handover_ms = (time.perf_counter() - started) * 1e3
    return {
        "beds": beds,
        "rows": beds * readings * len(VITALS),
        "journal_mb": round(size_mb, 1),
        "read_and_rebuild_s": round(read_s, 2),
        "on_loop_handover_ms": round(handover_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monitors", default="1,16,64", help="monitors sending at once")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each level")
    parser.add_argument("--journals", default="off,normal,full")
    parser.add_argument(
        "--readings",
        default=f"12,60,{2_000_000 // (2048 * 7)}",
        help="readings per vital sign and bed in the journals restored at start (2,048 beds)",
    )
    args = parse_args(parser, monitors="1,16", journals="off,full", seconds=1.0, readings="12")
    console.width = max(console.width, 140)  # the tables' columns, unabridged
    monitor_levels = [int(m) for m in args.monitors.split(",")]
    journals = args.journals.split(",")
    say(
        f"hl7_ingest: HL7 ingest, {plural(len(monitor_levels) * len(journals), 'level')} of {args.seconds:g} s "
        f"(a fresh server each), then {plural(len(args.readings.split(',')), 'journal restore')}"
    )
    rows = []
    with tempfile.TemporaryDirectory(dir=results_dir(), ignore_cleanup_errors=True) as tmp:  # the journal's disk
        repo = Path(tmp) / "repo"
        repo.mkdir()
        for monitors in monitor_levels:
            for journal in journals:
                row = level(repo, Path(tmp) / f"state-{journal}-{monitors}", journal, monitors, args.seconds)
                rows.append(row)
                say(f"{row['messages_per_s']} messages/s")
        table(
            f"HL7 ORU^R01 (7 vital signs) ingest, {args.seconds:g} s per level, each monitor waits for its ACK",
            rows,
            [
                "journal",
                "monitors",
                "messages",
                "messages_per_s",
                "ack_p50_ms",
                "ack_p99_ms",
                "messages_per_commit",
                "failures",
            ],
        )
        say("hl7_ingest: restoring 2,048 beds from the journal at start")
        restores = [restore_levels(Path(tmp) / "restore", 2048, int(readings)) for readings in args.readings.split(",")]
        table(
            "restoring 2,048 beds from the journal at start",
            restores,
            ["beds", "rows", "journal_mb", "read_and_rebuild_s", "on_loop_handover_ms"],
        )
    write_results("hl7_ingest", {"rows": rows, "restore": restores, "machine": machine()})


if __name__ == "__main__":
    main_guard(main)
