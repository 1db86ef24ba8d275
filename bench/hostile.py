"""STAT latency while hostile clients do their worst: decompression bombs, slow connections.

    python bench/hostile.py [--seconds 4]

A STAT probe (one keep-alive client, `X-Bedside-Priority: 1`, the demo breast-mass model) runs
alone, then beside each attack:
  - gzip bombs: 8 clients each posting 64 KB of gzip that inflates to 63 MiB of JSON numbers;
  - slowloris: 1,500 connections that send half a request line and stop.
For each: the probe's p50/p99, its errors, the server's peak RSS, and what the attackers got.
Prints a table and writes bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import gzip
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))
from _common import BlockingClient, console, http_request, machine, rss_mb, start_server, table, write_results
from bedside.models.demo import build_demo

MODEL = "breast_mass_malignancy"
PATH = f"/v2/models/{MODEL}/infer"


def probe(port: int, seconds: float, peak: list[float], pid: int) -> dict[str, Any]:
    x = np.random.default_rng(0).normal(size=(1, 30)).astype(np.float32)
    body = orjson.dumps(
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel()}]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    request = http_request(PATH, body, {"X-Bedside-Priority": "1"})
    client = BlockingClient(port)
    latencies, errors = [], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        try:
            client.call(request)
        except RuntimeError:  # an answer other than 200
            errors += 1
        except OSError:
            errors += 1
            client = BlockingClient(port)
            continue
        latencies.append(time.perf_counter() - started)
        peak[0] = max(peak[0], rss_mb(pid))
    ms = np.asarray(latencies) * 1e3
    return {
        "stat_requests": len(ms),
        "stat_p50_ms": round(float(np.percentile(ms, 50)), 3) if len(ms) else None,
        "stat_p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else None,
        "stat_max_ms": round(float(ms.max()), 3) if len(ms) else None,
        "stat_errors": errors,
    }


def bombs(port: int, stop: threading.Event, outcomes: Counter[str]) -> None:
    bomb = gzip.compress(b"[" + b"1.0," * (16 << 20) + b"1.0]", 9)  # 63 MiB of numbers
    request = http_request(PATH, bomb, {"Content-Encoding": "gzip"})
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request)
                outcomes[sock.recv(16)[9:12].decode() or "closed"] += 1
        except OSError as exc:
            outcomes[type(exc).__name__] += 1


def scenario(name: str, port: int, pid: int, seconds: float, attack: Any) -> dict[str, Any]:
    peak = [rss_mb(pid)]
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    threads = [threading.Thread(target=attack, args=(port, stop, outcomes)) for _ in range(8 if attack else 0)]
    for thread in threads:
        thread.start()
    result = probe(port, seconds, peak, pid)
    stop.set()
    for thread in threads:
        thread.join()
    return {"scenario": name, **result, "peak_rss_mb": round(peak[0], 1), "attackers_got": dict(outcomes)}


def slowloris(port: int, pid: int, seconds: float, count: int = 1500) -> dict[str, Any]:
    socks = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /v2 HTTP/1.1\r\n")
            socks.append(sock)
        except OSError:
            break
    peak = [rss_mb(pid)]
    result = probe(port, seconds, peak, pid)
    deadline = time.monotonic() + 15  # the header timeout is 10 s
    outcomes: Counter[str] = Counter()
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            outcomes[sock.recv(16)[9:12].decode() or "closed"] += 1
        except OSError:
            outcomes["still open after 15 s"] += 1
        sock.close()
    return {
        "scenario": f"{len(socks)} slow connections",
        **result,
        "peak_rss_mb": round(peak[0], 1),
        "attackers_got": dict(outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_demo(Path(tmp) / "repo", ecg=False)
        proc, port = start_server(repo)
        try:
            rows = [
                scenario("quiet", port, proc.pid, args.seconds, None),
                scenario("8 gzip bombs (64 KB -> 63 MiB)", port, proc.pid, args.seconds, bombs),
                slowloris(port, proc.pid, args.seconds),
            ]
        finally:
            proc.terminate()
            proc.wait(10)
    columns = ["scenario", "stat_requests", "stat_p50_ms", "stat_p99_ms", "stat_max_ms", "stat_errors", "peak_rss_mb"]
    table("STAT latency under hostile clients", rows, columns)
    for row in rows:
        console.print(f"{row['scenario']}: attackers got {row['attackers_got']}")
    console.print(f"written to {write_results('hostile', {'machine': machine(), 'rows': rows})}")


if __name__ == "__main__":
    main()
