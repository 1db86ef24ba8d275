"""The cost of security: audit log, bearer-token authentication and TLS, REST and gRPC, demo model, batch 1.

    python bench/security.py [--seconds 5] [--quick]

Prints a table and writes bench/results/security.json (--quick: 0.5 s per row, results in
bench/results/quick/). One server start per configuration, in this order: off (audit off, no
auth, no TLS), audit only, auth + audit, TLS + auth + audit, and off again, so that drift over
the run shows as the difference between the two off rows; each configuration is compared with
their mean. Every configuration is measured the same way: REST with binary tensors and gRPC with
a pre-serialized request (bytes in, bytes out, as in grpc_latency.py), at concurrency 1 (one
keep-alive connection / one channel) and 16 (16 connections / 16 tasks on one channel), with the
server's own CPU per request. Every request carries the same bearer token, in every configuration,
so the bytes on the wire differ only by TLS and the difference is the server's work. Connections
(and TLS handshakes) are made and warmed up before the clock starts.

Before measuring, the script checks that authentication is really on (a request without the token
gets 401 over REST and UNAUTHENTICATED over gRPC) and, after each server stops, that the audit log
was really written (its SQLite file holds entries) or, with audit off, not written at all.

Target (the issue): auth + audit cost at most 10 % of the throughput (each transport, c=1 and
c=16) and add at most 0.1 ms to the p50 at concurrency 1 (at c=16 the p50 is mostly queueing, so
it follows the throughput); TLS is reported beside it, without a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sqlite3
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    NAME,
    BlockingClient,
    _response_complete,
    _status,
    console,
    demo_repo,
    exchange,
    free_port,
    http_request,
    machine,
    main_guard,
    parse_args,
    run_async,
    say,
    server,
    summarize,
    table,
    write_results,
)
from grpc_latency import INFER, MODEL, WARMUP, cpu_seconds, infer_message

# isort: split
import grpc
import numpy as np
import orjson

from bedside.protocol.types import DEFAULT_TENANT
from bedside.security.callers import CallerRegistry
from bedside.security.certs import make_ca, make_server

CONFIGS = ("off", "audit", "auth+audit", "tls+auth+audit", "off")  # the order they run in
TRANSPORTS = ("REST, binary tensors", "gRPC, raw contents")
TARGET_LOSS_PCT = 10.0
TARGET_ADDED_P50_MS = 0.1


# --- the server ---------------------------------------------------------------------------------


# --- REST: plain or TLS keep-alive clients ------------------------------------------------------


class TLSClient(BlockingClient):
    """BlockingClient over TLS: the same keep-alive loop, on an ssl-wrapped socket."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")


def rest_client(port: int, context: ssl.SSLContext | None) -> BlockingClient:
    return TLSClient(port, context) if context else BlockingClient(port)


def rest_status(port: int, request: bytes, context: ssl.SSLContext | None) -> int:
    """The status of one request on a fresh connection (any status, unlike BlockingClient.call)."""
    client = rest_client(port, context)
    try:
        client.sock.sendall(request)
        buf = b""
        while not _response_complete(buf):
            chunk = client.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            buf += chunk
        return _status(buf)
    finally:
        client.sock.close()


def rest_sequential(
    port: int, request: bytes, seconds: float, context: ssl.SSLContext | None, mark: Callable[[], None]
) -> dict[str, float]:
    client = rest_client(port, context)
    for _ in range(WARMUP):
        client.call(request)
    mark()
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        client.call(request)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    client.sock.close()
    return summarize(lat, wall)


def rest_concurrent(
    port: int,
    request: bytes,
    concurrency: int,
    seconds: float,
    warmup: float,
    context: ssl.SSLContext | None,
    mark: Callable[[], None],
) -> dict[str, float]:
    """_common.closed_loop, plain or over TLS, on connections opened (handshakes done) and warmed up
    for `warmup` s before the clock starts; every request must succeed."""

    async def main() -> dict[str, float]:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return reader, writer

        async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, until: float, out: list) -> None:
            while time.perf_counter() < until:
                out.append(await exchange(reader, writer, request))

        connections = await asyncio.gather(*(connect() for _ in range(concurrency)))
        warm: list = []
        until = time.perf_counter() + warmup
        await asyncio.gather(*(loop(r, w, until, warm) for r, w in connections))
        mark()
        outcomes: list = []
        start = time.perf_counter()
        await asyncio.gather(*(loop(r, w, start + seconds, outcomes) for r, w in connections))
        wall = time.perf_counter() - start
        for _, writer in connections:
            writer.close()
        failed = sorted({o.status for o in warm + outcomes if o.status != 200})
        if failed:
            raise RuntimeError(f"REST requests failed at c={concurrency}, statuses {failed}")
        return summarize([o.latency for o in outcomes], wall)

    return run_async(main())


