"""REST (binary tensors) vs gRPC, end to end through one bedside server: demo model, batch 1.

    python bench/grpc_latency.py [--seconds 5] [--quick]

Prints a table and writes bench/results/grpc_latency.json (--quick: 1 s per row, results in
bench/results/quick/). Both load generators are lean and run
in this process: REST is the keep-alive raw-socket client of _common (16 connections at
concurrency 16); gRPC sends a pre-serialized ModelInferRequest over one channel and does not parse
the reply (grpc.aio with 16 tasks at concurrency 16), so each side costs the client about the same.
A row with tritonclient.grpc shows what a typical Python client adds on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    closed_loop,
    console,
    demo_repo,
    free_port,
    grpc_sequential,
    http_request,
    machine,
    main_guard,
    parse_args,
    require,
    run_async,
    say,
    sequential,
    server,
    summarize,
    table,
    write_results,
)

# isort: split
import grpc
import numpy as np
import orjson

from bedside.server.grpc import oip_pb2

MODEL = "breast_mass_malignancy"
INFER = "/inference.GRPCInferenceService/ModelInfer"
WARMUP = 200


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(
    pid: int,
    case: str,
    concurrency: int,
    seconds: float,
    run: Callable[[], dict[str, float]],
    warmup: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """One row, with the server's own CPU per request: on a small box the client shares the cores,
    so this is the server's cost whatever the client's. `warmup` runs first, outside the count."""
    say(f"  {case}, c={concurrency}: {'1 s warm-up + ' if concurrency > 1 else ''}{seconds:g} s...")
    if warmup is not None:
        warmup()
    before = cpu_seconds(pid)
    row = run()
    used = cpu_seconds(pid) - before
    return {"case": case, "concurrency": concurrency, **row, "server_cpu_us_per_req": round(used / row["n"] * 1e6, 1)}


def infer_message(x: np.ndarray) -> bytes:
    request = oip_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="features", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def tritonclient_sequential(port: int, x: np.ndarray, seconds: float) -> dict[str, float]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(WARMUP):
        client.infer(MODEL, [inp]).as_numpy("probabilities")
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        client.infer(MODEL, [inp]).as_numpy("probabilities")
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    client.close()
    return summarize(lat, wall)


def grpc_concurrent(port: int, request: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(INFER)

            async def worker(stop: float, out: list[float]) -> None:
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    await call(request)
                    out.append(time.perf_counter() - t0)

            warm: list[float] = []
            await asyncio.gather(*(worker(time.perf_counter() + 1.0, warm) for _ in range(concurrency)))
            lat: list[float] = []
            start = time.perf_counter()
            await asyncio.gather(*(worker(start + seconds, lat) for _ in range(concurrency)))
            return summarize(lat, time.perf_counter() - start)

    return run_async(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    args = parse_args(parser, seconds=1.0)
    require("tritonclient")  # its row comes third: fail now, not then
    say(f"grpc_latency: REST vs gRPC through one bedside, {MODEL}, batch 1, 5 rows of {args.seconds:g} s")

    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data[:1].astype(np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [1, 30], "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    rest_req = http_request(
        f"/v2/models/{MODEL}/infer", header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    )
    grpc_req = infer_message(x)

    rows = []
    seconds = args.seconds
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = demo_repo(Path(tmp) / "repo", MODEL)
        grpc_port = free_port()
        with server(repo, "--grpc-port", str(grpc_port)) as (proc, port):
            pid = proc.pid
            rows.append(
                measured(pid, "REST, binary tensors", 1, seconds, lambda: sequential(port, rest_req, seconds, WARMUP))
            )
            rows.append(
                measured(pid, "gRPC, raw contents", 1, seconds, lambda: grpc_sequential(grpc_port, grpc_req, seconds))
            )
            rows.append(
                measured(
                    pid, "gRPC, tritonclient.grpc", 1, seconds, lambda: tritonclient_sequential(grpc_port, x, seconds)
                )
            )
            rows.append(
                measured(
                    pid,
                    "REST, binary tensors",
                    16,
                    seconds,
                    lambda: summarize(*closed_loop(port, rest_req, 16, seconds)),
                    warmup=lambda: closed_loop(port, rest_req, 16, 1.0),  # the connections and the loop
                )
            )
            rows.append(
                measured(
                    pid, "gRPC, raw contents", 16, seconds, lambda: grpc_concurrent(grpc_port, grpc_req, 16, seconds)
                )
            )

    table(
        f"{MODEL}, batch 1, {args.seconds:g} s per row",
        rows,
        ["case", "concurrency", "n", "p50_ms", "p95_ms", "p99_ms", "max_ms", "throughput_rps", "server_cpu_us_per_req"],
    )
    by = {(r["case"], r["concurrency"]): r for r in rows}
    rest1, grpc1 = by[("REST, binary tensors", 1)], by[("gRPC, raw contents", 1)]
    rest16, grpc16 = by[("REST, binary tensors", 16)], by[("gRPC, raw contents", 16)]
    comparison = {
        "grpc_minus_rest_c1_p50_ms": round(grpc1["p50_ms"] - rest1["p50_ms"], 4),
        "grpc_minus_rest_c1_p99_ms": round(grpc1["p99_ms"] - rest1["p99_ms"], 4),
        "grpc_over_rest_c16_throughput": round(grpc16["throughput_rps"] / rest16["throughput_rps"], 3),
        "grpc_minus_rest_c16_server_cpu_us": round(
            grpc16["server_cpu_us_per_req"] - rest16["server_cpu_us_per_req"], 1
        ),
    }
    console.print(f"gRPC vs REST: {comparison}")
    write_results(
        "grpc_latency",
        {"model": MODEL, "batch": 1, "rows": rows, "comparison": comparison, "machine": machine()},
    )


if __name__ == "__main__":
    main_guard(main)
