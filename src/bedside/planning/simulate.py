"""A seeded discrete-event simulation of one box's model queues, predicting queue delay per priority.

What it models, because the server does it:
- Each model's queue is bedside's own `RequestQueue` (scheduler/queue.py) driven by a simulated
  clock: the same priority order (STAT first, first-come-first-served within a level, aging), the
  same dynamic batching (a batch fills from its level and more urgent ones up to max_batch_size;
  max_queue_delay_us waits for company except at STAT), the same queue limits and tenant quota. The
  simulation reuses the class instead of re-implementing it, so it cannot drift from the server.
- `instances` workers per model, non-preemptive: a batch, once started, runs to the end. Reserved
  instances take STAT work only. An idle worker takes work the moment it arrives (the real worker is
  woken by a condition variable: it runs `wake_ns` later, measured on the box, and takes what has
  arrived by then).
- A run after the instance sat idle is slower than one right after another (caches, clock speed):
  the extra time measured after idle gaps is added by how long the instance was idle.
- Service time of a batch of n rows is drawn from the latencies measured for that batch size
  (profile.py), interpolated between the measured sizes.
- Cores are shared: a running batch wants min(threads, cores) cores; when the running batches of all
  models (plus `background` cores of other work: the HTTP loop, a load generator) want more than
  the box has, each progresses at cores / demand (processor sharing). This is how the Linux
  scheduler shares compute-bound threads fairly over a run, and it ignores cache effects.

Not modelled: the HTTP/gRPC decode before a request reaches the queue, deadlines and their
rejections, several tenants (all load is one tenant), arrivals that are not Poisson (a graph's
second step arrives after its first; modelled as Poisson at the same rate).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bedside.errors import BedsideError
from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.scheduler.queue import Job, RequestQueue

_TENANT = ""  # all simulated load is one tenant: fairness between tenants is not what is planned here


class ServiceTime(Protocol):
    def draw(self, rows: int, rng: np.random.Generator) -> float:
        """Nanoseconds one execution of `rows` rows takes on an otherwise idle box."""
        ...


@dataclass(frozen=True, slots=True)
class Exponential:
    """Exponentially distributed service, mean `mean_ns` whatever the batch: for checking against M/M/1."""

    mean_ns: float

    def draw(self, rows: int, rng: np.random.Generator) -> float:
        return float(rng.exponential(self.mean_ns))


@dataclass(frozen=True, slots=True)
class Deterministic:
    """A fixed service time per execution: for checking against M/D/1."""

    ns: float

    def draw(self, rows: int, rng: np.random.Generator) -> float:
        return self.ns


class Empirical:
    """Service times resampled from measurements per batch size. A batch of a size that was not
    measured takes the same quantile of the two measured sizes around it, linearly interpolated by
    rows (execution cost of these models grows about linearly with the batch); beyond the largest
    measured size, extrapolated along the last two."""

    def __init__(self, samples_ms: Mapping[int, Sequence[float]]) -> None:
        if not samples_ms or any(len(v) == 0 for v in samples_ms.values()):
            raise ValueError("an empirical service time needs at least one sample per batch size")
        self.sizes = sorted(samples_ms)
        self.sorted_ns = {b: np.sort(np.asarray(samples_ms[b], dtype=np.float64) * 1e6) for b in self.sizes}

    def quantile(self, size: int, u: float) -> float:
        values = self.sorted_ns[size]
        return float(values[min(len(values) - 1, int(u * len(values)))])

    def draw(self, rows: int, rng: np.random.Generator) -> float:
        u = float(rng.random())
        sizes = self.sizes
        rows = max(1, rows)
        i = bisect_left(sizes, rows)
        if i < len(sizes) and sizes[i] == rows:
            return self.quantile(rows, u)
        if len(sizes) == 1:
            return self.quantile(sizes[0], u) * (rows / sizes[0] if rows > sizes[0] else 1.0)
        if i == 0:  # below the smallest measured size: not faster than it
            return self.quantile(sizes[0], u)
        lo, hi = (sizes[i - 1], sizes[i]) if i < len(sizes) else (sizes[-2], sizes[-1])
        a, b = self.quantile(lo, u), self.quantile(hi, u)
        return max(a if rows > hi else 0.0, a + (b - a) * (rows - lo) / (hi - lo))

    def mean_ns(self, size: int) -> float:
        return float(np.mean(self.sorted_ns[size])) if size in self.sorted_ns else 0.0


@dataclass(frozen=True, slots=True)
class Stream:
    """Poisson arrivals at one model and one priority level."""

    level: int  # 1 = STAT, as users number them
    rate: float  # requests per second
    rows: int = 1  # rows per request


@dataclass
class SimModel:
    name: str
    policy: SchedulingPolicy
    max_batch_size: int
    instances: int
    threads: int  # intra-op threads of one execution: the cores it can keep busy
    service: ServiceTime
    streams: list[Stream]
    # (idle ms, extra ms) measured: a run after the instance sat idle is slower; none: no penalty
    idle_penalty: tuple[tuple[float, float], ...] = ()

    def penalty_ns(self, idle_ns: float) -> float:
        """Extra time of a run after `idle_ns` idle, interpolated between the measured gaps (0 at 0,
        the longest gap's beyond it)."""
        points = self.idle_penalty
        if not points:
            return 0.0
        idle_ms = idle_ns / 1e6
        prev_gap, prev_extra = 0.0, 0.0
        for gap, extra in points:
            if idle_ms <= gap:
                return 1e6 * (prev_extra + (extra - prev_extra) * (idle_ms - prev_gap) / (gap - prev_gap))
            prev_gap, prev_extra = gap, extra
        return 1e6 * prev_extra


@dataclass
class LevelResult:
    count: int = 0
    rejected: int = 0
    queue_ms: dict[str, float] = field(default_factory=dict)  # mean, p50, p95, p99
    latency_ms: dict[str, float] = field(default_factory=dict)  # queue + service, inside the server


@dataclass
class ModelResult:
    name: str
    levels: dict[int, LevelResult]
    utilisation: float  # busy instance-time over instances x simulated time
    mean_batch: float


@dataclass(slots=True)
class _Running:
    model: int
    instance: int
    batch: list[Job]
    started: float
    remaining: float  # ns of work left at full speed


@dataclass(slots=True)
class _Worker:
    stat_only: bool
    busy: bool = False
    timer: int = 0  # token of its pending timer; a newer one makes older ones stale
    waking: bool = False  # notified, not yet running (wake_ns)
    idle_since: float | None = 0.0  # None: it went straight from one batch to the next


def simulate(
    models: Sequence[SimModel],
    cores: float,
    seconds: float,
    seed: int = 0,
    background: float = 0.0,
    warmup: float = 0.05,
    wake_ns: float = 0.0,
) -> dict[str, ModelResult]:
    """Simulate `seconds` of the box; requests arriving in the first `warmup` fraction are run but
    not counted, so the prediction is of the steady state, not of an empty start. `wake_ns`: how
    long an idle worker takes to run once a request notifies it (profile.wake_ms)."""
    if cores <= 0 or seconds <= 0:
        raise ValueError("the simulation needs cores > 0 and seconds > 0")
    rng = np.random.default_rng(seed)
    horizon = seconds * 1e9
    counted_from = horizon * warmup
    times, which = _arrivals(models, horizon, rng)
    streams = [(m, s) for m, model in enumerate(models) for s in model.streams]
    queues = [RequestQueue(model.policy, model.max_batch_size, model.instances, max_tenants=2) for model in models]
    workers = [
        [_Worker(stat_only=i < model.policy.reserved_instances) for i in range(model.instances)] for model in models
    ]
    demand_of = [min(float(model.threads), cores) for model in models]
    queue_ns: dict[tuple[int, int], list[float]] = {}
    latency_ns: dict[tuple[int, int], list[float]] = {}
    rejected: dict[tuple[int, int], int] = {}
    busy_ns = [0.0] * len(models)
    executions = [0] * len(models)
    rows_run = [0] * len(models)
    running: list[_Running] = []
    timers: list[tuple[float, int, int, int]] = []  # (time, model, instance, token)
    now = 0.0
    demand = background

    def speed() -> float:
        return 1.0 if demand <= cores else cores / demand

    def dispatch(m: int, w: int) -> None:
        """Worker w of model m asks its queue for work, as the real worker does when woken."""
        nonlocal demand
        worker = workers[m][w]
        worker.waking = False
        batch, _expired, wait = queues[m].take(int(now), worker.stat_only)
        if not batch:
            if worker.idle_since is None:
                worker.idle_since = now
            if wait is not None:
                worker.timer += 1
                heapq.heappush(timers, (now + wait, m, w, worker.timer))
            return
        worker.busy = True
        worker.timer += 1
        rows = sum(j.rows for j in batch)
        for job in batch:
            if job.enqueued >= counted_from:
                queue_ns.setdefault((m, job.level), []).append(now - job.enqueued)
        work = models[m].service.draw(rows, rng)
        if worker.idle_since is not None:
            work += models[m].penalty_ns(now - worker.idle_since)
            worker.idle_since = None
        running.append(_Running(m, w, batch, now, work))
        demand += demand_of[m]

    def reject(m: int, job: Job) -> None:
        if job.enqueued >= counted_from:
            rejected[m, job.level] = rejected.get((m, job.level), 0) + 1

    i = 0
    n = len(times)
    while True:
        t_arrival = times[i] if i < n else math.inf
        t_timer = timers[0][0] if timers else math.inf
        s = speed()
        first = min(running, key=lambda r: r.remaining) if running else None
        t_done = now + first.remaining / s if first is not None else math.inf
        t = min(t_arrival, t_timer, t_done)
        if t == math.inf:
            break
        for r in running:  # everything running progressed at the shared speed until t
            r.remaining -= (t - now) * s
        now = t
        if first is not None and t == t_done:
            running.remove(first)
            demand -= demand_of[first.model]
            m, batch = first.model, first.batch
            busy_ns[m] += now - first.started
            executions[m] += 1
            rows_run[m] += sum(j.rows for j in batch)
            queues[m].done(batch, int(now - first.started))
            for job in batch:
                if job.enqueued >= counted_from:
                    latency_ns.setdefault((m, job.level), []).append(now - job.enqueued)
            workers[m][first.instance].busy = False
            dispatch(m, first.instance)
        elif t == t_arrival:
            m, stream = streams[which[i]]
            i += 1
            job = Job({}, None, stream.rows, 0, _TENANT, stream.level - 1, int(now))
            try:
                for victim in queues[m].admit(job, int(now)):
                    reject(m, victim)
            except BedsideError:
                reject(m, job)
                continue
            for w, worker in enumerate(workers[m]):  # the woken worker(s) take what they may
                if worker.busy or worker.waking:
                    continue
                if wake_ns > 0:  # it runs a moment later: what arrives meanwhile joins its batch
                    worker.waking = True
                    worker.timer += 1
                    heapq.heappush(timers, (now + wake_ns, m, w, worker.timer))
                else:
                    dispatch(m, w)
        else:
            _, m, w, token = heapq.heappop(timers)
            if not workers[m][w].busy and workers[m][w].timer == token:
                dispatch(m, w)
    return {
        model.name: ModelResult(
            model.name,
            {
                s.level: _level(
                    queue_ns.get((m, s.level - 1), []),
                    latency_ns.get((m, s.level - 1), []),
                    rejected.get((m, s.level - 1), 0),
                )
                for s in model.streams
            },
            busy_ns[m] / (model.instances * horizon) if model.instances else 0.0,
            rows_run[m] / executions[m] if executions[m] else 0.0,
        )
        for m, model in enumerate(models)
    }


def _arrivals(models: Sequence[SimModel], horizon: float, rng: np.random.Generator) -> tuple[Any, Any]:
    """All Poisson arrivals of the run at once: the count is Poisson, the times uniform given the
    count (the order statistics of a Poisson process), each a stream chosen by its share of the rate.
    Vectorised, so a long run costs its events, not its random draws."""
    rates = np.array([s.rate for model in models for s in model.streams], dtype=np.float64)
    total = float(rates.sum())
    if total <= 0:
        return np.empty(0), np.empty(0, dtype=np.int64)
    n = int(rng.poisson(total * horizon / 1e9))
    times = np.sort(rng.uniform(0.0, horizon, n))
    which = rng.choice(len(rates), size=n, p=rates / total)
    return times.tolist(), which.tolist()


def _level(queue: list[float], latency: list[float], rejected: int) -> LevelResult:
    return LevelResult(len(latency), rejected, _summary(queue), _summary(latency))


def _summary(ns: list[float]) -> dict[str, float]:
    if not ns:
        return {}
    ms = np.asarray(ns) / 1e6
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99)}
