"""STAT latency while hostile clients do their worst: decompression bombs, slow connections.

    python bench/hostile.py [--seconds 4] [--quick]

A STAT probe (one keep-alive client, `X-Bedside-Priority: 1`, the demo breast-mass model) runs
alone, then beside each attack:
  - gzip bombs: 8 clients each posting 64 KB of gzip that inflates to 63 MiB of JSON numbers;
  - slowloris: 1,500 connections that send half a request line and stop.
For each: the probe's p50/p99, its errors, the server's peak RSS, and what the attackers got.
Prints a table and writes bench/results/hostile.json (--quick: 1 s per scenario and a 2 s header
timeout, results in bench/results/quick/).
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

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    BlockingClient,
    console,
    demo_repo,
    http_request,
    machine,
    main_guard,
    parse_args,
    rss_mb,
    say,
    server,
    table,
    write_results,
)

# isort: split
import numpy as np
import orjson

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


def bomb_request() -> bytes:
    bomb = gzip.compress(b"[" + b"1.0," * (16 << 20) + b"1.0]", 9)  # 63 MiB of numbers
    return http_request(PATH, bomb, {"Content-Encoding": "gzip"})


def bombs(port: int, stop: threading.Event, outcomes: Counter[str], request: bytes) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request)
                outcomes[sock.recv(16)[9:12].decode() or "closed"] += 1
        except OSError as exc:
            outcomes[type(exc).__name__] += 1


def scenario(name: str, port: int, pid: int, seconds: float, attack: Any, *args: Any) -> dict[str, Any]:
    say(f"  {name}: STAT probe for {seconds:g} s...")
    peak = [rss_mb(pid)]
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    threads = [
        threading.Thread(target=attack, args=(port, stop, outcomes, *args), daemon=True)  # Ctrl-C: not waited for
        for _ in range(8 if attack else 0)
    ]
    try:
        for thread in threads:
            thread.start()
        result = probe(port, seconds, peak, pid)
    finally:
        stop.set()
    for thread in threads:
        thread.join()
    return {"scenario": name, **result, "peak_rss_mb": round(peak[0], 1), "attackers_got": dict(outcomes)}


def slowloris(port: int, pid: int, seconds: float, header_timeout: float, count: int = 1500) -> dict[str, Any]:
    wait = header_timeout + 5
    say(f"  {count} slow connections: opening them, STAT probe for {seconds:g} s, then up to {wait:g} s for the server")
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
    deadline = time.monotonic() + wait  # the server closes them after its header timeout
    outcomes: Counter[str] = Counter()
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            outcomes[sock.recv(16)[9:12].decode() or "closed"] += 1
        except OSError:
            outcomes[f"still open after {wait:g} s"] += 1
        sock.close()
    return {
        "scenario": f"{len(socks)} slow connections",
        **result,
        "peak_rss_mb": round(peak[0], 1),
        "attackers_got": dict(outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="STAT probe duration of each scenario")
    parser.add_argument(
        "--header-timeout", type=float, help="the server's server.header_timeout_s (default: its own, 10 s)"
    )
    args = parse_args(parser, seconds=1.0, header_timeout=2.0)
    extra = () if args.header_timeout is None else ("--set", f"server.header_timeout_s={args.header_timeout:g}")
    say(f"hostile: STAT latency under hostile clients, 3 scenarios of {args.seconds:g} s")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = demo_repo(Path(tmp) / "repo", MODEL)
        say("hostile: compressing the gzip bomb (64 KB that inflates to 63 MiB)...")
        bomb = bomb_request()
        with server(repo, *extra) as (proc, port):
            rows = [
                scenario("quiet", port, proc.pid, args.seconds, None),
                scenario("8 gzip bombs (64 KB -> 63 MiB)", port, proc.pid, args.seconds, bombs, bomb),
                slowloris(port, proc.pid, args.seconds, 10.0 if args.header_timeout is None else args.header_timeout),
            ]
    columns = ["scenario", "stat_requests", "stat_p50_ms", "stat_p99_ms", "stat_max_ms", "stat_errors", "peak_rss_mb"]
    table("STAT latency under hostile clients", rows, columns)
    for row in rows:
        console.print(f"{row['scenario']}: attackers got {row['attackers_got']}")
    write_results("hostile", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main_guard(main)
