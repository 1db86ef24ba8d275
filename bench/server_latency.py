"""Server overhead: raw in-process ONNX Runtime vs bedside end to end, demo model, batch 1.

    python bench/server_latency.py [--seconds 5] [--quick]

Prints a table and writes bench/results/server_latency.json (--quick: 1 s per row, results in
bench/results/quick/). The load generator is a lean keep-alive raw-socket client in this process
(no HTTP library), so client cost stays small; it shares the box's cores with the server, as any
client on an edge box would.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    closed_loop,
    console,
    demo_repo,
    http_request,
    machine,
    main_guard,
    parse_args,
    say,
    sequential,
    server,
    summarize,
    table,
    write_results,
)

# isort: split
import numpy as np
import orjson

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    args = parse_args(parser, seconds=1.0)
    say(f"server_latency: in-process ONNX Runtime vs bedside, {MODEL}, batch 1, 4 rows of {args.seconds:g} s")

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

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = demo_repo(Path(tmp) / "repo", MODEL)
        say(f"  in-process ONNX Runtime, c=1: {args.seconds:g} s...")
        rows = [{"case": "in-process ONNX Runtime", "concurrency": 1, **in_process(repo, x, args.seconds)}]
        with server(repo) as (_, port):
            say(f"  server JSON, c=1: {args.seconds:g} s...")
            rows.append({"case": "server, JSON", "concurrency": 1, **sequential(port, json_req, args.seconds)})
            say(f"  server binary tensors, c=1: {args.seconds:g} s...")
            rows.append(
                {"case": "server, binary tensors", "concurrency": 1, **sequential(port, binary_req, args.seconds)}
            )
            say(f"  server JSON, c=16: 1 s warm-up + {args.seconds:g} s...")
            closed_loop(port, json_req, 16, 1.0)  # warm the connections and the loop
            lat, wall = closed_loop(port, json_req, 16, args.seconds)
            rows.append({"case": "server, JSON", "concurrency": 16, **summarize(lat, wall)})

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
    write_results(
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


if __name__ == "__main__":
    main_guard(main)
