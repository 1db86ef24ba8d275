"""The request queue of one model version: admission, priority order, tenant fairness, batching.

Pure logic with the clock passed in, so its behaviour is tested deterministically; the worker holds
a lock around it. Requests wait in lanes, one per (priority level, tenant), each first-in first-out.
The next batch starts at the lane whose head ranks first by
    (effective level, tenant's served rows / tenant's share, arrival order)
where the effective level improves by one per `aging_us` of waiting, so routine work is delayed by
urgent work for a bounded time only. The batch is then filled with requests of the same tenant and
the same batch key, so a batch never holds two tenants' data.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bedside.errors import DeadlineExceeded, InvalidInput, Overloaded
from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.settings import DEFAULTS

SCAN_LIMIT = 256  # jobs looked at per lane when filling a batch: bounds the work under a deep queue
_EWMA = 0.2


@dataclass(slots=True, eq=False)
class Job:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    rows: int
    key: Hashable
    tenant: str
    level: int  # 0-based, 0 = STAT
    enqueued: int  # ns on the queue's clock
    deadline: int | None = None
    future: Any = None
    seq: int = 0
    lane: tuple[int, str] = field(default=(0, ""))


def retry_after(ns: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(ns / 1e9)))}


class RequestQueue:
    def __init__(
        self,
        policy: SchedulingPolicy,
        max_batch: int,
        instances: int = 1,
        max_tenants: int = DEFAULTS.limits.max_tenants,
    ) -> None:
        self.policy = policy
        self.max_tenants = max_tenants  # distinct tenant names tracked: names come from callers, memory must not
        self.levels = policy.priority_levels
        self.max_batch = max_batch if max_batch > 0 and policy.batching.enabled else 0
        self.instances = max(1, instances)
        self.exec_ewma_ns = 0.0
        self.in_flight: dict[str, int] = {}
        self._lanes: dict[tuple[int, str], deque[Job]] = {}
        self._waiting = [0] * (self.levels + 1)  # index `levels`: overdue requests kept by timeout_action=delay
        self._waiting_rows = [0] * (self.levels + 1)
        self._with_deadline = 0
        self._served: dict[str, float] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # tenants with nothing in flight, longest idle first
        self._seq = 0
        self._aging = policy.aging_us * 1000
        self._delay = policy.batching.max_queue_delay_us * 1000
        self._preferred = policy.batching.preferred_batch_sizes

    # --- admission ------------------------------------------------------------------------

    def admit(self, job: Job, now: int, timeout_us: int | None = None) -> list[Job]:
        """Queue `job`, or raise why not. Returns the requests shed to make room for it: a tenant at
        its quota loses its least urgent queued work before its STAT work is refused."""
        level_policy = self.policy.levels[job.level]
        tenant_policy = self.policy.tenant(job.tenant)
        in_flight = self.in_flight.get(job.tenant, 0)
        shed: list[Job] = []
        if in_flight >= tenant_policy.max_in_flight:
            victim = self._least_urgent(job.tenant, job.level)
            if victim is None:
                raise Overloaded(
                    f"tenant {job.tenant!r} already has {in_flight} requests in flight on this model, "
                    f"its quota (max_in_flight); retry when some complete",
                    retry_after(self.exec_ewma_ns),
                )
            shed.append(victim)
            in_flight -= 1
        if job.tenant not in self._served and len(self._served) >= self.max_tenants and not self._forget_idle():
            self._requeue(shed)
            raise Overloaded(
                f"this model has work in flight for {self.max_tenants} distinct tenants, its limit; "
                f"tenant {job.tenant!r} is refused until one finishes",
                retry_after(self.exec_ewma_ns),
            )
        if self._waiting[job.level] >= level_policy.max_queue_size:
            self._requeue(shed)
            raise Overloaded(
                f"queue for priority {job.level + 1} is full ({level_policy.max_queue_size} requests waiting); "
                "the model is overloaded",
                retry_after(self.estimate_wait_ns(job.level, job.rows)),
            )
        if timeout_us is not None and timeout_us > 0:
            if not level_policy.allow_timeout_override:
                self._requeue(shed)
                raise InvalidInput(f"priority {job.level + 1} does not take a per-request timeout")
            timeout = timeout_us
        else:
            timeout = level_policy.default_timeout_us
        if timeout:
            job.deadline = now + timeout * 1000
            wait = self.estimate_wait_ns(job.level, job.rows)
            if self.exec_ewma_ns and now + wait > job.deadline:
                self._requeue(shed)
                raise DeadlineExceeded(
                    f"request cannot finish within its {timeout / 1000:g} ms deadline: about {wait / 1e6:.1f} ms "
                    f"of work is queued at priority {job.level + 1} or above",
                    retry_after(wait),
                )
            self._with_deadline += 1
        self._seq += 1
        job.seq = self._seq
        job.lane = (job.level, job.tenant)
        if job.tenant not in self._served:
            # a newcomer starts level with the least-served tenant instead of owning the box until it catches up
            self._served[job.tenant] = min(self._served.values(), default=0.0)
        self._lanes.setdefault(job.lane, deque()).append(job)
        self._waiting[job.level] += 1
        self._waiting_rows[job.level] += job.rows
        self.in_flight[job.tenant] = in_flight + 1
        self._idle.pop(job.tenant, None)
        return shed

    def estimate_wait_ns(self, level: int, rows: int) -> float:
        """Time until a new request at `level` would finish, from the recent cost of one execution."""
        if self.max_batch:
            executions = math.ceil((sum(self._waiting_rows[: level + 1]) + rows) / self.max_batch)
        else:
            executions = sum(self._waiting[: level + 1]) + 1
        return executions * self.exec_ewma_ns / self.instances

    # --- dispatch ---------------------------------------------------------------------------

    def take(self, now: int, stat_only: bool = False) -> tuple[list[Job], list[Job], int | None]:
        """Return (batch to run, requests rejected for missing their deadline, ns to wait before asking again).

        An empty batch with a wait of None means: nothing to do until a new request arrives.
        `stat_only` is for an instance reserved for STAT work: it starts batches at level 1 only.
        """
        expired = self._sweep(now) if self._with_deadline else []
        best: tuple[int, str] | None = None
        best_rank: tuple[float, float, int] | None = None
        for lane_key, lane in self._lanes.items():
            if lane:
                head = lane[0]
                rank = (self._effective_level(lane_key[0], head, now), self._served[head.tenant], head.seq)
                if stat_only and (rank[0] > 0 or lane_key[0] > 0):
                    continue
                if best_rank is None or rank < best_rank:
                    best, best_rank = lane_key, rank
        if best is None or best_rank is None:
            return [], expired, None
        batch = self._fill(best)
        rows = sum(j.rows for j in batch)
        if self.max_batch and rows < self.max_batch and rows not in self._preferred:
            oldest = min(j.enqueued for j in batch)
            if self._delay and best_rank[0] > 0 and now - oldest < self._delay:
                return [], expired, self._delay - (now - oldest)  # STAT (level 0) never waits for company
            batch = self._trim_to_preferred(batch)
        self._remove(batch)
        self._served[batch[0].tenant] += sum(j.rows for j in batch) / self.policy.tenant(batch[0].tenant).share
        return batch, expired, None

    def done(self, jobs: list[Job], exec_ns: int | None = None) -> None:
        for job in jobs:
            left = self.in_flight[job.tenant] = self.in_flight[job.tenant] - 1
            if not left:
                self._idle[job.tenant] = None  # newest idle last: the longest idle is forgotten first
        if exec_ns is not None:
            self.exec_ewma_ns = exec_ns if not self.exec_ewma_ns else (1 - _EWMA) * self.exec_ewma_ns + _EWMA * exec_ns

    def depth(self) -> dict[str, int]:
        out = {str(level + 1): self._waiting[level] for level in range(self.levels)}
        out["overdue"] = self._waiting[self.levels]
        return out

    def __len__(self) -> int:
        return sum(self._waiting)

    # --- internals --------------------------------------------------------------------------

    def _least_urgent(self, tenant: str, level: int) -> Job | None:
        """Take out the tenant's newest queued request that is less urgent than `level` (overdue
        requests first), or None when it has none: what a quota sheds for more urgent work."""
        for lane_level in range(self.levels, level, -1):
            lane = self._lanes.get((lane_level, tenant))
            if lane:
                victim = lane.pop()
                self._waiting[lane_level] -= 1
                self._waiting_rows[lane_level] -= victim.rows
                if victim.deadline is not None:
                    self._with_deadline -= 1
                self.in_flight[tenant] -= 1
                return victim
        return None

    def _requeue(self, shed: list[Job]) -> None:
        """Undo `_least_urgent` when the request it made room for is refused after all."""
        for job in shed:
            self._lanes[job.lane].append(job)
            self._waiting[job.lane[0]] += 1
            self._waiting_rows[job.lane[0]] += job.rows
            if job.deadline is not None:
                self._with_deadline += 1
            self.in_flight[job.tenant] += 1

    def _forget_idle(self) -> bool:
        """Forget the tenant idle the longest (nothing queued or running), so the table of tenants
        stays bounded without refusing newcomers while some tenant has nothing in flight."""
        if not self._idle:
            return False
        tenant = next(iter(self._idle))
        del self._idle[tenant]
        del self._served[tenant]
        self.in_flight.pop(tenant, None)
        for level in range(self.levels + 1):
            self._lanes.pop((level, tenant), None)
        return True

    def _effective_level(self, lane_level: int, head: Job, now: int) -> int:
        if lane_level == self.levels or not self._aging:
            return lane_level
        return max(0, lane_level - (now - head.enqueued) // self._aging)

    def _fill(self, start: tuple[int, str]) -> list[Job]:
        head = self._lanes[start][0]
        if not self.max_batch:
            return [head]
        tenant, key = head.tenant, head.key
        # Fill from this level and more urgent ones only: a STAT batch stays small and quick.
        order = [
            start,
            *sorted(
                k for k, lane in self._lanes.items() if k[1] == tenant and k != start and k[0] <= start[0] and lane
            ),
        ]
        batch: list[Job] = []
        rows = 0
        for lane_key in order:
            for scanned, job in enumerate(self._lanes[lane_key]):
                if scanned >= SCAN_LIMIT or rows == self.max_batch:
                    break
                if job.key == key and rows + job.rows <= self.max_batch:
                    batch.append(job)
                    rows += job.rows
        return batch

    def _trim_to_preferred(self, batch: list[Job]) -> list[Job]:
        if not self._preferred:
            return batch
        prefix = 0
        best = 0
        for i, job in enumerate(batch, 1):
            prefix += job.rows
            if prefix in self._preferred:
                best = i
        return batch[:best] if best else batch

    def _remove(self, batch: list[Job]) -> None:
        ids = {id(j) for j in batch}
        for lane_key in {j.lane for j in batch}:
            lane = self._lanes[lane_key]
            while lane and id(lane[0]) in ids:
                ids.discard(id(lane.popleft()))
            if ids and any(id(j) in ids for j in lane):
                self._lanes[lane_key] = deque(j for j in lane if id(j) not in ids)
        for job in batch:
            self._waiting[job.lane[0]] -= 1
            self._waiting_rows[job.lane[0]] -= job.rows
            if job.deadline is not None:
                self._with_deadline -= 1

    def _sweep(self, now: int) -> list[Job]:
        """Reject (or, with timeout_action=delay, set aside) every queued request past its deadline."""
        expired: list[Job] = []
        overdue: list[Job] = []
        for lane_key, lane in list(self._lanes.items()):
            if lane_key[0] == self.levels or not any(j.deadline is not None and j.deadline <= now for j in lane):
                continue
            keep: deque[Job] = deque()
            for job in lane:
                if job.deadline is not None and job.deadline <= now:
                    self._with_deadline -= 1
                    self._waiting[job.level] -= 1
                    self._waiting_rows[job.level] -= job.rows
                    if self.policy.levels[job.level].timeout_action == "delay":
                        job.deadline = None
                        overdue.append(job)
                    else:
                        expired.append(job)
                else:
                    keep.append(job)
            self._lanes[lane_key] = keep
        for job in sorted(overdue, key=lambda j: j.seq):
            job.lane = (self.levels, job.tenant)
            self._lanes.setdefault(job.lane, deque()).append(job)
            self._waiting[self.levels] += 1
            self._waiting_rows[self.levels] += job.rows
        self.done(expired)
        return expired
