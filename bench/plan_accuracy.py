"""Does `bedside plan` predict what the server does? Its simulation against a measured run.

    python bench/plan_accuracy.py [--seconds 15] [--rates 0.3,0.6,0.8] [--quick]

One model, measured by the planner on this box (planning/profile.py, in process), then served by a
real `bedside serve` and driven by an open-loop Poisson client at fractions of its measured
capacity (instances / mean batch-1 time), 20 % STAT and 80 % routine. Per rate and priority it
compares what the server measured with what the planner's simulation predicts for the same load:

- latency inside the server (admission to result: queue + batching + compute) per priority, from
  the server's statistics (`/v2/models/NAME/stats`): each priority is sent as its own tenant, whose
  latency the server keeps per tenant. The mean is exact (the tenant's histogram sum / count over
  the whole run); p50 and p99 are over the tenant's window, the last 1,024 requests of the run.
- queue delay (admission to the start of the batch), all priorities together: the server keeps it
  per model, not per priority; the mean is exact (histogram sum and count before and after).

A separate tenant per priority changes nothing in what the queue does here: levels are ordered
before tenants, and a routine batch only starts when no STAT request waits.

The model is the benchmark LSTM (bench/_models.py, hidden 384: about 2 ms per batch of 1, and a
batch of 4 costs about 1.5 batches of 1) rather than a demo model: the demo's tabular models answer
in ~0.02 ms, so on this box HTTP saturates long before their queue holds anything to predict. The
client shares the box's cores with the server, as does any other work running meanwhile: both are
load the plan does not know about unless told (`--busy-cores`); the table shows the prediction
without (as `bedside plan` runs by default) and with the CPU the run measured outside the model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    _response_complete,
    console,
    http_request,
    machine,
    main_guard,
    parse_args,
    run_async,
    say,
    server,
    table,
    write_results,
)
from _models import vitals_lstm

# isort: split
import numpy as np
import orjson

from bedside.modelconfig.model import load_config
from bedside.planning.profile import measure
from bedside.planning.simulate import Empirical, SimModel, Stream, simulate

MODEL = "vitals_lstm"
STAT_SHARE = 0.2
TOLERANCE = 0.25
CONFIG = """
max_batch_size = 8
instances = 1
threads = 1
[[inputs]]
name = "vitals"
datatype = "FP32"
shape = [60, 8]
[[outputs]]
name = "risk"
datatype = "FP32"
shape = [1]
"""


def build_repo(root: Path) -> Path:
    vitals_lstm(root / MODEL / "1" / "model.onnx", hidden=384)
    (root / MODEL / "config.toml").write_text(CONFIG, encoding="utf-8")
    return root


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{MODEL}/stats", timeout=10) as answer:
        return orjson.loads(answer.read())["model_stats"][0]


def server_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def open_loop(port: int, bodies: dict[int, bytes], rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Poisson arrivals at `rate` for `seconds`, each sent when due whatever is in flight (open
    loop: a slow server gets more concurrent requests, as from independent callers)."""
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rate * seconds))
    due = np.sort(rng.uniform(0, seconds, n))
    levels = np.where(rng.random(n) < STAT_SHARE, 1, 3)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(16):
        idle.append(await _connect(port))
    latencies: dict[int, list[float]] = {1: [], 3: []}
    failures = 0
    lateness: list[float] = []

    async def one(t: float, level: int, start: float) -> None:
        nonlocal failures
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lateness.append(time.perf_counter() - start - t)
        conn = idle.pop() if idle else await _connect(port)
        t0 = time.perf_counter()
        conn[1].write(bodies[level])
        buf = b""
        while not _response_complete(buf):
            chunk = await conn[0].read(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            buf += chunk
        latencies[level].append(time.perf_counter() - t0)
        failures += buf[9:12] != b"200"
        idle.append(conn)

    start = time.perf_counter() + 0.05
    await asyncio.gather(*(one(float(t), int(lv), start) for t, lv in zip(due, levels, strict=True)))
    for _, writer in idle:
        writer.close()
    return {
        "sent": n,
        "failures": failures,
        "client_ms": latencies,
        "late_ms_p99": float(np.percentile(lateness, 99)) * 1e3,
    }


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def request(level: int, tenant: str, x: np.ndarray) -> bytes:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "vitals",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    )
    return http_request(
        f"/v2/models/{MODEL}/infer",
        header + x.tobytes(),
        {
            "Inference-Header-Content-Length": str(len(header)),
            "X-Bedside-Priority": str(level),
            "X-Bedside-Tenant": tenant,
        },
    )


