"""Inference graphs: branches that really overlap, timeouts, optional steps that degrade the answer,
priority and tenant inside child steps, load-time refusals, and the response cache per tenant."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from bedside.dataplane.dataplane import Dataplane
from bedside.errors import DeadlineExceeded, InferenceFailed, InvalidInput, ModelLoadError, Unavailable
from bedside.graphs.steps import Port, StepContext, StepType, register
from bedside.protocol.types import CallContext, InferRequest
from tests.models import SCALE_CONFIG, scale_model, write_config

VEC = Port("x", "FP32", (-1, 4))
SEEN: list[tuple[str, str, object]] = []  # (step, tenant, priority) as the steps saw them
CALLS: list[str] = []
GATES: dict[str, asyncio.Event] = {}


def _plus_one(inputs, ctx: StepContext):
    SEEN.append((ctx.step, ctx.tenant, ctx.priority))
    CALLS.append(ctx.tenant)
    return {"x": inputs["x"] + 1}


async def _gated(inputs, ctx: StepContext):
    """Opens its own gate, then waits for the other branch's: finishes only if both run at once."""
    mine, other = (ctx.step, "b" if ctx.step == "a" else "a")
    GATES.setdefault(mine, asyncio.Event()).set()
    await asyncio.wait_for(GATES.setdefault(other, asyncio.Event()).wait(), timeout=5)
    return {"x": inputs["x"]}


async def _never(inputs, ctx: StepContext):
    await asyncio.Event().wait()
    return {"x": inputs["x"]}


def _broken(inputs, ctx: StepContext):
    raise RuntimeError("a bug that must not leak its text")


def _refuse(inputs, ctx: StepContext):
    raise InvalidInput("the dose field is not a number")


def _join(inputs, ctx: StepContext):
    extra = inputs.get("extra")
    return {"x": inputs["x"] + (extra if extra is not None else 0)}


register(StepType("test.plus_one", (VEC,), (VEC,), lambda p, f: _plus_one))
register(StepType("test.gated", (VEC,), (VEC,), lambda p, f: _gated, is_async=True))
register(StepType("test.never", (VEC,), (VEC,), lambda p, f: _never, is_async=True))
register(StepType("test.broken", (VEC,), (VEC,), lambda p, f: _broken))
register(StepType("test.refuse", (VEC,), (VEC,), lambda p, f: _refuse))
register(StepType("test.join", (VEC, Port("extra", "FP32", (-1, 4), optional=True)), (VEC,), lambda p, f: _join))

HEAD = """
deadline_ms = {deadline}
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
"""


def graph(root: Path, name: str, body: str, deadline: float = 2000, head: str = HEAD) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "graph.toml").write_text(head.format(deadline=deadline) + body, encoding="utf-8")


def step(name: str, source: str, function: str | None = None, model: str | None = None, more: str = "") -> str:
    kind = f'function = "{function}"' if function else f'model = "{model}"'
    port = "x"
    return f'[[steps]]\nname = "{name}"\n{kind}\ninputs = {{ {port} = "{source}" }}\n{more}\n'


def out(source: str, name: str = "y") -> str:
    return f'[[outputs]]\nname = "{name}"\nfrom = "{source}"\n'


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_config(tmp_path / "scale", SCALE_CONFIG)
    scale_model(tmp_path / "scale" / "1" / "model.onnx", factor=2.0)
    return tmp_path


def served(repo: Path) -> Dataplane:
    dp = Dataplane(repo)
    dp.start()
    return dp


def run(dp: Dataplane, name: str, x: np.ndarray, context: CallContext | None = None):
    return asyncio.run(dp.infer(name, None, InferRequest({"x": x}), context or CallContext()))


ONES = np.ones((1, 4), np.float32)


def test_a_chain_of_python_and_model_steps_answers_with_per_step_timing(repo):
    graph(repo, "chain", step("prep", "x", "test.plus_one") + step("double", "prep.x", model="scale") + out("double.y"))
    dp = served(repo)
    try:
        response = run(dp, "chain", ONES)
        assert response.outputs["y"].tolist() == [[4.0] * 4]  # (1 + 1) * 2
        params = response.parameters or {}
        assert params["degraded"] is False and {"step_prep_us", "step_double_us"} <= set(params)
        meta = dp.model_metadata("chain", None, CallContext().caller)
        assert meta.platform == "bedside_graph" and [t.name for t in meta.outputs] == ["y"]
        (row,) = dp.statistics("chain", None, CallContext().caller)
        assert row.success.count == 1 and row.detail["steps"]["double"]["ok"] == 1
        index = {r.name: r for r in dp.repository_index(CallContext().caller)}
        assert index["chain"].state == "READY" and index["scale"].state == "READY"
    finally:
        dp.close()


