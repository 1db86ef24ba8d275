from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bedside.models.demo import build_demo
from bedside.tools.client import Client
from tests.models import SCALE_CONFIG, all_types_model, scale_model, write_config


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo") / "repo", ecg=False)  # ECG wiring uses a small model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serving_repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models plus good and deliberately broken ones."""
    root = tmp_path_factory.mktemp("serving")
    for child in demo_repo.iterdir():
        if child.is_dir():
            shutil.copytree(child, root / child.name)
    write_config(root / "scale", SCALE_CONFIG)
    scale_model(root / "scale" / "1" / "model.onnx", factor=2.0)
    scale_model(root / "scale" / "2" / "model.onnx", factor=3.0)
    all_types_model(root / "all_types" / "1" / "model.onnx")  # no config: inferred
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf graph")
    write_config(
        root / "mismatch",
        SCALE_CONFIG.replace(
            'datatype = "FP32"\nshape = [4]\n[[outputs]]', 'datatype = "FP64"\nshape = [4]\n[[outputs]]'
        ),
    )
    scale_model(root / "mismatch" / "1" / "model.onnx")
    (root / "missing_file" / "1").mkdir(parents=True)
    return root


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def client(self) -> Client:
        return Client(self.url)


def start_server(repo: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    if "--mllp-port" not in extra:
        extra = (*extra, "--mllp-port", "-1")  # tests run side by side: no shared default port
    if "--grpc-port" not in extra:
        extra = (*extra, "--grpc-port", "-1")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    # each server its own journal and key: tests must not restore each other's beds
    env.setdefault("BEDSIDE_STREAMS_STATE_DIR", str(log.parent / f"state-{port}"))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bedside",
                "serve",
                "--repository",
                str(repo),
                "--port",
                str(port),
                "--log-level",
                "warning",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            client = server.client()
            client.request("GET", "/v2/health/ready")
            client.close()
            return server
        except Exception:
            time.sleep(0.05)  # polling for readiness, not waiting for a result
    process.kill()
    raise RuntimeError(f"server not ready within 60 s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server(serving_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(serving_repo, tmp_path_factory.mktemp("log") / "server.log", "--max-body-mb", "1")
    yield srv
    srv.process.terminate()
    try:
        srv.process.wait(10)
    except subprocess.TimeoutExpired:
        srv.process.kill()
    assert srv.process.returncode is not None


@pytest.fixture
def serving_factory(tmp_path_factory: pytest.TempPathFactory):
    """Start a server on a repository a test has just built; stopped when the test ends."""
    started: list[Server] = []

    def start(repo: Path) -> Server:
        srv = start_server(repo, tmp_path_factory.mktemp("log") / "server.log")
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.process.terminate()
        srv.process.wait(10)
