"""The publisher's side: key rotation that boxes follow, rollout cohorts, the stage decisions read
from reports, maintenance windows, and the commands' one-line errors."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bedside.cli import app
from bedside.settings import parse_window
from bedside.updates.progress import decide, stage_health
from bedside.updates.rollout import ModelRollout, PlanError, RolloutPlan, device_bucket, parse_stages
from tests.fleet import box, scale_bytes, update_server
from tests.models import SCALE_CONFIG, scale_model

runner = CliRunner()


class Ran:
    """A command's exit code and output as `bedside` (main) gives them: an error is one line, exit 2."""

    def __init__(self, *args: str) -> None:
        from bedside.cli import explain

        result = runner.invoke(app, list(args), terminal_width=200)
        self.exit_code, self.output = result.exit_code, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            self.exit_code, line = explain(result.exception)
            self.output += line


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "root"])
def test_a_box_follows_a_key_rotation_and_keeps_updating(tmp_path, role):
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        with box(tmp_path / "box", server) as (_, agent):
            assert agent.check()[0].action == "installed"
            old_keys = json.loads((server.root / "keys" / "keys.json").read_text())[role]
            server.publisher.rotate(role)
            assert json.loads((server.root / "keys" / "keys.json").read_text())[role] != old_keys
            server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 3.0)))
            [outcome] = agent.check()
            assert (outcome.action, outcome.serving) == ("installed", 2)
            trusted = json.loads((tmp_path / "box" / "state" / "metadata" / "root.json").read_text())
            assert trusted["signed"]["version"] == 2  # every rotation is a new root, which the box now trusts


