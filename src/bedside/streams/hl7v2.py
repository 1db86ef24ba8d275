"""HL7v2 ORU^R01 observation messages from patient monitors, and the ACK / NAK each one gets.

Observations are recognised by LOINC or IEEE 11073 MDC codes (OBX-3), or a plain mnemonic where a
monitor sends one. Unknown codes are ignored (counted), not guessed. What is valid in a message is
stored: an observation that cannot be used (no value, not a number, implausible, stamped outside
the accepted time range) is left out and named in an ERR (severity W) of the AA; only a message
with nothing usable is refused (AE) with the reasons. A message never takes the listener down:
every problem with hostile input is an HL7Error, with its HL7 table 0357 code for ERR-3.

The text is split here rather than by the `hl7` library: reading only what is used (MSH, PID, PV1,
OBR-7, OBX) is several times faster, and separators, escapes and repetitions are handled exactly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from bedside.streams.hl7ack import MAX_TEXT, VERSION, Encoding, Problem, ack, clean, header, unescape
from bedside.streams.identity import pseudonym

if TYPE_CHECKING:
    from bedside.settings import StreamsSettings

# observation code -> vital sign
CODES: dict[str, str] = {
    # heart / pulse rate
    "8867-4": "heart_rate",
    "147842": "heart_rate",
    "149530": "heart_rate",
    "MDC_ECG_HEART_RATE": "heart_rate",
    "MDC_PULS_OXIM_PULS_RATE": "heart_rate",
    "HR": "heart_rate",
    # blood pressure
    "8480-6": "systolic_bp",
    "150021": "systolic_bp",
    "150017": "systolic_bp",
    "MDC_PRESS_BLD_NONINV_SYS": "systolic_bp",
    "MDC_PRESS_BLD_ART_SYS": "systolic_bp",
    "SBP": "systolic_bp",
    "8462-4": "diastolic_bp",
    "150022": "diastolic_bp",
    "150018": "diastolic_bp",
    "MDC_PRESS_BLD_NONINV_DIA": "diastolic_bp",
    "MDC_PRESS_BLD_ART_DIA": "diastolic_bp",
    "DBP": "diastolic_bp",
    # oxygen saturation
    "59408-5": "spo2",
    "2708-6": "spo2",
    "20564-1": "spo2",
    "150456": "spo2",
    "MDC_PULS_OXIM_SAT_O2": "spo2",
    "SPO2": "spo2",
    # respiratory rate
    "9279-1": "respiratory_rate",
    "151562": "respiratory_rate",
    "MDC_RESP_RATE": "respiratory_rate",
    "MDC_TTHOR_RESP_RATE": "respiratory_rate",
    "RR": "respiratory_rate",
    # temperature
    "8310-5": "temperature",
    "8331-1": "temperature",
    "150344": "temperature",
    "188496": "temperature",
    "MDC_TEMP": "temperature",
    "MDC_TEMP_BODY": "temperature",
    "TEMP": "temperature",
    # level of consciousness (ACVPU)
    "67775-7": "consciousness",
    "80288-4": "consciousness",
    "ACVPU": "consciousness",
    "AVPU": "consciousness",
    # supplemental oxygen: flow (L/min) or inspired fraction (%), or a yes/no flag
    "3151-8": "oxygen_flow",
    "19996-8": "oxygen_flow",
    "3150-0": "fio2",
    "O2SUPP": "on_oxygen",
}
NUMERIC = {
    "heart_rate",
    "systolic_bp",
    "diastolic_bp",
    "spo2",
    "respiratory_rate",
    "temperature",
    "oxygen_flow",
    "fio2",
}
PLAUSIBLE = {  # physiologically possible ranges: values outside are device errors, not patients
    "heart_rate": (0, 350),
    "systolic_bp": (0, 350),
    "diastolic_bp": (0, 250),
    "spo2": (0, 100),
    "respiratory_rate": (0, 120),
    "temperature": (20, 45),
    "oxygen_flow": (0, 80),
    "fio2": (21, 100),
}


SKIPPED_STATUS = {"D", "I", "N", "O", "W", "X"}  # OBX-11: deleted, pending, not asked, order, wrong, no result
LEVELS = {  # level of consciousness (ACVPU): the letters and the words monitors send
    **{c: c for c in "ACVPU"},
    **{"ALERT": "A", "CONFUSED": "C", "CONFUSION": "C", "NEW CONFUSION": "C", "VOICE": "V", "VERBAL": "V"},
    **{"PAIN": "P", "UNRESPONSIVE": "U"},
}
YES, NO = {"Y", "YES", "1", "TRUE", "T"}, {"N", "NO", "0", "FALSE", "F"}
FAHRENHEIT, CELSIUS = {"DEGF", "[DEGF]", "F", "°F"}, {"CEL", "DEGC", "[DEGC]", "C", "°C"}
MAX_BED = 64

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


def _get(fields: list[str], n: int) -> str:
    return fields[n] if n < len(fields) else ""


def _components(text: str, enc: Encoding) -> list[str]:
    """The components of a field's first repetition, escape sequences decoded, control characters dropped."""
    return [clean(unescape(c, enc)).strip() for c in text.split(enc.repetition, 1)[0].split(enc.component)]


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


