"""HL7 v2 text encoding (a sender's separators and escape sequences) and the ACK / NAK that answers
each message: MSH with sender and receiver swapped, MSA, and one ERR (v2.5) per problem.

Every value copied from a message into an answer is re-encoded for the answer's own separators
(|^~\\&): escape sequences for separator characters, control characters dropped, lengths bounded.
A value can never move another field, and no CR or FS in it can end a segment or an MLLP frame.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple

import hl7
import hl7.util

MAX_HEAD = 8192  # characters of the MSH segment read
MAX_ID = 199  # longest control id or application name kept (the HL7 2.7 length of MSH-10)
MAX_TEXT = 200  # longest MSA-3 / ERR-8 text
MAX_ERRORS = 20  # ERR segments in one answer; beyond, one says how many more


class Encoding(NamedTuple):
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str


STANDARD = Encoding("|", "^", "~", "\\", "&")
# escape sequences given to the `hl7` library to decode: separators, highlighting, hexadecimal characters
_DECODED = re.compile(r"[FSRTEHN]|X(?:[0-9A-Fa-f]{2})+", re.ASCII)
_HIGHLIGHT = {"H": "", "N": ""}  # the library's default writes "_" for them

ERRORS = {  # HL7 table 0357, message error condition codes (v2.5)
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")

_LEAD = re.compile(r"[\r\n\x00 ]*")
_EOL = re.compile(r"[\r\n]")
_ESCAPE_BODY = re.compile(r"[A-Za-z0-9.]{1,32}", re.ASCII)
_SURROGATE = re.compile("[\ud800-\udfff]")
VERSION = re.compile(r"2\.[0-9]{1,2}(?:\.[0-9]{1,2})?", re.ASCII)
_TRIGGER = re.compile(r"[A-Z0-9]{3}", re.ASCII)
# control characters: CR, LF and TAB become spaces, the rest (NUL, VT, FS...) are dropped
_CLEAN = str.maketrans({c: (" " if c in (9, 10, 13) else None) for c in (*range(32), 127)})
_ESCAPE = str.maketrans({"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"})


class Problem(str):
    """A reason a message or an observation was refused, with its HL7 table 0357 code (ERR-3) and,
    where known, its place in the message (ERR-2: segment, occurrence, field)."""

    error: str
    where: tuple[str, int, int] | None

    def __new__(cls, text: str, error: str = "207", where: tuple[str, int, int] | None = None) -> Problem:
        self = super().__new__(cls, text)
        self.error = error
        self.where = where
        return self


def clean(text: str) -> str:
    """`text` without control characters or lone surrogates: safe inside any field of an answer."""
    text = text.translate(_CLEAN)
    return _SURROGATE.sub("\ufffd", text) if not text.isascii() else text


def escape(text: str) -> str:
    """A value for a field of an answer (standard separators): separators as escape sequences."""
    return clean(text).translate(_ESCAPE)


def first_segment(raw: str) -> str:
    """The first segment of `raw` (at most MAX_HEAD characters), after leading blank lines."""
    lead = _LEAD.match(raw)
    start = lead.end() if lead else 0
    end = _EOL.search(raw, start, start + MAX_HEAD)
    return raw[start : end.start() if end else start + MAX_HEAD]


def _usable(c: str) -> bool:
    return c.isascii() and c.isprintable() and not c.isalnum() and c != " "


def encoding(msh: str) -> Encoding | None:
    """The separators an MSH segment declares (MSH-1, MSH-2), or None when they are missing or
    unusable (letters, digits, spaces, control characters, one character in two roles)."""
    if not msh.startswith("MSH") or len(msh) < 5:
        return None
    end = msh.find(msh[3], 4)
    chars = msh[4:end] if end > 0 else msh[4:]
    if not 1 <= len(chars) <= 5:  # 5: with the v2.7 truncation character, not used here
        return None
    chars = chars[:4] + "^~\\&"[len(chars[:4]) :]
    found = Encoding(msh[3], chars[0], chars[1], chars[2], chars[3])
    return found if len(set(found)) == 5 and all(_usable(c) for c in found) else None


class Header(NamedTuple):
    """The first segment of a message and the separators it declares (None: not a usable MSH)."""

    segment: str
    enc: Encoding | None

    def get(self, n: int) -> str:
        """MSH-n as sent (escape sequences and all), at most MAX_ID characters; "" when absent."""
        if self.enc is None or n < 3:
            return ""
        fields = self.segment.split(self.enc.field, n - 1)
        return fields[n - 1].split(self.enc.field, 1)[0][:MAX_ID] if len(fields) >= n else ""

    @property
    def control_id(self) -> str:
        """MSH-10 as the value it carries, safe to copy into an answer."""
        return clean(unescape(self.get(10), self.enc)).strip() if self.enc else ""


def header(raw: str) -> Header:
    segment = first_segment(raw)
    return Header(segment, encoding(segment))


def _pieces(text: str, esc: str) -> Iterator[tuple[str, str]]:
    """(plain text, escape sequence) pairs: the text before each sequence, and its body (F in \\F\\);
    the body is empty after the last. A stray escape character stays in the plain text."""
    i = 0
    while True:
        j, k = text.find(esc, i), -1
        while j >= 0:
            k = text.find(esc, j + 1)
            if k > j and _ESCAPE_BODY.fullmatch(text, j + 1, k):
                break
            j = k
        if j < 0:
            yield text[i:], ""
            return
        yield text[i:j], text[j + 1 : k]
        i = k + 1


@lru_cache(maxsize=32)
def _separators(enc: Encoding) -> Any:
    """An empty `hl7.Message` with `enc`'s separators: what the library's unescaping reads them from."""
    return hl7.Message(separators="\r" + enc.field + enc.repetition + enc.component + enc.subcomponent, esc=enc.escape)


def unescape(text: str, enc: Encoding) -> str:
    """The value a field of text type carries, decoded by the `hl7` library: separator sequences
    (\\F\\ \\S\\ \\R\\ \\T\\ \\E\\) and \\Xhh\\ become their characters, highlighting (\\H\\, \\N\\) is dropped.
    Other sequences (formatting, character sets, unknown) and a stray escape character are kept as
    written: the library would drop them silently (80\\Z\\ would read 80), log the field's text, raise
    (\\.spX\\) or build a string of any length (\\.sp999999999\\), so it is only given the ones above."""
    esc = enc.escape
    if esc not in text:
        return text
    parts = text.split(esc)  # as the library reads it: text, sequence, text, sequence, ..., text
    literal = esc + "E" + esc  # what the library turns into the escape character itself
    given = [parts[0]]
    for i in range(1, len(parts), 2):
        if i + 1 == len(parts):  # a stray escape character, no sequence
            given.append(literal + parts[i])
        elif _DECODED.fullmatch(parts[i]):
            given.append(esc + parts[i] + esc + parts[i + 1])
        else:
            given.append(literal + parts[i] + literal + parts[i + 1])
    return str(hl7.util.unescape(_separators(enc), "".join(given), _HIGHLIGHT))


def _recode_part(text: str, enc: Encoding) -> str:
    if enc.escape not in text:
        return escape(text)
    return "".join(escape(plain) + (f"\\{body}\\" if body else "") for plain, body in _pieces(text, enc.escape))


def recode(text: str, enc: Encoding) -> str:
    """A field written with `enc` rewritten with the standard separators, its structure (repetitions,
    components, subcomponents) and escape sequences kept: MON^1.2.3^ISO stays three components."""
    return "~".join(
        "^".join("&".join(_recode_part(part, enc) for part in comp.split(enc.subcomponent)) for comp in rep)
        for rep in (r.split(enc.component) for r in text.split(enc.repetition))
    )


def _new_prefix() -> None:
    global _PREFIX, _COUNTER
    _PREFIX = "BS" + secrets.token_hex(4).upper()  # a fresh prefix per process: restarts never repeat ids
    _COUNTER = itertools.count(1)


_PREFIX = ""
_COUNTER = itertools.count(1)
_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def new_control_id() -> str:
    """A control id (MSH-10) for an answer: unique per process, at most 20 characters (HL7 2.5)."""
    return f"{_PREFIX}{next(_COUNTER) % 10**10}"


def _err(error: str, severity: str, where: tuple[str, int, int] | None, text: str) -> str:
    error = error if error in ERRORS else "207"
    code = f"{error}^{ERRORS[error]}^HL70357"
    place = f"{where[0]}^{where[1]}^{where[2]}" if where else ""
    legacy = f"{place or '^^'}^{code.replace('^', '&')}"  # ERR-1 (before v2.5): segment^seq^field^code
    return f"ERR|{legacy}|{place}|{code}|{severity}||||{escape(text[:MAX_TEXT]).strip(' ')}"


def ack(
    raw: str,
    code: str = "AA",
    text: str = "",
    control_id: str = "",
    problems: Sequence[str] = (),
    severity: str = "E",
    error: str = "207",
) -> str:
    """The acknowledgement for `raw`: MSH with sender and receiver swapped, MSA with the code and
    `text`, and an ERR per problem (or one for `text` with `error` when a NAK names none). Problems
    that are `Problem`s carry their own table 0357 code and place; `severity` is ERR-4 (E, W, I)."""
    head = header(raw)
    enc, get = head.enc, head.get
    sender = sender_facility = receiver_facility = ""
    version, trigger, processing = "2.5", "R01", "P"
    if enc is not None:
        sender, sender_facility, receiver_facility = recode(get(3), enc), recode(get(4), enc), recode(get(6), enc)
        sent_version = get(12).split(enc.component)[0].strip(" ")
        version = sent_version if VERSION.fullmatch(sent_version) else "2.5"
        sent_trigger = [*get(9).split(enc.repetition)[0].split(enc.component), "", ""][1]
        trigger = sent_trigger if _TRIGGER.fullmatch(sent_trigger) else "R01"
        processing = get(11)[:1] if get(11)[:1] in ("P", "T", "D") else "P"
        control_id = control_id or head.control_id
    code = code if code in ACK_CODES else "AE"
    severity = severity if severity in ("E", "W", "I") else "E"
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    note = escape(text[:MAX_TEXT]).strip(" ")
    segments = [
        f"MSH|^~\\&|BEDSIDE|{receiver_facility}|{sender}|{sender_facility}|{stamp}||ACK^{trigger}^ACK"
        f"|{new_control_id()}|{processing}|{version}",
        f"MSA|{code}|{escape(control_id[:MAX_ID])}" + (f"|{note}" if note else ""),
    ]
    listed = list(problems) or ([Problem(text, error)] if code != "AA" else [])
    for problem in listed[:MAX_ERRORS]:
        segments.append(_err(getattr(problem, "error", error), severity, getattr(problem, "where", None), str(problem)))
    if len(listed) > MAX_ERRORS:
        segments.append(_err(error, severity, None, f"{len(listed) - MAX_ERRORS} more problems not listed"))
    return "\r".join(segments) + "\r"
