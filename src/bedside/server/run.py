"""Start the server: one process, one event loop for REST, gRPC and the streams, worker threads per
model (no process hop). Only the HL7 ingest runs in a child process (see streams.ingest)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import uvicorn

from bedside.dataplane import Dataplane
from bedside.server.rest import App
from bedside.settings import Settings
from bedside.streams.service import Streams

log = logging.getLogger("bedside.server")


class StartupError(Exception):
    """The server cannot start as configured (a port is taken, ...); the message says why."""


def _bind(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound here so a taken port is a clear start-up error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"HTTP: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(repository: Path, settings: Settings) -> None:
    server = settings.server
    logging.basicConfig(level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # not on Linux/macOS: the standard loop
        pass
    runner(_serve(repository, settings))


async def _serve(repository: Path, settings: Settings) -> None:
    server = settings.server
    dataplane = Dataplane(repository)
    streams = Streams(dataplane, settings) if settings.streams.enabled else None
    app = App(dataplane, server.max_body_mb << 20, streams)
    http = uvicorn.Server(
        uvicorn.Config(
            app,
            host=server.host,
            port=server.http_port,
            http="httptools",
            lifespan="off",  # started and stopped here, beside gRPC
            access_log=False,  # no per-request logging on the hot path
            log_level=server.log_level,
            timeout_keep_alive=int(server.keepalive_s),
            ws_max_size=settings.limits.max_ws_message_kb << 10,
            ws_per_message_deflate=False,  # float32 ECG samples barely compress; deflate cost CPU on every chunk
        )
    )
    grpc_server = None
    # Listen at once (liveness answers) and load models beside it (readiness waits for them).
    loading = asyncio.get_running_loop().run_in_executor(None, dataplane.start)
    try:
        if streams is not None:
            try:
                await streams.start()
            except OSError as exc:  # e.g. the MLLP port is taken: say so and do not start half a server
                raise StartupError(f"streams: {exc}") from None
        if server.grpc_port >= 0:
            from bedside.server.grpc import start_grpc_server

            try:
                grpc_server = await start_grpc_server(
                    dataplane, server.host, server.grpc_port, server.max_body_mb << 20
                )
            except OSError as exc:
                raise StartupError(f"gRPC: {exc}") from None
        await http.serve(sockets=[_bind(server.host, server.http_port)])
    finally:
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        if streams is not None:
            await streams.close()
        await loading
        dataplane.close()
