"""The request queue, driven by a manual clock: every ordering decision is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bedside.errors import InvalidInput, Overloaded, Unavailable
from bedside.modelconfig.scheduling import BatchingPolicy, QueuePolicy, SchedulingPolicy, TenantPolicy
from bedside.scheduler.batching import batch_key
from bedside.scheduler.queue import Job, RequestQueue

MS = 1_000_000  # ns


def policy(**kw) -> SchedulingPolicy:
    levels = kw.pop("levels", None) or tuple(QueuePolicy() for _ in range(kw.get("priority_levels", 3)))
    return SchedulingPolicy(levels=levels, **kw)


def job(name: str, level: int = 2, tenant: str = "t", rows: int = 1, width: int = 4, now: int = 0) -> Job:
    inputs = {"x": np.zeros((rows, width), np.float32)}
    return Job(inputs, None, rows, batch_key(tenant, inputs, None), tenant, level, now, future=name)


def names(batch: list[Job]) -> list[str]:
    return [j.future for j in batch]


def drain_order(q: RequestQueue, now: int = 0) -> list[list[str]]:
    out = []
    while True:
        batch, _, _ = q.take(now)
        if not batch:
            return out
        q.done(batch, 1 * MS)
        out.append(names(batch))


def test_stat_overtakes_routine_without_batching():
    q = RequestQueue(policy(aging_us=0), max_batch=0)
    for n in ("r1", "r2"):
        q.admit(job(n, level=2), 0)
    q.admit(job("u1", level=1), 0)
    q.admit(job("s1", level=0), 0)
    assert drain_order(q) == [["s1"], ["u1"], ["r1"], ["r2"]]


def test_stat_runs_first_in_a_batch_of_its_own_behind_a_routine_backlog():
    q = RequestQueue(policy(aging_us=0), max_batch=4)
    for i in range(6):
        q.admit(job(f"r{i}"), 0)
    q.admit(job("stat", level=0), 0)
    q.admit(job("stat2", level=0), 0)
    # routine rows would only lengthen the STAT execution, so they wait for the next batch
    assert drain_order(q) == [["stat", "stat2"], ["r0", "r1", "r2", "r3"], ["r4", "r5"]]


def test_a_routine_batch_takes_urgent_work_of_its_tenant_along():
    q = RequestQueue(policy(aging_us=1000), max_batch=4)
    q.admit(job("r0"), 0)
    q.admit(job("u0", level=1), 3 * MS)  # r0 has aged to level 0 by now and leads
    assert drain_order(q, 3 * MS) == [["r0", "u0"]]


def test_a_reserved_instance_takes_stat_work_only():
    q = RequestQueue(policy(aging_us=0), max_batch=4)
    q.admit(job("r0"), 0)
    assert q.take(0, stat_only=True)[0] == []
    q.admit(job("s0", level=0), 0)
    assert names(q.take(0, stat_only=True)[0]) == ["s0"]
    assert names(q.take(0)[0]) == ["r0"]


def test_fifo_within_a_level():
    q = RequestQueue(policy(aging_us=0), max_batch=0)
    for i in range(5):
        q.admit(job(f"r{i}"), i)
    assert drain_order(q, 10) == [[f"r{i}"] for i in range(5)]


def test_aging_bounds_how_long_routine_waits():
    q = RequestQueue(policy(aging_us=1000), max_batch=0)  # one level per ms of waiting
    q.admit(job("routine", level=2), 0)
    q.admit(job("stat-early", level=0), 0)
    assert names(q.take(0)[0]) == ["stat-early"]
    # 1.5 ms later routine has climbed one level: still behind fresh STAT work
    q.admit(job("stat-1", level=0), int(1.5 * MS))
    assert names(q.take(int(1.5 * MS))[0]) == ["stat-1"]
    # after 2 ms it ranks as STAT and, being older, goes before a newer STAT request
    q.admit(job("stat-2", level=0), 2 * MS)
    assert names(q.take(2 * MS)[0]) == ["routine"]
    assert names(q.take(2 * MS)[0]) == ["stat-2"]


def test_full_queue_sheds_with_429_and_retry_after():
    levels = (QueuePolicy(), QueuePolicy(), QueuePolicy(max_queue_size=2))
    q = RequestQueue(policy(levels=levels), max_batch=8)
    q.admit(job("a"), 0)
    q.admit(job("b"), 0)
    with pytest.raises(Overloaded, match="queue for priority 3 is full") as err:
        q.admit(job("c"), 0)
    assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1
    q.admit(job("stat", level=0), 0)  # other levels keep their own room
    assert len(q) == 3


def test_deadline_that_cannot_be_met_is_rejected_at_admission():
    q = RequestQueue(policy(), max_batch=4)
    q.done([], exec_ns=10 * MS)  # each execution has been taking 10 ms
    for i in range(8):
        q.admit(job(f"r{i}"), 0)  # two full batches ahead: ~30 ms to finish a new one
    with pytest.raises(Unavailable, match=r"cannot finish within its 20 ms deadline: about 30\.0 ms") as err:
        q.admit(job("late"), 0, timeout_us=20_000)
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
    q.admit(job("ok"), 0, timeout_us=40_000)
    q.admit(job("stat", level=0), 0, timeout_us=20_000)  # STAT has nothing ahead of it


def test_deadline_passed_in_the_queue_is_rejected_never_dropped():
    q = RequestQueue(policy(aging_us=0), max_batch=0)
    q.admit(job("slow", level=2), 0, timeout_us=5_000)
    q.admit(job("fine", level=2), 0)
    batch, expired, _ = q.take(6 * MS)
    assert names(expired) == ["slow"] and names(batch) == ["fine"]
    assert q.in_flight["t"] == 1  # the expired one no longer counts


def test_timeout_action_delay_runs_overdue_work_after_work_on_time():
    levels = (QueuePolicy(), QueuePolicy(), QueuePolicy(timeout_action="delay", default_timeout_us=1000))
    q = RequestQueue(policy(levels=levels, aging_us=0), max_batch=0)
    q.admit(job("overdue"), 0)
    q.admit(job("on-time", level=1), 3 * MS)
    batch, expired, _ = q.take(3 * MS)
    assert expired == [] and names(batch) == ["on-time"]
    assert q.depth()["overdue"] == 1
    assert drain_order(q, 3 * MS) == [["overdue"]]


def test_per_request_timeout_needs_permission():
    levels = (QueuePolicy(allow_timeout_override=False), QueuePolicy(), QueuePolicy())
    q = RequestQueue(policy(levels=levels), max_batch=0)
    with pytest.raises(InvalidInput, match="does not take a per-request timeout"):
        q.admit(job("s", level=0), 0, timeout_us=100)


def test_tenant_quota_holds_and_frees_on_completion():
    q = RequestQueue(policy(tenants={"ward": TenantPolicy(max_in_flight=2)}), max_batch=0)
    q.admit(job("a", tenant="ward"), 0)
    q.admit(job("b", tenant="ward"), 0)
    with pytest.raises(Overloaded, match="tenant 'ward' already has 2 requests in flight"):
        q.admit(job("c", tenant="ward"), 0)
    q.admit(job("other", tenant="lab"), 0)  # another tenant is not affected
    batch, _, _ = q.take(0)
    q.done(batch)
    q.admit(job("c", tenant="ward"), 0)


def test_the_tenant_table_stays_bounded_whatever_names_callers_send():
    q = RequestQueue(policy(), max_batch=0, max_tenants=64)
    for i in range(64):
        q.admit(job(f"j{i}", tenant=f"t{i}"), 0)
    with pytest.raises(Overloaded, match="work in flight for 64 distinct tenants"):
        q.admit(job("one-too-many", tenant="new"), 0)  # all 64 busy: the table is full
    q.admit(job("known", tenant="t0"), 0)  # tenants already seen keep being served


def test_a_flood_of_tenant_names_does_not_lock_out_new_tenants():
    """Issue 10: after 1,021 one-off tenant names every new tenant, STAT included, got 429 until a
    reload. Tenants with nothing in flight are forgotten, longest idle first."""
    q = RequestQueue(policy(), max_batch=0, max_tenants=64)
    for i in range(1021):
        q.admit(job(f"j{i}", tenant=f"flood{i}"), 0)
        q.done(q.take(0)[0])
    assert len(q._served) <= 64 and len(q.in_flight) <= 64 and len(q._lanes) <= 64 * 4
    q.admit(job("stat", level=0, tenant="icu"), 0)
    assert names(q.take(0)[0]) == ["stat"]


def test_a_tenant_at_its_quota_sheds_routine_work_before_refusing_stat():
    """Issue 10: under a flood from one tenant, its STAT requests got 429. The quota now sheds the
    tenant's newest least urgent queued request to make room for a more urgent one."""
    q = RequestQueue(policy(tenants={"ward": TenantPolicy(max_in_flight=3)}), max_batch=0)
    for name in ("r1", "r2", "r3"):
        assert q.admit(job(name, level=2, tenant="ward"), 0) == []
    shed = q.admit(job("stat", level=0, tenant="ward"), 0)
    assert names(shed) == ["r3"]  # the newest routine request goes
    assert q.in_flight["ward"] == 3 and len(q) == 3
    assert names(q.take(0)[0]) == ["stat"]
    # only STAT left to shed for STAT: refused, and nothing was lost on the way
    q2 = RequestQueue(policy(tenants={"ward": TenantPolicy(max_in_flight=1)}), max_batch=0)
    q2.admit(job("s1", level=0, tenant="ward"), 0)
    with pytest.raises(Overloaded, match="already has 1 requests in flight"):
        q2.admit(job("s2", level=0, tenant="ward"), 0)
    assert names(q2.take(0)[0]) == ["s1"]


