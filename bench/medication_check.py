"""The medication check end to end, and what a graph costs over calling its steps directly.

    python bench/medication_check.py [--seconds 5] [--quick]

1. p50/p99 of one medication check (8 steps: barcode, 4 rule checks, features, the risk model,
   the verdict) through a real `bedside serve`, one request at a time: REST (JSON body, keep-alive
   raw-socket client) and gRPC (a pre-serialized ModelInferRequest with BYTES contents).
   Target: p99 <= 20 ms on this box (the seed's budget: 100 ms).
2. Graph overhead, in one process through the dataplane (no HTTP, so only the graph's own cost
   shows): (a) a one-step graph around the risk model vs calling the model directly; (b) the whole
   medication graph vs the same step functions and model call run back to back by hand. Overhead
   per step = (graph - direct) / steps. Target: <= 0.2 ms per step.

Prints a table and writes bench/results/medication_check.json (--quick: bench/results/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    console,
    free_port,
    grpc_sequential,
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
import grpc
import numpy as np
import orjson

from bedside.dataplane.dataplane import Dataplane
from bedside.graphs.steps import StepContext
from bedside.models.demo import build_demo
from bedside.models.demo_medication import demo_gtin
from bedside.protocol.types import SYSTEM, CallContext, InferRequest, RequestedOutput
from bedside.server.grpc import oip_pb2

GRAPH = "medication_check"
INFER = "/inference.GRPCInferenceService/ModelInfer"
# a ward patient on five drugs with a penicillin allergy and reduced kidney function; the scanned
# Coumadin meets an order, and a contraindicated interaction (miconazole) in the thesaurus
PATIENT = {
    "patient_id": "W-1", "age": 79, "sex": "F", "weight_kg": 61, "creatinine_mg_dl": 1.4, "egfr": 38,
    "allergies": ["penicillin", "sulfa"], "medications": ["miconazole", "amiodarone", "furosemide", "metformin"],
    "orders": [{"drug": "warfarin", "dose_mg": 5, "route": "oral", "due": "2026-11-25T08:00:00"},
               {"drug": "gabapentin", "dose_mg": 300, "route": "oral", "due": "2026-11-25T08:00:00"}],
    "scanned_at": "2026-11-25T08:05:00",
}  # fmt: skip
RISK_GRAPH = """
deadline_ms = 1000
[[inputs]]
name = "features"
datatype = "FP32"
shape = [-1, 8]
[[outputs]]
name = "probabilities"
from = "risk.probabilities"
[[steps]]
name = "risk"
model = "medication_risk"
inputs = { features = "features" }
"""


def rest_body() -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {"name": "barcode", "datatype": "BYTES", "shape": [1], "data": [demo_gtin(1)]},
                {"name": "patient", "datatype": "BYTES", "shape": [1], "data": [orjson.dumps(PATIENT).decode()]},
            ]
        }
    )


def grpc_message() -> bytes:
    request = oip_pb2.ModelInferRequest(model_name=GRAPH)
    for name, value in (("barcode", demo_gtin(1)), ("patient", orjson.dumps(PATIENT).decode())):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(value.encode())
    return request.SerializeToString()


def grpc_once(port: int, request: bytes) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return channel.unary_unary(INFER)(request)  # type: ignore[no-any-return]


async def _timed(fn: Any, seconds: float) -> dict[str, float]:
    for _ in range(200):
        await fn()
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        await fn()
        lat.append(time.perf_counter() - t0)
    return summarize(lat, time.perf_counter() - start)


def overhead(repo: Path, seconds: float) -> list[dict[str, Any]]:
    dp = Dataplane(repo)
    dp.start()
    try:
        return asyncio.run(_overhead(dp, seconds))
    finally:
        dp.close()


async def _overhead(dp: Dataplane, seconds: float) -> list[dict[str, Any]]:
    features = np.zeros((1, 8), np.float32)

    def model(name: str) -> Any:
        return lambda: dp.infer(name, None, InferRequest({"features": features}))

    direct_model = await _timed(model("medication_risk"), seconds)
    graph_model = await _timed(model("risk_graph"), seconds)
    feed = {
        "barcode": np.array([demo_gtin(1)], dtype=object),
        "patient": np.array([orjson.dumps(PATIENT).decode()], dtype=object),
    }
    graph = dp._graphs.find(GRAPH)  # the bench runs the graph's own step functions by hand
    assert graph is not None
    steps = graph.plan.steps

    async def by_hand() -> None:
        values: dict[str, np.ndarray] = dict(feed)
        for step in steps:
            inputs = {port: values[source] for port, source in step.sources}
            if step.function is not None:
                ctx = StepContext(GRAPH, step.spec.name, "default", None, SYSTEM, 0)
                out = step.function(inputs, ctx)
            else:
                wanted = [RequestedOutput(o) for o in step.outputs]
                out = (await dp.infer(step.spec.model or "", None, InferRequest(inputs, outputs=wanted))).outputs
            for key in step.outputs:
                values[f"{step.spec.name}.{key}"] = out[key]  # type: ignore[index]

    direct_all = await _timed(by_hand, seconds)
    graph_all = await _timed(lambda: dp.infer(GRAPH, None, InferRequest(dict(feed)), CallContext()), seconds)
    rows = []
    for case, n, direct, graphed in (
        ("risk model: 1-step graph vs direct", 1, direct_model, graph_model),
        (f"medication check: {len(steps)}-step graph vs by hand", len(steps), direct_all, graph_all),
    ):
        per_step = (graphed["p50_ms"] - direct["p50_ms"]) / n
        rows.append(
            {
                "case": case,
                "direct_p50_ms": direct["p50_ms"],
                "graph_p50_ms": graphed["p50_ms"],
                "graph_p99_ms": graphed["p99_ms"],
                "overhead_per_step_ms": round(per_step, 4),
                "target_ms": 0.2,
                "met": per_step <= 0.2,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per row")
    args = parse_args(parser, seconds=1)
    with tempfile.TemporaryDirectory() as tmp:
        say("medication_check: building the demo repository (a few seconds)...")
        repo = build_demo(Path(tmp) / "repo", ecg=False)
        (repo / "risk_graph").mkdir()
        (repo / "risk_graph" / "graph.toml").write_text(RISK_GRAPH, encoding="utf-8")
        say("medication_check: graph overhead in one process...")
        over = overhead(repo, args.seconds)
        grpc_port = free_port()
        with server(repo, "--grpc-port", str(grpc_port)) as (_, port):
            say(f"medication_check: REST, {args.seconds:g} s...")
            rest = sequential(port, http_request(f"/v2/models/{GRAPH}/infer", rest_body()), args.seconds)
            say(f"medication_check: gRPC, {args.seconds:g} s...")
            reply = oip_pb2.ModelInferResponse.FromString(grpc_once(grpc_port, grpc_message()))
            if not reply.outputs:
                raise RuntimeError("the gRPC medication check gave no outputs")
            grpc_row = grpc_sequential(grpc_port, grpc_message(), args.seconds, warmup=100)
    end_to_end = [
        {"transport": name, **row, "target_p99_ms": 20.0, "met": row["p99_ms"] <= 20.0}
        for name, row in (("REST (JSON)", rest), ("gRPC", grpc_row))
    ]
    table("medication check, one at a time", end_to_end, ["transport", "n", "p50_ms", "p99_ms", "target_p99_ms", "met"])
    table("graph overhead", over, ["case", "direct_p50_ms", "graph_p50_ms", "overhead_per_step_ms", "target_ms", "met"])
    path = write_results("medication_check", {"machine": machine(), "end_to_end": end_to_end, "overhead": over})
    console.print(f"results: {path}")


if __name__ == "__main__":
    main_guard(main)
