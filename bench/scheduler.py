"""Scheduler benchmark: dynamic batching off vs on, STAT latency under routine saturation, overload.

    python bench/scheduler.py [--seconds 3] [--models ...] [--concurrency 1,8,32,64] [--quick]

Models (random weights, built with onnx.helper; serving cost, not accuracy, is measured):
  ecg_cnn      1D-CNN over a 12-lead ECG window (5 s at 250 Hz)   [N, 12, 1250] -> [N, 5]
  vitals_lstm  LSTM (hidden 256, 0.27M params) over 60 steps of 8 vital signs  [N, 60, 8] -> [N, 1]
  vitals_lstm_2m  the same with hidden 704: the ~2M-parameter forecaster size of the model pipeline
Each is served twice from one server, `*_batched` (dynamic batching on) and `*_single` (off).
Requests use the binary tensor extension, batch 1 each, from a keep-alive raw-socket client in
this process. Prints tables and writes bench/results/scheduler.json (--quick: vitals_lstm_2m only,
concurrency 1 and 32, 0.5 s per point, results in bench/results/quick/).
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

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    console,
    http_request,
    machine,
    main_guard,
    parse_args,
    plural,
    rss_mb,
    run_loads,
    say,
    server,
    start_process,
    summarize,
    table,
    write_results,
)
from _models import ecg_cnn, params, vitals_lstm

# isort: split
import numpy as np
import orjson

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
OVERLOAD_MODEL = "vitals_lstm_2m"


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


def build_repo(root: Path, models: dict[str, dict]) -> dict[str, int]:
    sizes = {}
    for name, spec in models.items():
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


def runtime_ceiling(root: Path, models: dict[str, dict], seconds: float = 1.0) -> dict[str, float]:
    """Per-row cost at batch 1 over batch 32 inside ONNX Runtime (threads = 2, as served): the most
    that batching can gain once the box is compute-bound."""
    import onnxruntime as ort

    out = {}
    for name, spec in models.items():
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
            while time.perf_counter() - start < seconds:
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


def batching_rows(port: int, models: dict[str, dict], concurrency: list[int], seconds: float) -> list[dict]:
    rows = []
    for name, spec in models.items():
        for mode in ("single", "batched"):
            model = f"{name}_{mode}"
            req = request(model, spec)
            for c in concurrency:
                say(f"  {model} c={c}: 0.5 s warm-up + {seconds:g} s... ", end="")
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
                say(f"{rows[-1]['throughput_rps']} rps, p99 {rows[-1]['p99_ms']} ms")
    return rows


def _probe(port: int, request: bytes, seconds: float, every: float, out: multiprocessing.Queue) -> None:
    """A STAT caller in its own process, as a monitor on another device would be: paced, blocking.
    Puts its latencies on `out`, or the one line of what went wrong."""
    from _common import BlockingClient

    try:
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
    except Exception as exc:  # the parent says it, in one line
        out.put(f"{type(exc).__name__}: {exc}")
        return
    out.put(latencies)


def start_probe(port: int, request: bytes, seconds: float, every: float) -> tuple[multiprocessing.Process, object]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    probe = ctx.Process(target=_probe, args=(port, request, seconds, every, queue))
    start_process(probe)  # ignores Ctrl-C; stopped with the script
    return probe, queue


def probe_result(probe: multiprocessing.Process, queue, seconds: float) -> list[float]:
    """The probe's latencies; a RuntimeError if it failed or did not answer in time."""
    import queue as queues

    try:
        result = queue.get(timeout=seconds + 60)
    except queues.Empty:
        raise RuntimeError(f"the STAT probe process did not report within {seconds + 60:g} s") from None
    probe.join()
    if isinstance(result, str):
        raise RuntimeError(f"the STAT probe failed: {' '.join(result.split())[:300]}")
    return result


def _server_side(port: int, model: str, tenant: str) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", f"/v2/models/{model}/stats")
    doc = json.loads(conn.getresponse().read())
    return doc["model_stats"][0]["tenants"][tenant]["latency"]


