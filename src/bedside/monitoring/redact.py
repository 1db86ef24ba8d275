"""Log lines without request data or host paths.

An exception's message is where request data leaks into logs: numpy says which value it could not
convert, ONNX Runtime quotes shapes and names, the `hl7` library quotes the segment it choked on.
Tracebacks name files by absolute path, which shows the box's layout. So every exception that
reaches a log here is written as its type and the frames it passed through (module-relative file,
line, function), never its message; the handler installed by `install` applies that to every
logger, uvicorn's included.

With `fmt="json"` each line is one JSON object (`ts`, `level`, `logger`, `msg`, `error` for an
exception, and only the whitelisted context fields in `EXTRA_FIELDS`, never any other `extra=`),
under the same rules.
"""

from __future__ import annotations

import logging
import re
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
# the only `extra=` fields a JSON line carries: ids that say which request and model, never request data
EXTRA_FIELDS = ("request_id", "model", "version", "tenant")
_EXTRA_MAX = 128  # characters of one such field (a caller chooses its request id)
_ROOTS = ("site-packages/", "dist-packages/", "/src/", "/lib/python")


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\":]+/)+([^\s/'\":]+)")


def without_paths(text: str) -> str:
    """A library's message with every absolute path cut to its file name: ONNX Runtime says
    "Load model from /srv/.../model.onnx failed", which shows where the repository lives."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def _relative(filename: str) -> str:
    """`bedside/server/rest.py` for `/any/where/src/bedside/server/rest.py`; a basename otherwise."""
    for root in _ROOTS:
        cut = filename.rfind(root)
        if cut >= 0:
            tail = filename[cut + len(root) :]
            return tail.split("/", 1)[1] if root == "/lib/python" and "/" in tail else tail
    return filename.rsplit("/", 1)[-1]


def _frames(tb: TracebackType | None, limit: int = 12) -> list[str]:
    return [f"{_relative(f.filename)}:{f.lineno} in {f.name}" for f in traceback.extract_tb(tb)[-limit:]]


def describe_exception(exc: BaseException) -> str:
    """`ValueError at bedside/protocol/codec.py:120 in _decode_input`: the type and where (the
    innermost frame, and the innermost of bedside's own when that is elsewhere), no message."""
    frames = _frames(exc.__traceback__, 64)
    if not frames:
        return type(exc).__name__
    ours = [f for f in frames if f.startswith("bedside/")]
    where = frames[-1] if not ours or ours[-1] == frames[-1] else f"{frames[-1]} from {ours[-1]}"
    return f"{type(exc).__name__} at {where}"


class RedactingFormatter(logging.Formatter):
    """Formats exceptions as type + frames, without their messages or absolute paths."""

    def formatException(self, ei: Any) -> str:
        kind, exc, tb = ei
        if kind is None or exc is None:
            return ""
        lines = [f"{kind.__name__} (message withheld: it may carry request data)"]
        lines += [f"  at {frame}" for frame in _frames(tb)]
        cause = exc.__cause__ or exc.__context__
        if cause is not None and not exc.__suppress_context__:
            lines.append(f"  while handling {type(cause).__name__} at {', '.join(_frames(cause.__traceback__, 1))}")
        return "\n".join(lines)

    def formatStack(self, stack_info: str) -> str:
        return "(stack withheld)"


class JsonFormatter(RedactingFormatter):
    """One JSON object per record: `ts` (UTC, ms), `level`, `logger`, `msg`, the whitelisted
    `EXTRA_FIELDS` present on the record, and `error` (type and frames, as the text lines) for an
    exception. Exceptions are formatted from `exc_info` itself, never from a cached `exc_text` that
    another formatter may have written with the message in it."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _utc_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in EXTRA_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = _scalar(value)
        if isinstance(record.exc_info, tuple) and record.exc_info[0] is not None:
            line["error"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line).decode()


def _utc_ms(created: float) -> str:
    """`2024-05-01T12:34:56.789Z`."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _scalar(value: object) -> str | int | float | bool:
    """A field's value as JSON can carry it: numbers as they are (an int beyond 53 bits as text, which
    orjson would refuse), anything else as text, cut to `_EXTRA_MAX` characters."""
    if isinstance(value, bool | float) or (isinstance(value, int) and -(2**53) < value < 2**53):
        return value
    return str(value)[:_EXTRA_MAX]


def install(level: str, fmt: str = "text") -> None:
    """Log to stderr through the redacting formatter (`text`, or `json`: one object a line), for
    this process's every logger."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.addFilter(_no_connection_chatter)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _no_connection_chatter(record: logging.LogRecord) -> bool:
    """Drop uvicorn's per-WebSocket lines: their path names the bed ("WebSocket /v2/streams/ecg/ICU-07"),
    and a line per connection says nothing an operator needs (the streams' counters do)."""
    if not record.name.startswith("uvicorn"):
        return True
    text = str(record.msg)
    return not ('"WebSocket ' in text or text in ("connection open", "connection closed"))
