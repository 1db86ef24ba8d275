"""Signed model updates end to end on loopback: a publisher's TUF repository served over HTTP, and a
box's agent that verifies, installs beside, checks, switches, watches and rolls back."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from bedside.protocol.types import InferRequest
from bedside.repository.serving import read_state
from tests.fleet import box, golden_for, log_bytes, scale_bytes, update_server


def answer(dataplane, x: float = 1.0) -> float:
    request = InferRequest({"x": np.full((1, 4), x, np.float32)})
    return float(asyncio.run(dataplane.infer("scale", None, request)).outputs["y"][0, 0])


def test_a_new_model_arrives_then_a_delta_update_switches_it(tmp_path):
    with update_server(tmp_path / "pub") as server:
        v1 = server.publish("scale", scale_bytes(tmp_path, 2.0))
        server.roll_out("scale", v1)
        with box(tmp_path / "box", server) as (dataplane, agent):
            [first] = agent.check()
            assert (first.action, first.serving, first.delta) == ("installed", 1, False)
            assert answer(dataplane) == 2.0
            v2 = server.publish("scale", scale_bytes(tmp_path, 3.0))
            server.roll_out("scale", v2)
            [second] = agent.check()
            assert (second.action, second.serving, second.delta) == ("installed", 2, True)
            assert second.golden and second.golden["passed"]
            assert answer(dataplane) == 3.0
            assert read_state(tmp_path / "box" / "models" / "scale").version == 2
            [again] = agent.check()
            assert again.action == "up-to-date"


def test_a_version_that_fails_its_golden_check_is_refused_and_the_old_one_serves(tmp_path):
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        with box(tmp_path / "box", server) as (dataplane, agent):
            agent.check()
            wrong = golden_for(scale_bytes(tmp_path, 5.0))  # golden outputs of another model
            v2 = server.publish("scale", scale_bytes(tmp_path, 3.0), golden=wrong)
            server.roll_out("scale", v2)
            [outcome] = agent.check()
            assert outcome.action == "refused" and "golden check failed" in outcome.reason
            assert answer(dataplane) == 2.0
            state = read_state(tmp_path / "box" / "models" / "scale")
            assert state.version == 1 and "2" in state.refused
            assert not (tmp_path / "box" / "models" / "scale" / "2").exists()
            [again] = agent.check()
            assert again.action == "refused" and again.reason.startswith("refused before")


def test_a_version_that_degrades_under_watch_is_rolled_back(tmp_path):
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        with box(tmp_path / "box", server, watch_s=3600.0, watch_min_requests=10) as (dataplane, agent):
            agent.check()
            positive = json.loads(golden_for(log_bytes(tmp_path)))
            for case in positive["cases"]:  # golden inputs where log() is right
                case["inputs"]["x"]["data"] = [abs(v) + 0.5 for v in case["inputs"]["x"]["data"]]
                case["outputs"]["y"]["data"] = [float(np.log(np.float32(v))) for v in case["inputs"]["x"]["data"]]
            v2 = server.publish("scale", log_bytes(tmp_path), golden=json.dumps(positive).encode())
            server.roll_out("scale", v2)
            [outcome] = agent.check()
            assert outcome.action == "watching"
            assert answer(dataplane, 1.0) == 0.0  # log(1) from v2
            failed = 0
            for _ in range(20):  # real traffic has negative values: NaN answers, refused to the caller
                try:
                    answer(dataplane, -1.0)
                except Exception:
                    failed += 1
            assert failed == 20
            [verdict] = agent.watch()
            assert verdict.action == "rolled-back" and "error rate" in verdict.reason
            assert answer(dataplane, 1.0) == 2.0
            state = read_state(tmp_path / "box" / "models" / "scale")
            assert (state.version, state.phase) == (1, "serving") and "2" in state.refused


def test_every_step_is_audited_with_versions_and_reasons(tmp_path):
    import sqlite3

    from bedside.security.audit import AuditLog
    from bedside.updates.agent import UpdateAgent
    from tests.fleet import settings

    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        audit = AuditLog(tmp_path / "audit.sqlite", buffer_max=1000, flush_ms=10, retention_days=0)
        repository = tmp_path / "models"
        repository.mkdir()
        agent = UpdateAgent(settings(server), tmp_path / "state", repository, audit=audit)
        assert agent.check()[0].action == "installed"
        v2 = server.publish("scale", scale_bytes(tmp_path, 3.0), golden=golden_for(scale_bytes(tmp_path, 9.0)))
        server.roll_out("scale", v2)
        assert agent.check()[0].action == "refused"
        audit.close()
        rows = (
            sqlite3.connect(tmp_path / "audit.sqlite")
            .execute("SELECT kind, caller, model, version, outcome, detail FROM entries ORDER BY seq")
            .fetchall()
        )
    kinds = [(kind, version, outcome) for kind, _, _, version, outcome, _ in rows]
    assert ("update-download", "1", "ok") in kinds and ("update-switch", "1", "ok") in kinds
    assert ("update-golden", "2", "refused") in kinds and ("update-refused", "2", "refused") in kinds
    assert {caller for _, caller, *_ in rows} == {"update-agent"}
    refused = next(detail for kind, *_, detail in rows if kind == "update-refused")
    assert "golden check failed" in refused and str(tmp_path) not in refused


def test_models_stay_encrypted_at_rest_and_deltas_patch_the_decrypted_bytes(tmp_path):
    from bedside.security.keys import KeyRing, new_key
    from bedside.updates.agent import UpdateAgent
    from tests.fleet import settings

    keys = KeyRing([new_key()])
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        repository = tmp_path / "models"
        repository.mkdir()
        agent = UpdateAgent(settings(server), tmp_path / "state", repository, keys=keys)
        assert agent.check()[0].action == "installed"
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 3.0)))
        [outcome] = agent.check()
        assert (outcome.action, outcome.delta) == ("installed", True)
    for version in (1, 2):
        folder = repository / "scale" / str(version)
        assert (folder / "model.onnx.enc").is_file() and not (folder / "model.onnx").exists()
    assert scale_bytes(tmp_path, 3.0) not in (repository / "scale" / "2" / "model.onnx.enc").read_bytes()
    assert not list((tmp_path / "state" / "staging").glob("*.part"))


def test_a_restart_under_watch_loads_both_versions_and_the_watch_goes_on(tmp_path):
    from bedside.dataplane import Dataplane
    from bedside.updates.agent import UpdateAgent
    from tests.fleet import settings

    now = [1.0e9]
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        with box(tmp_path / "box", server, watch_s=60.0, clock=lambda: now[0]) as (_, agent):
            agent.check()
            server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 3.0)))
            assert agent.check()[0].action == "watching"
        repository = tmp_path / "box" / "models"
        restarted = Dataplane(repository)  # the power came back: a new server on the same files
        restarted.start()
        try:
            assert restarted.lifecycle.ready_versions("scale") == [1, 2]
            assert answer(restarted) == 3.0
            agent = UpdateAgent(
                settings(server, watch_s=60.0), tmp_path / "box" / "state", repository,
                lifecycle=restarted.lifecycle, clock=lambda: now[0],
            )  # fmt: skip
            assert agent.watch() == []  # still under watch
            now[0] += 61.0
            assert [o.action for o in agent.watch()] == ["kept"]
            assert restarted.lifecycle.ready_versions("scale") == [2]
        finally:
            restarted.close()


def test_reports_reach_the_publisher_and_bad_ones_are_refused(tmp_path):
    import urllib3

    from bedside.updates.reports import ReportStore

    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        with box(tmp_path / "box", server, report_url=f"{server.url}/reports", device_id="ward-3-box-1") as (_, agent):
            agent.check()
            assert agent.reporter.sent == 1
        http = urllib3.PoolManager()
        bad = [
            ("/reports/../etc", b"{}"),
            ("/reports/box-2", b"not json"),
            ("/reports/box-2", b'{"device": "box-3"}'),
            ("/elsewhere", b"{}"),
        ]
        for path, body in bad:
            assert http.request("POST", server.url + path, body=body).status == 400
        headers = {"Content-Length": "abc"}
        assert http.request("POST", f"{server.url}/reports/box-2", headers=headers).status == 400
        reports = ReportStore(tmp_path / "pub" / "reports").all()
    assert list(reports) == ["ward-3-box-1"]
    report = reports["ward-3-box-1"]
    assert report["serving"]["scale"]["version"] == 1 and report["last"]["scale"]["action"] == "installed"
    assert set(report["serving"]["scale"]["live"]) == {"requests", "failures", "p50_ms", "p99_ms"}
    assert str(tmp_path) not in json.dumps(report)


def test_old_versions_are_pruned_to_keep_versions(tmp_path):
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        with box(tmp_path / "box", server, keep_versions=2) as (dataplane, agent):
            agent.check()
            for factor in (3.0, 4.0, 5.0):
                server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, factor)))
                assert agent.check()[0].action == "installed"
            folder = tmp_path / "box" / "models" / "scale"
            assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["3", "4"]
            assert answer(dataplane) == 5.0
