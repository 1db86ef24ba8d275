"""Route each request to a worker thread of its model version and hand the result back to the
event loop, so inference never blocks the loop and a slow model never blocks a fast one."""

from __future__ import annotations

import asyncio
import queue
import threading
from time import perf_counter_ns
from typing import Any

import numpy as np

from bedside.errors import InferenceFailed, NotFound
from bedside.monitoring.latency import ModelStats
from bedside.protocol.types import InferRequest
from bedside.runtime.session import OnnxModel
from bedside.runtime.signature import Signature

_STOP = None


class ModelQueue:
    """The queue and worker threads (one per configured instance) of one model version."""

    def __init__(self, model: OnnxModel, stats: ModelStats) -> None:
        self.model = model
        self.stats = stats
        self.signature = Signature(model.config)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"bedside-{model.name}-v{model.version}-{i}", daemon=True)
            for i in range(model.config.instances)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, request: InferRequest) -> asyncio.Future[dict[str, np.ndarray]]:
        names = request.output_names()
        rows = self.signature.check(request.inputs, names)
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self._jobs.put((request.inputs, names, rows, future, perf_counter_ns()))
        return future

    def _work(self) -> None:
        model, stats, jobs = self.model, self.stats, self._jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            inputs, names, rows, future, queued_at = job
            started = perf_counter_ns()
            try:
                outputs = model.run(inputs, names)
            except Exception as exc:  # a model raising on odd values must not kill the worker
                stats.failures += 1
                error = InferenceFailed(f"model {model.name!r} v{model.version} failed: {exc}")
                future.get_loop().call_soon_threadsafe(_settle_error, future, error)
                continue
            done = perf_counter_ns()
            stats.queue.record(started - queued_at)
            stats.compute.record(done - started)
            stats.request.record(done - queued_at)
            stats.inferences += rows
            stats.executions += 1
            future.get_loop().call_soon_threadsafe(_settle, future, outputs)

    def close(self) -> None:
        """Let queued work finish, then stop the workers (they exit on the sentinel, in order)."""
        for _ in self._workers:
            self._jobs.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        for worker in self._workers:
            worker.join(timeout)


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # the caller may have gone away
        future.set_result(value)


def _settle_error(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class Scheduler:
    def __init__(self) -> None:
        self._queues: dict[tuple[str, int], ModelQueue] = {}
        self._latest: dict[str, ModelQueue] = {}
        self._lock = threading.Lock()

    def attach(self, model: OnnxModel, stats: ModelStats) -> None:
        new = ModelQueue(model, stats)
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

    def _refresh_latest(self, name: str) -> None:
        versions = [v for (n, v) in self._queues if n == name]
        if versions:
            self._latest[name] = self._queues[(name, max(versions))]
        else:
            self._latest.pop(name, None)

    def lookup(self, name: str, version: int | None) -> ModelQueue:
        found = self._latest.get(name) if version is None else self._queues.get((name, version))
        if found is None:
            raise NotFound(f"model {name!r} version {version or 'latest'} is not being served")
        return found

    def submit(self, name: str, version: int | None, request: InferRequest) -> asyncio.Future[dict[str, np.ndarray]]:
        return self.lookup(name, version).submit(request)

    def close(self) -> None:
        with self._lock:
            queues = list(self._queues.values())
            self._queues.clear()
            self._latest.clear()
        for q in queues:
            q.close()
        for q in queues:
            q.join(timeout=5)
