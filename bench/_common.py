"""Shared bench plumbing: percentiles, a lean keep-alive HTTP client, a server process, output."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
console = Console()


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "n": len(ms),
        "p50_ms": round(float(p50), 4),
        "p95_ms": round(float(p95), 4),
        "p99_ms": round(float(p99), 4),
        "max_ms": round(float(ms.max()), 4),
        "throughput_rps": round(len(ms) / wall_s, 1),
    }


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _response_complete(buf: bytes) -> int:
    """Length of the first complete response in buf, or 0 if it is not all there yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].lower()
    start = head.find(b"content-length:")
    length = int(head[start + 15 : head.find(b"\r\n", start) if head.find(b"\r\n", start) > 0 else None])
    total = end + 4 + length
    return total if len(buf) >= total else 0


def _status(buf: bytes) -> int:
    return int(buf[9:12])


class BlockingClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        buf = b""
        while True:
            buf += self.sock.recv(65536)
            n = _response_complete(buf)
            if n:
                if _status(buf) != 200:
                    raise RuntimeError(buf[:n].decode(errors="replace"))
                return buf[:n]


class Outcome:
    __slots__ = ("latency", "retry_after", "status", "well_formed_error")

    def __init__(self, latency: float, status: int, retry_after: bool, well_formed_error: bool) -> None:
        self.latency = latency
        self.status = status
        self.retry_after = retry_after
        self.well_formed_error = well_formed_error


def _outcome(latency: float, response: bytes) -> Outcome:
    status = _status(response)
    if status == 200:
        return Outcome(latency, status, False, True)
    head, _, body = response.partition(b"\r\n\r\n")
    try:
        well_formed = bool(json.loads(body).get("error"))
    except ValueError:
        well_formed = False
    return Outcome(latency, status, b"\r\nretry-after:" in head.lower(), well_formed)


async def _connection(port: int, request: bytes, stop: float, out: list[Outcome], pace: float = 0.0) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    next_send = time.perf_counter()
    while time.perf_counter() < stop:
        if pace:
            delay = next_send - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing an open-loop probe, not waiting for a result
            next_send += pace
        t0 = time.perf_counter()
        writer.write(request)
        buf = b""
        while not (n := _response_complete(buf)):
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError("server closed the connection")
            buf += chunk
        out.append(_outcome(time.perf_counter() - t0, buf[:n]))
    writer.close()


def run_loads(port: int, loads: list[tuple[bytes, int, float]], seconds: float) -> tuple[list[list[Outcome]], float]:
    """Run several loads at once; each is (request, connections, pace in s: 0 = closed loop)."""

    async def main() -> tuple[list[list[Outcome]], float]:
        results: list[list[Outcome]] = [[] for _ in loads]
        start = time.perf_counter()
        stop = start + seconds
        await asyncio.gather(
            *(
                _connection(port, req, stop, results[i], pace)
                for i, (req, conns, pace) in enumerate(loads)
                for _ in range(conns)
            )
        )
        return results, time.perf_counter() - start

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


def closed_loop(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` connections, each sending its next request when the last one returns; all must succeed."""
    (outcomes,), wall = run_loads(port, [(request, concurrency, 0.0)], seconds)
    failed = [o.status for o in outcomes if o.status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, statuses {sorted(set(failed))}")
    return [o.latency for o in outcomes], wall


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(repo: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bedside",
            "serve",
            "-r",
            str(repo),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *(extra if "--mllp-port" in extra else (*extra, "--mllp-port", "-1")),
            *(() if "--grpc-port" in extra else ("--grpc-port", "-1")),  # side by side: no shared default port
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not become ready: {proc.stderr.read().decode() if proc.stderr else ''}")


def write_results(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*(str(row.get(c, "")) for c in columns))
    console.print(t)


def machine() -> dict[str, Any]:
    import platform

    import onnxruntime

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }
