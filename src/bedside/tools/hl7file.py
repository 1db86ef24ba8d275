"""Recorded HL7 v2 files for replay: read (MLLP-framed, or plain text with one message from each MSH
line), their message times found, and re-timed to the present.

A recording's timestamps are as old as the recording, and a server refuses observations older than
streams.max_observation_age_s (1 h by default). Re-timing shifts every timestamp bedside reads
(MSH-7, OBR-7, OBX-14) by one whole number of seconds, so the spacing between messages is kept; a
time written with a zone offset keeps its offset, one written without (a naive local time) is
written as UTC with an explicit +0000, never naive again. Times without an offset are read as UTC
to measure the spacing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from bedside.streams.mllp import END, START

# HL7 DTM to the minute at least: YYYYMMDDHHMM[SS[.S[S[S[S]]]]][+/-ZZZZ], as the server reads it
_TIME = re.compile(
    r"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,4}))?)?([+-][0-9]{4})?"
)
_TIME_FIELDS = {"MSH": 7, "OBR": 7, "OBX": 14}  # the times bedside reads, in this order of preference
_BATCH = ("FHS", "BHS", "BTS", "FTS")  # the envelope of an HL7 batch file, not messages
_LINES = re.compile(r"\r\n|\r|\n")


class HL7FileError(ValueError):
    pass


@dataclass(frozen=True)
class Stamp:
    """An HL7 time as written: whole unix seconds, the fraction's digits, the zone offset ('' if none)."""

    seconds: int
    fraction: str
    offset: str

    def shifted(self, by: int) -> str:
        """This time `by` seconds later, written at the same precision (seconds at least), in the same
        zone offset, or in UTC with +0000 when it had none."""
        offset = self.offset or "+0000"
        zone = timezone(int(offset[0] + "1") * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
        text = datetime.fromtimestamp(self.seconds + by, zone).strftime("%Y%m%d%H%M%S")
        return text + (f".{self.fraction}" if self.fraction else "") + offset


def parse_time(text: str) -> Stamp | None:
    match = _TIME.fullmatch(text.strip(" "))
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        zone = UTC
        if offset:
            zone = timezone(int(offset[0] + "1") * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
        when = datetime(int(year), int(month), int(day), int(hour), int(minute), min(int(second or 0), 59), tzinfo=zone)
        return Stamp(int(when.timestamp()), fraction or "", offset or "")
    except (ValueError, OverflowError):  # 2026-02-30, an offset of a day or more
        return None


def read_hl7_file(path: Path) -> list[str]:
    """The messages of a recording (segments joined by CR): MLLP-framed, or plain text where each
    MSH line starts a message (CR, LF or CRLF line ends; the FHS/BHS/BTS/FTS lines of a batch file
    are skipped). HL7FileError, naming the file, for a missing, empty or unreadable file, a folder,
    or text that is not HL7 messages."""
    if not path.exists():
        raise HL7FileError(f"{path} does not exist")
    if path.is_dir():
        raise HL7FileError(f"{path} is a folder, not an HL7 file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HL7FileError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if not raw.strip():
        raise HL7FileError(f"{path} is empty")
    if raw.lstrip(b"\r\n\t ").startswith(START):  # MLLP-framed, as captured off the wire
        blocks = [part.split(END)[0].decode("utf-8", "replace") for part in raw.split(START)[1:]]
        messages = ["\r".join(s for s in _LINES.split(b.strip("\r\n ")) if s.strip()) + "\r" for b in blocks]
        for number, message in enumerate(messages, 1):
            if not message.startswith("MSH"):
                raise HL7FileError(f"{path}: MLLP frame {number} does not start with an MSH segment")
        return messages
    text = raw.decode("utf-8", "replace").lstrip("\ufeff")
    lines = _LINES.split(text)
    if not any(line.startswith("MSH") for line in lines):
        raise HL7FileError(f"{path} contains no HL7 messages (no line starts with an MSH segment)")
    messages = []
    current: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(_BATCH):
            continue
        if line.startswith("MSH"):
            if current:
                messages.append("\r".join(current) + "\r")
            current = [line]
        elif current:
            current.append(line)
        else:
            raise HL7FileError(f"{path}: line {number} ({line[:30]!r}) comes before the first MSH segment")
    messages.append("\r".join(current) + "\r")
    return messages


def _time_fields(message: str) -> tuple[list[list[str]], list[tuple[int, int, Stamp]]]:
    """The message's segments split into fields, and (segment, field, time) for each time bedside reads."""
    field, component = (message[3], message[4]) if len(message) > 4 else ("|", "^")
    segments = [s.split(field) for s in _LINES.split(message) if s]
    found = []
    for i, parts in enumerate(segments):
        number = _TIME_FIELDS.get(parts[0])
        if number is None:
            continue
        index = number - 1 if parts[0] == "MSH" else number  # MSH-1 is the separator itself
        if index < len(parts):
            stamp = parse_time(parts[index].split(component, 1)[0])
            if stamp is not None:
                found.append((i, index, stamp))
    return segments, found


def message_time(message: str) -> int | None:
    """When the message was sent (MSH-7), else its earliest observation time (OBR-7, OBX-14)."""
    _, found = _time_fields(message)
    if not found:
        return None
    head = [stamp for i, _, stamp in found if i == 0]
    return (head[0] if head else min(found, key=lambda f: f[2].seconds)[2]).seconds


def shift_times(message: str, by: int) -> str:
    """The message with MSH-7, OBR-7 and OBX-14 `by` seconds later (see Stamp.shifted)."""
    field, component = (message[3], message[4]) if len(message) > 4 else ("|", "^")
    segments, found = _time_fields(message)
    for i, index, stamp in found:
        rest = segments[i][index].split(component, 1)[1:]
        segments[i][index] = component.join([stamp.shifted(by), *rest])
    return "\r".join(field.join(parts) for parts in segments) + "\r"


def schedule(messages: list[str], speed: float, now: float, keep_times: bool = False) -> list[tuple[float, str]]:
    """(offset in recorded seconds, message) for each message, the offset measured from the first
    message's time (a message without one goes with the message before it). Unless `keep_times`,
    the times are shifted so that no message is stamped later than it will arrive: the recording
    ends as the replay ends, `duration / speed` seconds from `now`; at speed 1 the first message
    is stamped `now`."""
    times = [message_time(m) for m in messages]
    known = [t for t in times if t is not None]
    if not known:
        return [(0.0, m) for m in messages]
    offsets: list[float] = []
    last = 0.0
    for t in times:
        last = float(t - known[0]) if t is not None else last
        offsets.append(last)
    if keep_times:
        return list(zip(offsets, messages, strict=True))
    duration = max(0.0, *offsets)
    by = math.floor(now + duration / speed - duration) - known[0]
    return [(offset, shift_times(m, by)) for offset, m in zip(offsets, messages, strict=True)]
