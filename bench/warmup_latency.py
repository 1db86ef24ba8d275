"""Cold vs warm first-request latency: what the scheduled warm-up (warmup.keep_hot) buys the first
request after a quiet spell, per demo model, end to end over REST.

    python bench/warmup_latency.py [--rounds 6] [--idle 6] [--thrash 2] [--quick]

Two real `bedside serve` processes on the demo models, one after the other (never side by side: they
share the ONNX Runtime code pages and the caches, so one would warm the other):
  - cold: no warm-up;
  - warm: `BEDSIDE_WARMUP_KEEP_HOT` covering now, `BEDSIDE_WARMUP_KEEP_HOT_IDLE_S` of half the idle
    time, so the warm-up's own code path (the one `warmup.times` fires too) exercises each model
    while it sits idle.
Each round first disturbs the box as a quiet night would: the model files' pages are dropped from
the page cache (posix_fadvise DONTNEED; a loaded model's weights are in the process's memory, so this
touches only what the server reads from disk again), a numpy job in another process streams through
256 MiB for `--thrash` seconds (evicting the CPU caches), then nothing runs for `--idle` seconds (the
CPU may clock down). In the warm scenario the round then waits for the next keep-hot run to be
logged, 0.3 s more, and measures; the cold one waits as long on average. Then each model gets its
first request (timed, on a connection opened just before) and a second one (the steady state).
Models are asked in a rotating order, so no model is always the very first request of the round.

Prints per model the median and max of the first request, cold and warm, beside the steady state,
and the warm-up's own latencies (from its log lines: what it paid so the first request did not), and
writes bench/results/warmup_latency.json. --quick: 2 rounds, 3 s idle, 1 s thrash.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    BlockingClient,
    console,
    demo_repo,
    http_request,
    machine,
    main_guard,
    parse_args,
    popen,
    say,
    server,
    table,
    write_results,
)

# isort: split
import orjson

MODELS = ("breast_mass_malignancy", "diabetes_progression", "vitals_deterioration")
# a process that streams through memory: writes evict the caches other work left behind
THRASH = """
import sys, time, numpy as np
a = np.ones(32 << 20)  # 256 MiB of float64
stop = time.perf_counter() + float(sys.argv[1])
while time.perf_counter() < stop:
    a += 1.0
"""
WARMUP_LINE = re.compile(r"warm-up \(keep-hot\) in \d+ ms: (.*)")
MODEL_MS = re.compile(r"(\w+) v\d+ ([\d.]+) ms")


def request_for(port: int, model: str) -> bytes:
    """A JSON request of zeros of the model's input shape (batch 1), from its metadata."""
    client = BlockingClient(port)
    try:
        raw = client.call(f"GET /v2/models/{model} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    finally:
        client.sock.close()
    meta = orjson.loads(raw.partition(b"\r\n\r\n")[2])
    inputs = []
    for t in meta["inputs"]:
        shape = [1 if d < 0 else d for d in t["shape"]]
        size = 1
        for d in shape:
            size *= d
        inputs.append({"name": t["name"], "datatype": t["datatype"], "shape": shape, "data": [0] * size})
    body = orjson.dumps({"inputs": inputs})
    return http_request(f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})


