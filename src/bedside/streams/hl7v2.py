"""HL7v2 ORU^R01 observation messages from patient monitors, parsed with the `hl7` library, and the
ACK / NAK each message is answered with.

Observations are recognised by LOINC or IEEE 11073 MDC codes (OBX-3), or a plain mnemonic where a
monitor sends one. Unknown codes are ignored (counted), not guessed. A message that cannot be read
gets a NAK naming the problem; it never takes the listener down.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

import hl7

# observation code -> (vital, unit conversion). Temperatures in degrees F are converted.
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


class HL7Error(Exception):
    """A message that cannot be accepted; `code` is the MSA-1 answer: AR (reject) or AE (error)."""

    def __init__(self, message: str, code: str = "AE", control_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.control_id = control_id


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


def _field(segment: hl7.Segment, index: int) -> str:
    try:
        return str(segment[index]).strip()
    except (IndexError, KeyError):
        return ""


def _component(segment: hl7.Segment, index: int, component: int) -> str:
    try:
        return str(segment[index][0][component]).strip()
    except (IndexError, KeyError, TypeError):
        return ""


def _hl7_time(text: str, default: float) -> float:
    """HL7 DTM (YYYYMMDD[HHMM[SS[.S]]][+/-ZZZZ]) as unix seconds, UTC when no offset is given.
    Integer slicing rather than strptime: this runs for every observation on the event loop."""
    digits = text.split("+")[0].split("-")[0].split(".")[0]
    if len(digits) < 8 or not digits.isdigit():
        return default
    try:
        stamp = datetime(
            int(digits[0:4]),
            int(digits[4:6]),
            int(digits[6:8]),
            int(digits[8:10] or 0),
            int(digits[10:12] or 0),
            int(digits[12:14] or 0),
            tzinfo=UTC,
        )
    except ValueError:
        return default
    return stamp.timestamp()


def parse_oru(raw: str, now: float | None = None, policy: HL7Policy = DEFAULT_POLICY) -> VitalsMessage:
    now = time.time() if now is None else now
    text = raw.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 ")
    if not text.startswith("MSH"):
        raise HL7Error("message does not start with an MSH segment", "AR")
    try:
        message = hl7.parse(text)
        msh = message.segment("MSH")
    except Exception as exc:  # the hl7 library raises several types on malformed input
        raise HL7Error(f"unreadable HL7: {str(exc)[:200]}", "AR") from None
    control_id = _field(msh, 10)
    message_type = _component(msh, 9, 0) or _field(msh, 9)
    trigger = _component(msh, 9, 1)
    if message_type != "ORU" or (trigger and trigger != "R01"):
        raise HL7Error(f"message type {message_type}^{trigger} is not ORU^R01", "AR", control_id)
    bed = ""
    try:
        pv1 = message.segment("PV1")
        bed = "-".join(p for p in (_component(pv1, 3, 0), _component(pv1, 3, 1), _component(pv1, 3, 2)) if p)
    except KeyError:
        pass
    if not bed:
        try:
            mrn = _component(message.segment("PID"), 3, 0)
        except KeyError:
            mrn = ""
        # keyed by a digest, so the record number never travels with scores and alerts
        bed = "patient-" + hashlib.sha256(mrn.encode()).hexdigest()[:12] if mrn else ""
    if not bed:
        raise HL7Error("no bed (PV1-3) or patient identifier (PID-3) to attach the observations to", "AE", control_id)
    default_time = _hl7_time(_field(msh, 7), now)
    out = VitalsMessage(control_id, bed, sending_application=_field(msh, 3), sending_facility=_field(msh, 4))
    try:
        segments = message.segments("OBX")
    except KeyError:
        raise HL7Error("ORU^R01 without any OBX observation", "AE", control_id) from None
    for obx in segments:
        code = _component(obx, 3, 0).upper() or _field(obx, 3).upper()
        vital = CODES.get(code) or CODES.get(_component(obx, 3, 1).upper())
        status = _field(obx, 11).upper()
        if vital is None or status in ("X", "D", "W"):  # unknown code; cannot be obtained / deleted / wrong
            out.ignored += 1
            continue
        value_text = _field(obx, 5)
        when = _hl7_time(_field(obx, 14), default_time)
        out.observations.append(Observation(vital, _value(vital, value_text, _component(obx, 6, 0), control_id), when))
    if not out.observations:
        raise HL7Error(f"none of the {out.ignored} observations has a code bedside uses (LOINC, MDC)", "AE", control_id)
    return out


def _value(vital: str, text: str, unit: str, control_id: str) -> float | str | bool:
    if vital == "consciousness":
        level = text.strip().upper()[:1]
        if level not in ("A", "C", "V", "P", "U"):
            raise HL7Error(f"level of consciousness {text!r} is not one of A, C, V, P, U", "AE", control_id)
        return level
    if vital == "on_oxygen":
        return text.strip().upper() in ("Y", "YES", "1", "TRUE")
    try:
        value = float(text)
    except ValueError:
        raise HL7Error(f"{vital} value {text!r} is not a number", "AE", control_id) from None
    if vital == "temperature" and (unit.upper() in ("DEGF", "[DEGF]", "F") or value > 50):
        value = (value - 32) * 5 / 9
    low, high = PLAUSIBLE[vital]
    if not low <= value <= high:
        raise HL7Error(f"{vital} {value:g} is outside the physiological range {low}-{high}", "AE", control_id)
    return value


def accepted_ack(raw: str, message: VitalsMessage) -> str:
    """The AA for a stored message, with what was left out of it."""
    note = f"{message.ignored} observations with unused codes ignored" if message.ignored else ""
    return ack(raw, "AA", note, message.control_id)


def ack(raw: str, code: str = "AA", text: str = "", control_id: str = "") -> str:
    """The acknowledgement for `raw`: MSH with sender and receiver swapped, MSA with the code."""
    fields = ["", "", "", "", "", ""]
    try:
        msh_line = raw.replace("\n", "\r").split("\r")[0]
        if msh_line.startswith("MSH") and len(msh_line) > 4:
            sep = msh_line[3]
            fields = msh_line.split(sep) + [""] * 12
    except Exception:
        pass
    control_id = control_id or (fields[9] if len(fields) > 9 else "")
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    version = fields[11] if len(fields) > 11 and fields[11] else "2.5"
    clean = text.replace("|", "/").replace("\r", " ").replace("\n", " ")[:200]
    receiving_facility = fields[5] if len(fields) > 5 else ""
    msh = f"MSH|^~\\&|BEDSIDE|{receiving_facility}|{fields[2]}|{fields[3]}|{stamp}||ACK^R01|ACK{stamp}|P|{version}"
    msa = f"MSA|{code}|{control_id}" + (f"|{clean}" if clean else "")
    segments = [msh, msa]
    if code != "AA":
        segments.append(f"ERR|||{'207' if code == 'AE' else '200'}|E|||{clean}")
    return "\r".join(segments) + "\r"
