"""What the server's log handler lets through: no request data, host paths or bed names."""

from __future__ import annotations

import logging

from bedside.monitoring import redact


def _passes(name: str, msg: str, *args: object) -> bool:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    return redact._no_connection_chatter(record)


def test_websocket_lines_that_name_a_bed_are_dropped():
    assert not _passes("uvicorn.error", '%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/v2/streams/ecg/ICU-07")
    assert not _passes("uvicorn.error", "connection open")
    assert not _passes("uvicorn.error", "connection closed")
    assert _passes("uvicorn.error", "Started server process [%d]", 1)
    assert _passes("bedside.streams", "connection open")  # only uvicorn's own chatter is dropped


def test_an_exception_is_logged_as_type_and_frames_without_its_message():
    try:
        open("/home/alice/patients/MRN-123456.csv")  # noqa: SIM115
    except OSError as exc:
        text = redact.describe_exception(exc)
    assert "FileNotFoundError" in text and "MRN-123456" not in text and "/home/alice" not in text
