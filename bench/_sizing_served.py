"""The served ward box of bench/cluster_sizing.py: a real `bedside serve` of the ward models with HL7
on, streamed by a load generator in its own process; what the streams cost outside the models, and
the served check of the sizing's answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import free_port, popen, say, server, stop
from _sizing_report import ms

# isort: split
import numpy as np

from bedside.planning import cluster
from bedside.planning.profile import ModelProfile

WARD_MODELS = ("ecg_rhythm", "vitals_deterioration")
VITALS_EVERY_S = 15.0
WARMUP_S = 6.0  # the first ECG window is full after 5 s
WINDOW_S = 15.0  # steady streaming measured: one HL7 round (every 15 s) inside
OTHER_WORK = 0.25  # cores other processes kept busy during a served level that missed: it says nothing
TRIES = 3  # served measurements of one level at most, while other work spoils them
# The load generator, in a process of its own as bench/_streams_load.py (lean: uvloop, the collector
# frozen after start-up), with HL7 vitals every 15 s: argv PORT MLLP_PORT BEDS SECONDS VITALS_EVERY.
LOAD = """
import gc, sys, orjson, uvloop
from bedside.tools.replay import replay
port, mllp, beds, seconds, every = sys.argv[1:6]
gc.collect()
gc.freeze()
url, hl7 = f"http://127.0.0.1:{port}", ("127.0.0.1", int(mllp))
stats = uvloop.run(replay(url, hl7, int(beds), float(seconds), 1.0, vitals_every=float(every), chunk=50))
latencies = [r["latency_ms"] for r in stats.ecg_results if r.get("latency_ms") is not None]
sys.stdout.buffer.write(orjson.dumps({"latencies_ms": latencies, "summary": stats.summary()}))
"""


# --- the served ward box -----------------------------------------------------------------------


def tree_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of a process and each of its descendants, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError, IndexError):
            continue
    return out


def box_cpu_s() -> float:
    """CPU seconds the whole box has been busy (all processes, all cores), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return json.loads(answer.read())


def ecg_windows(port: int) -> int:
    return int(get(port, "/v2/streams")["ecg"]["windows"])


def model_cpu_s(port: int, costs: dict[str, ModelProfile]) -> float:
    """CPU the models' executions took so far: per model, its executions by batch size (the server's
    batch histogram) times what one costs (the measured mean, interpolated between measured sizes),
    times the threads it keeps busy. Not the compute time the server records: on a shared box that
    is wall time, and it grows with every preemption by other work."""
    total = 0.0
    for model, cost in costs.items():
        row = get(port, f"/v2/models/{model}/stats")["model_stats"][0]
        sizes = sorted(cost.latency_ms)
        means = [cost.mean_ms(b) for b in sizes]
        for batch, count in row["batch_size_histogram"].items():
            total += count * float(np.interp(int(batch), sizes, means)) / 1e3 * cost.threads
    return total


