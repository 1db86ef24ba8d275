"""Route each request to the queue of its model version (when no version is named: the pinned one,
else the newest ready one). Attach and detach happen on load and unload; detaching lets queued work
finish. A pin is how an update switches traffic: one dict assignment, between two requests."""

from __future__ import annotations

import threading

from bedside.monitoring.latency import ModelStats
from bedside.runtime.session import OnnxModel
from bedside.scheduler.worker import ModelQueue
from bedside.settings import DEFAULTS


class Scheduler:
    def __init__(self, max_tenants: int = DEFAULTS.limits.max_tenants) -> None:
        self.max_tenants = max_tenants
        self._queues: dict[tuple[str, int], ModelQueue] = {}
        self._latest: dict[str, ModelQueue] = {}
        self._pins: dict[str, int] = {}  # model -> the version that answers unversioned requests
        self._lock = threading.Lock()

    def attach(self, model: OnnxModel, stats: ModelStats) -> None:
        new = ModelQueue(model, stats, max_tenants=self.max_tenants)
        with self._lock:
            old = self._queues.get((model.name, model.version))
            self._queues[(model.name, model.version)] = new
            self._refresh_latest(model.name)
        if old is not None:
            old.close()

    def detach(self, name: str, version: int) -> None:
        with self._lock:
            old = self._queues.pop((name, version), None)
            self._refresh_latest(name)
        if old is not None:
            old.close()

    def pin(self, name: str, version: int | None) -> None:
        """Send requests that name no version to `version` (None: to the newest again)."""
        with self._lock:
            if version is None:
                self._pins.pop(name, None)
            else:
                self._pins[name] = version
            self._refresh_latest(name)

    def _refresh_latest(self, name: str) -> None:
        versions = [v for (n, v) in self._queues if n == name]
        pinned = self._pins.get(name)
        if pinned in versions:
            self._latest[name] = self._queues[(name, pinned)]
        elif versions:
            self._latest[name] = self._queues[(name, max(versions))]
        else:
            self._latest.pop(name, None)

    def find(self, name: str, version: int | None) -> ModelQueue | None:
        """The queue serving this model version (the newest when None), or None."""
        return self._latest.get(name) if version is None else self._queues.get((name, version))

    def depth(self, name: str, version: int) -> dict[str, int] | None:
        found = self._queues.get((name, version))
        return None if found is None else found.depth()

    def close(self) -> None:
        with self._lock:
            queues = list(self._queues.values())
            self._queues.clear()
            self._latest.clear()
        for q in queues:
            q.close()
        for q in queues:
            q.join(timeout=5)