def tenant_figures(after: dict[str, Any], tenant: str) -> dict[str, float]:
    row = after["tenants"][tenant]
    hist = row["histogram"]
    count = sum(hist["counts"])
    return {
        "n": count,
        "mean_ms": hist["sum_ms"] / count,
        "p50_ms": row["latency"]["p50_ms"],
        "p99_ms": row["latency"]["p99_ms"],
    }


def window_mean(before: dict[str, Any], after: dict[str, Any], which: str) -> float:
    b, a = before["histograms"][which], after["histograms"][which]
    count = sum(a["counts"]) - sum(b["counts"])
    return (a["sum_ms"] - b["sum_ms"]) / count if count else float("nan")


def predict(model: SimModel, rate: float, seconds: float, busy: float, seed: int, wake_ns: float) -> dict[str, Any]:
    model.streams = [Stream(1, rate * STAT_SHARE), Stream(3, rate * (1 - STAT_SHARE))]
    cores = float(os.cpu_count() or 1)
    result = simulate([model], cores=cores, seconds=seconds, seed=seed, background=busy, wake_ns=wake_ns)[MODEL]
    out: dict[str, Any] = {"utilisation": result.utilisation, "mean_batch": result.mean_batch}
    total = sum(lr.count for lr in result.levels.values())
    out["queue_mean_ms"] = sum(lr.count * lr.queue_ms["mean"] for lr in result.levels.values()) / total
    for level, lr in result.levels.items():
        out[level] = {"mean_ms": lr.latency_ms["mean"], "p50_ms": lr.latency_ms["p50"], "p99_ms": lr.latency_ms["p99"]}
    return out


def error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else float("nan")


def run_rate(port: int, pid: int, k: int, rate: float, seconds: float, x: np.ndarray) -> dict[str, Any]:
    """One rate: the load, then what the server measured (its statistics before and after)."""
    bodies = {1: request(1, f"stat-{k}", x), 3: request(3, f"routine-{k}", x)}
    before, cpu0, client0, wall0 = stats(port), server_cpu_s(pid), time.process_time(), time.perf_counter()
    sent = run_async(open_loop(port, bodies, rate, seconds, k))
    wall = time.perf_counter() - wall0
    after = stats(port)
    cpu = server_cpu_s(pid) - cpu0 + time.process_time() - client0
    old = before["batch_size_histogram"]
    batches = {int(b): n - old.get(b, 0) for b, n in after["batch_size_histogram"].items()}
    mean_batch = sum(b * n for b, n in batches.items()) / max(1, sum(batches.values()))
    # compute is recorded per request, each with its batch's time: per execution, divide by the batch
    compute_sum_ms = after["histograms"]["compute"]["sum_ms"] - before["histograms"]["compute"]["sum_ms"]
    other_cores = max(0.0, (cpu - compute_sum_ms / max(mean_batch, 1.0) / 1e3) / wall)
    return {
        "sent": sent["sent"],
        "failures": sent["failures"],
        "client_late_ms_p99": round(sent["late_ms_p99"], 3),
        "client_p99_ms": {lv: round(float(np.percentile(v, 99)) * 1e3, 3) for lv, v in sent["client_ms"].items() if v},
        "mean_batch": round(mean_batch, 3),
        "compute_mean_ms": round(window_mean(before, after, "compute"), 4),
        "queue_mean_ms": round(window_mean(before, after, "queue"), 4),
        "other_cores": round(other_cores, 3),
        1: tenant_figures(after, f"stat-{k}"),
        3: tenant_figures(after, f"routine-{k}"),
    }


def compare(fraction: float, measured: dict[str, Any], plain: dict[str, Any], loaded: dict[str, Any]) -> list[dict]:
    rows = []
    for level, name in ((1, "STAT"), (3, "routine")):
        for stat in ("mean_ms", "p50_ms", "p99_ms"):
            m, p, q = measured[level][stat], plain[level][stat], loaded[level][stat]
            ok = abs(error(p, m)) <= TOLERANCE
            rows.append(_row(fraction, name, stat.removesuffix("_ms"), m, p, q, "yes" if ok else "no"))
    m = measured["queue_mean_ms"]
    rows.append(_row(fraction, "all", "queue mean", m, plain["queue_mean_ms"], loaded["queue_mean_ms"], ""))
    return rows


