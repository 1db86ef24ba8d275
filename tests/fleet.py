"""An update repository on a real loopback HTTP server, and boxes that update from it, for the
update tests and benchmarks: the publisher signs, `serve_repository` serves, agents verify."""

from __future__ import annotations

import dataclasses
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bedside.dataplane import Dataplane
from bedside.modelconfig.model import parse_config
from bedside.settings import DEFAULTS, UpdateSettings
from bedside.updates.agent import UpdateAgent
from bedside.updates.golden import make_golden
from bedside.updates.publisher import Publisher
from bedside.updates.reports import serve_repository
from bedside.updates.rollout import ModelRollout, RolloutPlan, parse_stages
from tests.models import SCALE_CONFIG, log_model, scale_model


def scale_bytes(tmp: Path, factor: float) -> bytes:
    return scale_model(tmp / f"scale-{factor}.onnx", factor=factor, weights=20_000).read_bytes()


def log_bytes(tmp: Path) -> bytes:
    return log_model(tmp / "log.onnx").read_bytes()


def golden_for(model: bytes, config: str = SCALE_CONFIG, **kw: Any) -> bytes:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parsed = parse_config(tomllib.loads(config), "scale", Path("."))
    return make_golden(lambda feed: dict(zip(names, session.run(None, feed), strict=True)), parsed, **kw)


class UpdateServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.publisher = Publisher(root / "repo", root / "keys")
        self.publisher.init()
        self.httpd = serve_repository(root / "repo", root / "reports", "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def trusted_root(self) -> Path:
        return self.root / "repo" / "metadata" / "1.root.json"

    def publish(self, name: str, model: bytes, golden: bytes | None = None, config: str = SCALE_CONFIG) -> int:
        files = {"model.onnx": model, "config.toml": config.encode(), "golden.json": golden or golden_for(model)}
        files["MODEL_CARD.md"] = f"# {name}\nSYNTHETIC test model.\n".encode()
        return self.publisher.add_version(name, files)

    def roll_out(self, name: str, version: int, stages: str = "100", urgent: bool = False, **kw: Any) -> None:
        plan = self.publisher.plan()
        plan.models[name] = ModelRollout(version, parse_stages(stages), urgent=urgent, **kw)
        self.publisher.set_plan(plan)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def update_server(root: Path) -> Iterator[UpdateServer]:
    server = UpdateServer(root)
    try:
        yield server
    finally:
        server.close()


def settings(server: UpdateServer, **values: Any) -> UpdateSettings:
    base = {"url": server.url, "root": str(server.trusted_root), "watch_s": 0.0, "poll_s": 1.0}
    return dataclasses.replace(DEFAULTS.updates, **{**base, **values})


@contextmanager
def box(root: Path, server: UpdateServer, clock: Any = None, **values: Any) -> Iterator[tuple[Dataplane, UpdateAgent]]:
    """A bedside dataplane on `root/models` with an update agent inside it, as `bedside serve` runs them."""
    repository = root / "models"
    repository.mkdir(parents=True, exist_ok=True)
    dataplane = Dataplane(repository)
    dataplane.start()
    extra = {"clock": clock} if clock is not None else {}
    agent = UpdateAgent(settings(server, **values), root / "state", repository, lifecycle=dataplane.lifecycle, **extra)
    try:
        yield dataplane, agent
    finally:
        dataplane.close()


__all__ = ["RolloutPlan", "box", "golden_for", "log_bytes", "scale_bytes", "update_server"]
