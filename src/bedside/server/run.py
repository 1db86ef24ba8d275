"""Start the server: one process, one event loop, worker threads per model (no process hop)."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from bedside.engine import Engine
from bedside.server.app import MAX_BODY_BYTES, App
from bedside.streams.service import Streams, StreamsConfig


def serve(
    repository: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: str = "info",
    streams: StreamsConfig | None = None,
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(repository)
    app = App(engine, max_body_bytes, Streams(engine, streams) if streams is not None else None)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # no per-request logging on the hot path
        log_level=log_level,
        timeout_keep_alive=30,
        ws_per_message_deflate=False,  # float32 ECG samples barely compress; deflate cost CPU on every chunk
    )
    uvicorn.Server(config).run()