def serve_ward(repo: Path, beds: int, costs: dict[str, ModelProfile], target_ms: float | None = None) -> dict[str, Any]:
    """A ward box of `beds` beds served for real: its stream CPU per bed and its ECG p99. The load
    generator (LOAD, its own process) builds every bed's recording first, then streams; the CPU is
    measured over WINDOW_S once every bed has had a window scored."""
    mllp = free_port()
    seconds = WARMUP_S + WINDOW_S + 3.0  # streaming; the measurement starts after about WARMUP_S
    with server(repo, "--mllp-port", str(mllp), "--score-interval", f"{VITALS_EVERY_S:g}") as (proc, port):
        say(f"  {beds} beds: building their recordings, then {seconds:g} s of streaming...", end="")
        load = popen(
            [sys.executable, "-c", LOAD, str(port), str(mllp), str(beds), f"{seconds:g}", f"{VITALS_EVERY_S:g}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while ecg_windows(port) < beds:  # every bed has had a window scored
                if load.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the load generator stopped before every bed streamed: {_tail(load)}")
                time.sleep(0.1)
            cpu0, model0, wall0 = tree_cpu_s(proc.pid), model_cpu_s(port, costs), time.monotonic()
            gen0, box0, windows0 = sum(tree_cpu_s(load.pid).values()), box_cpu_s(), ecg_windows(port)
            time.sleep(WINDOW_S)
            cpu1, model1, wall = tree_cpu_s(proc.pid), model_cpu_s(port, costs), time.monotonic() - wall0
            gen, box, windows = sum(tree_cpu_s(load.pid).values()) - gen0, box_cpu_s() - box0, ecg_windows(port)
            stdout, _ = load.communicate(timeout=seconds + 60)
        finally:
            stop(load)
    if load.returncode:
        raise RuntimeError(f"the load generator exited with code {load.returncode}")
    result = json.loads(stdout)
    latencies, summary = result["latencies_ms"][beds:], result["summary"]  # after the first round of windows
    main = cpu1.get(proc.pid, 0.0) - cpu0.get(proc.pid, 0.0)
    ingest = sum(v - cpu0.get(p, 0.0) for p, v in cpu1.items() if p != proc.pid)  # the HL7 ingest process
    models = model1 - model0
    expected = beds * int(seconds - 4)
    p99 = round(float(np.percentile(latencies, 99)), 3) if latencies else None
    row = {
        "beds": beds,
        "ecg_windows": summary["ecg_windows"],
        "ecg_windows_expected": expected,
        "ecg_p50_ms": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "ecg_p99_ms": p99,
        "hl7_acked": summary["hl7_acked"],
        "hl7_sent": summary["hl7_sent"],
        "errors": summary["errors"],
        "measured_s": round(wall, 2),
        "server_cores": round((main + ingest) / wall, 4),
        "ingest_cores": round(ingest / wall, 4),
        "model_cores": round(models / wall, 4),
        "stream_cores_per_bed": round((main + ingest - models) / wall / beds, 6),
        "windows_per_s": round((windows - windows0) / wall, 2),
        "loop_cores": round((main - models) / wall, 4),  # the server process outside the models: its event loop
        "generator_cores": round(gen / wall, 4),
        "other_work_cores": round(max(0.0, box - main - ingest - gen) / wall, 4),  # other processes on the box
    }
    row["met"] = bool(
        p99 is not None
        and (target_ms is None or p99 <= target_ms)
        and summary["ecg_windows"] >= 0.98 * expected
        and summary["hl7_acked"] == summary["hl7_sent"]
        and not summary["errors"]
    )
    say(
        f" ECG p99 {ms(p99)} ms, {summary['ecg_windows']}/{expected} windows; server {row['server_cores']:.2f} cores"
        f" (models {row['model_cores']:.3f}, HL7 ingest {row['ingest_cores']:.3f}), load generator"
        f" {row['generator_cores']:.2f}, other work {row['other_work_cores']:.2f}"
    )
    return row


def _tail(process: Any) -> str:
    if process.poll() is None:
        return "still running"
    lines = process.stderr.read().decode(errors="replace").strip().splitlines() if process.stderr else []
    return lines[-1] if lines else f"exit code {process.returncode}"


def fit_streams(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The event loop's CPU as fixed cores + ms per ECG window, a least-squares line through the
    served runs (through the origin with one run, or when the line would start below 0), and HL7
    ingest per bed (the mean)."""
    x = np.array([r["windows_per_s"] for r in rows], dtype=float)
    y = np.array([r["loop_cores"] for r in rows], dtype=float)
    slope, fixed = np.polyfit(x, y, 1) if len(rows) > 1 and np.ptp(x) > 0 else (0.0, -1.0)
    if fixed < 0:
        slope, fixed = float(y.sum() / x.sum()) if x.sum() else 0.0, 0.0
    ingest = float(np.mean([r["ingest_cores"] / r["beds"] for r in rows]))
    return {"loop_ms": round(float(slope) * 1e3, 4), "loop_cores": round(float(fixed), 4),
            "ingest_cores_per_bed": round(ingest, 7)}  # fmt: skip


@dataclass
class Served:
    """The served check of the ward boxes: the most beds one box held within the ECG target when
    served (one box lost included), and what that makes the counts."""

    rows: list[dict[str, Any]]
    beds_ok: int | None  # most beds a served box held within the target; None: none tried did
    needed: int | None  # fewest ward boxes whose busiest holds at most beds_ok
    recommended: int | None  # fewest ward boxes whose busiest survivor, one lost, holds at most beds_ok
    inconclusive: bool = False  # other work on this box kept it from telling


def check_served(sizing: cluster.ClusterSizing, ward_repo: Path, costs: dict[str, ModelProfile]) -> Served:
    """Serve the most beds a ward box of the recommended count holds when one box is lost; when its
    ECG p99 misses the target, the simulation was optimistic: the next count's, at most 3 counts.
    A miss while other processes kept more than OTHER_WORK cores of this box busy says nothing about
    a box of its own: it is measured again (TRIES in all), and if the box never gets quiet enough
    the check stops there, inconclusive. Then the busiest box of the count that passed, all boxes
    up, for the margin in normal operation."""
    ward = sizing.ward
    assert ward.needed is not None and ward.recommended is not None
    target = next((r.target_ms for r in ward.options[0].busiest.evaluation.rows if r.name == WARD_MODELS[0]), None)
    wards = sizing.site.wards()
    rows: list[dict[str, Any]] = []

    def serve(beds: int, purpose: str) -> dict[str, Any]:
        for attempt in range(1, TRIES + 1):
            row: dict[str, Any] = {"purpose": purpose, "attempt": attempt, "target_ms": target}
            row.update(serve_ward(ward_repo, beds, costs, target))
            row["inconclusive"] = not row["met"] and row["other_work_cores"] > OTHER_WORK
            rows.append(row)
            if not row["inconclusive"]:
                break
            say(f"  other work held {row['other_work_cores']:.2f} cores of this box: inconclusive")
            time.sleep(10.0)
        return row

    say("served check: the busiest ward box of the answer with one box lost (the load generator on the same cores):")
    passed = None
    for boxes in range(ward.recommended, min(ward.recommended + 3, len(wards) + 1)):
        split = cluster.split_wards(wards, boxes)
        beds = max(max(sum(b) for b in split), cluster.beds_after_loss(split) or 0)
        row = serve(beds, f"{boxes} ward boxes, one lost")
        if row["inconclusive"]:
            return Served(rows, None, None, None, inconclusive=True)
        if row["met"]:
            passed = (boxes, beds)
            break
    if passed is None:
        return Served(rows, None, None, None)
    boxes, beds_ok = passed
    busiest = max(sum(b) for b in cluster.split_wards(wards, boxes))
    if busiest < beds_ok:
        say(f"served check: the busiest of {boxes} ward boxes, all up, for the margin:")
        serve(busiest, f"{boxes} ward boxes, all up")
    fits = [k for k in range(1, len(wards) + 1) if max(sum(b) for b in cluster.split_wards(wards, k)) <= beds_ok]
    return Served(rows, beds_ok, min(fits), boxes)