def test_parallel_branches_overlap(repo):
    """Each branch waits for the other to have started: run one after the other, both would time out."""
    body = step("a", "x", "test.gated") + step("b", "x", "test.gated")
    body += '[[steps]]\nname = "join"\nfunction = "test.join"\ninputs = { x = "a.x", extra = "b.x" }\n'
    graph(repo, "fork", body + out("join.x"))
    dp = served(repo)
    try:
        GATES.clear()
        response = run(dp, "fork", ONES)
        assert response.outputs["y"].tolist() == [[2.0] * 4] and response.parameters["degraded"] is False
    finally:
        dp.close()


def test_an_optional_step_that_times_out_degrades_the_answer_and_says_so(repo):
    body = step("slow", "x", "test.never", more="timeout_ms = 30\noptional = true")
    body += '[[steps]]\nname = "join"\nfunction = "test.join"\ninputs = { x = "x", extra = "slow.x" }\n'
    graph(repo, "degrades", body + out("join.x") + out("slow.x", "slow"))
    dp = served(repo)
    try:
        response = run(dp, "degrades", ONES)
        params = response.parameters or {}
        assert params["degraded"] is True and "slow: timed out after 30 ms" in params["degraded_steps"]
        assert response.outputs["y"].tolist() == [[1.0] * 4] and "slow" not in response.outputs
        (row,) = dp.statistics("degrades", None, CallContext().caller)
        assert row.detail["steps"]["slow"]["timed_out"] == 1 and row.detail["steps"]["join"]["ok"] == 1
    finally:
        dp.close()


def test_a_required_step_past_its_timeout_fails_the_graph(repo):
    graph(repo, "late", step("slow", "x", "test.never", more="timeout_ms = 20") + out("slow.x"))
    graph(repo, "deadline", step("slow", "x", "test.never") + out("slow.x"), deadline=25)
    dp = served(repo)
    try:
        with pytest.raises(DeadlineExceeded, match="step 'slow': timed out after 20 ms"):
            run(dp, "late", ONES)
        with pytest.raises(DeadlineExceeded, match="graph's deadline"):
            run(dp, "deadline", ONES)
        with pytest.raises(DeadlineExceeded):  # the caller's own deadline is shorter than the graph's
            run(dp, "late", ONES, CallContext(timeout_us=5_000))
    finally:
        dp.close()


def test_failing_steps_degrade_or_fail_without_leaking_their_text(repo):
    broken = step("bug", "x", "test.broken", more="optional = true")
    broken += '[[steps]]\nname = "join"\nfunction = "test.join"\ninputs = { x = "x", extra = "bug.x" }\n'
    graph(repo, "survives", broken + out("join.x"))
    graph(repo, "fails", step("bug", "x", "test.broken") + out("bug.x"))
    graph(repo, "refuses", step("check", "x", "test.refuse") + out("check.x"))
    dp = served(repo)
    try:
        params = run(dp, "survives", ONES).parameters or {}
        assert params["degraded_steps"] == "bug: failed (RuntimeError)"
        with pytest.raises(InferenceFailed) as failed:
            run(dp, "fails", ONES)
        assert "must not leak" not in failed.value.message
        with pytest.raises(InvalidInput, match="step 'check': the dose field is not a number"):
            run(dp, "refuses", ONES)  # a step's 400 stays a 400
        with pytest.raises(InvalidInput, match="expected datatype FP32"):
            asyncio.run(dp.infer("survives", None, InferRequest({"x": np.ones((1, 4), np.float64)})))
    finally:
        dp.close()


def test_priority_and_tenant_reach_every_child_step(repo):
    graph(repo, "chain", step("prep", "x", "test.plus_one") + step("double", "prep.x", model="scale") + out("double.y"))
    dp = served(repo)
    try:
        SEEN.clear()
        run(dp, "chain", ONES, CallContext(tenant="icu", priority=1))
        run(dp, "chain", ONES, CallContext(tenant="ward", priority="routine"))
        assert SEEN == [("prep", "icu", 1), ("prep", "ward", "routine")]
        (model,) = dp.statistics("scale", None, CallContext().caller)
        tenants = model.detail["tenants"]
        assert tenants["icu"]["success_count"] == 1 and tenants["ward"]["success_count"] == 1
        by_priority = model.detail["priorities"]
        assert by_priority["1"]["ok"] == 1 and by_priority["3"]["ok"] == 1  # STAT stayed STAT in the model queue
    finally:
        dp.close()