def test_a_root_with_a_threshold_needs_that_many_signatures(tmp_path):
    from bedside.updates.publisher import Publisher

    publisher = Publisher(tmp_path / "repo", tmp_path / "keys")
    publisher.init(root_keys=3, root_threshold=2)
    root = json.loads((tmp_path / "repo" / "metadata" / "1.root.json").read_text())
    assert root["signed"]["roles"]["root"]["threshold"] == 2 and len(root["signatures"]) == 3
    assert all(oct(p.stat().st_mode)[-3:] == "600" for p in (tmp_path / "keys").glob("*"))
    published = [p for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    assert published and all(oct(p.stat().st_mode)[-3:] == "644" for p in published)  # a web server reads them


def test_the_keys_folder_may_not_be_inside_the_repository(tmp_path):
    from bedside.updates.publisher import Publisher, PublishError

    with pytest.raises(PublishError, match="must not be inside"):
        Publisher(tmp_path / "repo", tmp_path / "repo" / "keys")


def test_cohorts_are_a_stable_hash_of_the_device_id_and_stages_are_cumulative():
    assert device_bucket("box-17") == device_bucket("box-17")
    buckets = [device_bucket(f"box-{i}") for i in range(10_000)]
    assert 400 < sum(b < 5 for b in buckets) < 600  # about 5 %
    rollout = ModelRollout(2, parse_stages("group:icu,5,100"))
    icu_only = [f"box-{i}" for i in range(200) if rollout.admits(f"box-{i}", frozenset({"icu"}))]
    assert len(icu_only) == 200 and not rollout.admits("box-1", frozenset())
    rollout.stage = 1
    in_5 = {f"box-{i}" for i in range(2000) if rollout.admits(f"box-{i}", frozenset())}
    rollout.stage = 2
    assert in_5 < {f"box-{i}" for i in range(2000) if rollout.admits(f"box-{i}", frozenset())}


@pytest.mark.parametrize("text", ["", "0", "101", "fast", "group:", "group:../x"])
def test_bad_stages_are_refused_with_the_reason(text):
    with pytest.raises(PlanError):
        parse_stages(text)


def test_a_plan_that_is_not_valid_is_refused():
    with pytest.raises(PlanError):
        RolloutPlan.from_json(b'{"models": {"x": {"version": 0, "stages": []}}}')
    with pytest.raises(PlanError):
        RolloutPlan.from_json(b'{"models": {"../x": {"version": 1, "stages": [{"percent": 5}]}}}')


def _report(version: int, phase: str = "serving", refused: dict[str, str] | None = None) -> dict:
    return {"serving": {"m": {"version": version, "phase": phase, "refused": refused or {}}}}


def test_a_stage_halts_on_any_failure_waits_for_watches_and_then_advances():
    rollout = ModelRollout(2, parse_stages("100"))
    failed = stage_health("m", rollout, {"a": _report(2), "b": _report(1, refused={"2": "golden check failed"})})
    assert decide(rollout, failed, 1)[0] == "halt" and "golden check failed" in decide(rollout, failed, 1)[1]
    watching = stage_health("m", rollout, {"a": _report(2, "watching")})
    assert decide(rollout, watching, 1)[0] == "wait"
    assert decide(rollout, stage_health("m", rollout, {"a": _report(2)}), 1)[0] == "done"
    two = ModelRollout(2, parse_stages("100,100"))
    assert decide(two, stage_health("m", two, {"a": _report(2)}), 1)[0] == "advance"


@pytest.mark.parametrize(
    ("window", "now", "inside"),
    [("01:00-05:00", "03:00", True), ("01:00-05:00", "05:00", False), ("22:00-04:00", "23:30", True),
     ("22:00-04:00", "03:59", True), ("22:00-04:00", "12:00", False)],
)  # fmt: skip
def test_maintenance_windows_may_span_midnight(tmp_path, window, now, inside):
    from bedside.updates.agent import UpdateAgent

    with update_server(tmp_path / "pub") as server, box(tmp_path / "box", server, window=window) as (_, agent):
        assert isinstance(agent, UpdateAgent)
        assert agent.in_window(datetime.fromisoformat(f"2026-11-24T{now}")) is inside
    assert parse_window(window) is not None


def test_publish_and_rollout_commands(tmp_path):
    repo, keys, reports = tmp_path / "repo", tmp_path / "keys", tmp_path / "reports"
    opts = ["--repo", str(repo), "--keys", str(keys)]
    assert Ran("publish", "init", *opts).exit_code == 0
    again = Ran("publish", "init", *opts)
    assert again.exit_code == 2 and "already holds" in again.output
    version = tmp_path / "models" / "m" / "1"
    scale_model(version / "model.onnx", weights=100)
    (version.parent / "config.toml").write_text(SCALE_CONFIG)
    added = Ran("publish", "add", str(version), *opts)
    assert added.exit_code == 0 and "published m v1" in added.output
    not_a_version = Ran("publish", "add", str(version.parent), *opts)
    assert not_a_version.exit_code == 2 and "version folder" in not_a_version.output
    assert Ran("rollout", "start", "m", "1", *opts, "--stages", "10,100").exit_code == 0
    reports.mkdir()
    (reports / "box-1.json").write_text(json.dumps({"device": "box-1", **_report(1)}))
    status = Ran("rollout", "status", "m", "--repo", str(repo), "--reports", str(reports))
    assert status.exit_code == 0 and '"stage": "1/2"' in status.output
    assert Ran("rollout", "pause", "m", *opts).exit_code == 0
    paused = Ran("rollout", "advance", "m", *opts, "--reports", str(reports))
    assert paused.exit_code == 2 and "paused" in paused.output
    assert Ran("rollout", "resume", "m", *opts).exit_code == 0
    (reports / "box-2.json").write_text(json.dumps({"device": "box-2", **_report(0, refused={"1": "does not load"})}))
    halted = Ran("rollout", "advance", "m", *opts, "--reports", str(reports))
    assert halted.exit_code == 1 and "halted" in halted.output and "does not load" in halted.output
    missing = Ran("rollout", "start", "m", "7", *opts)
    assert missing.exit_code == 2 and "no published version 7" in missing.output
    assert not Path(tmp_path / "repo" / "keys").exists()


def test_update_runs_one_pass_and_says_what_it_did(tmp_path, monkeypatch):
    monkeypatch.setenv("BEDSIDE_STREAMS_STATE_DIR", str(tmp_path / "state"))
    box_repo = tmp_path / "box"
    box_repo.mkdir()
    no_url = Ran("update", "-r", str(box_repo))
    assert no_url.exit_code == 2 and "no update repository" in no_url.output
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)))
        args = ["update", "-r", str(box_repo), "--url", server.url, "--root", str(server.trusted_root)]
        first = Ran(*args)
        assert first.exit_code == 0 and '"action": "installed"' in first.output
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 3.0), golden=b'{"cases": []}'))
        refused = Ran(*args)
        assert refused.exit_code == 1 and '"action": "refused"' in refused.output
        assert str(tmp_path) not in refused.output
    assert (tmp_path / "state" / "audit.sqlite").is_file()  # the pass is audited as the server's agent is
