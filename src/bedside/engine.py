"""The engine: the repository, the scheduler and the runtime wired together. The server talks only
to this; an inference goes server -> scheduler -> runtime and back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bedside import __version__
from bedside.errors import NotFound, Retired, Unavailable
from bedside.protocol.types import InferRequest, InferResponse
from bedside.repository.manager import ModelEntry, RepositoryManager, State
from bedside.repository.store import ModelStore
from bedside.scheduler.scheduler import ModelQueue, Scheduler

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "model_configuration"]


def parse_version(version: str | None) -> int | None:
    if version is None or version == "":
        return None
    if not version.isdigit() or int(version) < 1:
        raise NotFound(f"version {version!r} is not a positive integer")
    return int(version)


class Engine:
    def __init__(self, repository: Path) -> None:
        self.scheduler = Scheduler()
        self.manager = RepositoryManager(ModelStore(repository), self.scheduler.attach, self.scheduler.detach)
        self.started = False

    def start(self) -> None:
        self.manager.load_all()
        self.started = True

    def close(self) -> None:
        self.scheduler.close()

    # --- inference: the hot path ---------------------------------------------------------

    def route(self, name: str, version: str | None) -> ModelQueue:
        """The queue that serves this model version; resolved before the body is even decoded."""
        number = parse_version(version)
        try:
            return self.scheduler.lookup(name, number)
        except NotFound:
            self._explain_missing(name, number)
            raise

    async def infer(self, queue: ModelQueue, request: InferRequest, version: str | None = None) -> InferResponse:
        try:
            future = queue.submit(request)
        except Retired:
            # reloaded while this request's body was read: the new queue (or a clear error) takes it
            queue = self.route(queue.model.name, version)
            future = queue.submit(request)
        outputs = await future
        return InferResponse(queue.model.name, str(queue.model.version), outputs, request.id)

    def _explain_missing(self, name: str, version: int | None) -> None:
        entry = self.manager.entry(name)  # raises NotFound for a model not in the repository
        if version is not None and version not in entry.versions:
            raise NotFound(f"model {name!r} has no version {version} loaded; it serves {entry.ready_versions()}")
        status = entry.versions.get(version) if version is not None else None
        reason = (status.reason if status else "") or entry.reason or entry.state.value.lower()
        raise Unavailable(f"model {name!r} is not ready: {reason}")

    # --- metadata and control ----------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "bedside", "version": __version__, "extensions": EXTENSIONS}

    def _ready_entry(self, name: str, version: int | None) -> tuple[ModelEntry, int]:
        entry = self.manager.entry(name)
        if version is not None and version not in entry.versions:
            raise NotFound(f"model {name!r} has no version {version}")
        ready = entry.ready_versions()
        if version is None:
            if not ready:
                raise Unavailable(f"model {name!r} is not ready: {entry.reason or entry.state.value.lower()}")
            return entry, ready[-1]
        return entry, version

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        entry, number = self._ready_entry(name, parse_version(version))
        config = entry.config
        if config is None:
            raise Unavailable(f"model {name!r} is not ready: {entry.reason}")
        return {
            "name": name,
            "versions": [str(v) for v in entry.ready_versions()] if version is None else [str(number)],
            "platform": config.platform,
            "inputs": [dict(s.to_dict(), shape=list(config.full_shape(s))) for s in config.inputs],
            "outputs": [dict(s.to_dict(), shape=list(config.full_shape(s))) for s in config.outputs],
        }

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        entry, _ = self._ready_entry(name, parse_version(version))
        assert entry.config is not None
        return entry.config.to_dict()

    def model_ready(self, name: str, version: str | None) -> bool:
        entry = self.manager.entry(name)
        number = parse_version(version)
        if number is None:
            return bool(entry.ready_versions())
        if number not in entry.versions:
            raise NotFound(f"model {name!r} has no version {number}")
        return entry.versions[number].state is State.READY

    def index(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for entry in self.manager.entries():
            if not entry.versions:
                rows.append({"name": entry.name, "state": entry.state.value, "reason": entry.reason})
            for version, status in sorted(entry.versions.items()):
                row: dict[str, Any] = {
                    "name": entry.name,
                    "version": str(version),
                    "state": status.state.value,
                    "reason": status.reason,
                }
                if status.model is not None:
                    row["provider"] = status.model.provider
                rows.append(row)
        return rows

    async def load(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.manager.load, name)

    async def unload(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.manager.unload, name)

    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        number = parse_version(version)
        entries = [self.manager.entry(name)] if name else self.manager.entries()
        rows = []
        for entry in entries:
            for v, status in sorted(entry.versions.items()):
                if number is not None and v != number:
                    continue
                row = {"name": entry.name, "version": str(v), "state": status.state.value, **status.stats.to_dict()}
                row["queue_depth"] = self.scheduler.depth(entry.name, v) or {}
                rows.append(row)
        return {"model_stats": rows}
