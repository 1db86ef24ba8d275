"""Recorded 12-lead ECGs for replay: DICOM 12-lead ECG Waveform Storage (what carts and ECG
management systems export), read with pydicom, resampled to the stream's 250 Hz, in millivolts, in
the lead order of the ECG stream. Needs the `dicom` extra (pydicom, scipy).

A recording that lacks the derived limb leads (III, aVR, aVL, aVF) gets them from Einthoven's and
Goldberger's relations; one that lacks I, II or a chest lead is refused, naming what is missing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bedside.clinical.ecg import FS, LEADS

_UNITS_TO_MV = {"uV": 1e-3, "mV": 1.0, "V": 1e3}
_LEAD = re.compile(r"^Lead\s+(aVR|aVL|aVF|III|II|I|V[1-6])\b", re.IGNORECASE)


class ECGFileError(ValueError):
    pass


@dataclass
class ECGRecording:
    samples: np.ndarray  # [12, n] float32 mV at FS, in LEADS order
    source_rate: float
    derived_leads: list[str] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)  # the cart's own interpretation, verbatim
    measurements: dict[str, float] = field(default_factory=dict)  # e.g. "RR Interval" in ms


def _lead_name(meaning: str) -> str | None:
    match = _LEAD.match(meaning.strip())
    if match is None:
        return None
    name = match.group(1)
    return name if name.startswith("a") else name.upper()


def read_dicom_ecg(path: Path | str) -> ECGRecording:
    """The 12 leads of a DICOM ECG; ECGFileError, naming the file, for one that is missing, a folder,
    not DICOM, a DICOM without a waveform, or a waveform without the leads a 12-lead stream needs."""
    try:
        import pydicom
        import pydicom.errors
        from scipy.signal import resample_poly
    except ImportError as exc:
        raise ECGFileError(f"DICOM ECGs need the 'dicom' extra (pip install 'bedside[dicom]'): {exc}") from None
    path = Path(path)
    if not path.exists():
        raise ECGFileError(f"{path} does not exist")
    if path.is_dir():
        raise ECGFileError(f"{path} is a folder, not a DICOM ECG file")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        raise ECGFileError(f"{path} is not a DICOM file (it has no DICOM header)") from None
    except OSError as exc:
        raise ECGFileError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # pydicom raises several types on files that are not DICOM
        raise ECGFileError(f"{path} is not a readable DICOM file: {str(exc)[:200]}") from None
    groups = list(ds.get("WaveformSequence") or [])
    if not groups:
        kind = str(ds.get("Modality", "")).strip() or "no modality given"
        raise ECGFileError(f"{path} is a DICOM file without a waveform ({kind}), not a 12-lead ECG")
    try:
        # the rhythm strip, not the median beat: the longest multiplex group
        index = max(range(len(groups)), key=lambda i: int(groups[i].NumberOfWaveformSamples))
        group = groups[index]
        rate = float(group.SamplingFrequency)
        raw = np.asarray(ds.waveform_array(index), dtype=np.float64)  # sensitivity and baseline applied
        definitions = list(group.ChannelDefinitionSequence)
    except Exception as exc:  # a waveform whose attributes or data pydicom cannot use
        raise ECGFileError(f"{path} is not a readable DICOM waveform: {str(exc)[:200]}") from None
    if raw.ndim != 2 or raw.shape[1] != len(definitions) or not raw.shape[0] or not rate > 0:
        raise ECGFileError(f"{path}: the waveform's samples do not match its channel definitions")
    leads: dict[str, np.ndarray] = {}
    for channel, definition in enumerate(definitions):
        sources = definition.get("ChannelSourceSequence") or []
        name = _lead_name(str(sources[0].get("CodeMeaning", ""))) if sources else None
        if name is None:
            continue
        units = "uV"
        if "ChannelSensitivityUnitsSequence" in definition:
            units = str(definition.ChannelSensitivityUnitsSequence[0].CodeValue)
        if units not in _UNITS_TO_MV:
            raise ECGFileError(f"lead {name} is in {units!r}; expected uV, mV or V")
        leads[name] = raw[:, channel] * _UNITS_TO_MV[units]
    derived = _derive_limb_leads(leads)
    missing = [lead for lead in LEADS if lead not in leads]
    if missing:
        raise ECGFileError(f"{path.name} lacks lead(s) {', '.join(missing)}; a 12-lead stream needs I, II and V1-V6")
    samples = np.stack([leads[lead] for lead in LEADS])
    if rate != FS:
        up, down = _ratio(rate)
        samples = resample_poly(samples, up, down, axis=1)  # anti-aliased
    statements, measurements = _annotations(ds)
    return ECGRecording(samples.astype(np.float32), rate, derived, statements, measurements)


def _ratio(rate: float) -> tuple[int, int]:
    if rate != int(rate):
        raise ECGFileError(f"sampling frequency {rate} Hz is not a whole number")
    g = math.gcd(FS, int(rate))
    return FS // g, int(rate) // g


def _derive_limb_leads(leads: dict[str, np.ndarray]) -> list[str]:
    """III = II - I; aVR = -(I + II)/2; aVL = I - II/2; aVF = II - I/2 (Einthoven, Goldberger)."""
    if "I" not in leads or "II" not in leads:
        return []
    lead_i, lead_ii = leads["I"], leads["II"]
    formulas = {
        "III": lambda: lead_ii - lead_i,
        "aVR": lambda: -(lead_i + lead_ii) / 2,
        "aVL": lambda: lead_i - lead_ii / 2,
        "aVF": lambda: lead_ii - lead_i / 2,
    }
    derived = [name for name in formulas if name not in leads]
    for name in derived:
        leads[name] = formulas[name]()
    return derived


def _annotations(ds: object) -> tuple[list[str], dict[str, float]]:
    statements: list[str] = []
    measurements: dict[str, float] = {}
    for item in getattr(ds, "WaveformAnnotationSequence", []):
        if "UnformattedTextValue" in item:
            statements.append(str(item.UnformattedTextValue))
        elif "NumericValue" in item and "ConceptNameCodeSequence" in item:
            measurements[str(item.ConceptNameCodeSequence[0].CodeMeaning)] = float(item.NumericValue)
    return statements, measurements


def looped(recording: np.ndarray, seconds: float) -> np.ndarray:
    """The recording repeated to fill `seconds` (a 10 s cart ECG replayed as a longer stream)."""
    need = int(seconds * FS)
    reps = -(-need // recording.shape[1])
    return np.tile(recording, (1, reps))[:, :need]
