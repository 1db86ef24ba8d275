"""The worker threads of one model version around its request queue.

The event loop only admits a request (a lock, a few compares, a notify); batching, inference and
splitting run on the model's own threads, one per configured instance, and each result goes back
to the loop with call_soon_threadsafe. ONNX Runtime releases the GIL while it computes, so models
run in parallel with each other and with the HTTP layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

import numpy as np

from bedside.errors import BedsideError, DeadlineExceeded, InferenceFailed, NonFiniteOutput, Overloaded, Retired
from bedside.monitoring.latency import ModelStats
from bedside.protocol.cache import ResponseCache
from bedside.protocol.types import WARMUP_TENANT, CallContext, InferRequest
from bedside.runtime.session import OnnxModel
from bedside.runtime.signature import Signature
from bedside.scheduler.batching import batch_key, merge, split
from bedside.scheduler.queue import Job, RequestQueue, retry_after
from bedside.settings import DEFAULTS

Clock = Callable[[], int]
log = logging.getLogger("bedside.scheduler")


class ModelQueue:
    def __init__(
        self,
        model: OnnxModel,
        stats: ModelStats,
        clock: Clock = perf_counter_ns,
        max_tenants: int = DEFAULTS.limits.max_tenants,
    ) -> None:
        self.model = model
        self.version_text = str(model.version)
        # every answer of a version trained on synthetic data or not at all says so (read-only, shared)
        self.answer_parameters = None if model.provenance == "trained" else {"provenance": model.provenance}
        self.stats = stats
        spec = model.config.cache  # a reload makes a new queue, and so an empty cache
        self.cache = None if spec is None else ResponseCache(spec.max_entries, spec.max_bytes)
        self.signature = Signature(model.config)
        self.policy = model.config.scheduling
        self.queue = RequestQueue(self.policy, model.config.max_batch_size, model.config.instances, max_tenants)
        self._clock = clock
        self._cond = threading.Condition()
        self._closing = False
        reserved = self.policy.reserved_instances
        self._notify_all = reserved > 0  # a STAT-only worker must not swallow the wake-up for routine work
        self._workers = [
            threading.Thread(
                target=self._work, args=(i < reserved,), name=f"bedside-{model.name}-v{model.version}-{i}", daemon=True
            )
            for i in range(model.config.instances)
        ]
        self._started = threading.Semaphore(0)
        for worker in self._workers:
            worker.start()
        for _ in self._workers:  # attached only once every worker has set itself up
            self._started.acquire(timeout=10)

    def submit(self, request: InferRequest, context: CallContext) -> asyncio.Future[dict[str, np.ndarray]]:
        names = request.output_names()
        rows = self.signature.check(request.inputs, names)
        tenant = context.tenant
        level = self.policy.level_of(context.priority, tenant)
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        key = batch_key(tenant, request.inputs, names)
        job = Job(request.inputs, names, rows, key, tenant, level, 0, future=future)
        with self._cond:
            if self._closing:
                raise Retired(f"model {self.model.name!r} v{self.model.version} is being unloaded")
            job.enqueued = self._clock()
            try:
                shed = self.queue.admit(job, job.enqueued, context.timeout_us)
            except BedsideError as exc:
                self.stats.reject(tenant, type(exc).__name__, level)
                raise
            for victim in shed:  # the tenant's routine work, shed at its quota for this more urgent request
                self.stats.reject(tenant, "Overloaded", victim.level)
                _settle_error(
                    victim.future,
                    Overloaded(
                        f"tenant {tenant!r} reached its quota (max_in_flight) and this request was shed for "
                        f"a more urgent one of the same tenant; retry",
                        retry_after(self.queue.exec_ewma_ns),
                    ),
                )
            if self._notify_all:
                self._cond.notify_all()
            else:
                self._cond.notify()
        return future

    def _work(self, stat_only: bool) -> None:
        if self.policy.routine_nice and not stat_only:
            _lower_thread_priority(self.policy.routine_nice)
        self._started.release()
        cond, queue, clock = self._cond, self.queue, self._clock
        while True:
            with cond:
                while True:
                    batch, expired, wait = queue.take(clock(), stat_only)
                    if expired:
                        self._expire(expired)
                    if batch:
                        break
                    if self._closing and not len(queue):
                        return
                    cond.wait(None if wait is None else wait / 1e9)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        model, stats, clock = self.model, self.stats, self._clock
        started = clock()
        try:
            inputs = merge([j.inputs for j in batch])
            outputs = model.run(inputs, batch[0].outputs)
            parts = split(outputs, [j.rows for j in batch])
        except Exception as exc:  # a model raising on odd values must not kill the worker
            error = (
                exc
                if isinstance(exc, InferenceFailed)
                else InferenceFailed(f"model {model.name!r} v{model.version} failed: {exc}")
            )
            with self._cond:
                self.queue.done(batch)
            for job in batch:
                stats.record_failure(job.level)
                _post(job.future, _settle_error, error)
            return
        done = clock()
        with self._cond:
            self.queue.done(batch, done - started)
        stats.record_execution(sum(j.rows for j in batch))
        if stats.drift is not None and batch[0].tenant != WARMUP_TENANT:  # batches are one tenant's
            stats.drift.observe(inputs, outputs)  # a copy into the drift window: rows stay in memory
        suspect = not self.signature.finite(outputs)  # one check per batch; per request only on a miss
        for job, result in zip(batch, parts, strict=True):
            if suspect:
                try:
                    self.signature.check_outputs(result)
                except NonFiniteOutput as exc:
                    stats.reject(job.tenant, type(exc).__name__, job.level)
                    _post(job.future, _settle_error, exc)
                    continue
            stats.record_request(job.tenant, job.level, started - job.enqueued, done - started, done - job.enqueued)
            _post(job.future, _settle, result)

    def _expire(self, jobs: list[Job]) -> None:
        now = self._clock()
        for job in jobs:
            waited = (now - job.enqueued) / 1e6
            self.stats.reject(job.tenant, "DeadlineExceeded", job.level)
            error = DeadlineExceeded(
                f"deadline exceeded after {waited:.1f} ms in the queue of {self.model.name!r} at priority "
                f"{job.level + 1}; the request was not run",
                retry_after(self.queue.exec_ewma_ns),
            )
            _post(job.future, _settle_error, error)

    def depth(self) -> dict[str, int]:
        with self._cond:
            return self.queue.depth()

    def close(self) -> None:
        """Stop taking requests; the workers finish what is queued, then exit."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        for worker in self._workers:
            worker.join(timeout)


def _lower_thread_priority(nice: int) -> None:
    """Renice this thread only: on Linux a thread id passed as PRIO_PROCESS names one thread."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: run at normal priority
        log.warning("could not lower routine worker priority: %s", exc)


def _post(future: Any, fn: Callable[[Any, Any], None], value: Any) -> None:
    if future is not None:
        future.get_loop().call_soon_threadsafe(fn, future, value)


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # the caller may have gone away
        future.set_result(value)


def _settle_error(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