def _row(fraction: float, priority: str, figure: str, m: float, p: float, q: float, ok: str) -> dict[str, str]:
    return {
        "load": f"{fraction:.0%}",
        "priority": priority,
        "figure": figure,
        "measured ms": f"{m:.3f}",
        "predicted ms": f"{p:.3f}",
        "error": f"{error(p, m):+.0%}",
        "+ other CPU ms": f"{q:.3f}",
        "error ": f"{error(q, m):+.0%}",
        "within 25 %": ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each rate's run (at most 20 s)")
    parser.add_argument("--rates", default="0.3,0.6,0.8", help="fractions of the measured batch-1 capacity")
    parser.add_argument("--sim-seconds", type=float, default=120.0, help="simulated seconds per prediction")
    args = parse_args(parser, seconds=4.0, rates="0.3,0.8", sim_seconds=30.0)
    fractions = [float(f) for f in args.rates.split(",")]
    seconds = min(args.seconds, 20.0)
    say(f"plan_accuracy: {MODEL} served by bedside, open-loop Poisson at {args.rates} of capacity, {seconds:g} s each")
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = build_repo(Path(tmp) / "repo")
        say("  measuring the model as `bedside plan` does (memory, latency per batch size, after idle)...")
        box = measure(repo, runs=300, budget_s=1.0)
        profile, wake_ns = box.models[MODEL], box.wake_ms * 1e6
        config = load_config(repo / MODEL / "config.toml", MODEL)
        capacity = config.instances / (profile.mean_ms(1) / 1e3)
        say(
            f"  batch 1: {profile.mean_ms(1):.3f} ms (capacity {capacity:.0f} req/s), batch 8: "
            f"{profile.mean_ms(8):.3f} ms; extra after idle (gap ms: ms) {profile.idle_penalty_ms}; "
            f"worker wake-up {box.wake_ms:.3f} ms"
        )
        penalty = tuple(sorted(profile.idle_penalty_ms.items()))
        model = SimModel(
            MODEL, config.scheduling, config.max_batch_size, config.instances, profile.threads,
            Empirical(profile.latency_ms), [], penalty,
        )  # fmt: skip
        x = np.random.default_rng(0).standard_normal((1, 60, 8)).astype(np.float32)
        with server(repo) as (proc, port):
            warm = {1: request(1, "warm", x), 3: request(3, "warm", x)}
            run_async(open_loop(port, warm, capacity * 0.3, 2.0, 99))  # connections, arenas, the loop
            for k, fraction in enumerate(fractions):
                rate = capacity * fraction
                say(f"  {fraction:.0%} of capacity, {rate:.0f} req/s for {seconds:g} s...", end="")
                measured = run_rate(port, proc.pid, k, rate, seconds, x)
                say(
                    f" {measured['sent']} sent, {measured['failures']} failed; "
                    f"mean batch {measured['mean_batch']:.2f}, compute {measured['compute_mean_ms']:.3f} ms, "
                    "CPU outside the model "
                    f"{measured['other_cores']:.2f} cores, sends late by {measured['client_late_ms_p99']:.2f} ms (p99)"
                )
                plain = predict(model, rate, args.sim_seconds, 0.0, k, wake_ns)
                loaded = predict(model, rate, args.sim_seconds, measured["other_cores"], k, wake_ns)
                rows += compare(fraction, measured, plain, loaded)
                runs.append({"fraction": fraction, "rate": rate, "measured": measured, "predicted": plain,
                             "predicted_with_other_cpu": loaded})  # fmt: skip
    table(
        f"{MODEL}: latency inside the server, measured vs the planner's prediction "
        f"({seconds:g} s per load, {STAT_SHARE:.0%} STAT)",
        rows,
        [
            "load",
            "priority",
            "figure",
            "measured ms",
            "predicted ms",
            "error",
            "+ other CPU ms",
            "error ",
            "within 25 %",
        ],
    )
    judged = [r for r in rows if r["within 25 %"]]
    within = sum(r["within 25 %"] == "yes" for r in judged)
    console.print(f"{within} of {len(judged)} latency figures within {TOLERANCE:.0%} (the plain prediction)")
    write_results(
        "plan_accuracy",
        {
            "model": MODEL,
            "profile_mean_ms": {b: round(profile.mean_ms(b), 4) for b in profile.latency_ms},
            "idle_penalty_ms": profile.idle_penalty_ms,
            "wake_ms": box.wake_ms,
            "capacity_rps": capacity,
            "stat_share": STAT_SHARE,
            "seconds": seconds,
            "runs": runs,
            "rows": rows,
            "within": f"{within}/{len(judged)}",
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main_guard(main)