# --- gRPC: insecure or TLS channels -------------------------------------------------------------


def grpc_sequential(
    target: str,
    request: bytes,
    seconds: float,
    credentials: grpc.ChannelCredentials | None,
    metadata: tuple[tuple[str, str], ...],
    mark: Callable[[], None],
) -> dict[str, float]:
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary(INFER)  # bytes in, bytes out: no (de)serialization in the loop
        for _ in range(WARMUP):
            call(request, metadata=metadata)
        mark()
        lat = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            call(request, metadata=metadata)
            lat.append(time.perf_counter() - t0)
        return summarize(lat, time.perf_counter() - start)


def grpc_concurrent(
    target: str,
    request: bytes,
    concurrency: int,
    seconds: float,
    warmup: float,
    credentials: grpc.ChannelCredentials | None,
    metadata: tuple[tuple[str, str], ...],
    mark: Callable[[], None],
) -> dict[str, float]:
    async def main() -> dict[str, float]:
        channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        async with channel:
            call = channel.unary_unary(INFER)

            async def worker(until: float, out: list[float]) -> None:
                while time.perf_counter() < until:
                    t0 = time.perf_counter()
                    await call(request, metadata=metadata)
                    out.append(time.perf_counter() - t0)

            warm: list[float] = []
            await asyncio.gather(*(worker(time.perf_counter() + warmup, warm) for _ in range(concurrency)))
            mark()
            lat: list[float] = []
            start = time.perf_counter()
            await asyncio.gather(*(worker(start + seconds, lat) for _ in range(concurrency)))
            return summarize(lat, time.perf_counter() - start)

    return run_async(main())