def test_shed_work_is_put_back_when_the_urgent_request_is_refused_after_all():
    stat_full = QueuePolicy(max_queue_size=1)
    levels = (stat_full, QueuePolicy(), QueuePolicy())
    q = RequestQueue(policy(levels=levels, tenants={"ward": TenantPolicy(max_in_flight=2)}), max_batch=0)
    q.admit(job("s0", level=0, tenant="other"), 0)  # the STAT queue is now full
    q.admit(job("r1", tenant="ward"), 0)
    q.admit(job("r2", tenant="ward"), 0)
    with pytest.raises(Overloaded, match="queue for priority 1 is full"):
        q.admit(job("stat", level=0, tenant="ward"), 0)
    assert q.in_flight["ward"] == 2 and len(q) == 3
    assert drain_order(q) == [["s0"], ["r1"], ["r2"]]


def test_batches_never_mix_tenants():
    q = RequestQueue(policy(), max_batch=8)
    for i in range(12):
        q.admit(job(f"{'ab'[i % 2]}{i}", tenant="ab"[i % 2]), 0)
    for batch in drain_order(q):
        assert len({n[0] for n in batch}) == 1


def test_requests_with_other_shapes_or_outputs_are_not_merged():
    q = RequestQueue(policy(), max_batch=8)
    q.admit(job("w4-a", width=4), 0)
    q.admit(job("w5", width=5), 0)
    q.admit(job("w4-b", width=4), 0)
    other_outputs = job("w4-out", width=4)
    other_outputs.key = batch_key("t", other_outputs.inputs, ["y"])
    q.admit(other_outputs, 0)
    assert drain_order(q) == [["w4-a", "w4-b"], ["w5"], ["w4-out"]]


