"""Scheduler benchmark: dynamic batching off vs on, STAT latency under routine saturation, overload.

    python bench/scheduler.py [--seconds 3]

Models (random weights, built with onnx.helper; serving cost, not accuracy, is measured):
  ecg_cnn      1D-CNN over a 12-lead ECG window (5 s at 250 Hz)   [N, 12, 1250] -> [N, 5]
  vitals_lstm  LSTM (hidden 256, 0.27M params) over 60 steps of 8 vital signs  [N, 60, 8] -> [N, 1]
  vitals_lstm_2m  the same with hidden 704: the ~2M-parameter forecaster size of the model pipeline
Each is served twice from one server, `*_batched` (dynamic batching on) and `*_single` (off).
Requests use the binary tensor extension, batch 1 each, from a keep-alive raw-socket client in
this process. Prints tables and writes bench/results/scheduler.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    console,
    http_request,
    machine,
    rss_mb,
    run_loads,
    start_server,
    summarize,
    table,
    write_results,
)
from _models import ecg_cnn, params, vitals_lstm

MODELS = {
    "ecg_cnn": {"input": "ecg", "shape": (12, 1250), "output": "probabilities", "width": 5, "build": ecg_cnn},
    "vitals_lstm": {"input": "vitals", "shape": (60, 8), "output": "risk", "width": 1, "build": vitals_lstm},
    "vitals_lstm_2m": {
        "input": "vitals",
        "shape": (60, 8),
        "output": "risk",
        "width": 1,
        "build": functools.partial(vitals_lstm, hidden=704),
    },
}
CONCURRENCY = (1, 8, 32, 64)


def config(name: str, spec: dict, batching: bool, extra: str = "") -> str:
    shape = list(spec["shape"])
    return f"""{extra}