def grpc_refused(target: str, request: bytes, credentials: grpc.ChannelCredentials | None) -> str:
    """The status code name of one gRPC call without the token ("OK" if it was let through)."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            channel.unary_unary(INFER)(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


# --- one configuration --------------------------------------------------------------------------


def measured(pid: int, config: str, case: str, concurrency: int, seconds: float, warmup: float, run: Callable) -> dict:
    """One row with the server's CPU per request, counted from `mark` (called by `run` once its
    connections are open and warm) to the end of the measurement."""
    say(f"  {case}, c={concurrency}: {f'{warmup:g} s warm-up + ' if concurrency > 1 else ''}{seconds:g} s...")
    before: list[float] = []
    row = run(lambda: before.append(cpu_seconds(pid)))
    used = cpu_seconds(pid) - before[0]
    return {
        "config": config,
        "case": case,
        "concurrency": concurrency,
        **row,
        "server_cpu_us_per_req": round(used / row["n"] * 1e6, 1),
    }


def audit_entries(path: Path) -> int | None:
    """Entries in an audit log, or None when there is no such file."""
    if not path.is_file():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]


def run_config(
    config: str,
    index: int,
    tmp: Path,
    repo: Path,
    requests: dict[str, bytes],
    token: str,
    seconds: float,
    warmup: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start a server for `config`, check what it must refuse, measure the four rows, stop it and
    check its audit log. Returns the rows and the checks."""
    say(f"{NAME}: configuration {index + 1}/{len(CONFIGS)}: {config}")
    state = tmp / f"state-{index}"  # its own state dir: nothing carried over from an earlier start
    audit_file = tmp / f"audit-{index}.sqlite"
    extra = ["--grpc-port", str(grpc_port := free_port()), "--set", f"streams.state_dir={state}"]
    audited, auth, tls = config != "off", "auth" in config, config.startswith("tls")
    extra += ["--set", f"security.audit_file={audit_file}"] if audited else ["--set", "security.audit=false"]
    if auth:
        extra += ["--auth", "--set", f"security.callers_file={tmp / 'callers.json'}"]
    context = credentials = None
    if tls:
        extra += ["--tls-cert", str(tmp / "server.pem"), "--tls-key", str(tmp / "server.key")]
        context = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        credentials = grpc.ssl_channel_credentials((tmp / "ca.pem").read_bytes())
    target = f"127.0.0.1:{grpc_port}"
    metadata = (("authorization", f"Bearer {token}"),)
    rest, grpc_req = requests["rest"], requests["grpc"]
    checks: dict[str, Any] = {"config": config}
    rows = []
    with server(repo, *extra, tls=context) as (proc, port):
        if auth:  # really on: no token, no answer
            rest_code = rest_status(port, requests["rest_no_token"], context)
            grpc_code = grpc_refused(target, grpc_req, credentials)
            checks["no_token"] = {"rest": rest_code, "grpc": grpc_code}
            if rest_code != 401 or grpc_code != "UNAUTHENTICATED":
                raise RuntimeError(
                    f"{config}: a request without the token got REST {rest_code} and gRPC {grpc_code}, "
                    "not 401 and UNAUTHENTICATED: authentication is not on"
                )
            say(f"  authentication is on: without the token REST {rest_code}, gRPC {grpc_code}")
        pid = proc.pid
        rest_case, grpc_case = TRANSPORTS
        rows.append(
            measured(
                pid, config, rest_case, 1, seconds, warmup, lambda m: rest_sequential(port, rest, seconds, context, m)
            )
        )
        rows.append(
            measured(
                pid,
                config,
                grpc_case,
                1,
                seconds,
                warmup,
                lambda m: grpc_sequential(target, grpc_req, seconds, credentials, metadata, m),
            )
        )
        rows.append(
            measured(
                pid,
                config,
                rest_case,
                16,
                seconds,
                warmup,
                lambda m: rest_concurrent(port, rest, 16, seconds, warmup, context, m),
            )
        )
        rows.append(
            measured(
                pid,
                config,
                grpc_case,
                16,
                seconds,
                warmup,
                lambda m: grpc_concurrent(target, grpc_req, 16, seconds, warmup, credentials, metadata, m),
            )
        )
    # after the stop: the server has flushed what it held in memory
    measured_requests = sum(r["n"] for r in rows)
    entries = audit_entries(audit_file if audited else state / "audit.sqlite")
    checks.update(audit_entries=entries, measured_requests=measured_requests)
    if audited and not entries:
        raise RuntimeError(f"{config}: the audit log {audit_file} {'has no entries' if entries == 0 else 'is missing'}")
    if audited and entries < measured_requests:
        say(f"  [!] the audit log holds {entries} entries, fewer than the {measured_requests} requests measured")
    if not audited and entries is not None:
        raise RuntimeError(f"{config}: audit is off, yet the server wrote an audit log ({entries} entries)")
    say(
        f"  audit log: {entries} entries (>= {measured_requests} requests measured)"
        if audited
        else "  audit log: none written (audit off)"
    )
    return rows, checks


# --- the comparison -----------------------------------------------------------------------------


