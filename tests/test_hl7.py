"""HL7v2 parsing of real-world message variants, ACK/NAK, and the MLLP listener under bad input."""

from __future__ import annotations

import asyncio

import pytest

from bedside.streams.hl7v2 import HL7Error, ack, parse_oru
from bedside.streams.mllp import END, START, MLLPServer, frame

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


def message(*segments: str, sep: str = "\r") -> str:
    return sep.join([MSH, PID, PV1, *segments]) + sep


def test_parses_a_monitor_message_with_loinc_and_mdc_codes():
    parsed = parse_oru(message(*OBX))
    assert parsed.bed == "ICU-12-B" and parsed.control_id == "MSG00042" and parsed.ignored == 1
    values = {o.vital: o.value for o in parsed.observations}
    assert values["heart_rate"] == 112 and values["systolic_bp"] == 94 and values["diastolic_bp"] == 58
    assert values["spo2"] == 93 and values["respiratory_rate"] == 24 and values["consciousness"] == "V"
    assert values["temperature"] == pytest.approx(38.5, abs=0.01)  # converted from Fahrenheit
    assert values["oxygen_flow"] == 2
    hr = next(o for o in parsed.observations if o.vital == "heart_rate")
    from datetime import UTC, datetime

    assert hr.time == datetime(2026, 11, 23, 10, 14, 55, tzinfo=UTC).timestamp()  # OBX-14, not the message time


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_terminators(sep):
    assert len(parse_oru(message(*OBX[:2], sep=sep)).observations) == 2


def test_repetitions_escapes_and_missing_fields():
    obx = "OBX|1|NM|8867-4^Heart \\T\\ pulse rate^LN~147842^MDC_ECG_HEART_RATE^MDC||88"  # no units, no status
    parsed = parse_oru(message(obx))
    assert parsed.observations[0].vital == "heart_rate" and parsed.observations[0].value == 88
    no_pv1 = "\r".join([MSH, PID, OBX[0]])
    bed = parse_oru(no_pv1).bed  # no location: a digest of the patient id keys the state
    assert bed.startswith("patient-") and "MRN123456" not in bed and bed == parse_oru(no_pv1).bed


def test_cancelled_observations_are_not_used():
    parsed = parse_oru(message(OBX[0], OBX[1].replace("||||F", "||||X")))
    assert [o.vital for o in parsed.observations] == ["heart_rate"]


@pytest.mark.parametrize(
    ("raw", "code", "reason"),
    [
        ("PID|1||123", "AR", "does not start with an MSH"),
        (MSH.replace("ORU^R01^ORU_R01", "ADT^A01") + "\r" + PID, "AR", r"is not ORU\^R01"),
        (MSH + "\r" + PID + "\r" + PV1, "AE", "without any OBX"),
        (MSH + "\rOBX|1|NM|8867-4^HR^LN||80", "AE", "no bed"),
        (message("OBX|1|NM|8867-4^HR^LN||eighty"), "AE", "not a number"),
        (message("OBX|1|NM|8867-4^HR^LN||900"), "AE", "outside the physiological range"),
        (message("OBX|1|ST|67775-7^LOC^LN||drowsy"), "AE", "not one of A, C, V, P, U"),
        (message("OBX|1|NM|1234-5^Unknown^LN||1"), "AE", "none of the 1 observations"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(raw, code, reason):
    with pytest.raises(HL7Error, match=reason) as err:
        parse_oru(raw)
    assert err.value.code == code


def test_ack_and_nak_shapes():
    ok = ack(message(*OBX), "AA", control_id="MSG00042").split("\r")
    assert (
        ok[0].startswith("MSH|^~\\&|BEDSIDE|HOSP|PHILIPS_MX800|ICU_EAST|")
        and "|ACK^R01|" in ok[0]
        and ok[0].endswith("|2.6")
    )
    assert ok[1] == "MSA|AA|MSG00042"
    nak = ack(message(*OBX), "AE", "heart_rate value 'x' | bad", "MSG00042").split("\r")
    assert nak[1] == "MSA|AE|MSG00042|heart_rate value 'x' / bad" and nak[2].startswith("ERR|")
    assert ack("garbage", "AR", "unreadable").split("\r")[1] == "MSA|AR||unreadable"


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

    async def main():
        server = MLLPServer(received.append, port=0, max_frame=4096)
        await server.start()
        good = frame(message(*OBX))
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