description = "benchmark model, random weights"
max_batch_size = 32
threads = 2
dynamic_batching = {{ enabled = {str(batching).lower()} }}
[[inputs]]
name = "{spec["input"]}"
datatype = "FP32"
shape = {shape}
[[outputs]]
name = "{spec["output"]}"
datatype = "FP32"
shape = [{spec["width"]}]
"""


def build_repo(root: Path) -> dict[str, int]:
    sizes = {}
    for name, spec in MODELS.items():
        onnx_path = spec["build"](root / "_src" / f"{name}.onnx")
        sizes[name] = params(onnx_path)
        variants = {
            f"{name}_single": config(name, spec, False),
            f"{name}_batched": config(name, spec, True),
            # a second instance reserved for STAT: STAT never waits behind a routine batch
            f"{name}_reserved": config(name, spec, True, "instances = 2\nscheduling = { reserved_instances = 1 }"),
            # plus: routine instances single-threaded at lower OS priority, so STAT preempts their compute
            f"{name}_stat_first": config(
                name, spec, True, "instances = 3\nscheduling = { reserved_instances = 1, routine_nice = 10 }"
            ).replace("threads = 2", "threads = 1"),
            # small routine queue, to see shedding under overload; STAT keeps its reserved instance
            f"{name}_shed": config(
                name, spec, True, "instances = 3\nscheduling = { reserved_instances = 1, routine_nice = 10 }"
            ).replace("threads = 2", "threads = 1")
            + "[[queue_policy]]\nlevel = 3\nmax_queue_size = 64\n",
        }
        for variant, text in variants.items():
            (root / variant / "1").mkdir(parents=True)
            (root / variant / "config.toml").write_text(text)
            (root / variant / "1" / "model.onnx").write_bytes(onnx_path.read_bytes())
    import shutil

    shutil.rmtree(root / "_src")
    return sizes


def runtime_ceiling(root: Path) -> dict[str, float]:
    """Per-row cost at batch 1 over batch 32 inside ONNX Runtime (threads = 2, as served): the most
    that batching can gain once the box is compute-bound."""
    import onnxruntime as ort

    out = {}
    for name, spec in MODELS.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(root / f"{name}_single" / "1" / "model.onnx"), opts)
        per_row = {}
        for batch in (1, 32):
            x = np.random.default_rng(0).standard_normal((batch, *spec["shape"])).astype(np.float32)
            for _ in range(3):
                session.run(None, {spec["input"]: x})
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 1.0:
                session.run(None, {spec["input"]: x})
                n += 1
            per_row[batch] = (time.perf_counter() - start) / n / batch
        out[name] = round(per_row[1] / per_row[32], 2)
    return out


def request(model: str, spec: dict, priority: str | None = None, tenant: str | None = None) -> bytes:
    x = np.random.default_rng(0).standard_normal((1, *spec["shape"])).astype(np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": spec["input"],
                    "datatype": "FP32",
                    "shape": [1, *spec["shape"]],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    headers = {"Inference-Header-Content-Length": str(len(header))}
    if priority:
        headers["X-Bedside-Priority"] = priority
    if tenant:
        headers["X-Bedside-Tenant"] = tenant
    return http_request(f"/v2/models/{model}/infer", header + x.tobytes(), headers)


def ok_latencies(outcomes) -> list[float]:
    bad = [o.status for o in outcomes if o.status != 200]
    if bad:
        raise RuntimeError(f"unexpected failures: {sorted(set(bad))}")
    return [o.latency for o in outcomes]


def batching_rows(port: int, seconds: float) -> list[dict]:
    rows = []
    for name, spec in MODELS.items():
        for mode in ("single", "batched"):
            model = f"{name}_{mode}"
            req = request(model, spec)
            for c in CONCURRENCY:
                run_loads(port, [(req, c, 0.0)], 0.5)  # warm up at this concurrency
                (outcomes,), wall = run_loads(port, [(req, c, 0.0)], seconds)
                rows.append(
                    {
                        "model": name,
                        "batching": mode == "batched",
                        "concurrency": c,
                        **summarize(ok_latencies(outcomes), wall),
                    }
                )
                console.print(f"  {model} c={c}: {rows[-1]['throughput_rps']} rps, p99 {rows[-1]['p99_ms']} ms")
    return rows


def _probe(port: int, request: bytes, seconds: float, every: float, out: multiprocessing.Queue) -> None:
    """A STAT caller in its own process, as a monitor on another device would be: paced, blocking."""
    from _common import BlockingClient

    client = BlockingClient(port)
    latencies = []
    stop = time.perf_counter() + seconds
    next_send = time.perf_counter()
    while time.perf_counter() < stop:
        delay = next_send - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # pacing the probe, not waiting for a result
        next_send += every
        t0 = time.perf_counter()
        client.call(request)
        latencies.append(time.perf_counter() - t0)
    out.put(latencies)


def _server_side(port: int, model: str, tenant: str) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", f"/v2/models/{model}/stats")
    doc = json.loads(conn.getresponse().read())
    return doc["model_stats"][0]["tenants"][tenant]["latency"]


def stat_rows(port: int, seconds: float) -> list[dict]:
    """STAT p99 alone vs with 32 closed-loop routine connections saturating the box.

    The probe runs in its own process (50 requests/s) under its own tenant name per phase, so the
    server's per-tenant statistics give the server-side latency (admission to result) as well."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name, spec in MODELS.items():
        for variant in ("batched", "reserved", "stat_first"):
            model = f"{name}_{variant}"
            routine = request(model, spec, "routine")
            measured = {}
            for phase in ("alone", "loaded"):
                stat = request(model, spec, "stat", tenant=f"probe-{phase}")
                queue = ctx.Queue()
                probe = ctx.Process(target=_probe, args=(port, stat, seconds, 0.02, queue))
                probe.start()
                background = run_loads(port, [(routine, 32, 0.0)], seconds)[0][0] if phase == "loaded" else []
                latencies = queue.get()
                probe.join()
                measured[phase] = summarize(latencies, seconds)
                measured[phase + "_server"] = _server_side(port, model, f"probe-{phase}")
                if background:
                    measured["routine"] = summarize(ok_latencies(background), seconds)
            a, b = measured["alone"], measured["loaded"]
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "stat_p99_alone_ms": a["p99_ms"],
                    "stat_p99_loaded_ms": b["p99_ms"],
                    "ratio": round(b["p99_ms"] / a["p99_ms"], 2),
                    "server_p99_alone_ms": measured["alone_server"]["p99_ms"],
                    "server_p99_loaded_ms": measured["loaded_server"]["p99_ms"],
                    "server_ratio": round(measured["loaded_server"]["p99_ms"] / measured["alone_server"]["p99_ms"], 2),
                    "routine_rps": measured["routine"]["throughput_rps"],
                }
            )
            console.print(f"  {model}: STAT p99 {a['p99_ms']} ms alone, {b['p99_ms']} ms under load")
    return rows