def compare(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each configuration against the mean of the two off rows, per transport and concurrency; and
    the drift between the two off rows."""
    comparisons, drift = [], []
    for case in TRANSPORTS:
        for concurrency in (1, 16):
            same = [r for r in rows if r["case"] == case and r["concurrency"] == concurrency]
            offs = [r for r in same if r["config"] == "off"]
            base = {k: float(np.mean([r[k] for r in offs])) for k in ("throughput_rps", "p50_ms", "p99_ms")}
            base["server_cpu_us_per_req"] = float(np.mean([r["server_cpu_us_per_req"] for r in offs]))
            first, second = offs
            drift.append(
                {
                    "case": case,
                    "concurrency": concurrency,
                    "throughput_change_pct": round((second["throughput_rps"] / first["throughput_rps"] - 1) * 100, 1),
                    "p50_change_ms": round(second["p50_ms"] - first["p50_ms"], 4),
                }
            )
            for r in same:
                if r["config"] == "off":
                    continue
                comparisons.append(
                    {
                        "case": case,
                        "concurrency": concurrency,
                        "config": r["config"],
                        "throughput_loss_pct": round((1 - r["throughput_rps"] / base["throughput_rps"]) * 100, 1),
                        "added_p50_ms": round(r["p50_ms"] - base["p50_ms"], 4),
                        "added_p99_ms": round(r["p99_ms"] - base["p99_ms"], 4),
                        "added_server_cpu_us": round(r["server_cpu_us_per_req"] - base["server_cpu_us_per_req"], 1),
                    }
                )
    return comparisons, drift


def judged(comparison: dict[str, Any]) -> bool:
    ok = comparison["throughput_loss_pct"] <= TARGET_LOSS_PCT
    if comparison["concurrency"] == 1:
        ok = ok and comparison["added_p50_ms"] <= TARGET_ADDED_P50_MS
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    args = parse_args(parser, seconds=0.5)
    seconds = args.seconds
    warmup = min(1.0, seconds)  # at c=16, on the same connections, before the clock starts
    say(
        f"{NAME}: off / audit / auth+audit / TLS+auth+audit / off, REST and gRPC at c=1 and 16, {MODEL}, "
        f"batch 1, {len(CONFIGS) * 4} rows of {seconds:g} s"
    )

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
    path, body = f"/v2/models/{MODEL}/infer", header + x.tobytes()
    binary = {"Inference-Header-Content-Length": str(len(header))}

    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as name:
        tmp = Path(name)
        repo = demo_repo(tmp / "repo", MODEL)
        say(f"{NAME}: a CA, a server certificate and a caller with a bearer token...")
        ca = make_ca()
        ca.write(tmp / "ca.pem", tmp / "ca.key")
        make_server(ca, []).write(tmp / "server.pem", tmp / "server.key")
        registry = CallerRegistry(tmp / "callers.json")
        registry.upsert("bench", DEFAULT_TENANT, ["infer"], [])  # the tenant that owns a model without [access]
        _, token = registry.issue_token("bench")
        registry.save()
        requests = {
            "rest": http_request(path, body, {**binary, "Authorization": f"Bearer {token}"}),
            "rest_no_token": http_request(path, body, binary),
            "grpc": infer_message(x),
        }
        for index, config in enumerate(CONFIGS):
            found, checked = run_config(config, index, tmp, repo, requests, token, seconds, warmup)
            for row in found:
                row["pass"] = 2 if config == "off" and index > 0 else 1
            rows += found
            checks.append(checked)

    shown_rows = [
        {**r, "config": f"{r['config']} (pass {r['pass']})" if r["config"] == "off" else r["config"]} for r in rows
    ]
    table(
        f"{MODEL}, batch 1, {seconds:g} s per row, one server start per configuration",
        shown_rows,
        ["config", "case", "concurrency", "n", "p50_ms", "p99_ms", "throughput_rps", "server_cpu_us_per_req"],
    )
    comparisons, drift = compare(rows)
    for c in comparisons:
        c["meets_target"] = judged(c) if c["config"] == "auth+audit" else None
    table(
        "against off (the mean of its two passes)",
        [{**c, "meets_target": {True: "yes", False: "NO", None: "-"}[c["meets_target"]]} for c in comparisons],
        [
            "case",
            "concurrency",
            "config",
            "throughput_loss_pct",
            "added_p50_ms",
            "added_p99_ms",
            "added_server_cpu_us",
            "meets_target",
        ],
    )
    table(
        "drift: off, second pass vs first",
        drift,
        ["case", "concurrency", "throughput_change_pct", "p50_change_ms"],
    )
    targets = {
        "config": "auth+audit",
        "throughput_loss_pct_max": TARGET_LOSS_PCT,
        "added_p50_ms_max": TARGET_ADDED_P50_MS,
        "added_p50_judged_at_concurrency": [1],
        "baseline": "off: security.audit=false, no --auth, no TLS; the mean of its two passes",
    }
    passed = all(c["meets_target"] for c in comparisons if c["config"] == "auth+audit")
    console.print(
        f"auth + audit against off: {'[green]meets[/green]' if passed else '[red]misses[/red]'} the target "
        f"(throughput loss <= {TARGET_LOSS_PCT:g} %, added p50 at c=1 <= {TARGET_ADDED_P50_MS:g} ms); "
        "TLS is reported beside it, without a target"
        + (" (a smoke run: rows too short to judge by)" if args.quick else "")
    )
    write_results(
        "security",
        {
            "model": MODEL,
            "batch": 1,
            "seconds": seconds,
            "order": list(CONFIGS),
            "rows": rows,
            "comparisons": comparisons,
            "off_drift": drift,
            "checks": checks,
            "targets": targets,
            "meets_target": passed,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main_guard(main)
