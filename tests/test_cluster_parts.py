"""The cluster's parts that need no Ray: the STAT-first gate, the queue-delay policy, the plan of
deployments read from a repository, and the gateway's routing (through a backend of our own)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from bedside.cluster.autoscale import QUEUE_DELAY, QueueDelayPolicy
from bedside.cluster.gate import PriorityGate
from bedside.cluster.plan import GRAPH, MODEL, plan
from bedside.errors import ModelLoadError, Overloaded
from bedside.modelconfig.cluster import parse_cluster
from bedside.server.gateway import Gateway
from bedside.server.inproc import HTTPAnswer, HTTPCall, call_app
from bedside.settings import DEFAULTS

# --- the gate ------------------------------------------------------------------------------------


def test_gate_lets_stat_go_before_routine_that_waited_longer():
    async def scenario() -> list[str]:
        gate = PriorityGate(limit=1, max_waiting=10)
        order: list[str] = []
        await gate.enter(2)  # the one place is taken

        async def wait(name: str, level: int) -> None:
            await gate.enter(level)
            order.append(name)

        tasks = [asyncio.create_task(wait(f"routine{i}", 2)) for i in range(3)]
        await asyncio.sleep(0)  # let the routine ones queue first
        tasks.append(asyncio.create_task(wait("stat", 0)))
        await asyncio.sleep(0)
        for _ in range(4):
            gate.leave()  # one place frees: the most urgent waiter takes it
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["stat", "routine0", "routine1", "routine2"]


def test_gate_refuses_beyond_its_bound_with_retry_after():
    async def scenario() -> None:
        gate = PriorityGate(limit=1, max_waiting=1)
        await gate.enter(0)
        waiter = asyncio.create_task(gate.enter(2))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await gate.enter(0)
        assert refused.value.headers["Retry-After"] == "1" and gate.refused == 1
        gate.leave()
        await waiter
        assert gate.in_flight == 1 and gate.waiting == 0

    asyncio.run(scenario())


def test_gate_grows_with_the_replicas_and_forgets_a_caller_that_left():
    async def scenario() -> None:
        gate = PriorityGate(limit=1, max_waiting=10)
        await gate.enter(1)
        gone = asyncio.create_task(gate.enter(1))
        stays = asyncio.create_task(gate.enter(1))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.resize(2)  # a second replica runs: the waiter goes at once
        await stays
        assert gate.in_flight == 2 and gate.waiting == 0

    asyncio.run(scenario())


# --- the autoscaling policy ---------------------------------------------------------------------------


class Context:
    def __init__(self, replicas: int, delays_ms: list[float], ongoing: float) -> None:
        self.current_num_replicas = replicas
        self.target_num_replicas = replicas
        self.aggregated_metrics = {QUEUE_DELAY: {f"r{i}": d for i, d in enumerate(delays_ms)}}
        self.total_num_requests = ongoing


@pytest.mark.parametrize(
    ("replicas", "delays", "ongoing", "wanted"),
    [
        (1, [12.0], 1.0, 3),  # 12 ms against a 5 ms target: 2.4 times the replicas
        (2, [4.0, 6.0], 2.0, 2),  # at target: stay
        (2, [0.5, 0.5], 20.0, 5),  # little delay but 10 in flight per replica (4 wanted): 2.5 times
        (3, [0.1, 0.2, 0.0], 1.0, 2),  # idle: one fewer at a time
        (2, [3.0, 3.0], 1.0, 2),  # under target but not well under: hysteresis holds
        (1, [], 0.0, 0),  # no requests, no metrics: one fewer (Ray's min_replicas bounds it)
    ],
)
def test_queue_delay_policy(replicas, delays, ongoing, wanted):
    policy = QueueDelayPolicy(target_queue_ms=5.0, target_ongoing=4.0)
    desired, state = policy(Context(replicas, delays, ongoing))
    assert desired == wanted
    assert "delay_ratio" in state


# --- the plan -----------------------------------------------------------------------------------------


def test_plan_reads_every_model_and_graph_with_its_cluster_table(demo_repo: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(demo_repo, repo)
    config = repo / "diabetes_progression" / "config.toml"
    config.write_text(config.read_text() + "\n[cluster]\nmin_replicas = 2\nmax_replicas = 4\nmemory_mb = 900\n")
    settings = DEFAULTS.cluster
    placements = {p.name: p for p in plan(repo, settings)}
    models = sorted(p.name for p in (repo).iterdir() if p.is_dir() and not (p / "graph.toml").exists())
    assert [n for n, p in placements.items() if p.kind == MODEL] == models
    diabetes = placements["diabetes_progression"]
    assert (diabetes.min_replicas, diabetes.max_replicas, diabetes.memory_bytes) == (2, 4, 900 << 20)
    breast = placements["breast_mass_malignancy"]
    size = sum(f.stat().st_size for f in (repo / "breast_mass_malignancy").rglob("*") if f.is_file())
    assert breast.memory_bytes == (settings.replica_base_mb << 20) + int(size * settings.model_memory_factor)
    assert (breast.min_replicas, breast.max_replicas, breast.cpus) == (1, settings.max_replicas, settings.replica_cpus)
    graph = placements["medication_check"]
    assert graph.kind == GRAPH and graph.serves[0] == "medication_check" and "medication_risk" in graph.serves
    assert graph.deployment == "graph-medication_check" and breast.deployment == "model-breast_mass_malignancy"
    assert breast.level("stat") == 0 and breast.level(None) == breast.policy.default_priority - 1
    assert breast.level("no-such-level") == breast.policy.priority_levels - 1  # the replica refuses it


def test_a_bad_cluster_table_is_refused_with_its_reason():
    with pytest.raises(ModelLoadError, match="min_replicas 3 is above"):
        parse_cluster({"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ModelLoadError, match="cluster takes"):
        parse_cluster({"replicas": 2})
    with pytest.raises(ModelLoadError, match="cpus must be a number"):
        parse_cluster({"cpus": 0})


# --- the gateway ----------------------------------------------------------------------------------------


class Backend:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, HTTPCall]] = []

    async def forward(self, model: str, priority: Any, call: HTTPCall) -> HTTPAnswer:
        self.sent.append((model, priority, call))
        return HTTPAnswer(200, ((b"content-type", b"application/json"),), b'{"model_name":"%s"}' % model.encode())

    async def forward_any(self, call: HTTPCall) -> HTTPAnswer:
        return HTTPAnswer(200, (), b'{"name":"bedside"}')

    async def gather(self, call: HTTPCall) -> list[HTTPAnswer]:
        rows_a = [{"name": "b", "version": "1"}, {"name": "a", "version": "1"}]
        rows_b = [{"name": "a", "version": "1", "from": "graph replica"}, {"name": "g", "version": "1"}]
        if call.path.endswith("/stats"):
            return [HTTPAnswer(200, (), orjson.dumps({"model_stats": r})) for r in (rows_a, rows_b)]
        return [HTTPAnswer(200, (), orjson.dumps(r)) for r in (rows_a, rows_b)]

    async def ready(self) -> bool:
        return False


STAT_HEADER = ((b"x-bedside-priority", b"1"),)


def _call(method: str, path: str, body: bytes = b"", headers: tuple[tuple[bytes, bytes], ...] = ()) -> HTTPCall:
    return HTTPCall(method, path, b"", headers, body)


def test_gateway_routes_by_model_and_reads_the_priority_cheaply():
    backend = Backend()
    gateway = Gateway(backend, max_body=1 << 20)

    async def scenario() -> list[HTTPAnswer]:
        body = b'{"inputs": [], "parameters": {"priority": "stat"}}'
        return [
            await call_app(gateway, _call("POST", "/v2/models/m1/infer", body)),
            await call_app(gateway, _call("POST", "/v2/models/m2/versions/1/infer", b"{}", STAT_HEADER)),
            await call_app(gateway, _call("GET", "/v2/models/m3")),
            await call_app(gateway, _call("GET", "/v2/health/ready")),
            await call_app(gateway, _call("GET", "/v2/health/live")),
            await call_app(gateway, _call("POST", "/v2/repository/index", b"{}")),
            await call_app(gateway, _call("GET", "/v2/models/stats")),
            await call_app(gateway, _call("GET", "/v2/beds")),
            await call_app(gateway, _call("POST", "/v2/repository/models/m1/unload")),
            await call_app(gateway, _call("POST", "/v2/models/m1/infer", b"x" * ((1 << 20) + 1))),
        ]  # fmt: skip

    infer, header, meta, ready, live, index, stats, beds, unload, large = asyncio.run(scenario())
    assert [(m, p) for m, p, _ in backend.sent] == [("m1", "stat"), ("m2", "1"), ("m3", None)]
    assert infer.status == 200 and orjson.loads(infer.body) == {"model_name": "m1"}
    assert header.status == 200 and meta.status == 200
    assert (ready.status, orjson.loads(ready.body)) == (503, {"ready": False})
    assert (live.status, orjson.loads(live.body)) == (200, {"live": True})
    names = [(r["name"], r.get("from")) for r in orjson.loads(index.body)]
    assert names == [("a", None), ("b", None), ("g", None)]  # ordered, the model's own row kept once
    assert [r["name"] for r in orjson.loads(stats.body)["model_stats"]] == ["a", "b", "g"]
    assert beds.status == 404 and b"ward's box" in beds.body
    assert unload.status == 409 and b"bedside cluster up" in unload.body
    assert large.status == 413


def test_metrics_from_every_deployment_merge_into_one_valid_text():
    from prometheus_client.parser import text_string_to_metric_families

    from bedside.server.gateway import merged_metrics

    def text(model: str, lost: int, extra_model: str = "") -> bytes:
        lines = [
            "# HELP bedside_requests Requests answered.",
            "# TYPE bedside_requests counter",
            f'bedside_requests_total{{model="{model}",version="1"}} 5.0',
        ]
        if extra_model:  # a graph's replica also reports the model it loads
            lines.append(f'bedside_requests_total{{model="{extra_model}",version="1"}} 99.0')
        lines += [
            "# HELP bedside_audit_lost Entries lost.",
            "# TYPE bedside_audit_lost gauge",
            f"bedside_audit_lost {lost}",
        ]
        return ("\n".join(lines) + "\n").encode()

    merged = merged_metrics([HTTPAnswer(200, (), text("a", 1)), HTTPAnswer(200, (), text("g", 2, extra_model="a"))])
    assert merged.status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged.body.decode())
        for s in family.samples
    }
    assert samples[("bedside_requests_total", (("model", "a"), ("version", "1")))] == 5.0  # its own deployment's
    assert samples[("bedside_requests_total", (("model", "g"), ("version", "1")))] == 5.0
    assert samples[("bedside_audit_lost", ())] == 3.0  # server-wide: summed over the replicas
    refused = HTTPAnswer(403, (), b'{"error": "monitor role needed"}')
    assert merged_metrics([HTTPAnswer(200, (), text("a", 0)), refused]) is refused
