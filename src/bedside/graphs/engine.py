"""Running a graph: each step starts as soon as its inputs are there, so independent branches run at
the same time; every step has a deadline (its own timeout, within the graph's), and an optional
step that fails, times out or is skipped degrades the answer instead of failing it, and says so.

Plain Python steps run inline on the event loop, in order, as soon as they are ready: they take
tens of microseconds, and a task or a thread hop per step would cost more than the step. Model
steps and async Python steps run as tasks, so they overlap; one `asyncio.wait` watches them all with
the nearest deadline as its timeout, instead of a timer per step.

Model steps go back through the dataplane with the caller, tenant and priority of the request that
reached the graph: a STAT medication check is STAT in every model queue it touches, counted to the
right tenant, and refused where that tenant may not use a model.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any

import numpy as np

from bedside.errors import (
    BedsideError,
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    NotFound,
    Overloaded,
    Unavailable,
)
from bedside.graphs.check import Plan, PlannedStep
from bedside.graphs.spec import GraphSpec
from bedside.graphs.steps import StepContext
from bedside.modelconfig.model import ModelConfig
from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.monitoring.latency import LatencyWindow, ModelStats
from bedside.protocol.cache import ResponseCache
from bedside.protocol.types import CallContext, InferRequest, InferResponse, RequestedOutput
from bedside.runtime.signature import Signature

CallModel = Callable[[str, str | None, InferRequest, CallContext], Awaitable[InferResponse]]
OK, FAILED, TIMED_OUT, SKIPPED = "ok", "failed", "timed_out", "skipped"
_LEVELS = SchedulingPolicy()  # a graph counts priorities as a model with the default levels does
_PROVENANCE_RANK = {"trained": 0, "synthetic": 1, "untrained": 2}


class StepStats:
    """What one step has done since the graph loaded (bounded: one latency window)."""

    __slots__ = ("latency", "outcomes")

    def __init__(self, bucketed: bool) -> None:
        self.latency = LatencyWindow(1024, bucketed)
        self.outcomes = dict.fromkeys((OK, FAILED, TIMED_OUT, SKIPPED), 0)

    def to_dict(self) -> dict[str, Any]:
        return {**self.outcomes, "latency": self.latency.summary()}


class StepFailed(Exception):
    """A step that did not give its outputs: why, in words a log and an answer may carry."""

    def __init__(self, outcome: str, reason: str, error: BedsideError | None = None) -> None:
        super().__init__(reason)
        self.step = ""  # set when it fails the graph
        self.outcome = outcome
        self.reason = reason
        self.error = error


class Graph:
    """A loaded graph: its spec, its checked plan and its statistics."""

    def __init__(self, spec: GraphSpec, plan: Plan, call: CallModel, stats: ModelStats) -> None:
        self.spec = spec
        self.name = spec.name
        self.version_text = str(spec.version)
        self.plan = plan
        self.config = ModelConfig(
            name=spec.name,
            inputs=spec.inputs,
            outputs=plan.outputs,
            description=spec.description,
            platform="bedside_graph",
            warmup=None,
            access=spec.access,
            cache=spec.cache,
        )
        self.signature = Signature(self.config)
        self.cache = None if spec.cache is None else ResponseCache(spec.cache.max_entries, spec.cache.max_bytes)
        self.stats = stats
        self.step_stats = {s.spec.name: StepStats(stats.detailed) for s in plan.steps}
        self._call = call
        self._children = [[c.index for c in plan.steps if s.index in c.deps] for s in plan.steps]
        self._outputs = {o.name: o.source for o in spec.outputs}

    async def run(self, request: InferRequest, context: CallContext) -> InferResponse:
        started = perf_counter_ns()
        try:
            level = _LEVELS.level_of(context.priority, context.tenant)
        except BedsideError:
            level = _LEVELS.default_priority - 1
        try:
            self.signature.check(request.inputs, request.output_names())
            cache, key = self.cache, None
            if cache is not None:
                key = cache.key(context.tenant, request)
                hit = cache.get(key)
                if hit is not None:
                    total = perf_counter_ns() - started
                    self.stats.record_request(context.tenant, level, 0, total, total)
                    return InferResponse(self.name, self.version_text, hit[0], request.id, hit[1])
            response = await self._run(request, context, started)
            answered = response.parameters or {}
            if key is not None and cache is not None and not answered.get("degraded"):
                kept = {k: v for k, v in answered.items() if not k.startswith("step_")}
                cache.put(key, response.outputs, {**kept, "cached": True})  # a degraded one is not kept
        except BedsideError as exc:
            if isinstance(exc, InvalidInput):
                self.stats.reject(context.tenant, type(exc).__name__, level)
            else:
                self.stats.record_failure(level)
            raise
        except BaseException:
            self.stats.record_failure(level)
            raise
        total = perf_counter_ns() - started
        self.stats.record_request(context.tenant, level, 0, total, total)
        return response

    async def _run(self, request: InferRequest, context: CallContext, started: int) -> InferResponse:
        deadline = self.spec.deadline_ms * 1_000_000
        if context.timeout_us is not None:
            deadline = min(deadline, context.timeout_us * 1000)
        deadline_ns = started + int(deadline)
        steps = self.plan.steps
        values: dict[str, np.ndarray] = dict(request.inputs)
        waiting = [len(s.deps) for s in steps]
        ready = deque(s.index for s in steps if not s.deps)
        running: dict[asyncio.Task[dict[str, np.ndarray]], tuple[PlannedStep, int, int]] = {}
        timings: dict[str, Any] = {}
        degraded: list[str] = []
        provenance: dict[str, str] = {}

        def settle(step: PlannedStep, begun: int, outputs: dict[str, np.ndarray] | StepFailed) -> None:
            name = step.spec.name
            stats = self.step_stats[name]
            if not isinstance(outputs, StepFailed):
                missing = [k for k in step.outputs if k not in outputs]
                if missing:
                    outputs = StepFailed(FAILED, f"gave no {missing}")
            if isinstance(outputs, StepFailed):
                stats.outcomes[outputs.outcome] += 1
                if not step.spec.optional:
                    outputs.step = name
                    raise outputs
                degraded.append(f"{name}: {outputs.reason}")
            else:
                took = perf_counter_ns() - begun
                stats.outcomes[OK] += 1
                stats.latency.record(took)
                timings[f"step_{name}_us"] = took // 1000
                for key in step.outputs:
                    values[f"{name}.{key}"] = outputs[key]
            for child in self._children[step.index]:
                waiting[child] -= 1
                if not waiting[child]:
                    ready.append(child)

        try:
            while ready or running:
                while ready:
                    step = steps[ready.popleft()]
                    feed = self._feed(step, values)
                    begun = perf_counter_ns()
                    if isinstance(feed, StepFailed):
                        settle(step, begun, feed)
                        continue
                    step_deadline = deadline_ns
                    if step.spec.timeout_ms is not None:
                        step_deadline = min(deadline_ns, begun + int(step.spec.timeout_ms * 1_000_000))
                    ctx = StepContext(
                        self.name, step.spec.name, context.tenant, context.priority, context.caller, step_deadline
                    )
                    if step.function is not None and not step.is_async:
                        settle(step, begun, self._inline(step, feed, ctx, step_deadline))
                        continue
                    task = asyncio.ensure_future(self._start(step, feed, ctx, context, provenance))
                    running[task] = (step, begun, step_deadline)
                if not running:
                    break
                nearest = min(d for _, _, d in running.values())
                done, _ = await asyncio.wait(
                    running, timeout=max(0.0, (nearest - perf_counter_ns()) / 1e9), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    step, begun, _ = running.pop(task)
                    settle(step, begun, _outcome(task, step))
                now = perf_counter_ns()
                for task, (step, begun, step_deadline) in list(running.items()):
                    if step_deadline <= now:
                        task.cancel()
                        del running[task]
                        settle(step, begun, _late(step, step_deadline, deadline_ns))
        except StepFailed as failed:
            for task in running:
                task.cancel()
            raise _error(self.name, failed) from None
        return self._answer(request, values, timings, degraded, provenance)

    def _feed(self, step: PlannedStep, values: dict[str, np.ndarray]) -> dict[str, np.ndarray] | StepFailed:
        feed = {}
        for port, source in step.sources:
            value = values.get(source)
            if value is None:
                if port in step.optional_inputs:
                    continue
                return StepFailed(SKIPPED, f"skipped: {source.split('.', 1)[0]} gave no {port!r}")
            feed[port] = value
        return feed

    def _inline(
        self, step: PlannedStep, feed: dict[str, np.ndarray], ctx: StepContext, step_deadline: int
    ) -> dict[str, np.ndarray] | StepFailed:
        assert step.function is not None
        try:
            result = step.function(feed, ctx)
        except BedsideError as exc:
            return StepFailed(FAILED, exc.message, exc)
        except Exception as exc:  # a step's own bug: named by type, its text may carry request data
            return StepFailed(FAILED, f"failed ({type(exc).__name__})")
        if perf_counter_ns() > step_deadline:
            # an inline step cannot be interrupted; an answer past its deadline is not used
            return StepFailed(TIMED_OUT, f"timed out (over {step.spec.timeout_ms} ms)")
        return result  # type: ignore[return-value]

    async def _start(
        self,
        step: PlannedStep,
        feed: dict[str, np.ndarray],
        ctx: StepContext,
        context: CallContext,
        provenance: dict[str, str],
    ) -> dict[str, np.ndarray]:
        if step.function is not None:
            return await step.function(feed, ctx)  # type: ignore[misc]
        spec = step.spec
        assert spec.model is not None
        remaining_us = max(1, (ctx.deadline_ns - perf_counter_ns()) // 1000)
        child = CallContext(context.tenant, context.priority, remaining_us, context.caller, context.transport)
        wanted = [RequestedOutput(o) for o in step.outputs]
        response = await self._call(
            spec.model, None if spec.version is None else str(spec.version), InferRequest(feed, outputs=wanted), child
        )
        if response.parameters and "provenance" in response.parameters:
            provenance[spec.name] = str(response.parameters["provenance"])
        return response.outputs

    def _answer(
        self,
        request: InferRequest,
        values: dict[str, np.ndarray],
        timings: dict[str, Any],
        degraded: list[str],
        provenance: dict[str, str],
    ) -> InferResponse:
        names = request.output_names() or list(self._outputs)
        outputs = {n: values[self._outputs[n]] for n in names if self._outputs[n] in values}
        parameters: dict[str, Any] = {**timings, "degraded": bool(degraded)}  # never None: run() reads it
        if degraded:
            parameters["degraded_steps"] = "; ".join(degraded)
        if provenance:  # an answer that rests on a synthetic or untrained model says so
            worst = max(provenance.values(), key=lambda p: _PROVENANCE_RANK.get(p, 3))
            parameters["provenance"] = worst
            parameters["provenance_steps"] = ",".join(sorted(provenance))
        return InferResponse(self.name, self.version_text, outputs, request.id, parameters)

    def statistics(self) -> dict[str, Any]:
        return {name: stats.to_dict() for name, stats in self.step_stats.items()}


def _outcome(task: asyncio.Task[dict[str, np.ndarray]], step: PlannedStep) -> dict[str, np.ndarray] | StepFailed:
    if task.cancelled():
        return StepFailed(FAILED, "cancelled")
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, DeadlineExceeded):
        return StepFailed(TIMED_OUT, f"timed out in the queue of {step.spec.model!r}", exc)
    if isinstance(exc, BedsideError):
        return StepFailed(FAILED, exc.message, exc)
    return StepFailed(FAILED, f"failed ({type(exc).__name__})")


def _late(step: PlannedStep, step_deadline: int, deadline_ns: int) -> StepFailed:
    if step.spec.timeout_ms is not None and step_deadline < deadline_ns:
        return StepFailed(TIMED_OUT, f"timed out after {step.spec.timeout_ms:g} ms")
    return StepFailed(TIMED_OUT, "not done by the graph's deadline")


def _error(graph: str, failed: StepFailed) -> BedsideError:
    """The graph's error for a required step that failed. The step's own kind where it tells the
    caller something true (a 400 for its input, a 403 for a model it may not use, a 429 to retry);
    a model step's model that is missing or not ready is the graph being unavailable (503)."""
    message = f"graph {graph!r}: step {failed.step!r}: {failed.reason}"
    error = failed.error
    if failed.outcome == TIMED_OUT:
        return DeadlineExceeded(message)
    if isinstance(error, NotFound):
        return Unavailable(message)
    if isinstance(error, (InvalidInput, Forbidden, Overloaded, Unavailable)):
        copied = copy.copy(error)
        copied.message, copied.args = message, (message,)
        return copied
    return InferenceFailed(message)
