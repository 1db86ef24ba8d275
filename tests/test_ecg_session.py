"""The ECG stream without any transport: a per-bed session takes the bytes of each message and
returns rhythm results; the model's input and labels come from its config, and the rhythm alert
decision is the policy's, with thresholds from settings."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bedside.alerts.bus import AlertBus
from bedside.alerts.events import Alert
from bedside.alerts.policies import RhythmAlert
from bedside.dataplane import Dataplane
from bedside.errors import InvalidInput
from bedside.settings import DEFAULTS
from bedside.streams.ecg import ChunkError, ECGSession, ECGStats
from bedside.streams.service import Streams
from bedside.synthetic.ecg import generate
from tests.models import rhythm_config, rhythm_model, write_config

HOSPITAL_LABELS = ["sinus", "afib", "flutter"]


def make_dataplane(root: Path, name: str, config: str, classes: int, favour: int, samples: int = 1250) -> Dataplane:
    write_config(root / name, config)
    rhythm_model(root / name / "1" / "model.onnx", classes=classes, samples=samples, favour=favour)
    dataplane = Dataplane(root)
    dataplane.start()
    return dataplane


def run_session(dataplane: Dataplane, model: str, seconds: float = 6.0, **ecg) -> tuple[list[dict], AlertBus]:
    settings = dataclasses.replace(DEFAULTS.ecg, model=model, **ecg)
    bus = AlertBus()
    session = ECGSession(dataplane, settings, "ICU-3", bus, ECGStats())
    signal = generate("atrial_fibrillation", seconds, np.random.default_rng(1))

    async def go() -> list[dict]:
        out = []
        for start in range(0, signal.shape[1], 125):
            chunk = np.ascontiguousarray(signal[:, start : start + 125].T).astype("<f4").tobytes()
            out += [r.to_dict() for r in await session.push(chunk)]
        with pytest.raises(ChunkError, match="12 leads"):
            await session.push(b"\x00" * 7)
        return out

    return asyncio.run(go()), bus


def test_a_hospital_model_with_its_own_labels_drops_in(tmp_path):
    dataplane = make_dataplane(tmp_path, "site_rhythm", rhythm_config(HOSPITAL_LABELS), 3, favour=2)
    try:
        results, bus = run_session(dataplane, "site_rhythm")
    finally:
        dataplane.close()
    assert [r["sample_end"] for r in results] == [1250, 1500]
    assert {r["rhythm"] for r in results} == {"flutter"} and all(r["source"] == "site_rhythm v1" for r in results)
    assert all(r["confirmed"] and not r["degraded"] and r["latency_ms"] > 0 for r in results)
    (alert,) = bus.recent  # one alert for the change from sinus, not one per window
    assert isinstance(alert, Alert) and alert.level == 2 and "flutter" in alert.reason and alert.bed == "ICU-3"


def test_alert_probability_comes_from_settings(tmp_path):
    dataplane = make_dataplane(tmp_path, "site_rhythm", rhythm_config(HOSPITAL_LABELS), 3, favour=2)
    try:
        results, bus = run_session(dataplane, "site_rhythm", alert_probability=0.99)
    finally:
        dataplane.close()
    assert results[0]["probability"] < 0.99 and not bus.recent


@pytest.mark.parametrize(
    ("config", "classes", "samples", "reason"),
    [
        (rhythm_config(None), 5, 1250, "names no rhythm labels"),
        (rhythm_config(HOSPITAL_LABELS, samples=1000), 3, 1000, "feeds FP32 [1, 12, 1250] windows"),
    ],
)
def test_a_model_that_does_not_fit_degrades_with_the_reason(tmp_path, config, classes, samples, reason):
    dataplane = make_dataplane(tmp_path, "site_rhythm", config, classes, favour=0, samples=samples)
    try:
        results, bus = run_session(dataplane, "site_rhythm")
    finally:
        dataplane.close()
    assert results and all(r["degraded"] and r["source"] == "rules" and reason in r["reason"] for r in results)
    assert all(r["heart_rate"] for r in results) and not bus.recent  # the R-peak rate still goes out


def test_no_model_means_heart_rate_only(tmp_path):
    dataplane = Dataplane(tmp_path)
    dataplane.start()
    results, _ = run_session(dataplane, "ecg_rhythm")
    dataplane.close()
    assert all(
        r["degraded"] and "model 'ecg_rhythm' is not in the repository" in r["reason"] and r["heart_rate"]
        for r in results
    )


def test_bed_names_are_checked_by_the_streams(tmp_path):
    streams = Streams(Dataplane(tmp_path))
    with pytest.raises(InvalidInput, match="bed must be 1-64"):
        streams.open_ecg("bad bed")
    assert streams.open_ecg("ICU-1.b_2").bed == "ICU-1.b_2"


def test_rhythm_policy_alerts_on_confirmed_changes_only():
    policy = RhythmAlert("B1", min_probability=0.8)
    assert policy.decide("atrial_fibrillation", 0.95, False, "m v1", 0.0) is None  # not confirmed by R-R
    assert policy.decide("atrial_fibrillation", 0.95, True, "m v1", 1.0) is not None
    assert policy.decide("atrial_fibrillation", 0.97, True, "m v1", 2.0) is None  # the same rhythm again
    assert policy.decide("normal_sinus", 0.9, True, "m v1", 3.0) is None  # back to sinus: no alert
    assert policy.decide("pvc", 0.5, True, "m v1", 4.0) is None  # below the probability
    assert policy.decide("pvc", 0.9, True, "m v1", 5.0) is None  # still pvc: no new alert
    assert policy.decide(None, 0.0, False, "rules", 6.0) is None


def test_a_rhythm_alert_carries_no_vitals_fields():
    alert = RhythmAlert("B2", 0.8).decide("pvc", 0.9, True, "ecg_rhythm v1", 1.0)
    assert alert is not None and set(alert.to_dict()) == {
        "type",
        "bed",
        "time",
        "level",
        "source",
        "reason",
        "degraded",
    }


def test_a_chunk_longer_than_the_cap_is_refused_and_the_session_carries_on(tmp_path):
    """Issue 10: one 8 MiB chunk (~700 s) was classified back to back, 695 windows, holding other
    beds' windows at 56 ms. A chunk is capped at ecg.max_chunk_s with a clear error."""
    dataplane = make_dataplane(tmp_path, "site_rhythm", rhythm_config(HOSPITAL_LABELS), 3, favour=2)
    settings = dataclasses.replace(DEFAULTS.ecg, model="site_rhythm", max_chunk_s=2.0)
    session = ECGSession(dataplane, settings, "ICU-3", AlertBus(), ECGStats())
    signal = generate("normal_sinus", 8.0, np.random.default_rng(2))
    as_bytes = lambda a: np.ascontiguousarray(a.T).astype("<f4").tobytes()  # noqa: E731

    async def go() -> list[int]:
        with pytest.raises(ChunkError, match=r"holds 8 s of ECG; at most 2 s"):
            await session.push(as_bytes(signal))
        assert session.windows.samples == 0  # nothing of the refused chunk was kept
        ends = []
        for start in range(0, signal.shape[1], 500):  # the same ECG in 2 s chunks is taken
            ends += [r.sample_end for r in await session.push(as_bytes(signal[:, start : start + 500]))]
        return ends

    try:
        assert asyncio.run(go()) == [1250, 1500, 1750, 2000]
    finally:
        dataplane.close()
