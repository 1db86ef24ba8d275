"""HL7v2 ORU^R01 observation messages from patient monitors, and the ACK / NAK each one gets.

Observations are recognised by LOINC or IEEE 11073 MDC codes (OBX-3), or a plain mnemonic where a
monitor sends one. Unknown codes are ignored (counted), not guessed. What is valid in a message is
stored: an observation that cannot be used (no value, not a number, implausible, stamped outside
the accepted time range) is left out and named in an ERR (severity W) of the AA; only a message
with nothing usable is refused (AE) with the reasons. A message never takes the listener down:
every problem with hostile input is an HL7Error, with its HL7 table 0357 code for ERR-3.

The `hl7` library (python-hl7) splits the message into segments, fields, repetitions and components
and decodes escape sequences (`hl7ack.unescape` gives it those it decodes safely). Checked before it:
the MSH's separators and control id (what every answer carries), and the number of parts (MAX_PARTS,
about 0.5 kB each in its objects). Its exception texts, which can quote the PID, never reach an answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import hl7

from bedside.streams.codes import CODES, LEVELS, PLAUSIBLE, SKIPPED_STATUS
from bedside.streams.hl7ack import MAX_ID, MAX_TEXT, VERSION, Encoding, Problem, ack, clean, header, unescape
from bedside.streams.identity import pseudonym

if TYPE_CHECKING:
    from bedside.settings import StreamsSettings

YES, NO = {"Y", "YES", "1", "TRUE", "T"}, {"N", "NO", "0", "FALSE", "F"}
FAHRENHEIT, CELSIUS = {"DEGF", "[DEGF]", "F", "°F"}, {"CEL", "DEGC", "[DEGC]", "C", "°C"}
MAX_BED = 64
MAX_PARTS = 20_000  # segments, fields, repetitions, components the library may build for one message

# HL7 NM: an optional sign, ASCII digits, an optional decimal point; no exponent, nan, inf or spaces
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)", re.ASCII)
# HL7 DTM to the minute at least: YYYYMMDDHHMM[SS[.S[S[S[S]]]]][+/-ZZZZ]
_TIME = re.compile(
    r"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,4}))?)?([+-][0-9]{4})?"
)


class HL7Error(Exception):
    """A message that cannot be accepted. `code` is the MSA-1 answer, AR (reject) or AE (error);
    `error` the HL7 table 0357 code for ERR-3 (207, application internal error, unless the message is
    at fault); `problems` the refused observations, one ERR each, when a message had nothing usable."""

    def __init__(
        self, message: str, code: str = "AE", control_id: str = "", error: str = "207", problems: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.control_id = control_id
        self.error = error
        self.problems = list(problems)


@dataclass
class Observation:
    vital: str
    value: float | str | bool
    time: float  # unix seconds


@dataclass
class VitalsMessage:
    control_id: str
    bed: str
    observations: list[Observation] = field(default_factory=list)
    ignored: int = 0  # observations with codes bedside does not use
    sending_application: str = ""
    sending_facility: str = ""
    warnings: list[str] = field(default_factory=list)  # observations refused while the rest were stored


@dataclass(frozen=True)
class HL7Policy:
    """How messages are read: the monitors' time zone for times without an offset, the box's secret
    key for bed names derived from a patient identifier, and the accepted range of observation times."""

    zone: tzinfo = UTC
    bed_key: bytes = b""
    max_age_s: float = 3600.0
    max_skew_s: float = 300.0


DEFAULT_POLICY = HL7Policy()


def policy_from_settings(streams: StreamsSettings, bed_key: bytes) -> HL7Policy:
    """The policy the streams settings ask for; ValueError naming the setting for an unknown zone."""
    name = streams.monitor_timezone.strip()
    zone: tzinfo
    if name.upper() == "UTC":
        zone = UTC
    else:
        try:
            zone = ZoneInfo(name)
        except (KeyError, ValueError, OSError):  # not found, not a zone name, a folder of zones
            raise ValueError(
                f"streams.monitor_timezone: unknown time zone {name[:60]!r}; use UTC or an IANA name "
                "such as Europe/Berlin"
            ) from None
    return HL7Policy(zone, bed_key, streams.max_observation_age_s, streams.max_clock_skew_s)


class _Refused(Exception):
    """One observation that cannot be used; `late` is how far its time is behind now (< 0: ahead)."""

    def __init__(self, error: str, reason: str, field: int, late: float = 0.0) -> None:
        super().__init__(reason)
        self.error, self.reason, self.field, self.late = error, reason, field, late


def _quote(text: str, limit: int = 24) -> str:
    return repr(clean(text[:limit]) + ("..." if len(text) > limit else ""))


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _field(segment: Any, n: int) -> Any:
    """Field n of a segment the library read (MSH-n for the MSH); "" when absent or no such segment."""
    return segment[n] if segment is not None and n < len(segment) else ""


def _component(segment: Any, n: int, k: int = 0) -> str:
    """Component k (0: the first) of field n's first repetition as sent (escapes undecoded, subcomponents
    joined). The library keeps a field, or a repetition, without components as one plain str: that str is
    component 0 (indexing into it would read PV1-3 ICU as the components I, C, U)."""
    field = _field(segment, n)
    if isinstance(field, hl7.Field):
        field = field[0] if field else ""
    if isinstance(field, hl7.Repetition):
        return str(field[k]) if k < len(field) else ""
    return str(field) if k == 0 else ""


def _text(segment: Any, n: int, k: int, enc: Encoding) -> str:
    """Component k of field n as the value it carries: escapes decoded, control characters dropped."""
    return clean(unescape(_component(segment, n, k), enc)).strip()


def _read(raw: str, enc: Encoding, refuse: Callable[..., HL7Error]) -> Any:
    """The message as the library reads it (an hl7.Message), with the separators MSH declared."""
    text = raw.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 ")
    if sum(map(text.count, ("\r", enc.field, enc.repetition, enc.component, enc.subcomponent))) > MAX_PARTS:
        raise refuse(f"message has more than {MAX_PARTS} segments, fields and components", "207", "AR")
    try:
        message = hl7.parse(text)
    except Exception:  # its text may quote a segment: our own reason instead
        raise refuse("message cannot be read as HL7 v2 segments and fields", "100", "AR") from None
    declared = "\r" + enc.field + enc.repetition + enc.component + enc.subcomponent
    if message.separators != declared or message.esc != enc.escape:  # MSH-2 not ended by a field separator
        raise refuse("the separators in MSH-1 and MSH-2 are missing or unusable", "102", "AR")
    return message


def _hl7_time(text: str, zone: tzinfo) -> float | None:
    """HL7 DTM as unix seconds: the offset when one is given, else `zone`; None when it is not a time."""
    match = _TIME.fullmatch(text.strip(" "))
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        if offset:
            zone = timezone(int(offset[0] + "1") * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
        stamp = datetime(
            int(year), int(month), int(day), int(hour), int(minute), min(int(second or 0), 59), tzinfo=zone
        )
        return stamp.timestamp() + (float("0." + fraction) if fraction else 0.0)
    except (ValueError, OverflowError):  # 2026-02-30, an offset of a day or more, beyond year 1..9999
        return None


def _value(vital: str, obx: Any, unit: str, enc: Encoding) -> float | str | bool:
    text = str(_field(obx, 5)).strip(" ")  # as sent: a number is one plain value, no separators or escapes
    if not text:
        raise _Refused("101", "no value (OBX-5)", 5)
    if vital == "consciousness":  # a code (A, C, V, P, U or a word), or a CWE: code^text^system
        level = LEVELS.get(_text(obx, 5, 0, enc).upper()) or LEVELS.get(_text(obx, 5, 1, enc).upper())
        if level is None:
            raise _Refused("103", f"level of consciousness {_quote(text)} is not one of A, C, V, P, U", 5)
        return level
    if vital == "on_oxygen":
        flag = _text(obx, 5, 0, enc).upper()
        if flag not in YES and flag not in NO:
            raise _Refused("103", f"supplemental oxygen {_quote(text)} is not Y or N", 5)
        return flag in YES
    if len(text) > 32 or not _NUMBER.fullmatch(text):
        raise _Refused("102", f"value {_quote(text)} is not a number", 5)
    value = float(text)
    unit = unit.upper()
    if vital == "temperature" and (unit in FAHRENHEIT or (unit not in CELSIUS and value > 50)):
        value = (value - 32) * 5 / 9
    low, high = PLAUSIBLE[vital]
    if not low <= value <= high:
        raise _Refused("102", f"{value:.4g} is outside the physiological range {low}-{high}", 5)
    return value


def _when(times: dict[str, float | None], stamps: tuple[tuple[str, str], ...], now: float, policy: HL7Policy) -> float:
    """The observation's time: the first of OBX-14, OBR-7, MSH-7 that is given (else now), in range."""
    when = now
    for name, text in stamps:
        if text.strip(" "):
            if text not in times:
                times[text] = _hl7_time(text, policy.zone)
            found = times[text]
            if found is None:
                raise _Refused("102", f"{name} {_quote(text)} is not an HL7 time (YYYYMMDDHHMM[SS][+/-ZZZZ])", 14)
            when = found
            break
    check = "check the monitor's clock or streams.monitor_timezone"
    if when > now + policy.max_skew_s:
        ahead = f"time is {_span(when - now)} ahead of this box's clock (limit {_span(policy.max_skew_s)})"
        raise _Refused("102", f"{ahead}; {check}", 14, now - when)
    if when < now - policy.max_age_s:
        behind = f"time is {_span(now - when)} behind this box's clock (limit {_span(policy.max_age_s)})"
        raise _Refused("102", f"{behind}; {check}", 14, now - when)
    return when


