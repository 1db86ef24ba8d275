"""`server.log_format=json`: one JSON object a line, with request ids but never request data; the
text lines stay as they were."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bedside.cli import app
from bedside.cli.serving import build_settings
from bedside.monitoring import redact
from bedside.settings import DEFAULTS, SettingsError
from tests.conftest import start_server

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HOST_PATH = "/home/alice/wards/icu/MRN-4711.hl7"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """`install` replaces the root logger's handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line, or this fails
    assert all(isinstance(obj, dict) for obj in parsed)
    return parsed


def _fail() -> None:
    try:
        {}["MRN-4711"]
    except KeyError:  # implicitly chained: the line says what it was handling, by type only
        raise ValueError(f"could not convert 'MRN-4711' read from {HOST_PATH}")  # noqa: B904


def test_every_line_is_a_json_object_with_the_fields(root_logging, capsys):
    redact.install("info", "json")
    log = logging.getLogger("bedside.test")
    log.info("loaded %d models", 3)
    log.warning("slow")
    log.debug("not at info")
    lines = _lines(capsys.readouterr().err)
    assert [(line["level"], line["logger"], line["msg"]) for line in lines] == [
        ("INFO", "bedside.test", "loaded 3 models"),
        ("WARNING", "bedside.test", "slow"),
    ]
    for line in lines:
        assert isinstance(line["ts"], str) and TS.match(line["ts"])
        assert abs(datetime.fromisoformat(line["ts"]).timestamp() - time.time()) < 60
        assert datetime.fromisoformat(line["ts"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert set(line) == {"ts", "level", "logger", "msg"}


def test_an_exception_is_type_and_frames_never_its_message(root_logging, capsys):
    redact.install("info", "json")
    try:
        _fail()
    except ValueError:
        logging.getLogger("bedside.test").exception("decoding failed", extra={"request_id": "r-1"})
    err = capsys.readouterr().err
    assert "MRN-4711" not in err and "/home/alice" not in err and "could not convert" not in err
    (line,) = _lines(err)
    assert line["msg"] == "decoding failed" and line["request_id"] == "r-1" and line["level"] == "ERROR"
    error = str(line["error"])
    assert error.startswith("ValueError (message withheld")
    assert "test_json_logs.py:" in error and " in _fail" in error and "while handling KeyError" in error
    assert "/tests/" not in error  # frames by file name, not the box's layout


def test_a_message_cached_by_another_formatter_is_not_reused():
    try:
        _fail()
    except ValueError:
        record = logging.getLogger("bedside.test").makeRecord(
            "bedside.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    assert "MRN-4711" in logging.Formatter().format(record)  # the standard one caches the message ...
    out = redact.JsonFormatter().format(record)
    assert "MRN-4711" not in out and "ValueError" in json.loads(out)["error"]  # ... which is never used


def test_only_whitelisted_extras_appear(root_logging, capsys):
    redact.install("info", "json")
    extra = {
        "request_id": "req-42",
        "model": "ecg_rhythm",
        "version": 3,
        "tenant": "ward-7",
        "patient_id": "MRN-4711",
        "inputs": [[72.0, 98.5]],
        "bed": "ICU-07",
    }
    logging.getLogger("bedside.test").info("scored", extra=extra)
    logging.getLogger("bedside.test").info("long id", extra={"request_id": "x" * 1000})
    err = capsys.readouterr().err
    first, second = _lines(err)
    assert first == {**first, "request_id": "req-42", "model": "ecg_rhythm", "version": 3, "tenant": "ward-7"}
    assert set(first) == {"ts", "level", "logger", "msg", "request_id", "model", "version", "tenant"}
    assert "MRN-4711" not in err and "ICU-07" not in err and "98.5" not in err
    assert second["request_id"] == "x" * 128


def test_connection_chatter_is_still_dropped(root_logging, capsys):
    redact.install("info", "json")
    logging.getLogger("uvicorn.error").info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/v2/streams/ecg/ICU-07")
    logging.getLogger("uvicorn.error").info("connection open")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 7)
    (line,) = _lines(capsys.readouterr().err)
    assert line["msg"] == "Started server process [7]" and line["logger"] == "uvicorn.error"


def test_text_stays_the_default_and_unchanged(root_logging, capsys):
    redact.install("info")
    (handler,) = logging.getLogger().handlers
    assert type(handler.formatter) is redact.RedactingFormatter
    assert handler.formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    log = logging.getLogger("bedside.test")
    log.info("loaded %d models", 3, extra={"request_id": "req-42", "patient_id": "MRN-4711"})
    try:
        _fail()
    except ValueError:
        log.exception("decoding failed")
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO bedside\.test: loaded 3 models", lines[0])
    assert re.fullmatch(r"\S+ \S+ ERROR bedside\.test: decoding failed", lines[1])
    assert lines[2] == "ValueError (message withheld: it may carry request data)"
    assert all(line.startswith("  ") for line in lines[3:]) and "MRN-4711" not in "\n".join(lines)
    assert DEFAULTS.server.log_format == "text"


def test_an_unknown_format_is_refused(root_logging):
    with pytest.raises(ValueError, match="text, json"):
        redact.install("info", "xml")


def test_the_setting_comes_from_the_environment_or_set():
    settings, sources = build_settings({"BEDSIDE_SERVER_LOG_FORMAT": "json"})
    assert settings.server.log_format == "json" and sources["server.log_format"] == "BEDSIDE_SERVER_LOG_FORMAT"
    settings, sources = build_settings({}, None, ["server.log_format=json"])
    assert settings.server.log_format == "json" and sources["server.log_format"] == "--set"
    with pytest.raises(SettingsError, match=r"server\.log_format must be one of text, json"):
        build_settings({}, None, ["server.log_format=xml"])
    result = CliRunner().invoke(app, ["settings", "--json"], env={"BEDSIDE_SERVER_LOG_FORMAT": "json"})
    assert result.exit_code == 0, result.output
    (row,) = [row for row in json.loads(result.output) if row["setting"] == "server.log_format"]
    assert row["value"] == "json" and row["source"] == "BEDSIDE_SERVER_LOG_FORMAT"


def test_a_server_started_with_json_logs_writes_json_lines(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "corrupt" / "1").mkdir(parents=True)  # a model that fails to load: one warning line
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf graph")
    log = tmp_path / "server.log"
    srv = start_server(repo, log, "--no-streams", env={"BEDSIDE_SERVER_LOG_FORMAT": "json"})
    srv.process.terminate()
    srv.process.wait(10)
    # stdout and stderr share the file: the start-up banner is the one line printed to stdout
    lines = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith("bedside serving")]
    parsed = _lines("\n".join(lines))
    assert any(line["logger"] == "bedside.repository" and "corrupt" in str(line["msg"]) for line in parsed), lines
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in parsed)
    assert str(tmp_path) not in log.read_text()
