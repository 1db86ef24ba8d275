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


def closed_loop(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` connections, each sending its next request when the last one returns."""

    async def worker(lat: list[float], stop: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            buf = b""
            while not (n := _response_complete(buf)):
                chunk = await reader.read(65536)
                if not chunk:
                    raise RuntimeError("server closed the connection")
                buf += chunk
            if _status(buf) != 200:
                raise RuntimeError(buf[:n].decode(errors="replace"))
            lat.append(time.perf_counter() - t0)
        writer.close()

    async def main() -> tuple[list[float], float]:
        lat: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*(worker(lat, start + seconds) for _ in range(concurrency)))
        return lat, time.perf_counter() - start

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
            *extra,
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
