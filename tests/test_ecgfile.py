"""Recorded 12-lead ECGs: the real resting cart ECG that pydicom ships (10 s at 1000 Hz, sinus
rhythm, RR 982 ms per the cart) read, resampled to 250 Hz, checked against the physics of the
leads, and its heart rate found by the stream's R-peak detector."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bedside.clinical.ecg import FS, LEAD_II, LEADS, heart_rate, r_peaks, rr_irregularity
from bedside.clinical.ecg import confirmed as confirmed_by
from bedside.settings import DEFAULTS
from bedside.streams.ecg import WINDOW
from bedside.tools.ecgfile import ECGFileError, _derive_limb_leads, looped, read_dicom_ecg

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

CART = get_testdata_file("waveform_ecg.dcm")


def lead(samples: np.ndarray, name: str) -> np.ndarray:
    return samples[LEADS.index(name)]


def test_the_real_cart_ecg_is_read_as_a_12_lead_stream():
    ecg = read_dicom_ecg(CART)
    assert ecg.samples.shape == (12, 10 * FS) and ecg.samples.dtype == np.float32
    assert ecg.source_rate == 1000 and ecg.derived_leads == []
    assert "RITMO SINUSALE" in ecg.statements and ecg.measurements["RR Interval"] == 982
    amplitude = np.ptp(lead(ecg.samples, "II"))
    assert 0.5 < amplitude < 5  # millivolts, not microvolts
    # Einthoven's law holds in the recording, so leads are where the stream expects them
    s = ecg.samples
    assert np.max(np.abs(lead(s, "III") - (lead(s, "II") - lead(s, "I")))) < 0.02
    assert np.max(np.abs(lead(s, "aVR") + (lead(s, "I") + lead(s, "II")) / 2)) < 0.02


def test_heart_rate_on_the_real_ecg_matches_the_carts_rr_interval():
    ecg = read_dicom_ecg(CART)
    expected = 60_000 / ecg.measurements["RR Interval"]  # 61.1 / min
    for start in range(0, ecg.samples.shape[1] - WINDOW + 1, FS):  # every window the stream would see
        rate = heart_rate(ecg.samples[LEAD_II, start : start + WINDOW])
        assert rate is not None and abs(rate - expected) < 3, (start, rate)


def test_missing_limb_leads_are_derived_like_the_recorded_ones():
    s = read_dicom_ecg(CART).samples.astype(np.float64)
    leads = {name: s[i] for i, name in enumerate(LEADS) if name not in ("III", "aVR", "aVL", "aVF")}
    assert _derive_limb_leads(leads) == ["III", "aVR", "aVL", "aVF"]
    for name in ("III", "aVR", "aVL", "aVF"):
        assert np.max(np.abs(leads[name] - lead(s, name))) < 0.02


def test_unreadable_files_and_missing_leads_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ECGFileError, match=re.escape("junk.dcm is not a DICOM file (it has no DICOM header)")):
        read_dicom_ecg(junk)
    with pytest.raises(ECGFileError, match=re.escape("missing.dcm does not exist")):
        read_dicom_ecg(tmp_path / "missing.dcm")
    with pytest.raises(ECGFileError, match="is a folder, not a DICOM ECG file"):
        read_dicom_ecg(tmp_path)
    with pytest.raises(ECGFileError, match=re.escape("is a DICOM file without a waveform (CT), not a 12-lead ECG")):
        read_dicom_ecg(get_testdata_file("CT_small.dcm"))  # a real DICOM image: no 12-lead waveform
    ds = pydicom.dcmread(CART)
    ds.WaveformSequence[0].ChannelDefinitionSequence[11].ChannelSourceSequence[0].CodeMeaning = "Lead X"
    no_v6 = tmp_path / "no_v6.dcm"
    ds.save_as(no_v6)
    with pytest.raises(ECGFileError, match="lacks lead\\(s\\) V6"):
        read_dicom_ecg(no_v6)


def test_a_recording_is_looped_to_the_requested_length():
    ecg = read_dicom_ecg(CART).samples
    longer = looped(ecg, 25.0)
    assert longer.shape == (12, 25 * FS)
    np.testing.assert_array_equal(longer[:, 10 * FS : 20 * FS], ecg)


def confirmed(rhythm, irregularity):
    return confirmed_by(rhythm, irregularity, DEFAULTS.ecg.af_min_irregularity)


def test_an_af_call_on_regular_real_beats_is_not_confirmed():
    """The synthetic-trained model calls this real sinus ECG AF; its R-R intervals say otherwise."""
    from bedside.synthetic.ecg import episodes

    real = read_dicom_ecg(CART).samples
    for start in range(0, real.shape[1] - WINDOW + 1, FS):
        irregularity = rr_irregularity(r_peaks(real[LEAD_II, start : start + WINDOW]))
        assert irregularity is not None and irregularity < 0.05
        assert not confirmed("atrial_fibrillation", irregularity)
        assert confirmed("normal_sinus", irregularity) and confirmed("pvc", irregularity)
    af, _ = episodes([("atrial_fibrillation", 30.0)], np.random.default_rng(4))  # SYNTHETIC
    calls = [
        confirmed("atrial_fibrillation", rr_irregularity(r_peaks(af[LEAD_II, s : s + WINDOW])))
        for s in range(0, af.shape[1] - WINDOW + 1, FS)
    ]
    assert sum(calls) >= 0.9 * len(calls)  # real fibrillation is irregular: confirmed
    assert not confirmed("atrial_fibrillation", None)  # too few beats to tell: not raised