def stat_rows(port: int, models: dict[str, dict], seconds: float) -> list[dict]:
    """STAT p99 alone vs with 32 closed-loop routine connections saturating the box.

    The probe runs in its own process (50 requests/s) under its own tenant name per phase, so the
    server's per-tenant statistics give the server-side latency (admission to result) as well."""
    rows = []
    for name, spec in models.items():
        for variant in ("batched", "reserved", "stat_first"):
            model = f"{name}_{variant}"
            say(f"  {model}: STAT alone {seconds:g} s, then beside 32 routine connections {seconds:g} s... ", end="")
            routine = request(model, spec, "routine")
            measured = {}
            for phase in ("alone", "loaded"):
                stat = request(model, spec, "stat", tenant=f"probe-{phase}")
                probe, queue = start_probe(port, stat, seconds, 0.02)
                background = run_loads(port, [(routine, 32, 0.0)], seconds)[0][0] if phase == "loaded" else []
                latencies = probe_result(probe, queue, seconds)
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
            say(f"STAT p99 {a['p99_ms']} ms alone, {b['p99_ms']} ms under load")
    return rows


def overload(port: int, pid: int, sustainable_rps: float, seconds: float) -> dict:
    """About 10x the load the 2M LSTM sustains (512 closed-loop connections), a STAT caller in its own
    process throughout, then a health check. Its routine queue holds 64 requests; beyond: 429."""
    spec = MODELS[OVERLOAD_MODEL]
    model = f"{OVERLOAD_MODEL}_shed"
    routine = request(model, spec, "routine")
    stat = request(model, spec, "stat", tenant="probe-overload")
    rss_before = rss_mb(pid)
    peak = [rss_before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        probe, queue = start_probe(port, stat, seconds, 0.05)
        (flood,), wall = run_loads(port, [(routine, 512, 0.0)], seconds)
    finally:
        done.set()
        sampler.join()
    stat_latencies = probe_result(probe, queue, seconds)
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
    parser.add_argument("--models", default=",".join(MODELS), help=f"some of {', '.join(MODELS)}")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="connections, batching table")
    parser.add_argument(
        "--overload-seconds", type=float, help=f"length of the overload run ({OVERLOAD_MODEL}); default max(5, seconds)"
    )
    args = parse_args(parser, seconds=0.5, models=OVERLOAD_MODEL, concurrency="1,32", overload_seconds=2.0)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {', '.join(sorted(unknown))}: choose among {', '.join(MODELS)}")
    models = {name: spec for name, spec in MODELS.items() if name in args.models.split(",")}
    concurrency = [int(c) for c in args.concurrency.split(",")]
    overload_s = args.overload_seconds or max(args.seconds, 5.0)
    say(
        f"scheduler: {plural(len(models), 'model')} x {plural(len(concurrency), 'concurrency level')}, "
        f"batching off and on, {args.seconds:g} s per point; STAT under saturation; "
        + (f"overload {overload_s:g} s" if OVERLOAD_MODEL in models else "no overload")
    )
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        say(f"scheduler: building {', '.join(models)} (random weights), 5 variants each...")
        sizes = build_repo(Path(tmp) / "repo", models)
        ceiling_s = min(1.0, args.seconds)
        say(f"scheduler: runtime batch efficiency in process, batch 1 and 32, {ceiling_s:g} s each...")
        ceiling = runtime_ceiling(Path(tmp) / "repo", models, ceiling_s)
        with server(Path(tmp) / "repo") as (proc, port):
            say("scheduler: batching off vs on")
            rows = batching_rows(port, models, concurrency, args.seconds)
            say("scheduler: STAT under routine saturation")
            stats = stat_rows(port, models, args.seconds)
            flood = None
            if OVERLOAD_MODEL in models:
                lstm = [r for r in rows if r["model"] == OVERLOAD_MODEL and r["batching"]]
                sustained = next((r for r in lstm if r["concurrency"] == 32), lstm[-1])  # 32, else the last
                say(f"scheduler: overload, 512 connections on {OVERLOAD_MODEL}_shed for {overload_s:g} s...")
                flood = overload(port, proc.pid, sustained["throughput_rps"], overload_s)
            else:
                say(f"scheduler: overload skipped (it needs {OVERLOAD_MODEL} in --models)")
        crashed = proc.returncode not in (0, -15)

    speedups = {}
    for name in models:
        for c in concurrency:
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
    write_results(
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


if __name__ == "__main__":
    main_guard(main)