def disturb(repo: Path, thrash_s: float) -> None:
    for model in MODELS:
        for path in (repo / model).rglob("*.onnx"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    job = popen([sys.executable, "-c", THRASH, str(thrash_s)])
    job.wait()


def keep_hot_lines(proc: Any) -> list[str]:
    """The server's keep-hot log lines so far (read through a second descriptor: seeking the one the
    server writes to would move its write offset)."""
    with open(f"/proc/self/fd/{proc.bench_log.fileno()}", "rb") as log:
        text = log.read().decode(errors="replace")
    return [m.group(1) for m in WARMUP_LINE.finditer(text)]


def first_requests(port: int, requests: dict[str, bytes], order: list[str]) -> dict[str, tuple[float, float]]:
    """Per model: (first request ms, second request ms), each on a connection opened just before."""
    out = {}
    for model in order:
        client = BlockingClient(port)
        try:
            t0 = time.perf_counter()
            client.call(requests[model])
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.call(requests[model])
            out[model] = (first * 1e3, (time.perf_counter() - t0) * 1e3)
        finally:
            client.sock.close()
    return out


def scenario(name: str, repo: Path, args: argparse.Namespace, warm: bool) -> dict[str, Any]:
    extra = ("--log-level", "info")  # the warm-up's lines are info
    env_keys = {}
    if warm:
        now = datetime.now()
        window = f"{(now - timedelta(hours=1)):%H:%M}-{(now + timedelta(hours=2)):%H:%M}"
        env_keys = {"BEDSIDE_WARMUP_KEEP_HOT": window, "BEDSIDE_WARMUP_KEEP_HOT_IDLE_S": f"{args.idle / 2:g}"}
    os.environ.update(env_keys)
    first: dict[str, list[float]] = {m: [] for m in MODELS}
    steady: dict[str, list[float]] = {m: [] for m in MODELS}
    warmup_ms: dict[str, list[float]] = {m: [] for m in MODELS}
    opening: list[float] = []  # each round's very first request
    try:
        with server(repo, *extra) as (proc, port):
            requests = {m: request_for(port, m) for m in MODELS}
            first_requests(port, requests, list(MODELS))  # the server's own first requests: not counted
            for r in range(args.rounds):
                say(f"  {name}, round {r + 1}/{args.rounds}: disturb, idle {args.idle:g} s...", end="")
                disturb(repo, args.thrash)
                seen = len(keep_hot_lines(proc))
                time.sleep(args.idle)  # the quiet spell being measured, not waiting for a result
                if warm:
                    deadline = time.monotonic() + args.idle
                    while len(lines := keep_hot_lines(proc)) == seen and time.monotonic() < deadline:
                        time.sleep(0.05)  # polling the log for the next keep-hot run
                    for line in lines[seen:][-1:]:
                        for model, ms in MODEL_MS.findall(line):
                            warmup_ms.setdefault(model, []).append(float(ms))
                    time.sleep(0.3)
                else:
                    time.sleep(args.idle / 4 + 0.3)  # on average as long as the warm round waits
                order = list(MODELS[r % len(MODELS) :] + MODELS[: r % len(MODELS)])
                for model, (a, b) in first_requests(port, requests, order).items():
                    first[model].append(a)
                    steady[model].append(b)
                opening.append(first[order[0]][-1])
                say(" " + ", ".join(f"{m.split('_')[0]} {first[m][-1]:.2f} ms" for m in MODELS))
    finally:
        for key in env_keys:
            os.environ.pop(key, None)
    return {
        "first_ms": first,
        "steady_ms": steady,
        "opening_ms": opening,
        "warmup_ms": {m: v for m, v in warmup_ms.items() if v},
    }


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def row(model: str, cold: list[float], warm: list[float], steady: list[float], warmup: list[float]) -> dict[str, Any]:
    out = {
        "model": model,
        "cold_p50": med(cold),
        "cold_max": round(max(cold), 3),
        "warm_p50": med(warm),
        "warm_max": round(max(warm), 3),
        "steady_p50": med(steady),
        "gain_p50": round(med(cold) - med(warm), 3),
    }
    if warmup:  # none for the round's first request: no warm-up request of its own
        out["warm-up_p50"] = med(warmup)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="disturb-idle-measure rounds per scenario")
    parser.add_argument("--idle", type=float, default=6.0, help="seconds of quiet after each disturbance")
    parser.add_argument("--thrash", type=float, default=2.0, help="seconds of cache-evicting memory traffic")
    args = parse_args(parser, rounds=2, idle=3.0, thrash=1.0)
    if not hasattr(os, "posix_fadvise"):
        raise RuntimeError("needs os.posix_fadvise (Linux) to drop the model files' pages")
    say(
        f"warmup_latency: first request after {args.thrash:g} s of cache thrash and {args.idle:g} s idle, "
        f"cold vs kept hot, {args.rounds} rounds each, {len(MODELS)} demo models"
    )
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = demo_repo(Path(tmp) / "repo", *MODELS)
        cold = scenario("cold", repo, args, warm=False)
        warm = scenario("warm", repo, args, warm=True)
    rows = []
    for m in MODELS:
        c, w = cold["first_ms"][m], warm["first_ms"][m]
        rows.append(row(m, c, w, cold["steady_ms"][m] + warm["steady_ms"][m], warm["warmup_ms"].get(m, [])))
    # the round's very first request, whichever model: it also pays the HTTP path's cold cost
    # (event loop, parser, JSON), which the warm-up does not exercise (it enters at the dataplane)
    steady_all = [v for d in (cold, warm) for vs in d["steady_ms"].values() for v in vs]
    rows.append(row("(round's first request)", cold["opening_ms"], warm["opening_ms"], steady_all, []))
    table(
        f"first request after a quiet spell, ms, {args.rounds} rounds; steady: the request right after it; "
        "gain: cold p50 - warm p50; warm-up: its own request, from its log",
        rows,
        list(rows[0]),
    )
    console.print(
        "median first-request gain from keeping models hot: "
        + ", ".join(f"{r['model']} {r['gain_p50']:+.3f} ms" for r in rows)
        + " (positive: the warm first request was faster)"
    )
    write_results(
        "warmup_latency",
        {
            "rounds": args.rounds,
            "idle_s": args.idle,
            "thrash_s": args.thrash,
            "rows": rows,
            "cold": cold,
            "warm": warm,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main_guard(main)
