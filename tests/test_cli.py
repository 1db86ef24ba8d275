from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bedside.cli import app

runner = CliRunner()


def test_help_texts_describe_each_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "settings", "demo", "models", "infer", "export", "optimize", "bench", "replay"):
        assert command in result.output
    serve = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    for option in ("--repository", "--port", "--grpc-port", "--mllp-port", "--no-streams", "--alerts-hl7", "--set"):
        assert option in serve.output
    assert "Default: 8001" in serve.output  # the effective default, from bedside.settings


def test_help_texts_show_plain_metavars():
    """Issue 11: typer 0.27+ printed `<bool>` after --help and `{name}` in usage lines."""
    import re

    import typer.main

    for command in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert not re.search(r"<(str|int|float|bool|path)>|\{[a-z_]+\}", text), (command, text)


def test_the_entry_points_reach_the_same_app():
    import bedside.cli

    assert callable(bedside.cli.main) and bedside.cli.app is app


def test_models_refuses_a_missing_repository_in_one_line(tmp_path):
    result = runner.invoke(app, ["models", "--repository", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "is not a folder" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_models_checks_a_repository_offline(serving_repo):
    result = runner.invoke(app, ["models", "--repository", str(serving_repo), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["breast_mass_malignancy"]["state"] == "READY"
    assert rows["corrupt"]["state"] == "UNAVAILABLE" and "cannot load" in rows["corrupt"]["reason"]
    table = runner.invoke(app, ["models", "--repository", str(serving_repo)])
    assert table.exit_code == 0 and "breast_mass_malign" in table.output


def test_infer_against_a_running_server(server):
    result = runner.invoke(
        app,
        [
            "infer",
            "diabetes_progression",
            "--url",
            server.url,
            "-d",
            "[[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.86, 87]]",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["model_name"] == "diabetes_progression" and 100 < doc["outputs"][0]["data"][0] < 300


def test_infer_reports_server_errors_without_a_traceback(server):
    """What the server refuses is the user's to fix: one line with its reason, exit 2."""
    result = runner.invoke(app, ["infer", "nope", "--url", server.url, "-d", "[[1]]"])
    assert result.exit_code == 2 and "HTTP 404" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["infer", "breast_mass_malignancy", "--url", server.url, "-d", "[[1, 2]]"])
    assert result.exit_code == 2 and "expected shape" in result.output


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ('[[59, "two", 32.1]]', "not a number"),
        ("[[1, 2, 3], [4, 5]]", "different lengths"),
        ("[[1, 2", "not valid JSON"),
    ],
)
def test_infer_refuses_bad_rows_in_one_line(server, data, reason):
    result = runner.invoke(app, ["infer", "diabetes_progression", "--url", server.url, "-d", data])
    assert result.exit_code == 2 and reason in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_taken_port_is_found_before_anything_loads_and_names_the_flag(tmp_path):
    """Issue 11: a second `bedside serve` died on the MLLP port after loading every model."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, names in [
            (["--mllp-port", str(port), "--grpc-port", "-1"], "--mllp-port"),
            (["--grpc-port", str(port), "--mllp-port", "-1"], "--grpc-port"),
            (["--port", str(port), "--grpc-port", "-1", "--mllp-port", "-1"], "--port"),
        ]:
            # a repository that does not exist yet would be an error too: the port check comes first
            argv = [sys.executable, "-m", "bedside", "serve", "-r", str(tmp_path), *flags]
            if "--port" not in flags:
                from tests.conftest import free_port

                argv += ["--port", str(free_port())]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            output = done.stdout + done.stderr
            assert done.returncode == 1 and "Address already in use" in output and names in output, output
            assert "Traceback" not in output and "loaded" not in output


def test_user_mistakes_end_in_one_line_and_exit_2_never_a_traceback(tmp_path):
    """Issue 11: a missing file, a file that is not a pickle, an unknown reference name each ended
    in a traceback. The entry point turns them into one line; --debug shows the traceback."""
    import subprocess
    import sys

    not_pickle = tmp_path / "model.pkl"
    not_pickle.write_text("not a pickle")
    cases = [
        (["--model-file", str(tmp_path / "nosuch.pkl"), "--sample", str(tmp_path / "x.npy")], "No such file"),
        (["--model-file", str(not_pickle), "--sample", str(not_pickle)], "cannot use the input given"),
        (["--reference", "nosuch"], "unknown reference model 'nosuch'; choose one of ecg_cnn"),
    ]
    entry = "from bedside.cli import main; main()"
    for extra, reason in cases:
        argv = [sys.executable, "-c", entry, "export", "m", "-r", str(tmp_path / "repo"), *extra]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode == 2 and reason in output and "Traceback" not in output, output
        assert len(output.strip().splitlines()) == 1, output
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
