"""What observability costs: throughput and p50 with metrics on vs off, concurrency 1 and 16.

    python bench/metrics_overhead.py [--seconds 5] [--rounds 3] [--quick]

"off" is `monitoring.histograms=false` (counts and percentiles only: no latency buckets, no
per-priority counts, no drift window). "on" is the default, with /metrics scraped once a second
during the load (fifteen times Prometheus's usual rate) and the status page's live feed open, so
the scrape and the snapshots are paid for too. The two run in alternating order, a fresh server
each, `--rounds` times; the medians are compared. Target: at most 3 % lost. Prints a table and
writes bench/results/metrics_overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import urllib.request
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

MODEL = "breast_mass_malignancy"
TARGET_LOSS = 0.03


class Observer:
    """Scrapes /metrics every second and keeps the status page's live feed open, in the background."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.scrapes = 0
        self.snapshots = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=work, daemon=True) for work in (self._scrape, self._feed)]

    def __enter__(self) -> Observer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _scrape(self) -> None:
        while not self._stop.wait(1.0):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
                response.read()
            self.scrapes += 1

    def _feed(self) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status/stream", timeout=10) as stream:
            while not self._stop.is_set():
                if stream.readline().startswith(b"event: snapshot"):
                    self.snapshots += 1


def measure(repo: Path, request: bytes, seconds: float, on: bool) -> dict[str, dict[str, float]]:
    os.environ["BEDSIDE_MONITORING_HISTOGRAMS"] = "true" if on else "false"
    try:
        with server(repo) as (_, port):
            closed_loop(port, request, 16, 1.0)  # warm the connections, the loop and the model
            observer = Observer(port) if on else None
            with observer or contextlib.nullcontext():
                c1 = sequential(port, request, seconds)
                lat16, wall = closed_loop(port, request, 16, seconds)
                c16 = summarize(lat16, wall)
            if observer is not None and observer.scrapes == 0:
                raise RuntimeError("/metrics was never scraped during the load")
    finally:
        del os.environ["BEDSIDE_MONITORING_HISTOGRAMS"]
    return {"c1": c1, "c16": c16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs, alternating which goes first")
    args = parse_args(parser, seconds=1.0, rounds=1)
    say(f"metrics_overhead: {MODEL}, batch 1, JSON, {args.rounds} rounds of off and on, {args.seconds:g} s each")
    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data[:1].astype(np.float32)
    body = orjson.dumps(
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}]}
    )
    request = http_request(f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = demo_repo(Path(tmp) / "repo", MODEL)
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                say(f"  round {r + 1}: metrics {mode}...")
                runs[mode].append(measure(repo, request, args.seconds, mode == "on"))

    rows = []
    for concurrency in ("c1", "c16"):
        for mode in ("off", "on"):
            rps = statistics.median(run[concurrency]["throughput_rps"] for run in runs[mode])
            p50 = statistics.median(run[concurrency]["p50_ms"] for run in runs[mode])
            rows.append({"metrics": mode, "concurrency": int(concurrency[1:]), "throughput_rps": round(rps, 1),
                         "p50_ms": round(p50, 4)})  # fmt: skip
    loss = {}
    for concurrency in (1, 16):
        off, on = (
            next(r for r in rows if r["metrics"] == m and r["concurrency"] == concurrency) for m in ("off", "on")
        )
        loss[f"c{concurrency}_throughput_loss"] = round(1 - on["throughput_rps"] / off["throughput_rps"], 4)
        loss[f"c{concurrency}_p50_increase"] = round(on["p50_ms"] / off["p50_ms"] - 1, 4)
    worst = max(loss.values())
    met = worst <= TARGET_LOSS
    table(
        f"{MODEL}, batch 1, medians of {args.rounds} rounds",
        rows,
        ["metrics", "concurrency", "throughput_rps", "p50_ms"],
    )
    console.print(
        f"cost of metrics on: {loss} -> {'[green]meets[/green]' if met else '[red]misses[/red]'} "
        f"the target of at most {TARGET_LOSS:.0%}"
    )
    write_results(
        "metrics_overhead",
        {
            "model": MODEL,
            "rows": rows,
            "runs": runs,
            "loss": loss,
            "target_loss": TARGET_LOSS,
            "meets_target": met,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main_guard(main)