def _value(vital: str, raw: str, unit: str, enc: Encoding) -> float | str | bool:
    text = raw.strip(" ")
    if not text:
        raise _Refused("101", "no value (OBX-5)", 5)
    if vital == "consciousness":
        parts = _components(text, enc)
        level = LEVELS.get(parts[0].upper()) or (LEVELS.get(parts[1].upper()) if len(parts) > 1 else None)
        if level is None:
            raise _Refused("103", f"level of consciousness {_quote(text)} is not one of A, C, V, P, U", 5)
        return level
    if vital == "on_oxygen":
        flag = _components(text, enc)[0].upper()
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

    kind = [*_components(head.get(9), enc), ""]
    if kind[0] != "ORU" or kind[1] not in ("", "R01"):
        error = "200" if kind[0] != "ORU" else "201"
        raise refuse(f"message type {kind[0][:8]}^{kind[1][:8]} is not ORU^R01", error, "AR")
    version = _components(head.get(12), enc)[0]
    if version and not VERSION.fullmatch(version):
        raise refuse(f"HL7 version {_quote(version, 12)} is not supported (2.x)", "203", "AR")
    segments = raw.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 ").split("\r")[1:]
    fs = enc.field
    pid: list[str] = []
    pv1: list[str] = []
    obr_time = ""
    results: list[tuple[list[str], str]] = []
    for segment in segments:
        name = segment[:3]
        if segment[3:4] not in ("", fs) or name not in ("OBX", "OBR", "PID", "PV1", "MSH"):
            continue  # other segments (NTE, ORC, Z-segments) are not used
        fields = segment.split(fs)
        if name == "OBX":
            results.append((fields, obr_time))
        elif name == "OBR":
            obr_time = _get(fields, 7)
        elif name == "MSH":
            raise refuse("more than one message (MSH) in one frame; send one ORU^R01 per frame", "100", "AR")
        elif (name == "PID" and pid) or (name == "PV1" and pv1):
            raise refuse("more than one patient (PID/PV1) in one message; send one ORU^R01 per bed", "100")
        elif name == "PID":
            pid = fields
        else:
            pv1 = fields
    bed = "-".join(p for p in _components(_get(pv1, 3), enc)[:3] if p)
    if len(bed) > MAX_BED:
        raise refuse(f"bed (PV1-3) is longer than {MAX_BED} characters", "102")
    if not bed:
        mrn = _components(_get(pid, 3), enc)[0]
        if not mrn:
            raise refuse("no bed (PV1-3) or patient identifier (PID-3) to attach the observations to", "101")
        if not policy.bed_key:
            raise refuse("no bed (PV1-3); naming a bed after the patient identifier needs this box's key", "101")
        bed = "patient-" + pseudonym(policy.bed_key, mrn)  # keyed: the record number cannot be recovered
    if not results:
        raise refuse("ORU^R01 without any OBX observation", "100")
    application, facility = (clean(unescape(head.get(n), enc))[:MAX_BED] for n in (3, 4))
    out = VitalsMessage(control_id, bed, sending_application=application, sending_facility=facility)
    msh_time = head.get(7)
    times: dict[str, float | None] = {}
    refused: list[str] = []
    lateness: list[float] = []
    for position, (obx, result_time) in enumerate(results, 1):
        code = [*_components(_get(obx, 3), enc), ""]
        vital = CODES.get(code[0].upper()) or CODES.get(code[1].upper())
        if vital is None or _get(obx, 11).strip(" ").upper() in SKIPPED_STATUS:
            out.ignored += 1
            continue
        try:
            value = _value(vital, _get(obx, 5), _components(_get(obx, 6), enc)[0], enc)
            stamps = (("OBX-14", _get(obx, 14)), ("OBR-7", result_time), ("MSH-7", msh_time))
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