OPTIONAL_FEEDS_REQUIRED = step("a", "x", "test.plus_one", more="optional = true") + step("b", "a.x", "test.plus_one")
OPTIONAL_FEEDS_REQUIRED += out("b.x")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (step("a", "b.x", "test.plus_one") + step("b", "a.x", "test.plus_one") + out("b.x"), "form a cycle"),
        ('[[steps]]\nname = "a"\nfunction = "test.plus_one"\n' + out("a.x"), "input 'x' is not mapped"),
        (step("a", "nowhere", "test.plus_one") + out("a.x"), "neither a graph input nor a step's output"),
        (step("a", "x", "test.plus_one") + out("a.z"), "step 'a' gives no 'z'"),
        (step("a", "x", model="absent") + out("a.y"), "model 'absent' cannot be used"),
        (step("a", "x", "test.no_such_step") + out("a.x"), "no graph step named 'test.no_such_step'"),
        (OPTIONAL_FEEDS_REQUIRED, "step 'a' is optional"),
        (step("a", "x", "test.plus_one") + step("idle", "x", "test.plus_one") + out("a.x"), "nothing uses"),
    ],
)
def test_bad_graphs_are_refused_at_load_with_the_reason(repo, body, why):
    graph(repo, "bad", body)
    dp = served(repo)
    try:
        index = {r.name: r for r in dp.repository_index(CallContext().caller)}
        assert index["bad"].state == "UNAVAILABLE" and why in index["bad"].reason
        with pytest.raises(Unavailable, match="graph 'bad' is not ready"):
            run(dp, "bad", ONES)
        assert index["scale"].state == "READY"  # one bad graph takes nothing else down
    finally:
        dp.close()


def test_a_type_mismatch_between_steps_is_a_load_error(repo):
    head = HEAD.replace('datatype = "FP32"', 'datatype = "FP64"')
    graph(repo, "typed", step("double", "x", model="scale") + out("double.y"), head=head)
    dp = served(repo)
    try:
        (row,) = [r for r in dp.repository_index(CallContext().caller) if r.name == "typed"]
        assert "datatype FP64 where FP32 is expected" in row.reason
        with pytest.raises(ModelLoadError, match="datatype FP64"):
            asyncio.run(dp.load("typed", CallContext().caller))
    finally:
        dp.close()


def test_the_cache_answers_a_tenant_from_its_own_entries_only_and_empties_on_reload(repo):
    graph(repo, "cached", step("prep", "x", "test.plus_one") + out("prep.x") + "[cache]\nmax_entries = 8\n")
    dp = served(repo)
    try:
        CALLS.clear()
        first = run(dp, "cached", ONES, CallContext(tenant="icu"))
        again = run(dp, "cached", ONES, CallContext(tenant="icu"))
        assert CALLS == ["icu"] and (again.parameters or {}).get("cached") is True
        assert again.outputs["y"].tolist() == first.outputs["y"].tolist()
        run(dp, "cached", ONES, CallContext(tenant="ward"))  # same input, other tenant: computed for it
        assert CALLS == ["icu", "ward"]
        run(dp, "cached", ONES * 2, CallContext(tenant="icu"))  # other input
        assert CALLS == ["icu", "ward", "icu"]
        asyncio.run(dp.load("cached", CallContext().caller))
        run(dp, "cached", ONES, CallContext(tenant="icu"))  # a reload starts empty
        assert CALLS == ["icu", "ward", "icu", "icu"]
    finally:
        dp.close()


def test_a_model_cache_is_per_tenant_bounded_and_emptied_by_a_reload(tmp_path):
    write_config(tmp_path / "scale", SCALE_CONFIG + "[cache]\nmax_entries = 2\n")
    scale_model(tmp_path / "scale" / "1" / "model.onnx", factor=2.0)
    dp = served(tmp_path)
    try:

        def ask(x: np.ndarray, tenant: str):
            return asyncio.run(dp.infer("scale", None, InferRequest({"x": x}), CallContext(tenant=tenant)))

        assert "cached" not in (ask(ONES, "icu").parameters or {})
        hit = ask(ONES, "icu")
        assert (hit.parameters or {}).get("cached") is True and hit.outputs["y"].tolist() == [[2.0] * 4]
        assert "cached" not in (ask(ONES, "ward").parameters or {})  # another tenant: computed for it
        ask(ONES * 3, "icu")  # a third entry: the least recently used (icu's first) leaves, max_entries = 2
        assert (ask(ONES, "ward").parameters or {}).get("cached") is True
        assert "cached" not in (ask(ONES, "icu").parameters or {})
        (row,) = dp.statistics("scale", None, CallContext().caller)
        assert row.inference_count == 4  # the model ran for the four answers that were not cached
        asyncio.run(dp.load("scale", CallContext().caller))
        assert "cached" not in (ask(ONES, "icu").parameters or {})  # a reload starts empty
    finally:
        dp.close()
