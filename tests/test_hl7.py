"""HL7v2 parsing of real-world message variants, ACK/NAK, and the MLLP listener under bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import stat
import threading
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import hl7
import pytest

from bedside.settings import DEFAULTS
from bedside.streams.hl7v2 import (
    HL7Error,
    HL7Policy,
    VitalsMessage,
    accepted_ack,
    ack,
    nak,
    parse_oru,
    policy_from_settings,
)
from bedside.streams.identity import box_key, pseudonym
from bedside.streams.mllp import END, START, MLLPServer, frame

NOW = datetime(2026, 11, 23, 10, 15, tzinfo=UTC).timestamp()
KEY = bytes(range(32))
KEYED = HL7Policy(bed_key=KEY)
MSH = "MSH|^~\\&|PHILIPS_MX800|ICU_EAST|BEDSIDE|HOSP|20261123101500||ORU^R01^ORU_R01|MSG00042|P|2.6"
PID = "PID|1||MRN123456^^^HOSP^MR||DOE^JANE||19500101|F"
PV1 = "PV1|1|I|ICU^12^B||||"
OBX = [
    "OBX|1|NM|8867-4^Heart rate^LN||112|/min^beats per minute^UCUM|||||F|||20261123101455",
    "OBX|2|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC||94|mm[Hg]^^UCUM|||||F",
    "OBX|3|NM|150022^MDC_PRESS_BLD_NONINV_DIA^MDC||58|mm[Hg]^^UCUM|||||F",
    "OBX|4|NM|59408-5^SpO2^LN||93|%^^UCUM|||||F",
    "OBX|5|NM|9279-1^Resp rate^LN||24|/min^^UCUM|||||F",
    "OBX|6|NM|8310-5^Body temperature^LN||101.3|[degF]^^UCUM|||||F",
    "OBX|7|ST|67775-7^Level of responsiveness^LN||V||||||F",
    "OBX|8|NM|3151-8^Inhaled oxygen flow rate^LN||2|L/min|||||F",
    "OBX|9|NM|99999-9^Something else^LN||7|||||F",
]


def message(*segments: str, sep: str = "\r", msh: str = MSH) -> str:
    return sep.join([msh, PID, PV1, *segments]) + sep


def hr(value: str, when: str = "", status: str = "F") -> str:
    return f"OBX|1|NM|8867-4^HR^LN||{value}|/min|||||{status}|||{when}"


def parse(raw: str, policy: HL7Policy = KEYED) -> VitalsMessage:
    return parse_oru(raw, now=NOW, policy=policy)


def refusal(raw: str, policy: HL7Policy = KEYED, now: float = NOW) -> HL7Error:
    with pytest.raises(HL7Error) as err:
        parse_oru(raw, now=now, policy=policy)
    return err.value


def segments(answer: str) -> list[hl7.Segment]:
    """An answer as the `hl7` library reads it: the check that no value moved a field."""
    assert answer.endswith("\r") and "\n" not in answer
    return list(hl7.parse(answer))


def errs(answer: str) -> list[tuple[str, str, str, str]]:
    """(ERR-2, ERR-3 code, ERR-4, ERR-8 unescaped) for each ERR of an answer."""
    parsed = hl7.parse(answer)
    return [(str(s[2]), str(s[3][0][0]), str(s[4]), parsed.unescape(str(s[8]))) for s in parsed if str(s[0]) == "ERR"]


def at(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC).timestamp()


# --- reading messages --------------------------------------------------------------------------


def test_parses_a_monitor_message_with_loinc_and_mdc_codes():
    parsed = parse(message(*OBX))
    assert parsed.bed == "ICU-12-B" and parsed.control_id == "MSG00042" and parsed.ignored == 1
    values = {o.vital: o.value for o in parsed.observations}
    assert values["heart_rate"] == 112 and values["systolic_bp"] == 94 and values["diastolic_bp"] == 58
    assert values["spo2"] == 93 and values["respiratory_rate"] == 24 and values["consciousness"] == "V"
    assert values["temperature"] == pytest.approx(38.5, abs=0.01)  # converted from Fahrenheit
    assert values["oxygen_flow"] == 2 and parsed.warnings == []
    times = {o.vital: o.time for o in parsed.observations}
    assert times["heart_rate"] == at("20261123101455")  # OBX-14, not the message time
    assert times["spo2"] == at("20261123101500")  # no OBX-14: MSH-7


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n", "\r\r", "\n\r\n"])  # blank lines: empty segments
def test_segment_terminators(sep):
    assert len(parse(message(*OBX[:2], sep=sep)).observations) == 2


def test_repetitions_escapes_and_missing_fields():
    obx = "OBX|1|NM|8867-4^Heart \\T\\ pulse rate^LN~147842^MDC_ECG_HEART_RATE^MDC||88"  # no units, no status
    parsed = parse(message(obx))
    assert parsed.observations[0].vital == "heart_rate" and parsed.observations[0].value == 88
    assert parse(message(obx).replace(PV1, "PV1|1|I|ICU")).bed == "ICU"  # one component, not "ICU-C-U"
    assert parse(message(obx).replace(PV1, "PV1|1|I|ICU\\T\\A^1~OTHER^2")).bed == "ICU&A-1"


@pytest.mark.parametrize(
    ("pv1_3", "bed"),
    [("ICU", "ICU"), ("ICU^12^A", "ICU-12-A"), ("ICU~X^2", "ICU"), ("^12", "12"), ("ICU&E^12^A^X", "ICU&E-12-A")],
)
def test_a_bed_is_read_component_by_component(pv1_3, bed):
    """A field without components is its own component 0: the library keeps it as one str, and
    indexing into that str once read the bed ICU as the components I, C, U (ICU-C-U)."""
    assert parse(message(OBX[0]).replace(PV1, f"PV1|1|I|{pv1_3}")).bed == bed


def test_escape_sequences_are_decoded_and_hostile_ones_kept_as_written(caplog):
    def level(text: str) -> str:
        return str(parse(message(f"OBX|1|ST|ACVPU^X^L||{text}")).observations[0].value)

    assert level("\\X56\\") == "V" and level("\\H\\P\\N\\") == "P"  # hexadecimal; highlighting dropped
    start = time.perf_counter()
    for hostile in ("\\.sp999999999\\V", "\\.spX\\V", "\\Z\\V", "V\\", "\\\\V"):  # not expanded, raised, dropped
        err = refusal(message(f"OBX|1|ST|ACVPU^X^L||{hostile}"))
        assert err.error == "103" and hostile.replace("\\", "\\\\") in str(err)
    assert time.perf_counter() - start < 1
    assert "is not a number" in str(refusal(message(hr("80\\Z\\"))))  # not read as 80
    raw = message(OBX[0], msh=MSH.replace("MSG00042", "C\\Z\\\\X41\\1"))
    assert parse(raw).control_id == "C\\Z\\A1" and "MSA|AA|C\\E\\Z\\E\\A1" in accepted_ack(raw, parse(raw))
    assert not caplog.records  # the library logs a field's text for sequences it cannot decode


def test_the_library_error_text_never_reaches_an_answer(monkeypatch):
    def broken(text: str, *args: object, **kwargs: object) -> None:
        raise hl7.ParseException("Segment received before message header PID|1||MRN123456")

    raw = message(*OBX)
    monkeypatch.setattr(hl7, "parse", broken)
    err = refusal(raw)
    monkeypatch.undo()
    assert (err.code, err.error) == ("AR", "100") and "MRN123456" not in nak(raw, err)
    assert err.__cause__ is None and err.__suppress_context__


def test_a_message_too_large_for_the_library_is_refused_at_once():
    start = time.perf_counter()  # the library's objects: a megabyte of ^ took 16 s and 470 MB
    err = refusal(message("OBX|1|NM|8867-4^HR^LN||80|" + "^" * 1_000_000))
    assert (err.code, err.error) == ("AR", "207") and "more than 20000" in str(err)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("status", ["X", "D", "W", "I", "N"])
def test_cancelled_deleted_or_pending_observations_are_not_used(status):
    parsed = parse(message(OBX[0], OBX[1].replace("||||F", f"||||{status}")))
    assert [o.vital for o in parsed.observations] == ["heart_rate"] and parsed.ignored == 1


@pytest.mark.parametrize(
    ("raw", "code", "error", "reason"),
    [
        ("PID|1||123", "AR", "100", "does not start with an MSH"),
        ("MSH|abcd|X", "AR", "102", "separators in MSH-1 and MSH-2"),
        ("MSH|^^\\&|X|Y|Z|W|20261123||ORU^R01|C1|P|2.5", "AR", "102", "separators"),  # ^ in two roles
        ("MSH|^~\r" + PID + "\r" + PV1 + "\r" + OBX[0], "AR", "102", "separators"),  # MSH-2 not ended
        (MSH.replace("ORU^R01^ORU_R01", "ADT^A01") + "\r" + PID, "AR", "200", r"message type ADT\^A01 is not ORU\^R01"),
        (MSH.replace("ORU^R01^ORU_R01", "ORU^R30"), "AR", "201", r"is not ORU\^R01"),
        (MSH.replace("|2.6", "|3.0"), "AR", "203", "HL7 version '3.0' is not supported"),
        (MSH + "\r" + PID + "\r" + PV1, "AE", "100", "without any OBX"),
        (MSH + "\r" + MSH + "\r" + PV1 + "\r" + OBX[0], "AR", "100", "more than one message"),
        (message(OBX[0], PID, "PV1|1|I|ICU^13", OBX[1]), "AE", "100", "more than one patient"),
        (MSH + "\rOBX|1|NM|8867-4^HR^LN||80", "AE", "101", "no bed"),
        (message(hr("eighty")), "AE", "102", "not a number"),
        (message(hr("")), "AE", "101", r"no value \(OBX-5\)"),
        (message(hr("900")), "AE", "102", "outside the physiological range"),
        (message("OBX|1|ST|67775-7^LOC^LN||drowsy"), "AE", "103", "not one of A, C, V, P, U"),
        (message("OBX|1|NM|1234-5^Unknown^LN||1"), "AE", "103", "none of the 1 observations"),
        (message(OBX[0]).replace(PV1, "PV1|1|I|" + "W" * 70), "AE", "102", "longer than 64"),
    ],
)
def test_bad_messages_are_refused_with_a_reason_and_an_hl7_error_code(raw, code, error, reason):
    err = refusal(raw)
    assert err.code == code and err.error == error
    assert re.search(reason, str(err))
    assert str(segments(nak(raw, err))[1][1]) == code
    assert errs(nak(raw, err))[0][1:3] == (error, "E")


# --- 11: the valid observations of a message are kept ------------------------------------------


def test_one_bad_observation_does_not_lose_the_good_ones():
    raw = message(
        OBX[0],
        "OBX|2|NM|59408-5^SpO2^LN|||%|||||F",  # no value
        "OBX|3|NM|9279-1^RR^LN||eighty|/min|||||F",
        "OBX|4|NM|8480-6^SBP^LN||900|mm[Hg]|||||F",
        "OBX|5|ST|67775-7^ACVPU^LN||drowsy||||||F",
        "OBX|6|ST|O2SUPP^On oxygen^L||maybe||||||F",
        OBX[8],
    )
    parsed = parse(raw)
    assert [(o.vital, o.value) for o in parsed.observations] == [("heart_rate", 112.0)]
    assert len(parsed.warnings) == 5 and parsed.ignored == 1
    answer = accepted_ack(raw, parsed)
    msa = segments(answer)[1]
    assert str(msa[1]) == "AA" and str(msa[2]) == "MSG00042"
    assert str(msa[3]) == "5 observations refused; 1 observations with unused codes ignored"
    assert errs(answer) == [
        ("OBX^2^5", "101", "W", "OBX 2 spo2: no value (OBX-5)"),
        ("OBX^3^5", "102", "W", "OBX 3 respiratory_rate: value 'eighty' is not a number"),
        ("OBX^4^5", "102", "W", "OBX 4 systolic_bp: 900 is outside the physiological range 0-350"),
        ("OBX^5^5", "103", "W", "OBX 5 consciousness: level of consciousness 'drowsy' is not one of A, C, V, P, U"),
        ("OBX^6^5", "103", "W", "OBX 6 on_oxygen: supplemental oxygen 'maybe' is not Y or N"),
    ]
    assert str(segments(answer)[2][3]) == "101^Required field missing^HL70357"  # ERR-3 as a CWE of table 0357


def test_a_message_with_nothing_usable_is_refused_with_every_reason():
    raw = message(hr("x"), "OBX|2|NM|59408-5^SpO2^LN||101|%|||||F")
    err = refusal(raw)
    assert (
        err.code == "AE"
        and str(err) == "no usable observation: OBX 1 heart_rate: value 'x' is not a number (and 1 more)"
    )
    answer = nak(raw, err)
    assert [(e[0], e[1], e[2]) for e in errs(answer)] == [("OBX^1^5", "102", "E"), ("OBX^2^5", "102", "E")]
    assert str(segments(answer)[1][1]) == "AE"


def test_many_refused_observations_give_a_bounded_answer():
    raw = message(*[hr("x")] * 500)
    err = refusal(raw)
    answer = nak(raw, err)
    assert len(errs(answer)) == 21 and errs(answer)[-1][3] == "480 more problems not listed"
    assert len(answer) < 10_000


# --- 12, 13: observation times -----------------------------------------------------------------


def test_a_future_observation_is_refused_not_pinned():
    future, present = "20261123111500", "20261123101500"  # now + 1 h, now
    raw = message(hr("150", future), hr("72", present))
    parsed = parse(raw)
    assert [o.value for o in parsed.observations] == [72.0]
    assert "time is 60 min ahead of this box's clock (limit 5 min)" in parsed.warnings[0]
    err = refusal(message(hr("150", future)))
    assert err.code == "AE" and str(err).startswith("observation times are 60 min ahead of this box's clock")
    assert parse(message(hr("80", "20261123101920"))).observations[0].value == 80  # 4:20 ahead: within the skew
    assert refusal(message(hr("80", "20261123101920")), HL7Policy(bed_key=KEY, max_skew_s=60)).error == "102"


def test_times_without_an_offset_are_read_in_the_monitor_zone():
    berlin = HL7Policy(ZoneInfo("Europe/Berlin"), KEY)
    local = message(hr("80", "20261123111455"), msh=MSH.replace("20261123101500", "20261123111500"))
    assert parse(local, berlin).observations[0].time == at("20261123101455")
    no_obx_time = message(hr("80"), msh=MSH.replace("20261123101500", "20261123111500"))
    assert parse(no_obx_time, berlin).observations[0].time == at("20261123101500")  # MSH-7, local too
    summer = message(hr("80", "20260701120000"))  # daylight saving time: UTC+2
    assert parse_oru(summer, now=at("20260701100000"), policy=berlin).observations[0].time == at("20260701100000")


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("20261123111455+0100", at("20261123101455")),
        ("20261123051455-0500", at("20261123101455")),
        ("20261123101455.25", at("20261123101455") + 0.25),
        ("20261123111455.5+0100", at("20261123101455") + 0.5),
        ("20261123101455+0000", at("20261123101455")),
        ("202611231014", at("20261123101400")),
        ("20261123101460", at("20261123101459")),  # a leap second
        ("20261123101455^S", at("20261123101455")),  # a TS: the time, then its degree of precision
    ],
)
def test_explicit_offsets_and_fractions_are_honoured(stamp, expected):
    assert parse(message(hr("80", stamp))).observations[0].time == pytest.approx(expected)
    if "+" in stamp or "-" in stamp:  # an explicit offset wins over the monitors' zone
        eastern = HL7Policy(ZoneInfo("America/New_York"), KEY)
        assert parse(message(hr("80", stamp)), eastern).observations[0].time == pytest.approx(expected)


@pytest.mark.parametrize("stamp", ["2026-11-23", "20261123", "20261330101455", "20261123101455+2500", "20261123x"])
def test_an_unreadable_time_refuses_the_observation(stamp):
    parsed = parse(message(hr("80", stamp), OBX[3]))
    assert [o.vital for o in parsed.observations] == ["spo2"]
    assert "OBX-14" in parsed.warnings[0] and "is not an HL7 time" in parsed.warnings[0]


def test_obr7_is_the_time_of_its_observations_before_msh7():
    raw = message("OBR|1|||VITALS|||20261123100500", hr("80"), "OBR|2|||VITALS", OBX[3])
    times = [o.time for o in parse(raw).observations]
    assert times == [at("20261123100500"), at("20261123101500")]


def test_old_observations_are_refused_with_the_reason_and_a_hint():
    five_hours = "20261123051500"  # a monitor in UTC-5 read as UTC, or a clock 5 h behind
    err = refusal(message(hr("80", five_hours), OBX[3].replace("||||F", f"||||F|||{five_hours}")))
    assert err.code == "AE" and str(err) == (
        "observation times are 5.0 h behind this box's clock; "
        "if the monitor sends local time, set streams.monitor_timezone"
    )
    assert all(e[1:3] == ("102", "E") for e in errs(nak(message(), err)))
    parsed = parse(message(hr("80", "20261123091400"), OBX[3]))  # 61 min old, and one current
    assert [o.vital for o in parsed.observations] == ["spo2"]
    assert "61 min behind this box's clock (limit 60 min)" in parsed.warnings[0]
    assert "streams.monitor_timezone" in parsed.warnings[0]
    eastern = HL7Policy(ZoneInfo("America/New_York"), KEY)
    assert parse(message(hr("80", "20261123051455")), eastern).observations[0].time == at("20261123101455")


# --- 14, 15, 16: the ACK -----------------------------------------------------------------------


def test_ack_and_nak_shapes():
    ok = ack(message(*OBX), "AA", control_id="MSG00042").split("\r")
    assert ok[0].startswith("MSH|^~\\&|BEDSIDE|HOSP|PHILIPS_MX800|ICU_EAST|") and ok[0].endswith("|P|2.6")
    assert "+0000||ACK^R01^ACK|BS" in ok[0]
    assert ok[1] == "MSA|AA|MSG00042" and ok[2] == ""
    bad = ack(message(*OBX), "AE", "heart_rate value 'x' | bad", "MSG00042").split("\r")
    assert bad[1] == "MSA|AE|MSG00042|heart_rate value 'x' \\F\\ bad" and bad[2].startswith("ERR|")
    assert ack("garbage", "AR", "unreadable").split("\r")[1] == "MSA|AR||unreadable"


CONTROL = "A|B^C~D\\E&F"
ESCAPED = "A\\F\\B\\S\\C\\R\\D\\E\\E\\T\\F"


def test_ack_escapes_every_value_copied_into_it():
    raw = message(OBX[0], msh=MSH.replace("PHILIPS_MX800", "MX\\F\\800^1.2.3^ISO").replace("MSG00042", ESCAPED))
    parsed = parse(raw)
    assert parsed.control_id == CONTROL
    for answer in (accepted_ack(raw, parsed), ack(raw), nak(raw, refusal(raw.replace("||112|", "||x|")))):
        msh, msa, *_ = segments(answer)
        assert str(msa[2]) == ESCAPED and hl7.parse(answer).unescape(str(msa[2])) == CONTROL
        assert str(msh[5]) == "MX\\F\\800^1.2.3^ISO" and str(msh[6]) == "ICU_EAST"  # components kept
        assert str(msh[9]) == "ACK^R01^ACK" and str(msh[11]) == "P" and str(msh[12]) == "2.6" and len(msh) == 13
    hostile = ack(raw, "AE", "why |^~\\& \r\nMSH|x\x1c\r", "id|\r\n\x0b\x1cMSA|AR")
    msh, msa, err = segments(hostile)
    assert hl7.parse(hostile).unescape(str(msa[2])) == "id|  MSA|AR" and len(msa) == 4 and len(msh) == 13
    assert "\x1c" not in hostile and "\x0b" not in hostile and str(err[4]) == "E"
    assert hl7.parse(hostile).unescape(str(err[8])) == "why |^~\\&   MSH|x"


def test_ack_for_a_sender_with_other_separators():
    msh = "MSH!@#$%!MON@1.2@ISO!ICU!BEDSIDE!HOSP!20261123101500!!ORU@R01!C$F$1|2!P!2.5"
    raw = "\r".join([msh, "PID!1!!M1", "PV1!1!I!ICU@12", "OBX!1!NM!8867-4@HR@LN!!80!/min!!!!!F"]) + "\r"
    parsed = parse(raw)
    assert parsed.bed == "ICU-12" and parsed.control_id == "C!1|2" and parsed.observations[0].value == 80
    msh_out, msa = segments(accepted_ack(raw, parsed))
    assert str(msh_out[5]) == "MON^1.2^ISO" and str(msa[2]) == "C!1\\F\\2"


def test_ack_control_ids_are_unique_and_fit_hl7():
    ids = [str(segments(ack(message(OBX[0])))[0][10]) for _ in range(2000)]
    assert len(set(ids)) == len(ids) and max(map(len, ids)) <= 20 and "MSG00042" not in ids


def test_error_codes_come_from_table_0357():
    assert HL7Error("x").error == "207" and HL7Error("x", "AE", "C1").control_id == "C1"  # backward compatible
    internal = ack(message(OBX[0]), "AE", "internal error: RuntimeError")
    assert errs(internal) == [("", "207", "E", "internal error: RuntimeError")]
    assert "207^Application internal error^HL70357" in internal
    assert str(segments(internal)[2][1]) == "^^^207&Application internal error&HL70357"  # ERR-1 for v2.3 peers
    unknown = nak(message(), HL7Error("x", "AE", "C1", "999"))
    assert errs(unknown)[0][1] == "207"


# --- 19: beds named after a patient ------------------------------------------------------------


def test_a_bed_from_the_patient_identifier_is_keyed():
    raw = "\r".join([MSH, PID, OBX[0]])
    bed = parse(raw).bed
    assert bed == "patient-" + pseudonym(KEY, "MRN123456") and bed == parse(raw).bed
    assert hashlib.sha256(b"MRN123456").hexdigest()[:12] not in bed  # not the unkeyed, reversible digest
    assert parse(raw, HL7Policy(bed_key=bytes(32))).bed != bed  # another box, another name
    err = refusal(raw, HL7Policy())  # no key: refused rather than named by a digest anyone can reverse
    assert (err.code, err.error) == ("AE", "101") and str(err).startswith("no bed (PV1-3);")
    assert "MRN123456" not in nak(raw, err)
    with pytest.raises(ValueError, match="box's key"):
        pseudonym(b"", "MRN123456")


def test_the_box_key_is_made_once_whole_and_private(tmp_path):
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(box_key(tmp_path / "state"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32 and box_key(tmp_path / "state") == keys[0]
    assert sorted(os.listdir(tmp_path / "state")) == ["box.key"]  # no spare files left behind
    path = tmp_path / "state" / "box.key"
    path.chmod(0o644)
    assert box_key(tmp_path / "state") == keys[0] and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_bytes(b"short")
    with pytest.raises(OSError, match="damaged"):
        box_key(tmp_path / "state")


def test_the_box_key_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    key = box_key(tmp_path)
    assert len(key) == 32 and box_key(tmp_path) == key and sorted(os.listdir(tmp_path)) == ["box.key"]


# --- 23 and other values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("80", 80.0), ("+80", 80.0), ("80.", 80.0), ("80.50", 80.5), (".5", 0.5), ("0080", 80.0), (" 80 ", 80.0)],
)
def test_numbers_in_hl7_nm_form_are_read(text, value):
    assert parse(message(hr(text))).observations[0].value == value


NOT_NUMBERS = ["١٢٣", "８０", " 8e1 ", "8e1", "nan", "NaN", "inf", "-inf", "1_000", "0x50", "80.5.1", "--80"]
NOT_NUMBERS += ["+-80", "8 0", ".", "+", "80\\F\\", "80^90", "80~90", "8" * 40]


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_anything_else_is_not_a_number(text):
    err = refusal(message(hr(text)))
    assert err.error == "102" and "is not a number" in str(err) and len(str(err)) <= 200


def test_consciousness_and_oxygen_flags_are_read_exactly():
    def value(vital_code: str, text: str) -> object:
        return parse(message(f"OBX|1|ST|{vital_code}^X^L||{text}")).observations[0].value

    words = ("A", "alert", "Confused", "NEW CONFUSION", "V", "LA1^Voice^LN", "pain", "U")
    assert [value("ACVPU", w) for w in words] == ["A", "A", "C", "C", "V", "V", "P", "U"]
    for unclear in ("Unknown", "Asleep", "unable to assess"):  # first letters would have read U and A
        assert refusal(message(f"OBX|1|ST|ACVPU^X^L||{unclear}")).error == "103"
    assert value("O2SUPP", "Y") is True and value("O2SUPP", "no") is False
    assert refusal(message("OBX|1|ST|O2SUPP^X^L||maybe")).error == "103"


def test_temperature_units():
    def celsius(text: str, unit: str) -> float:
        return float(parse(message(f"OBX|1|NM|8310-5^T^LN||{text}|{unit}")).observations[0].value)

    assert celsius("37.2", "Cel") == 37.2 and celsius("98.6", "") == pytest.approx(37.0)
    assert celsius("99.5", "[degF]") == pytest.approx(37.5)
    assert refusal(message("OBX|1|NM|8310-5^T^LN||98.6|Cel")).error == "102"  # Celsius, not converted


def test_error_texts_are_short_and_never_carry_the_patient():
    pid = "PID|1||MRN123456^^^HOSP^MR||DOE^JANE"
    for obx in (hr("9" * 5000), hr("80", "2" * 5000), "OBX|1|ST|67775-7^LOC^LN||" + "MRN" * 3000):
        raw = "\r".join([MSH, pid, PV1, obx])
        err = refusal(raw)
        answer = nak(raw, err)
        assert len(str(err)) <= 200 and all(len(e[3]) <= 200 for e in errs(answer))
        assert "MRN123456" not in answer and "DOE" not in answer and len(answer) < 2000


def test_policy_from_settings():
    streams = DEFAULTS.streams
    policy = policy_from_settings(streams, KEY)
    assert policy == HL7Policy(UTC, KEY, streams.max_observation_age_s, streams.max_clock_skew_s)
    berlin = policy_from_settings(dataclasses.replace(streams, monitor_timezone="Europe/Berlin"), b"")
    assert berlin.zone == ZoneInfo("Europe/Berlin") and berlin.bed_key == b""
    for bad in ("Mars/Olympus", "Europe", "../etc/passwd", "/etc/localtime"):
        with pytest.raises(ValueError, match=r"streams\.monitor_timezone: unknown time zone"):
            policy_from_settings(dataclasses.replace(streams, monitor_timezone=bad), KEY)


# --- the listener ------------------------------------------------------------------------------


async def _exchange(server: MLLPServer, payload: bytes, answers: int) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(payload)
    await writer.drain()
    out, buffer = [], b""
    while len(out) < answers:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        buffer += chunk
        while START in buffer and END in buffer:
            start, end = buffer.index(START), buffer.index(END)
            out.append(buffer[start + 1 : end].decode())
            buffer = buffer[end + 2 :]
    writer.close()
    return out


def test_mllp_listener_acks_naks_and_survives_garbage():
    received = []
    current = time.strftime("%Y%m%d%H%M%S", time.gmtime())  # the listener reads times against the clock
    live = message(*OBX, msh=MSH.replace("20261123101500", current)).replace("20261123101455", current)

    async def main():
        server = MLLPServer(received.append, port=0, max_frame=4096)
        await server.start()
        good = frame(live)
        bad = frame("MSH|^~\\&|X|Y|Z|W|20261123||ORU^R01|BAD1|P|2.5\rOBX|1|NM|8867-4||80")
        # noise before a frame, two frames in one write, then a frame split across writes
        answers = await _exchange(server, b"\x00junk" + good + bad + good[:50], 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(good[:30])
        await writer.drain()
        writer.write(good[30:])
        await writer.drain()
        split_answer = (await asyncio.wait_for(reader.readuntil(END), 5)).decode()
        writer.close()
        # several monitors at once
        concurrent = await asyncio.gather(*(_exchange(server, good, 1) for _ in range(5)))
        # a frame that never ends and exceeds the limit is refused and its connection closed
        huge = await _exchange(server, START + b"A" * 5000, 1)
        after = await _exchange(server, good, 1)
        await server.close()
        return answers, split_answer, concurrent, huge, after, server

    answers, split_answer, concurrent, huge, after, server = asyncio.run(main())
    assert answers[0].split("\r")[1] == "MSA|AA|MSG00042|1 observations with unused codes ignored"
    assert answers[1].split("\r")[1].startswith("MSA|AE|BAD1|no bed")
    assert "MSA|AA|MSG00042" in split_answer
    assert all(a[0].split("\r")[1].startswith("MSA|AA|MSG00042") for a in concurrent)
    assert huge[0].split("\r")[1].startswith("MSA|AR||frame exceeds 4096 bytes")
    assert after[0].split("\r")[1].startswith("MSA|AA|MSG00042")  # still serving
    assert len(received) == 8 and server.rejected == 2