def _summary(refused: list[str], lateness: list[float]) -> str:
    hint = "if the monitor sends local time, set streams.monitor_timezone"
    if all(late > 0 for late in lateness):
        return f"observation times are {_span(min(lateness))} behind this box's clock; {hint}"
    if all(late < 0 for late in lateness):
        ahead = f"observation times are {_span(max(lateness))} ahead of this box's clock"
        return f"{ahead}; check the monitor's clock, or {hint}"
    more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
    return f"no usable observation: {refused[0]}"[: MAX_TEXT - len(more)] + more


def parse_oru(raw: str, now: float | None = None, policy: HL7Policy = DEFAULT_POLICY) -> VitalsMessage:
    now = time.time() if now is None else now
    head = header(raw)
    if not head.segment.startswith("MSH"):
        raise HL7Error("message does not start with an MSH segment", "AR", error="100")
    enc = head.enc
    if enc is None:
        raise HL7Error("the separators in MSH-1 and MSH-2 are missing or unusable", "AR", error="102")
    control_id = head.control_id

    def refuse(reason: str, error: str, code: str = "AE", problems: Sequence[str] = ()) -> HL7Error:
        return HL7Error(reason, code, control_id, error, problems)

    message = _read(raw, enc, refuse)
    msh = message[0]
    kind = (_text(msh, 9, 0, enc), _text(msh, 9, 1, enc))
    if kind[0] != "ORU" or kind[1] not in ("", "R01"):
        error = "200" if kind[0] != "ORU" else "201"
        raise refuse(f"message type {kind[0][:8]}^{kind[1][:8]} is not ORU^R01", error, "AR")
    version = _text(msh, 12, 0, enc)
    if version and not VERSION.fullmatch(version):
        raise refuse(f"HL7 version {_quote(version, 12)} is not supported (2.x)", "203", "AR")
    pid = pv1 = None
    obr_time = ""
    results: list[tuple[Any, str]] = []
    for segment in message[1:]:
        name = str(segment[0])  # a Field, or a plain str for a segment without separators
        if name == "OBX":
            results.append((segment, obr_time))
        elif name == "OBR":
            obr_time = _component(segment, 7)
        elif name == "MSH":
            raise refuse("more than one message (MSH) in one frame; send one ORU^R01 per frame", "100", "AR")
        elif (name == "PID" and pid is not None) or (name == "PV1" and pv1 is not None):
            raise refuse("more than one patient (PID/PV1) in one message; send one ORU^R01 per bed", "100")
        elif name == "PID":
            pid = segment
        elif name == "PV1":
            pv1 = segment
    bed = "-".join(p for p in (_text(pv1, 3, k, enc) for k in range(3)) if p)
    if len(bed) > MAX_BED:
        raise refuse(f"bed (PV1-3) is longer than {MAX_BED} characters", "102")
    if not bed:
        mrn = _text(pid, 3, 0, enc)
        if not mrn:
            raise refuse("no bed (PV1-3) or patient identifier (PID-3) to attach the observations to", "101")
        if not policy.bed_key:
            raise refuse("no bed (PV1-3); naming a bed after the patient identifier needs this box's key", "101")
        bed = "patient-" + pseudonym(policy.bed_key, mrn)  # keyed: the record number cannot be recovered
    if not results:
        raise refuse("ORU^R01 without any OBX observation", "100")
    application, facility = (clean(unescape(str(_field(msh, n))[:MAX_ID], enc))[:MAX_BED] for n in (3, 4))
    out = VitalsMessage(control_id, bed, sending_application=application, sending_facility=facility)
    msh_time = _component(msh, 7)
    times: dict[str, float | None] = {}
    refused: list[str] = []
    lateness: list[float] = []
    for position, (obx, result_time) in enumerate(results, 1):
        # OBX-3 is a CWE (identifier^text^coding system): a code in either of the first two
        vital = CODES.get(_text(obx, 3, 0, enc).upper()) or CODES.get(_text(obx, 3, 1, enc).upper())
        if vital is None or str(_field(obx, 11)).strip(" ").upper() in SKIPPED_STATUS:
            out.ignored += 1
            continue
        try:
            value = _value(vital, obx, _text(obx, 6, 0, enc), enc)
            stamps = (("OBX-14", _component(obx, 14)), ("OBR-7", result_time), ("MSH-7", msh_time))
            when = _when(times, stamps, now, policy)
        except _Refused as why:
            refused.append(
                Problem(f"OBX {position} {vital}: {why.reason}"[:MAX_TEXT], why.error, ("OBX", position, why.field))
            )
            lateness.append(why.late)
            continue
        out.observations.append(Observation(vital, value, when))
    if not out.observations:
        if refused:
            raise refuse(_summary(refused, lateness), getattr(refused[0], "error", "102"), problems=refused)
        raise refuse(f"none of the {out.ignored} observations has a code bedside uses (LOINC, MDC)", "103")
    out.warnings = refused
    return out


def accepted_ack(raw: str, message: VitalsMessage) -> str:
    """The AA for a stored message, with an ERR (severity W) for each observation left out of it."""
    notes = [f"{len(message.warnings)} observations refused"] if message.warnings else []
    notes += [f"{message.ignored} observations with unused codes ignored"] if message.ignored else []
    return ack(raw, "AA", "; ".join(notes), message.control_id, message.warnings, "W")


def nak(raw: str, error: HL7Error) -> str:
    """The AE / AR for a message refused with `error`: an ERR for each reason, with its 0357 code."""
    return ack(raw, error.code, str(error), error.control_id, error.problems, "E", error.error)