def overload(port: int, pid: int, sustainable_rps: float, seconds: float) -> dict:
    """About 10x the load the 2M LSTM sustains (512 closed-loop connections), a STAT caller in its own
    process throughout, then a health check. Its routine queue holds 64 requests; beyond: 429."""
    spec = MODELS["vitals_lstm_2m"]
    model = "vitals_lstm_2m_shed"
    routine = request(model, spec, "routine")
    stat = request(model, spec, "stat", tenant="probe-overload")
    rss_before = rss_mb(pid)
    peak = [rss_before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    probe = ctx.Process(target=_probe, args=(port, stat, seconds, 0.05, queue))
    probe.start()
    try:
        (flood,), wall = run_loads(port, [(routine, 512, 0.0)], seconds)
    finally:
        done.set()
        sampler.join()
    stat_latencies = queue.get()
    probe.join()
    statuses: dict[str, int] = {}
    for o in flood:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    rejected = [o for o in flood if o.status != 200]
    health = run_loads(port, [(request(model, spec), 1, 0.0)], 0.5)[0][0]
    served = sum(1 for o in flood if o.status == 200)
    return {
        "model": model,
        "offered_connections": 512,
        "offered_rps": round(len(flood) / wall, 1),
        "sustainable_rps": sustainable_rps,
        "offered_over_sustainable": round(len(flood) / wall / sustainable_rps, 1),
        "served_rps": round(served / wall, 1),
        "statuses": statuses,
        "rejected": len(rejected),
        "rejected_with_error_body": sum(o.well_formed_error for o in rejected),
        "rejected_with_retry_after": sum(o.retry_after for o in rejected),
        "stat_sent_and_served": len(stat_latencies),  # the probe raises on any non-200
        "stat_p99_ms": summarize(stat_latencies, seconds)["p99_ms"],
        "stat_server_p99_ms": _server_side(port, model, "probe-overload")["p99_ms"],
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_mb": round(peak[0], 1),
        "rss_after_mb": round(rss_mb(pid), 1),
        "healthy_after": len(health) > 0 and all(o.status == 200 for o in health),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = build_repo(Path(tmp) / "repo")
        console.print("runtime batch efficiency (in process)")
        ceiling = runtime_ceiling(Path(tmp) / "repo")
        proc, port = start_server(Path(tmp) / "repo")
        try:
            console.print("batching off vs on")
            rows = batching_rows(port, args.seconds)
            console.print("STAT under routine saturation")
            stats = stat_rows(port, args.seconds)
            lstm32 = next(
                r for r in rows if r["model"] == "vitals_lstm_2m" and r["batching"] and r["concurrency"] == 32
            )
            console.print("overload")
            flood = overload(port, proc.pid, lstm32["throughput_rps"], max(args.seconds, 5.0))
        finally:
            proc.terminate()
            proc.wait(10)
        crashed = proc.returncode not in (0, -15)

    speedups = {}
    for name in MODELS:
        for c in CONCURRENCY:
            off = next(r for r in rows if r["model"] == name and not r["batching"] and r["concurrency"] == c)
            on = next(r for r in rows if r["model"] == name and r["batching"] and r["concurrency"] == c)
            speedups[f"{name}@{c}"] = round(on["throughput_rps"] / off["throughput_rps"], 2)
    table(
        f"dynamic batching, batch-1 requests, {args.seconds:g} s per row",
        rows,
        ["model", "batching", "concurrency", "n", "p50_ms", "p95_ms", "p99_ms", "throughput_rps"],
    )
    console.print("throughput batching on / off:", speedups)
    console.print("ceiling: ONNX Runtime per-row cost at batch 1 / batch 32:", ceiling)
    table(
        "STAT p99 alone vs with 32 routine connections saturating the box",
        stats,
        [
            "model",
            "variant",
            "stat_p99_alone_ms",
            "stat_p99_loaded_ms",
            "ratio",
            "server_p99_alone_ms",
            "server_p99_loaded_ms",
            "server_ratio",
            "routine_rps",
        ],
    )
    console.print("overload:", flood, "server crashed:", crashed)
    out = write_results(
        "scheduler",
        {
            "params": sizes,
            "batching": rows,
            "speedup_on_over_off": speedups,
            "runtime_ceiling": ceiling,
            "stat": stats,
            "overload": flood,
            "server_crashed": crashed,
            "targets": {"speedup_at_32_min": 4.0, "stat_p99_ratio_max": 2.0},
            "machine": machine(),
        },
    )
    console.print(f"written to {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
