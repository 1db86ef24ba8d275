"""How `bedside serve` and `bedside settings` build the server's settings: defaults, then BEDSIDE_*
variables, then options; a bad value is one line naming the setting and exit 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bedside.cli import app
from bedside.cli.serving import build_settings, describe
from bedside.settings import DEFAULTS, SettingsError, from_environment

runner = CliRunner()


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit | None)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_environment_overrides_defaults_and_options_override_both():
    env = {"BEDSIDE_SERVER_GRPC_PORT": "9001", "BEDSIDE_ECG_ALERT_PROBABILITY": "0.7", "BEDSIDE_SERVER_HTTP_PORT": "81"}
    settings, sources = build_settings(env)
    assert settings.server.grpc_port == 9001 and settings.ecg.alert_probability == 0.7
    assert sources["server.grpc_port"] == "BEDSIDE_SERVER_GRPC_PORT" and sources["server.host"] == "default"
    settings, sources = build_settings(
        env,
        {"grpc_port": -1, "port": None, "streams": False, "alerts_hl7": "pager.ward:2576"},
        ["ecg.alert_probability=0.9", "scoring.timeout_ms=250"],
    )
    assert settings.server.grpc_port == -1 and sources["server.grpc_port"] == "--grpc-port"
    assert settings.server.http_port == 81 and sources["server.http_port"] == "BEDSIDE_SERVER_HTTP_PORT"  # not given
    assert settings.ecg.alert_probability == 0.9 and sources["ecg.alert_probability"] == "--set"
    assert settings.scoring.timeout_ms == 250.0
    assert settings.streams.enabled is False and sources["streams.enabled"] == "--no-streams"
    assert settings.alerts.hl7_target == "pager.ward:2576"
    assert settings.server.host == DEFAULTS.server.host


@pytest.mark.parametrize(
    ("env", "options", "sets", "named"),
    [
        ({"BEDSIDE_SERVER_HTTP_PORT": "0"}, {}, [], "BEDSIDE_SERVER_HTTP_PORT: server.http_port must be between"),
        ({"BEDSIDE_SERVER_PROT": "1"}, {}, [], "unknown setting BEDSIDE_SERVER_PROT"),
        ({}, {"port": 70000}, [], "--port: server.http_port must be between 1 and 65535"),
        ({}, {"log_level": "loud"}, [], "--log-level: server.log_level must be one of"),
        ({}, {}, ["server.prot=1"], "unknown setting 'server.prot'"),
        ({}, {}, ["nosuch.key=1"], "unknown setting 'nosuch.key'"),
        ({}, {}, ["ecg.alert_probability"], "--set wants section.key=value"),
        ({}, {}, ["ecg.alert_probability=1.5"], "ecg.alert_probability must be between 0 and 1"),
        ({}, {"port": 9000}, ["server.http_port=9001"], "server.http_port is given twice"),
        ({}, {"alerts_hl7": "pager.ward"}, [], "--alerts-hl7: alerts.hl7_target must be HOST:PORT"),
        (
            {"BEDSIDE_ALERTS_HL7_TARGET": "pager:0"},
            {},
            [],
            "BEDSIDE_ALERTS_HL7_TARGET: alerts.hl7_target must be HOST:PORT",
        ),
    ],
)
def test_bad_values_name_the_setting(env, options, sets, named):
    with pytest.raises(SettingsError) as info:
        build_settings(env, options, sets)
    assert named in str(info.value)


def test_settings_command_lists_every_setting_and_its_source(monkeypatch):
    from bedside.cli.common import console

    monkeypatch.setattr(console, "width", 200)
    result = runner.invoke(app, ["settings", "--json"], env={"BEDSIDE_SCORING_INTERVAL_S": "2.5"})
    assert result.exit_code == 0, result.output
    rows = {row["setting"]: row for row in json.loads(result.output)}
    assert set(rows) == {dotted for dotted, _, _ in DEFAULTS.rows()}
    assert rows["scoring.interval_s"] == {
        "setting": "scoring.interval_s",
        "value": 2.5,
        "source": "BEDSIDE_SCORING_INTERVAL_S",
        "env": "BEDSIDE_SCORING_INTERVAL_S",
        "help": "seconds between per-bed scorings",
    }
    assert rows["server.grpc_port"]["source"] == "default" and rows["server.grpc_port"]["value"] == 8001
    table = runner.invoke(app, ["settings"], env={"BEDSIDE_SCORING_INTERVAL_S": "2.5"}, terminal_width=200)
    assert (
        table.exit_code == 0
        and "BEDSIDE_SCORING_INTERVAL_S" in table.output
        and "ecg.alert_probability" in table.output
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BEDSIDE_SERVER_GRPC_PORT": "lots"}, "BEDSIDE_SERVER_GRPC_PORT: server.grpc_port must be an integer"),
        ({"BEDSIDE_STREAMS_ENABLED": "maybe"}, "streams.enabled must be true or false"),
        ({"BEDSIDE_SERVER_GRPC_PROT": "9001"}, "unknown setting BEDSIDE_SERVER_GRPC_PROT"),
    ],
)
def test_settings_command_refuses_a_bad_environment_in_one_line(env, named):
    assert named in one_line_error(runner.invoke(app, ["settings"], env=env, terminal_width=200))


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--set", "ecg.alert_probabilty=0.9"], {}, "unknown setting 'ecg.alert_probabilty'"),
        (["--set", "ecg.alert_probability=high"], {}, "ecg.alert_probability must be a number"),
        (["--port", "0"], {}, "--port: server.http_port"),
        (["--alerts-hl7", "pager"], {}, "--alerts-hl7: alerts.hl7_target must be HOST:PORT"),
        ([], {"BEDSIDE_LIMITS_MAX_TENANTS": "0"}, "BEDSIDE_LIMITS_MAX_TENANTS: limits.max_tenants"),
    ],
)
def test_serve_refuses_bad_settings_before_starting(args, env, named, tmp_path):
    result = runner.invoke(app, ["serve", "-r", str(tmp_path / "not-there"), *args], env=env, terminal_width=200)
    assert named in one_line_error(result)  # refused before the repository is even looked at


def test_serve_runs_the_server_with_the_built_settings_and_reports_startup_errors(monkeypatch, tmp_path):
    import bedside.server.run as run

    calls = []

    def fake_serve(repository: Path, settings) -> None:  # type: ignore[no-untyped-def]
        calls.append((repository, settings))
        raise run.StartupError("gRPC: [Errno 98] address already in use")

    monkeypatch.setattr(run, "serve", fake_serve)
    result = runner.invoke(
        app,
        ["serve", "-r", str(tmp_path), "--grpc-port", "9101", "--mllp-port", "-1", "--set", "ecg.budget_ms=8"],
        env={"BEDSIDE_SERVER_GRPC_PORT": "9001", "BEDSIDE_SERVER_HTTP_PORT": "8100"},
        terminal_width=300,
    )
    assert result.exit_code == 1, result.output
    ((repository, settings),) = calls
    assert repository == tmp_path
    assert (settings.server.grpc_port, settings.server.http_port) == (9101, 8100)
    assert settings.streams.mllp_port == -1 and settings.ecg.budget_ms == 8.0
    lines = result.output.strip().splitlines()
    served = f"bedside serving repository {tmp_path.name!r} on http://127.0.0.1:8100/v2, gRPC on 127.0.0.1:9101"
    assert lines[0] == served
    assert lines[1] == "bedside cannot start: gRPC: [Errno 98] address already in use" and len(lines) == 2


def test_the_served_line_names_only_what_runs():
    settings = DEFAULTS.replace({"server.grpc_port": -1, "streams.mllp_port": 2580, "alerts.hl7_target": "pager:2576"})
    assert describe(settings, None) == (
        "bedside serving the demo repository on http://127.0.0.1:8000/v2, HL7 MLLP on 127.0.0.1:2580, "
        "alerts as HL7 to pager:2576"
    )
    off = DEFAULTS.replace({"streams.enabled": False, "server.host": "::1"})
    assert describe(off, Path("/srv/hospital/repo")) == (  # the folder's name only: no host paths in logs
        "bedside serving repository 'repo' on http://[::1]:8000/v2, gRPC on [::1]:8001, streams off"
    )


def test_an_empty_host_is_refused_and_the_runtime_variables_are_known():
    with pytest.raises(SettingsError, match=r"server\.host must not be empty"):
        from_environment({"BEDSIDE_SERVER_HOST": " "})
    settings, named = from_environment({"BEDSIDE_TRT_CACHE": "/var/cache/trt", "BEDSIDE_DEMO_DIR": "/srv/demo"})
    assert settings == DEFAULTS and named == set()
