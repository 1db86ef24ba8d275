"""Hostile HL7: whatever a monitor (or anything else on the network) sends, parse_oru returns only
finite, plausible observations within the accepted time range or raises HL7Error, and every answer,
ACK or NAK, is HL7 that the `hl7` library reads back with the control id in MSA-2 and no field moved."""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime

import hl7
from hypothesis import given, settings
from hypothesis import strategies as st

from bedside.streams.hl7ack import ERRORS
from bedside.streams.hl7v2 import (
    CODES,
    PLAUSIBLE,
    HL7Error,
    HL7Policy,
    accepted_ack,
    ack,
    nak,
    parse_oru,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
NOW = datetime(2026, 11, 23, 10, 15, tzinfo=UTC).timestamp()
POLICY = HL7Policy(bed_key=bytes(range(32)))
SECRET = "MRN-SECRET-77"  # the patient identifier: never in an answer
VALID = [
    "MSH|^~\\&|MON^1.2.3^ISO|ICU|BEDSIDE|HOSP|20261123101500||ORU^R01^ORU_R01|CTRL-1|P|2.5",
    f"PID|1||{SECRET}^^^HOSP^MR||DOE^JANE||19500101|F",
    "PV1|1|I|ICU^12^B",
    "OBR|1|||VITALS|||20261123101000",
    "OBX|1|NM|8867-4^HR^LN||112|/min|||||F|||20261123101455",
    "OBX|2|NM|59408-5^SpO2^LN||93|%|||||F",
    "OBX|3|NM|8310-5^Temp^LN||101.3|[degF]|||||F|||20261123101455+0000",
    "OBX|4|ST|67775-7^ACVPU^LN||V||||||F",
    "OBX|5|ST|O2SUPP^On oxygen^L||Y||||||F",
]
NASTY = [
    *["", "|", "^", "~", "\\", "&", "\r", "\n", "\r\n", "\x00", "\x0b", "\x1c", "\x1c\r", "\x7f", "\t", "\ud800"],
    *["\\.sp999999999\\", "\\.spX\\", "\\.br\\", "\\Z\\", "\\XZZ\\", "\\X0D\\", "\\\\", "^" * 25_000],
    *["\\F\\", "\\E\\", "\\X41\\", "\\H\\", "\\E", "١٢٣", "٨٠", "８０", "+80", "-80", " 8e1 ", "nan", "inf", "1_000"],
    *["9" * 300, "A" * 5000, "MSH|^~\\&|", "PID|1||X", "ORU", "R01", "2.5", "3.0", "67775-7", "O2SUPP", "U"],
    *["20261123101500+0100", "20261123101500-0500", "20261123", "99999999999999", "20261123111500", "00000101000000"],
]
FIELD = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("|^~\\&\r\n\x00 0123456789.+-eE٣"), max_size=30),
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A valid ORU^R01 with one to four fields (the separators in MSH-2 included) replaced."""
    segments = [s.split("|") for s in VALID]
    for _ in range(draw(st.integers(1, 4))):
        fields = segments[draw(st.integers(0, len(segments) - 1))]
        at = draw(st.integers(1, len(fields) + 2))
        fields.extend([""] * (at + 1 - len(fields)))
        fields[at] = draw(FIELD)
    sep = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    return sep.join("|".join(fields) for fields in segments) + sep


def _answer_reads_back(answer: str, control_id: str) -> None:
    assert answer.endswith("\r") and not {"\n", "\x00", "\x0b", "\x1c"} & set(answer) and len(answer) < 20_000
    parsed = hl7.parse(answer)
    names = [str(segment[0]) for segment in parsed]
    assert names[:2] == ["MSH", "MSA"] and set(names[2:]) <= {"ERR"}
    msh, msa = parsed.segment("MSH"), parsed.segment("MSA")
    assert len(msh) == 13 and str(msh[3]) == "BEDSIDE" and str(msh[9]).startswith("ACK^") and len(str(msh[10])) <= 20
    assert str(msa[1]) in ("AA", "AE", "AR") and len(msa) <= 4
    assert parsed.unescape(str(msa[2])) == control_id
    for err in parsed.segments("ERR") if "ERR" in names else []:
        assert len(err) == 9 and str(err[3][0][0]) in ERRORS and str(err[4]) in ("E", "W")
        assert len(parsed.unescape(str(err[8]))) <= 200
    assert SECRET not in answer


def check(raw: str) -> None:
    try:
        message = parse_oru(raw, now=NOW, policy=POLICY)
    except HL7Error as exc:
        assert exc.code in ("AE", "AR") and exc.error in ERRORS and 0 < len(str(exc)) <= 200
        assert SECRET not in str(exc) and all(SECRET not in p for p in exc.problems)
        control_id = exc.control_id
        answers = [nak(raw, exc), ack(raw, exc.code, str(exc), exc.control_id)]
    else:
        assert message.observations and message.bed and len(message.bed) <= 64 and SECRET not in message.bed
        for obs in message.observations:
            assert obs.vital in CODES.values() and NOW - POLICY.max_age_s <= obs.time <= NOW + POLICY.max_skew_s
            if obs.vital in PLAUSIBLE:
                low, high = PLAUSIBLE[obs.vital]
                assert isinstance(obs.value, float) and math.isfinite(obs.value) and low <= obs.value <= high
            elif obs.vital == "consciousness":
                assert obs.value in ("A", "C", "V", "P", "U")
            else:
                assert isinstance(obs.value, bool)
        assert all(len(w) <= 200 and SECRET not in w for w in message.warnings)
        control_id = message.control_id
        answers = [accepted_ack(raw, message)]
    for answer in [*answers, ack(raw)]:  # ack(raw): the control id as read from the message itself
        _answer_reads_back(answer, control_id)


def test_the_valid_message_is_accepted():
    raw = "\r".join(VALID) + "\r"
    message = parse_oru(raw, now=NOW, policy=POLICY)
    assert len(message.observations) == 5 and message.control_id == "CTRL-1"
    check(raw)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False)
@given(
    st.one_of(
        st.text(max_size=300),
        st.text(max_size=300).map(lambda t: "MSH" + t),
        FIELD.map(lambda t: "MSH|^~\\&|A|B|C|D|20261123101500||ORU^R01|" + t + "|P|2.5\rPV1|1|I|X\rOBX|1|NM|HR||80"),
    )
)
def test_arbitrary_text_is_read_or_refused(raw):
    check(raw)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False)
@given(mutated())
def test_mutated_messages_are_read_or_refused(raw):
    check(raw)
