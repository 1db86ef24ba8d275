"""The real worker threads and a real ONNX model, held at a gate so the queue fills deterministically."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import tomllib

import numpy as np
import pytest

from bedside.dataplane import CallContext
from bedside.errors import Retired, Unavailable
from bedside.modelconfig.model import parse_config
from bedside.monitoring.latency import ModelStats
from bedside.protocol.types import InferRequest
from bedside.runtime.session import OnnxModel, open_session
from bedside.scheduler.worker import ModelQueue
from tests.models import SCALE_CONFIG, scale_model


class GatedModel(OnnxModel):
    """Runs the real session, but each run first waits at a gate the test opens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[np.ndarray] = []

    def run(self, inputs, output_names=None):
        self.calls.append(inputs["x"][:, 0].copy())
        if inputs["x"][0, 0] < 0:  # only the request that occupies a worker is held
            self.entered.set()
            assert self.gate.wait(10), "test never opened the gate"
        return super().run(inputs, output_names)


@pytest.fixture
def make_model(tmp_path):
    path = scale_model(tmp_path / "model.onnx", factor=2.0)

    def make(extra: str = "") -> GatedModel:
        config = parse_config(tomllib.loads(extra + SCALE_CONFIG), "scale")
        return GatedModel("scale", 1, path, config, open_session(path, 1, ("cpu",)))

    return make


def req(
    first: float, rows: int = 1, priority=None, tenant: str = "default", timeout_us=None
) -> tuple[InferRequest, CallContext]:
    x = np.tile(np.arange(rows, dtype=np.float32)[:, None] + first, (1, 4))
    return InferRequest({"x": x}), CallContext(tenant, priority, timeout_us)


async def occupy(queue: ModelQueue, model: GatedModel) -> asyncio.Future:
    """Submit one request and wait until the worker is inside the model with it."""
    future = queue.submit(*req(-1.0))
    assert await asyncio.to_thread(model.entered.wait, 10)
    return future


def test_batched_callers_each_get_their_own_rows(make_model):
    model = make_model()
    queue = ModelQueue(model, stats := ModelStats())

    async def main():
        first = await occupy(queue, model)
        futures = [queue.submit(*req(10.0 * i, rows=i)) for i in (1, 2, 3)]
        model.gate.set()
        await first
        return await asyncio.gather(*futures)

    results = asyncio.run(main())
    for i, out in zip((1, 2, 3), results, strict=True):
        expected = 2.0 * np.tile(np.arange(i, dtype=np.float32)[:, None] + 10.0 * i, (1, 4))
        np.testing.assert_array_equal(out["y"], expected)
    assert [len(c) for c in model.calls] == [1, 6]  # the three waiting requests ran as one batch
    assert stats.batch_sizes == {1: 1, 6: 1} and stats.request.count == 4
    queue.close()
    queue.join(5)


def test_stat_overtakes_routine_in_the_worker(make_model):
    model = make_model("dynamic_batching = { enabled = false }\n")
    queue = ModelQueue(model, ModelStats())

    async def main():
        first = await occupy(queue, model)
        futures = [
            queue.submit(*req(1.0)),
            queue.submit(*req(2.0)),
            queue.submit(*req(3.0, priority="stat")),
            queue.submit(*req(4.0, priority=2)),
        ]
        model.gate.set()
        await asyncio.gather(first, *futures)

    asyncio.run(main())
    assert [float(c[0]) for c in model.calls] == [-1.0, 3.0, 4.0, 1.0, 2.0]
    queue.close()


def test_a_request_past_its_deadline_gets_an_error_not_silence(make_model):
    now = [0]
    model = make_model()
    queue = ModelQueue(model, stats := ModelStats(), clock=lambda: now[0])

    async def main():
        first = await occupy(queue, model)
        late = queue.submit(*req(5.0, timeout_us=1000))
        on_time = queue.submit(*req(6.0))
        now[0] = 5_000_000  # 5 ms pass while the model is busy
        model.gate.set()
        await first
        with pytest.raises(Unavailable, match=r"deadline exceeded after 5\.0 ms") as err:
            await late
        assert err.value.headers["Retry-After"]
        return await on_time

    out = asyncio.run(main())
    assert out["y"][0, 0] == 12.0 and stats.rejected["DeadlineExceeded"] == 1
    queue.close()


def test_closing_finishes_queued_work_and_refuses_new_work(make_model):
    model = make_model()
    queue = ModelQueue(model, ModelStats())

    async def main():
        first = await occupy(queue, model)
        queued = queue.submit(*req(7.0))
        queue.close()
        with pytest.raises(Retired):
            queue.submit(*req(8.0))
        model.gate.set()
        return await first, await queued

    _, queued = asyncio.run(main())
    assert queued["y"][0, 0] == 14.0
    queue.join(5)
    assert not any(w.is_alive() for w in queue._workers)


def test_quota_rejections_are_counted_per_tenant(make_model):
    model = make_model("tenants = { lab = { max_in_flight = 1 } }\n")
    queue = ModelQueue(model, stats := ModelStats())

    async def main():
        first = await occupy(queue, model)
        ok = queue.submit(*req(1.0, tenant="lab"))
        with pytest.raises(Exception, match="tenant 'lab' already has 1 requests in flight"):
            queue.submit(*req(2.0, tenant="lab"))
        model.gate.set()
        await asyncio.gather(first, ok)

    asyncio.run(main())
    assert stats.tenants["lab"].rejected == 1 and stats.tenants["lab"].latency.count == 1
    queue.close()


def test_a_reserved_instance_serves_stat_while_routine_work_holds_the_other(make_model):
    model = make_model("instances = 2\nscheduling = { reserved_instances = 1 }\n")
    queue = ModelQueue(model, ModelStats())

    async def main():
        first = await occupy(queue, model)  # the routine instance is now stuck inside the model
        routine = queue.submit(*req(1.0))
        stat = await queue.submit(*req(2.0, priority="stat"))  # completes with the gate still shut
        assert not routine.done()
        model.gate.set()
        await asyncio.gather(first, routine)
        return stat

    assert asyncio.run(main())["y"][0, 0] == 4.0
    queue.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is a Linux feature")
def test_routine_instances_run_at_lower_os_priority(make_model):
    model = make_model("instances = 3\nscheduling = { reserved_instances = 1, routine_nice = 7 }\n")
    queue = ModelQueue(model, ModelStats())
    base = os.getpriority(os.PRIO_PROCESS, 0)
    nice = [os.getpriority(os.PRIO_PROCESS, t.native_id) for t in queue._workers]
    assert nice == [base, min(19, base + 7), min(19, base + 7)]  # the STAT instance keeps its priority
    queue.close()


def test_per_tenant_statistics_stay_bounded():
    from bedside.monitoring.latency import MAX_TENANTS, OTHER_TENANTS

    stats = ModelStats()
    for i in range(MAX_TENANTS + 50):
        stats.reject(f"t{i}", "Overloaded")
    assert len(stats.tenants) == MAX_TENANTS and stats.tenants[OTHER_TENANTS].rejected == 51