def test_weighted_fair_share_between_backlogged_tenants():
    q = RequestQueue(policy(tenants={"icu": TenantPolicy(share=3.0), "ward": TenantPolicy(share=1.0)}), max_batch=2)
    for i in range(200):
        q.admit(job(f"i{i}", tenant="icu"), 0)
        q.admit(job(f"w{i}", tenant="ward"), 0)
    served = {"icu": 0, "ward": 0}
    for _ in range(40):
        batch, _, _ = q.take(0)
        served[batch[0].tenant] += len(batch)
        q.done(batch)
    assert served == {"icu": 60, "ward": 20}


def test_max_queue_delay_waits_for_company_but_stat_does_not():
    q = RequestQueue(policy(batching=BatchingPolicy(max_queue_delay_us=2000)), max_batch=4)
    q.admit(job("r0"), 0)
    batch, _, wait = q.take(0)
    assert batch == [] and wait == 2 * MS
    q.admit(job("r1"), MS)
    batch, _, wait = q.take(MS)
    assert batch == [] and wait == MS
    assert names(q.take(2 * MS)[0]) == ["r0", "r1"]
    q.admit(job("stat", level=0), 3 * MS)
    assert names(q.take(3 * MS)[0]) == ["stat"]
    for i in range(4):
        q.admit(job(f"f{i}"), 4 * MS)
    assert len(q.take(4 * MS)[0]) == 4  # a full batch goes at once


def test_preferred_batch_sizes():
    q = RequestQueue(policy(batching=BatchingPolicy(preferred_batch_sizes=(2, 4))), max_batch=8)
    for i in range(7):
        q.admit(job(f"r{i}"), 0)
    # as Triton: the largest preferred size that the queue can fill goes first
    assert [len(b) for b in drain_order(q)] == [4, 2, 1]


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "admit", "admit", "take"]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 2),  # level
            st.integers(1, 3),  # rows
            st.sampled_from([3, 4]),  # width: two batch keys per tenant
            st.sampled_from([None, 500, 50_000]),  # timeout in us
        ),
        max_size=80,
    ),
    max_batch=st.integers(0, 6),
)
def test_every_admitted_request_leaves_exactly_once_in_a_single_tenant_batch(ops, max_batch):
    q = RequestQueue(policy(aging_us=700), max_batch=max_batch)
    now, admitted, seen = 0, set(), []
    for i, (op, tenant, level, rows, width, timeout) in enumerate(ops):
        now += 100_000
        if op == "admit":
            j = job(f"{tenant}{i}", level=level, tenant=tenant, rows=min(rows, max_batch or rows), width=width, now=now)
            try:
                q.admit(j, now, timeout)
            except (Overloaded, Unavailable):
                continue
            admitted.add(j.future)
        else:
            batch, expired, _ = q.take(now)
            seen += names(expired)
            if batch:
                assert len({b.tenant for b in batch}) == 1 and len({b.key for b in batch}) == 1
                assert (max_batch == 0 and len(batch) == 1) or sum(b.rows for b in batch) <= max_batch
                seen += names(batch)
                q.done(batch, 1000)
    while len(q):
        now += 100_000
        batch, expired, _ = q.take(now)
        seen += names(expired) + names(batch)
        q.done(batch)
    assert sorted(seen) == sorted(admitted)
    assert all(v == 0 for v in q.in_flight.values())
