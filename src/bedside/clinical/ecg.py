"""The 12-lead ECG as bedside takes it, and what its R peaks tell without any model.

Format: millivolts at 250 Hz, leads in the order I, II, III, aVR, aVL, aVF, V1-V6. The R-peak
heart rate and R-R irregularity are computed for every window; they are the fallback when the
rhythm model cannot answer, and the check that keeps a model's AF call on regular beats from
becoming an alert.
"""

from __future__ import annotations

import numpy as np

FS = 250
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LEAD_II = LEADS.index("II")
ATRIAL_FIBRILLATION = "atrial_fibrillation"


def r_peaks(lead: np.ndarray, fs: int = FS) -> list[int]:
    """R-peak sample positions: slope energy over 120 ms, adaptive threshold, 250 ms refractory."""
    slope = np.diff(lead.astype(np.float64)) ** 2
    width = int(0.12 * fs)
    summed = np.cumsum(slope)
    energy = np.empty(len(summed) - width + 1)  # 120 ms moving sum (a constant shift, same intervals)
    energy[0] = summed[width - 1]
    energy[1:] = summed[width:] - summed[:-width]
    top = int(0.99 * (len(energy) - 1))
    threshold = 0.3 * np.partition(energy, top)[top]  # the 99th percentile, without a full sort
    middle = energy[1:-1]
    candidates = np.flatnonzero((middle > threshold) & (middle >= energy[:-2]) & (middle >= energy[2:])) + 1
    peaks, last = [], -fs
    for i in candidates.tolist():  # a few dozen local maxima, not every sample
        if i - last > 0.25 * fs:
            peaks.append(i)
            last = i
    return peaks


def rate_from_peaks(peaks: list[int], fs: int = FS) -> float | None:
    """Beats per minute from the median R-R interval."""
    return float(60.0 * fs / np.median(np.diff(peaks))) if len(peaks) >= 2 else None


def heart_rate(lead: np.ndarray, fs: int = FS) -> float | None:
    return rate_from_peaks(r_peaks(lead, fs), fs)


def rr_irregularity(peaks: list[int]) -> float | None:
    """Coefficient of variation of the R-R intervals (sinus rhythm ~0.02-0.05, atrial fibrillation
    mostly above 0.1); None with fewer than three intervals to judge by."""
    if len(peaks) < 4:
        return None
    intervals = np.diff(peaks)
    return float(intervals.std() / intervals.mean())


def confirmed(rhythm: str | None, irregularity: float | None, min_irregularity: float) -> bool:
    """Whether the R-R intervals bear the rhythm out. Atrial fibrillation is irregularly irregular by
    definition: a model calling it on regular beats is not raised as an alert (the result still says
    what the model saw). Other rhythms are taken as the model gives them."""
    if rhythm != ATRIAL_FIBRILLATION:
        return True
    return irregularity is not None and irregularity >= min_irregularity
