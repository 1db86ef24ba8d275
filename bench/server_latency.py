"""Server overhead: raw in-process ONNX Runtime vs bedside end to end, demo model, batch 1.

    python bench/server_latency.py [--seconds 5]

Prints a table and writes bench/results/server_latency.json. The load generator is a lean
keep-alive raw-socket client in this process (no HTTP library), so client cost stays small; it
shares the box's cores with the server, as any client on an edge box would.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    BlockingClient,
    closed_loop,
    console,
    http_request,
    machine,
    start_server,
    summarize,
    table,
    write_results,
)
from bedside.models.demo import build_demo
from bedside.runtime.session import open_session

MODEL = "breast_mass_malignancy"


def in_process(repo: Path, x: np.ndarray, seconds: float) -> dict[str, float]:
    session = open_session(repo / MODEL / "1" / "model.onnx", 0, ("cpu",))
    feed = {"features": x}
    for _ in range(200):
        session.run(None, feed)
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run(None, feed)
        lat.append(time.perf_counter() - t0)
    return summarize(lat, time.perf_counter() - start)


def sequential(port: int, request: bytes, seconds: float) -> dict[str, float]:
    client = BlockingClient(port)
    for _ in range(200):
        client.call(request)
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        client.call(request)
        lat.append(time.perf_counter() - t0)
    return summarize(lat, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    args = parser.parse_args()

    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data[:1].astype(np.float32)
    path = f"/v2/models/{MODEL}/infer"
    json_body = orjson.dumps(
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}]}
    )
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [1, 30], "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    json_req = http_request(path, json_body, {"Content-Type": "application/json"})
    binary_req = http_request(path, header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))})

    with tempfile.TemporaryDirectory() as tmp:
        repo = build_demo(Path(tmp) / "repo")
        rows = [{"case": "in-process ONNX Runtime", "concurrency": 1, **in_process(repo, x, args.seconds)}]
        proc, port = start_server(repo)
        try:
            rows.append({"case": "server, JSON", "concurrency": 1, **sequential(port, json_req, args.seconds)})
            rows.append(
                {"case": "server, binary tensors", "concurrency": 1, **sequential(port, binary_req, args.seconds)}
            )
            closed_loop(port, json_req, 16, 1.0)  # warm the connections and the loop
            lat, wall = closed_loop(port, json_req, 16, args.seconds)
            rows.append({"case": "server, JSON", "concurrency": 16, **summarize(lat, wall)})
        finally:
            proc.terminate()
            proc.wait(10)

    base = rows[0]
    overhead = {
        "json_c1_p50_ms": round(rows[1]["p50_ms"] - base["p50_ms"], 4),
        "json_c1_p99_ms": round(rows[1]["p99_ms"] - base["p99_ms"], 4),
        "binary_c1_p50_ms": round(rows[2]["p50_ms"] - base["p50_ms"], 4),
        "binary_c1_p99_ms": round(rows[2]["p99_ms"] - base["p99_ms"], 4),
    }
    targets = {"overhead_p50_ms_max": 0.5, "overhead_p99_ms_max": 2.0}
    passed = overhead["json_c1_p50_ms"] <= 0.5 and overhead["json_c1_p99_ms"] <= 2.0
    table(
        f"{MODEL}, batch 1, {args.seconds:g} s per row",
        rows,
        ["case", "concurrency", "n", "p50_ms", "p95_ms", "p99_ms", "max_ms", "throughput_rps"],
    )
    console.print(
        f"server overhead over in-process at concurrency 1: {overhead} -> "
        f"{'[green]meets[/green]' if passed else '[red]misses[/red]'} the target {targets}"
    )
    out = write_results(
        "server_latency",
        {
            "model": MODEL,
            "batch": 1,
            "rows": rows,
            "overhead": overhead,
            "targets": targets,
            "meets_target": passed,
            "machine": machine(),
        },
    )
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
