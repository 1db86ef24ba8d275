"""Who may do what, at the dataplane, where every transport's requests are decided: roles, tenants,
identical 404s for other tenants' models, tenant-only statistics, and the audit of refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from bedside.dataplane import Dataplane, call_context
from bedside.dataplane.access import Access
from bedside.errors import BedsideError, Forbidden, NotFound, Unauthenticated
from bedside.modelconfig.model import parse_config
from bedside.protocol.types import ANONYMOUS, SYSTEM, CallContext, InferRequest
from bedside.security.audit import AuditLog
from bedside.security.auditcheck import last_entries
from bedside.security.callers import CallerRegistry, CallersError, Peer
from tests.models import SCALE_CONFIG, scale_model, write_config


class Recorder:
    """The real audit log, read back: entries as (kind, caller, tenant, transport, model, version,
    request id, outcome, latency) in the order written."""

    def __init__(self, path: Path) -> None:
        self.log = AuditLog(path, buffer_max=100_000, flush_ms=10_000, retention_days=0)
        self.log.start()

    @property
    def entries(self) -> list[tuple[str, ...]]:
        self.log.flush()
        fields = ("kind", "caller", "tenant", "transport", "model", "version", "request_id", "outcome", "latency_us")
        return [tuple(str(e[f]) for f in fields) for e in last_entries(self.log.path, 100_000)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tenants")
    tenants = 'tenants = { "a" = { share = 2.0 }, "secret-tenant" = { share = 1.0 } }\n'
    write_config(root / "a_model", tenants + SCALE_CONFIG + '[access]\nowner = "a"\n')
    write_config(root / "b_model", SCALE_CONFIG + '[access]\nowner = "b"\nshared_with = ["a"]\n')
    write_config(root / "everyone", SCALE_CONFIG + '[access]\nowner = "b"\nshared_with = ["*"]\n')
    write_config(root / "unowned", SCALE_CONFIG)  # no [access]: the default tenant's
    write_config(root / "unreadable", "this is [not toml")  # its [access] cannot be known
    scale_model(root / "unreadable" / "1" / "model.onnx")
    for name in ("a_model", "b_model", "everyone", "unowned"):
        scale_model(root / name / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[CallerRegistry, dict[str, str]]:
    reg = CallerRegistry(tmp_path_factory.mktemp("callers") / "callers.json")
    tokens = {}
    for name, tenant, roles, beds in [
        ("a-infer", "a", ["infer"], []),
        ("a-monitor", "a", ["monitor"], []),
        ("a-admin", "a", ["admin"], []),
        ("b-all", "b", ["infer", "monitor", "admin"], []),
        ("cart", "a", ["device"], ["ICU-*"]),
    ]:
        reg.upsert(name, tenant, roles, beds)
        tokens[name] = reg.issue_token(name)[1]
    reg.add_certificate("a-infer", "ab" * 32, "2030-01-01")
    reg.save()
    return reg, tokens


@pytest.fixture(scope="module")
def plane(repo: Path, registry: tuple[CallerRegistry, dict[str, str]]):
    audit = Recorder(repo.parent / "audit.sqlite")
    dataplane = Dataplane(repo, access=Access(registry[0], audit.log))
    dataplane.start()
    yield dataplane, registry[1], audit
    dataplane.close()
    audit.log.close()


def _as(plane_, name: str):
    dataplane, tokens, _ = plane_
    return dataplane.authenticate(f"Bearer {tokens[name]}", None, "rest")


def _x() -> InferRequest:
    return InferRequest({"x": np.ones((1, 4), np.float32)}, id="r-1")


def _infer(dataplane: Dataplane, caller, model: str):
    context = call_context(None, transport="rest", caller=caller)
    return asyncio.run(dataplane.infer(model, None, _x(), context))


def test_credentials_name_a_caller_or_are_refused(plane):
    dataplane, tokens, audit = plane
    caller = _as(plane, "a-infer")
    assert (caller.name, caller.tenant, caller.roles) == ("a-infer", "a", frozenset({"infer"}))
    assert dataplane.authenticate(None, Peer("a-infer", "ab" * 32), "grpc").name == "a-infer"
    for authorization, peer in [
        (None, None),
        ("Bearer bst_nope_nope", None),
        ("Basic YTpi", None),
        ("Bearer ", None),
        (None, Peer("a-infer", "cd" * 32)),  # a certificate the file does not list
        (None, Peer("someone", "ab" * 32)),  # a listed fingerprint under another name
    ]:
        with pytest.raises(Unauthenticated) as refused:
            dataplane.authenticate(authorization, peer, "rest")
        assert refused.value.status == 401 and "Bearer" in refused.value.headers["WWW-Authenticate"]
        assert tokens["a-infer"] not in refused.value.message
    assert [e[0] for e in audit.entries[-6:]] == ["auth_failed"] * 6


def test_a_tenant_never_meets_another_tenants_model(plane):
    dataplane, _, _ = plane
    a = _as(plane, "a-infer")
    assert _infer(dataplane, a, "a_model").outputs["y"].tolist() == [[2.0] * 4]
    assert _infer(dataplane, a, "b_model").model_name == "b_model"  # shared with a
    assert _infer(dataplane, a, "everyone").model_name == "everyone"
    missing = _error(lambda: _infer(dataplane, a, "no_such_model"))
    for name in ("unowned",):
        hidden = _error(lambda name=name: _infer(dataplane, a, name))
        assert type(hidden) is NotFound
        assert hidden.message == missing.message.replace("no_such_model", name)
    b = _as(plane, "b-all")
    hidden = _error(lambda: _infer(dataplane, b, "a_model"))
    assert hidden.message == missing.message.replace("no_such_model", "a_model")
    # the same answer from every call that names the model
    for call in (
        lambda: dataplane.check_served("a_model", None, b),
        lambda: dataplane.model_metadata("a_model", None, b),
        lambda: dataplane.model_metadata("a_model", "1", b),
        lambda: dataplane.model_config("a_model", None, b),
        lambda: dataplane.model_ready("a_model", None, b),
        lambda: dataplane.model_ready("a_model", "7", b),
        lambda: dataplane.statistics("a_model", None, b),
        lambda: asyncio.run(dataplane.load("a_model", b)),
        lambda: asyncio.run(dataplane.unload("a_model", b)),
    ):
        error = _error(call)
        assert (type(error), error.message) == (NotFound, hidden.message)


def test_roles_decide_before_the_model_is_looked_up(plane):
    dataplane, _, _ = plane
    monitor, admin, cart = _as(plane, "a-monitor"), _as(plane, "a-admin"), _as(plane, "cart")
    for caller in (monitor, admin, cart):  # no infer role: 403 for a model that exists and one that does not
        for model in ("a_model", "no_such_model"):
            assert type(_error(lambda c=caller, m=model: _infer(dataplane, c, m))) is Forbidden
    infer = _as(plane, "a-infer")
    for call in (
        lambda: dataplane.statistics(None, None, infer),
        lambda: dataplane.repository_index(infer),
        lambda: asyncio.run(dataplane.load("a_model", infer)),
        lambda: asyncio.run(dataplane.unload("nope", monitor)),
        lambda: dataplane.model_metadata("a_model", None, cart),
        lambda: dataplane.require(infer, "monitor", "sse"),
        lambda: dataplane.may_feed(infer, "ICU-1", "ecg"),
    ):
        assert type(_error(call)) is Forbidden
    dataplane.may_feed(cart, "ICU-1", "ecg")
    assert type(_error(lambda: dataplane.may_feed(cart, "WARD-2", "ecg"))) is Forbidden
    assert dataplane.model_metadata("a_model", None, monitor).name == "a_model"
    assert {r.name for r in dataplane.repository_index(admin)} == {"a_model", "b_model", "everyone"}
    assert {r.name for r in dataplane.repository_index(_as(plane, "b-all"))} == {"b_model", "everyone"}


def test_the_tenant_comes_from_the_credentials(plane):
    a = _as(plane, "a-infer")
    assert call_context(None, transport="rest", caller=a).tenant == "a"
    assert call_context(None, transport="rest", caller=a, tenant="a").tenant == "a"
    with pytest.raises(Forbidden, match="credentials set it"):
        call_context(None, transport="rest", caller=a, tenant="b")
    assert call_context(None, transport="rest", caller=ANONYMOUS, tenant="b").tenant == "b"  # auth off


def test_statistics_show_a_tenant_only_its_own_figures(plane):
    dataplane, _, _ = plane
    a, b = _as(plane, "a-infer"), _as(plane, "b-all")
    (before,) = dataplane.statistics("b_model", None, _as(plane, "a-monitor"))
    for _ in range(3):
        _infer(dataplane, a, "b_model")
    _infer(dataplane, b, "b_model")
    (owner_view,) = dataplane.statistics("b_model", None, b)
    assert set(owner_view.detail["tenants"]) == {"b"}
    assert owner_view.inference_count >= 4  # the model's own counts: b owns it
    (shared_view,) = dataplane.statistics("b_model", None, _as(plane, "a-monitor"))
    assert shared_view.detail == {"tenant": "a", **shared_view.detail} and "tenants" not in shared_view.detail
    assert shared_view.inference_count == shared_view.detail["success_count"] == before.inference_count + 3
    assert {s.name for s in dataplane.statistics(None, None, _as(plane, "a-monitor"))} == {
        "a_model",
        "b_model",
        "everyone",
    }


def test_every_inference_and_refusal_is_audited_without_data(plane):
    dataplane, _, audit = plane
    before = len(audit.entries)
    a = _as(plane, "a-infer")
    _infer(dataplane, a, "a_model")
    _error(lambda: _infer(dataplane, a, "unowned"))
    _error(lambda: asyncio.run(dataplane.load("a_model", a)))
    kinds = [(e[0], e[1], e[4]) for e in audit.entries[before:]]
    assert ("infer", "a-infer", "a_model") in kinds
    assert ("denied", "a-infer", "unowned") in kinds
    assert ("infer", "a-infer", "unowned") in kinds  # the refused request is on the record too, as a 404
    ok = next(e for e in audit.entries[before:] if e[0] == "infer" and e[4] == "a_model")
    assert ok[5:8] == ("1", "r-1", "ok") and int(ok[8]) >= 0  # version, request id, outcome, latency (µs)
    assert all("1.0" not in "".join(e) for e in audit.entries)  # never a tensor value


def test_without_authentication_everything_is_open_and_internal_calls_always_are(repo: Path):
    dataplane = Dataplane(repo)
    dataplane.start()
    try:
        assert dataplane.authenticate(None, None, "rest") is ANONYMOUS
        for model in ("a_model", "b_model", "unowned"):
            assert _infer(dataplane, ANONYMOUS, model).model_name == model
        out = asyncio.run(dataplane.infer("a_model", None, _x(), CallContext(tenant="streams")))
        assert out.model_name == "a_model" and CallContext().caller is SYSTEM
    finally:
        dataplane.close()


def test_access_config_is_checked(tmp_path: Path):
    base = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [4]}],
    }
    assert parse_config({**base, "access": {"owner": "icu", "shared_with": ["*"]}}, "m").access.admits("any")
    for bad in ({"owner": "*"}, {"owner": "a b"}, {"shared_with": "a"}, {"owners": "a"}, {"shared_with": [3]}):
        with pytest.raises(BedsideError, match="access"):
            parse_config({**base, "access": bad}, "m")


def _error(call) -> BedsideError:
    try:
        call()
    except BedsideError as exc:
        return exc
    raise AssertionError("no error raised")


def test_a_config_names_no_other_tenant(plane):
    dataplane, _, _ = plane
    shown = dataplane.model_config("a_model", None, _as(plane, "a-infer")).to_dict()
    assert set(shown["tenants"]) == {"*", "a"}
    assert "secret-tenant" in dataplane.model_config("a_model", None, SYSTEM).to_dict()["tenants"]


def test_a_tenant_uses_a_model_shared_with_it_but_only_the_owner_loads_and_unloads_it(plane):
    dataplane = plane[0]
    with pytest.raises(Forbidden, match="only the tenant that owns"):
        asyncio.run(dataplane.unload("b_model", _as(plane, "a-admin")))
    with pytest.raises(Forbidden, match="only the tenant that owns"):
        asyncio.run(dataplane.load("everyone", _as(plane, "a-admin")))
    assert _infer(dataplane, _as(plane, "a-infer"), "b_model").model_name == "b_model"  # still served


def test_a_model_whose_config_cannot_be_read_belongs_to_no_tenant(plane):
    dataplane, _, _ = plane
    for name in ("a-admin", "b-all"):
        caller = _as(plane, name)
        assert "unreadable" not in {r.name for r in dataplane.repository_index(caller)}
        assert type(_error(lambda c=caller: dataplane.model_metadata("unreadable", None, c))) is NotFound
    assert "unreadable" in {r.name for r in dataplane.repository_index(SYSTEM)}


def test_a_flood_of_failed_logins_is_counted_not_written_one_by_one(tmp_path: Path):
    audit = Recorder(tmp_path / "audit.sqlite")
    now = [100.0]
    access = Access(CallerRegistry(tmp_path / "callers.json"), audit.log, failures_per_s=3, clock=lambda: now[0])
    for _ in range(10):
        with pytest.raises(Unauthenticated):
            access.authenticate("Bearer bst_wrong", None, "rest")
    assert [e[0] for e in audit.entries] == ["auth_failed"] * 3
    now[0] = 101.5
    with pytest.raises(Unauthenticated):
        access.authenticate(None, None, "grpc")
    details = [e for e in audit.entries]
    assert len(details) == 5  # the 7 not written one by one are one entry, then the new second's first
    summary = last_entries(audit.log.path, 10)[3]
    assert summary["detail"].startswith("7 more: the bearer token is not valid")
    audit.log.close()


def test_the_callers_file_is_checked_before_it_is_trusted(tmp_path: Path):
    path = tmp_path / "callers.json"
    reg = CallerRegistry(path)
    reg.upsert("cart", "a", ["device"], ["ICU-*"])
    reg.save()
    text = path.read_text().replace('"beds": [\n    "ICU-*"\n   ]', '"beds": "ICU-*"')
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(CallersError, match="beds must be a list"):
        CallerRegistry(path)
    reg.save()
    path.chmod(0o664)  # group-writable: someone else could add an admin token
    with pytest.raises(CallersError, match="writable by no one else"):
        CallerRegistry(path)
