"""bedside alone vs bedside on Ray Serve (1 and 2 replicas), same model, same load, one box.

    python bench/cluster_scaling.py [--seconds 5] [--quick]

The model is the demo's breast_mass_malignancy (batch 1, JSON). bedside alone is `bedside serve`;
the cluster is a Ray instance of this process (2 CPUs) with the front and N fixed replicas
(`[cluster] min_replicas = max_replicas = N`), reached through Ray Serve's HTTP proxy. Each row
is a closed loop from this process's raw-socket client (c=1 and c=16). Ray's proxy, the front and
the replicas all share this 2-core box with the load generator: the figures show the cost of the
hops, not a cluster's capacity. Writes bench/results/cluster_scaling.json
(--throughput-optimized: Ray Serve's own fast mode, cluster_scaling_optimized.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    closed_loop,
    demo_repo,
    free_port,
    http_request,
    machine,
    main_guard,
    parse_args,
    require,
    run_loads,
    say,
    sequential,
    server,
    summarize,
    table,
    write_results,
)

# isort: split
import orjson

MODEL = "breast_mass_malignancy"


def stat_under_load(port: int, routine: bytes, stat: bytes, seconds: float) -> list[dict[str, Any]]:
    """STAT requests (20/s, one connection) while 48 connections of routine ones saturate the model:
    more than one replica takes at once, so routine work waits, and STAT should not."""
    idle = {"load": "STAT alone", **sequential(port, stat, min(seconds, 2.0), warmup=50)}
    (routine_out, stat_out), wall = run_loads(port, [(routine, 48, 0.0), (stat, 1, 0.05)], seconds)
    rows = [idle]
    for name, outcomes in (("STAT beside 48 routine", stat_out), ("routine (48 connections)", routine_out)):
        ok = [o.latency for o in outcomes if o.status == 200]
        rows.append({"load": name, **summarize(ok, wall), "refused": len(outcomes) - len(ok)})
    return rows


def measure(port: int, request: bytes, seconds: float) -> list[dict[str, float]]:
    rows = [{"concurrency": 1, **sequential(port, request, seconds)}]
    closed_loop(port, request, 16, min(1.0, seconds))  # warm the connections
    latencies, wall = closed_loop(port, request, 16, seconds)
    return [*rows, {"concurrency": 16, **summarize(latencies, wall)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode: user code on the replica's loop, gRPC between "
        "deployments, and direct ingress (the front's replica listens itself: no proxy hop)",
    )
    args = parse_args(parser, seconds=1.0)
    direct = free_port()
    if args.throughput_optimized:  # read by Ray when it is imported, in this process and the ones it starts
        os.environ.update(
            RAY_SERVE_THROUGHPUT_OPTIMIZED="1",
            RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(direct),  # the one front replica takes this port
            RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(direct + 1),
        )
    require("ray")
    import ray
    from sklearn.datasets import load_breast_cancer

    from bedside.cluster import app as cluster
    from bedside.settings import DEFAULTS

    x = load_breast_cancer().data[:1].ravel().tolist()
    body = orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x}]})
    request = http_request(f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
    path = f"/v2/models/{MODEL}/infer"
    stat = http_request(path, body, {"Content-Type": "application/json", "X-Bedside-Priority": "stat"})
    routine = http_request(path, body, {"Content-Type": "application/json", "X-Bedside-Priority": "routine"})
    rows = []
    priority_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = demo_repo(Path(tmp) / "repo", MODEL)
        config = repo / MODEL / "config.toml"
        plain = config.read_text()
        say(f"cluster_scaling: bedside alone, {args.seconds:g} s at c=1 and c=16...")
        with server(repo) as (_, port):
            rows += [{"case": "bedside alone", "replicas": "-", **r} for r in measure(port, request, args.seconds)]
            say(f"cluster_scaling: bedside alone, STAT beside saturating routine work, {args.seconds:g} s...")
            priority_rows += [
                {"case": "bedside alone", **r} for r in stat_under_load(port, routine, stat, args.seconds)
            ]
        for replicas in (1, 2):  # each round in a fresh Ray instance: nothing of the last one lingers
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                config.write_text(plain + f"\n[cluster]\nmin_replicas = {replicas}\nmax_replicas = {replicas}\n")
                port = free_port()
                settings = DEFAULTS.replace({"cluster.http_port": port, "streams.state_dir": str(Path(tmp) / "s")})
                say(f"cluster_scaling: Ray Serve, {replicas} replica(s), deploying...")
                cluster.start(repo, settings)
                say(f"cluster_scaling: Ray Serve, {replicas} replica(s), {args.seconds:g} s at c=1 and c=16...")
                path = "front (direct ingress) -> replica" if args.throughput_optimized else "proxy -> front -> replica"
                case = {"case": f"Ray Serve {path}", "replicas": replicas}
                target = direct if args.throughput_optimized else port
                rows += [{**case, **r} for r in measure(target, request, args.seconds)]
                if replicas == 1:
                    say(f"cluster_scaling: Ray Serve, STAT beside saturating routine work, {args.seconds:g} s...")
                    priority_rows += [
                        {"case": case["case"], **r} for r in stat_under_load(target, routine, stat, args.seconds)
                    ]
            finally:
                ray.shutdown()
    alone = {r["concurrency"]: r for r in rows if r["case"] == "bedside alone"}
    one = {r["concurrency"]: r for r in rows if r["replicas"] == 1}
    two = {r["concurrency"]: r for r in rows if r["replicas"] == 2}
    figures = {
        "proxy_hop_p50_ms_c1": round(one[1]["p50_ms"] - alone[1]["p50_ms"], 3),
        "cluster_vs_alone_throughput_c16": round(one[16]["throughput_rps"] / alone[16]["throughput_rps"], 3),
        "two_vs_one_replica_throughput_c16": round(two[16]["throughput_rps"] / one[16]["throughput_rps"], 3),
    }
    table(
        f"{MODEL}, batch 1, JSON, {args.seconds:g} s per row (this box: 2 cores shared by every process)",
        rows,
        ["case", "replicas", "concurrency", "n", "p50_ms", "p99_ms", "throughput_rps"],
    )
    table(
        "STAT beside routine work that saturates the model (1 replica in the cluster)",
        priority_rows,
        ["case", "load", "n", "p50_ms", "p99_ms", "throughput_rps", "refused"],
    )
    say(f"cluster_scaling: {figures}")
    name = "cluster_scaling_optimized" if args.throughput_optimized else "cluster_scaling"
    doc = {"model": MODEL, "throughput_optimized": args.throughput_optimized, "rows": rows, "figures": figures}
    doc["stat_under_load"] = priority_rows
    write_results(name, {**doc, "machine": machine()})


if __name__ == "__main__":
    main_guard(main)
