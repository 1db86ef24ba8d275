"""Scheduled warm-up: before the morning round, make sure every model is loaded and has just run,
so the first real request does not pay the cold cost (evicted weights and code pages, ONNX Runtime
arenas and thread pools parked, caches full of other work, a clocked-down CPU).

The exercise goes through the dataplane's public API, exactly as a REST or gRPC request would
(admission, queue, batching, the model's workers), as the server itself (`SYSTEM`), at the lowest
priority level of each model, so a warm-up never goes ahead of a patient's request. Its requests are
counted under a tenant of their own, `(warm-up)` (no caller's tenant can take that name), so the
statistics tell them from real traffic. The inputs are zeros of each input's datatype and shape,
batch 1; a model with an input zeros cannot stand for (text) is skipped, with the reason.

Nothing of a request or an answer is logged: one line per run, naming models and milliseconds.
When (settings `warmup.*`) is decided by the pure `warmup_schedule`; `WarmupTask` only sleeps and acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from time import perf_counter_ns
from typing import Any

import numpy as np

from bedside.dataplane.dataplane import Dataplane
from bedside.dataplane.types import CallContext, ModelMetadata
from bedside.dataplane.warmup_schedule import Schedule, idle_due
from bedside.errors import BedsideError
from bedside.monitoring.redact import without_paths
from bedside.protocol.datatypes import OIP_TO_NUMPY
from bedside.protocol.types import SYSTEM, WARMUP_TENANT, InferRequest
from bedside.settings import WarmupSettings

log = logging.getLogger("bedside.warmup")
TRANSPORT = "warmup"  # in the audit log and the statistics' transport, so warm-up requests are told apart
TENANT = WARMUP_TENANT  # outside the tenant name pattern: no caller's tenant can share its figures
PRIORITY = "routine"  # every model's lowest level, whatever its number of levels
READY = "READY"
Key = tuple[str, str]  # (model, version)


@dataclass(frozen=True, slots=True)
class ModelResult:
    """What the warm-up did to one model version: `ms` is its request's latency, admission to
    answer (what the first real request would otherwise have paid); `reason` why it was not run."""

    name: str
    version: str | None
    ok: bool
    ms: float | None = None
    reason: str = ""
    skipped: bool = False  # not run on purpose (text input, the max_models bound); else a failure when not ok
    loaded: bool = False  # the warm-up loaded it first (it was not ready)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "version": self.version, "ok": self.ok}
        if self.ms is not None:
            row["ms"] = round(self.ms, 3)
        if self.reason:
            row["reason"] = self.reason
        if self.skipped:
            row["skipped"] = True
        if self.loaded:
            row["loaded"] = True
        return row

    def line(self) -> str:
        """For the log line: the model, the version and milliseconds, or skipped/failed (no reason:
        a failure's text may come from a library, and the log takes no message it did not write)."""
        who = self.name + (f" v{self.version}" if self.version else "") + (" (loaded)" if self.loaded else "")
        if self.ok and self.ms is not None:
            return f"{who} {self.ms:.1f} ms"
        return f"{who} {'skipped' if self.skipped else 'failed'}"


@dataclass
class WarmupCounters:
    """What the warm-up has done since start, for the status page and /metrics to read."""

    runs: int = 0
    scheduled_runs: int = 0
    keep_hot_runs: int = 0
    exercised: int = 0  # model versions that answered
    failed: int = 0
    skipped: int = 0
    loaded: int = 0
    last_run_ms: int = 0  # wall clock, ms since the epoch; 0: none yet
    last: tuple[ModelResult, ...] = field(default_factory=tuple)  # the last run's results

    def add(self, kind: str, results: list[ModelResult], wall_ms: int) -> None:
        self.runs += 1
        if kind == "scheduled":
            self.scheduled_runs += 1
        elif kind == "keep_hot":
            self.keep_hot_runs += 1
        self.exercised += sum(r.ok for r in results)
        self.skipped += sum(r.skipped for r in results)
        self.failed += sum(not r.ok and not r.skipped for r in results)
        self.loaded += sum(r.loaded for r in results)
        self.last_run_ms = wall_ms
        self.last = tuple(results)

    def to_dict(self) -> dict[str, Any]:
        names = ("runs", "scheduled_runs", "keep_hot_runs", "exercised", "failed", "skipped", "loaded", "last_run_ms")
        return {**{n: getattr(self, n) for n in names}, "last": [r.to_dict() for r in self.last]}


def synthesize(metadata: ModelMetadata) -> InferRequest | str:
    """A batch-1 request of zeros for this model (a variable dimension taken as 1), or why none can
    be made. Zeros, not random values: the same every time, and in range for every datatype."""
    inputs: dict[str, np.ndarray] = {}
    for tensor in metadata.inputs:
        if tensor.datatype == "BYTES":
            return f"input {tensor.name!r} is text (BYTES): no synthetic value stands for it"
        dtype = OIP_TO_NUMPY.get(tensor.datatype)
        if dtype is None:
            return f"input {tensor.name!r} has datatype {tensor.datatype}, which has no synthetic value"
        inputs[tensor.name] = np.zeros(tuple(1 if d < 0 else d for d in tensor.shape), dtype)
    return InferRequest(inputs)


def _error(exc: BaseException) -> str:
    if isinstance(exc, BedsideError):
        return f"{type(exc).__name__} ({exc.status}): {without_paths(exc.message)[:300]}"
    return type(exc).__name__  # not ours: its message is not known to be free of data


async def exercise(dataplane: Dataplane, name: str, version: str, timeout_s: float) -> ModelResult:
    """One zeros request to this model version through `Dataplane.infer`, timed."""
    try:
        request = synthesize(dataplane.model_metadata(name, version, SYSTEM, TRANSPORT))
    except BedsideError as exc:  # unloaded since the index was read
        return ModelResult(name, version, False, reason=_error(exc))
    if isinstance(request, str):
        return ModelResult(name, version, False, reason=request, skipped=True)
    context = CallContext(TENANT, PRIORITY, int(timeout_s * 1e6), SYSTEM, TRANSPORT)
    started = perf_counter_ns()
    try:
        # the queue deadline drops a warm-up that real traffic kept waiting; wait_for also bounds a
        # model that hangs in compute, so one stuck model cannot stop the rest of the run
        response = await asyncio.wait_for(dataplane.infer(name, version, request, context), timeout_s)
    except TimeoutError:
        return ModelResult(name, version, False, reason=f"no answer within warmup.timeout_s ({timeout_s:g} s)")
    except Exception as exc:  # one model failing must not stop the others being warmed
        return ModelResult(name, version, False, reason=_error(exc))
    ms = (perf_counter_ns() - started) / 1e6
    if (response.parameters or {}).get("cached"):
        # a model with [cache] answers the same zeros from its cache (the warm-up's own tenant's
        # entry, never a real tenant's): the model did not run, so this warmed nothing
        return ModelResult(name, version, False, ms, "answered from the model's response cache: not run", True)
    return ModelResult(name, version, True, ms)


def _ready_versions(dataplane: Dataplane) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per model: its READY versions (oldest first), and for a model with none, why not."""
    ready: dict[str, list[str]] = {}
    why: dict[str, str] = {}
    for row in dataplane.repository_index(SYSTEM, TRANSPORT):
        versions = ready.setdefault(row.name, [])
        if row.state == READY and row.version is not None:
            versions.append(row.version)
        elif row.name not in why:  # a library's reason may name the repository's path: cut
            why[row.name] = f"{row.state}: {without_paths(row.reason)[:300]}" if row.reason else row.state
    return ready, {name: reason for name, reason in why.items() if not ready[name]}


async def warm_up(
    dataplane: Dataplane, settings: WarmupSettings, *, load: bool = True, only: Collection[Key] | None = None
) -> list[ModelResult]:
    """Exercise every ready model version (or those in `only`) once, one at a time; with `load`,
    first load each model that has no ready version (a failed load is a result, not an error)."""
    ready, not_ready = _ready_versions(dataplane)
    results: list[ModelResult] = []
    loaded: set[str] = set()
    if load and not_ready:
        for name in sorted(not_ready):
            try:
                await dataplane.load(name, SYSTEM, TRANSPORT)
            except Exception as exc:  # refused (gone from the repository, ...): say so, go on
                results.append(ModelResult(name, None, False, reason=f"load refused: {_error(exc)}"))
                continue
            loaded.add(name)
        ready, not_ready = _ready_versions(dataplane)
        for name in sorted(loaded & not_ready.keys()):
            results.append(ModelResult(name, None, False, reason=f"not ready after loading: {not_ready[name]}"))
    targets = [(name, v) for name in sorted(ready) for v in ready[name]]
    if only is not None:
        targets = [key for key in targets if key in only]
    sent = 0  # requests sent: a model skipped for its text input costs nothing against the bound
    for name, version in targets:
        if sent >= settings.max_models:
            results.append(ModelResult(name, version, False, reason="beyond warmup.max_models", skipped=True))
            continue
        result = await exercise(dataplane, name, version, settings.timeout_s)
        sent += not result.skipped
        if name in loaded:
            result = replace(result, loaded=True)
        results.append(result)
    return results


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class WarmupTask:
    """The background task: sleeps until the schedule says, then warms. `clock` (local wall time),
    `wall_ms` (the statistics' clock) and `sleep` are injected so tests drive it without waiting."""

    def __init__(
        self,
        dataplane: Dataplane,
        settings: WarmupSettings,
        *,
        clock: Callable[[], datetime] = datetime.now,
        wall_ms: Callable[[], int] = _wall_ms,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.schedule = Schedule.from_settings(settings)
        self.counters = WarmupCounters()
        self._dataplane = dataplane
        self._clock, self._wall_ms, self._sleep = clock, wall_ms, sleep
        # when the warm-up last tried each version: a version that fails or is skipped is not
        # retried on every pass (its last_inference_ms does not move), only after the idle time
        self._tried: dict[Key, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="bedside-warmup")

    async def stop(self) -> None:
        """Cancel the task (a request it awaits is abandoned; the model's worker finishes it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        schedule = self.schedule
        fire_at = schedule.next_fire(self._clock())
        while True:
            now = self._clock()
            keep_hot_wait: float | None = None
            if not self._dataplane.ready():  # models still loading at start: a fire time waits for them
                await self._sleep(1.0)
                continue
            try:
                if fire_at is not None and now >= fire_at:
                    fire_at = schedule.next_fire(now)  # first: a run that raises must not fire again at once
                    await self.run_now("scheduled", load=True)
                if schedule.hot(now):
                    keep_hot_wait = await self.keep_hot()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a warm-up is a courtesy: it never ends the server
                log.error("warm-up failed (%s); the next one runs as scheduled", type(exc).__name__)
            await self._sleep(schedule.nap(self._clock(), fire_at, keep_hot_wait))

    async def run_now(
        self, kind: str = "manual", *, load: bool = True, only: Collection[Key] | None = None
    ) -> list[ModelResult]:
        """One warm-up run now, counted and logged as `kind` (scheduled, keep_hot, manual)."""
        started = perf_counter_ns()
        results = await warm_up(self._dataplane, self.settings, load=load, only=only)
        wall = self._wall_ms()
        for r in results:
            if r.version is not None:
                self._tried[(r.name, r.version)] = wall
        self.counters.add(kind, results, wall)
        took = (perf_counter_ns() - started) / 1e6
        log.info(
            "warm-up (%s) in %.0f ms: %s",
            kind.replace("_", "-"),
            took,
            ", ".join(r.line() for r in results) or "no model",
        )
        return results

    async def keep_hot(self) -> float | None:
        """Exercise the ready versions idle for keep_hot_idle_s; returns the seconds until the next
        one will be (None: nothing is loaded)."""
        last: dict[Key, int] = {}
        for row in self._dataplane.statistics(None, None, SYSTEM, TRANSPORT):
            if row.state == READY:
                key = (row.name, row.version)
                last[key] = max(row.last_inference_ms, self._tried.get(key, 0))
        self._tried = {key: ms for key, ms in self._tried.items() if key in last}  # bounded by what is loaded
        due, wait = idle_due(last, self._wall_ms(), self.schedule.idle_s)
        if not due:
            return wait
        await self.run_now("keep_hot", load=False, only=set(due))
        return self.schedule.idle_s if wait is None else min(wait, self.schedule.idle_s)


def start_warmup(dataplane: Dataplane, settings: WarmupSettings) -> WarmupTask | None:
    """The warm-up task, started on the running loop, when settings schedule any; else None."""
    task = WarmupTask(dataplane, settings)
    if not task.schedule.active:
        return None
    task.start()
    log.info(
        "warm-up scheduled: at %s; kept hot %s",
        settings.times or "no fixed time",
        f"{settings.keep_hot} when idle {settings.keep_hot_idle_s:g} s" if settings.keep_hot else "never",
    )
    return task
