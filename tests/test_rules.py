"""NEWS2 and qSOFA against the published tables, at every band boundary."""

from __future__ import annotations

import pytest

from bedside.alerts.rules import (
    Vitals,
    consciousness_points,
    news2,
    oxygen_points,
    pulse_points,
    qsofa,
    respiratory_rate_points,
    spo2_points,
    systolic_points,
    temperature_points,
)

# (value, points) at both sides of every boundary of RCP NEWS2 chart 1
RR = [(5, 3), (8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3), (40, 3)]
SPO2_1 = [(85, 3), (91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)]
SBP = [(70, 3), (90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3), (250, 3)]
PULSE = [
    (30, 3),
    (40, 3),
    (41, 1),
    (50, 1),
    (51, 0),
    (90, 0),
    (91, 1),
    (110, 1),
    (111, 2),
    (130, 2),
    (131, 3),
    (180, 3),
]
TEMP = [(34.0, 3), (35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1), (39.1, 2), (41.0, 2)]


@pytest.mark.parametrize(("rr", "points"), RR)
def test_respiratory_rate(rr, points):
    assert respiratory_rate_points(rr) == points


@pytest.mark.parametrize(("spo2", "points"), SPO2_1)
def test_spo2_scale_1(spo2, points):
    assert spo2_points(spo2, on_oxygen=False) == points
    assert spo2_points(spo2, on_oxygen=True) == points  # scale 1 does not depend on oxygen


@pytest.mark.parametrize(
    ("spo2", "on_oxygen", "points"),
    [
        (80, False, 3),
        (83, False, 3),
        (84, False, 2),
        (85, False, 2),
        (86, True, 1),
        (87, True, 1),
        (88, True, 0),
        (92, True, 0),
        (93, False, 0),
        (99, False, 0),  # >= 93 on air scores 0
        (93, True, 1),
        (94, True, 1),
        (95, True, 2),
        (96, True, 2),
        (97, True, 3),
        (100, True, 3),
    ],
)
def test_spo2_scale_2(spo2, on_oxygen, points):
    assert spo2_points(spo2, on_oxygen, scale_2=True) == points


def test_air_or_oxygen():
    assert oxygen_points(True) == 2 and oxygen_points(False) == 0


@pytest.mark.parametrize(("sbp", "points"), SBP)
def test_systolic(sbp, points):
    assert systolic_points(sbp) == points


@pytest.mark.parametrize(("hr", "points"), PULSE)
def test_pulse(hr, points):
    assert pulse_points(hr) == points


@pytest.mark.parametrize(("level", "points"), [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3), ("a", 0)])
def test_consciousness(level, points):
    assert consciousness_points(level) == points


def test_consciousness_rejects_unknown_levels():
    with pytest.raises(ValueError, match="not one of ACVPU"):
        consciousness_points("drowsy")


@pytest.mark.parametrize(("temp", "points"), TEMP)
def test_temperature(temp, points):
    assert temperature_points(temp) == points


NORMAL = Vitals(
    respiratory_rate=16, spo2=97, on_oxygen=False, systolic_bp=120, heart_rate=75, consciousness="A", temperature=37.0
)


def test_aggregate_and_clinical_risk():
    assert news2(NORMAL).score == 0 and news2(NORMAL).risk == "low" and news2(NORMAL).complete
    # a single parameter scoring 3 -> low-medium (urgent ward-based response) even with a low total
    single = news2(Vitals(**{**NORMAL.__dict__, "heart_rate": 135}))
    assert single.score == 3 and single.risk == "low-medium"
    # 5-6 medium
    medium = news2(Vitals(**{**NORMAL.__dict__, "respiratory_rate": 22, "on_oxygen": True, "temperature": 38.5}))
    assert medium.score == 5 and medium.risk == "medium"
    # >= 7 high: RR 26 (3) + SpO2 91 (3) + oxygen (2) + SBP 95 (2) + HR 115 (2) + V (3) + 39.5 (2) = 17
    sick = Vitals(
        respiratory_rate=26,
        spo2=91,
        on_oxygen=True,
        systolic_bp=95,
        heart_rate=115,
        consciousness="V",
        temperature=39.5,
    )
    result = news2(sick)
    assert result.score == 17 and result.risk == "high"
    assert result.parameters == {
        "respiratory_rate": 3,
        "spo2": 3,
        "air_or_oxygen": 2,
        "systolic_bp": 2,
        "pulse": 2,
        "consciousness": 3,
        "temperature": 2,
    }


def test_missing_parameters_are_named_not_guessed():
    partial = news2(Vitals(heart_rate=120, systolic_bp=100))
    assert not partial.complete and partial.score == 4
    assert set(partial.missing) == {"respiratory_rate", "spo2", "air_or_oxygen", "consciousness", "temperature"}
    assert "missing" in partial.reason()


@pytest.mark.parametrize(
    ("vitals", "score", "positive"),
    [
        (Vitals(respiratory_rate=21, systolic_bp=101, consciousness="A"), 0, False),
        (Vitals(respiratory_rate=22, systolic_bp=101, consciousness="A"), 1, False),
        (Vitals(respiratory_rate=22, systolic_bp=100, consciousness="A"), 2, True),
        (Vitals(respiratory_rate=12, systolic_bp=100, consciousness="C"), 2, True),
        (Vitals(respiratory_rate=30, systolic_bp=80, consciousness="U"), 3, True),
    ],
)
def test_qsofa(vitals, score, positive):
    result = qsofa(vitals)
    assert result.score == score and result.positive == positive and not result.missing
