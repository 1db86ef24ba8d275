"""SYNTHETIC 12-lead ECG at 250 Hz with labelled rhythms, from published physiology.

Each beat is a sum of Gaussian waves (P, Q, R, S, T) with textbook durations and lead amplitudes;
limb leads obey Einthoven's and Goldberger's relations (III = II - I, aVR = -(I + II)/2, ...).
Rhythms: normal sinus (60-100 bpm), sinus bradycardia (<60), sinus tachycardia (>100), atrial
fibrillation (irregular RR, no P waves, 4-9 Hz fibrillatory baseline) and sinus rhythm with
premature ventricular contractions (wide QRS without P, discordant T, compensatory pause).
Baseline wander, mains interference and muscle noise are added. Values are in millivolts.
This is not a substitute for real ECG data: models trained on it are demonstrations only.
"""

from __future__ import annotations

import numpy as np

from bedside.clinical.ecg import FS, LEADS

__all__ = ["FS", "LEADS", "RHYTHMS", "dataset", "episodes", "generate"]

RHYTHMS = ("normal_sinus", "sinus_bradycardia", "sinus_tachycardia", "atrial_fibrillation", "pvc")

# Amplitudes (mV) of P, Q, R, S, T in leads I and II and V1-V6 (typical adult values).
_AMP = {
    "I": (0.08, -0.05, 0.6, -0.1, 0.2),
    "II": (0.12, -0.07, 1.0, -0.15, 0.3),
    "V1": (0.06, 0.0, 0.25, -0.9, -0.05),
    "V2": (0.07, 0.0, 0.45, -1.2, 0.35),
    "V3": (0.08, -0.03, 0.85, -0.7, 0.4),
    "V4": (0.08, -0.05, 1.3, -0.4, 0.35),
    "V5": (0.08, -0.07, 1.2, -0.2, 0.3),
    "V6": (0.07, -0.07, 0.9, -0.1, 0.25),
}
# Wave centre (s from QRS peak) and width (s, Gaussian sigma) of P, Q, R, S, T.
_TIMING = ((-0.16, 0.022), (-0.03, 0.008), (0.0, 0.011), (0.03, 0.009), (0.26, 0.045))
_PVC_TIMING = ((0.0, 0.0), (-0.05, 0.02), (0.0, 0.03), (0.06, 0.03), (0.3, 0.06))


def _beat(
    t: np.ndarray,
    centre: float,
    amps: tuple[float, ...],
    timing: tuple[tuple[float, float], ...],
    p_wave: bool,
    qt_scale: float,
) -> np.ndarray:
    out = np.zeros_like(t)
    for i, ((offset, width), amp) in enumerate(zip(timing, amps, strict=True)):
        if (i == 0 and not p_wave) or width == 0:
            continue
        if i == 4:
            offset *= qt_scale  # the QT interval shortens as the heart rate rises
        out += amp * np.exp(-0.5 * ((t - centre - offset) / width) ** 2)
    return out


def _rr_intervals(
    rhythm: str, seconds: float, rng: np.random.Generator, after: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Beat times (s) and a flag per beat: True for a premature ventricular beat. `after`: the time of
    the last beat of the rhythm before (an episode starting), so the first beat keeps the new rhythm's
    interval instead of a random phase."""
    rate = {
        "normal_sinus": (60, 100),
        "sinus_bradycardia": (40, 58),
        "sinus_tachycardia": (102, 150),
        "atrial_fibrillation": (70, 130),
        "pvc": (60, 95),
    }[rhythm]
    mean_rr = 60.0 / rng.uniform(*rate)
    times: list[float] = []
    pvc: list[bool] = []
    t = rng.uniform(0, mean_rr) if after is None else after + mean_rr
    while t < seconds + 1.0:
        premature = rhythm == "pvc" and len(times) > 0 and not pvc[-1] and rng.random() < 0.25
        times.append(t)
        pvc.append(premature)
        # atrial fibrillation is irregularly irregular; sinus rhythm has a little heart-rate variability
        irregular = rhythm == "atrial_fibrillation"
        rr = mean_rr * (rng.uniform(0.6, 1.4) if irregular else 1 + rng.normal(0, 0.02))
        if rhythm == "pvc" and rng.random() < 0.25 and not premature:
            rr = mean_rr * rng.uniform(0.55, 0.7)  # the next beat comes early: a PVC
            times.append(t + rr)
            pvc.append(True)
            t += rr + (2 * mean_rr - rr)  # full compensatory pause
            continue
        t += rr
    return np.asarray(times), np.asarray(pvc)


def generate(rhythm: str, seconds: float = 5.0, rng: np.random.Generator | None = None, fs: int = FS) -> np.ndarray:
    """One SYNTHETIC 12-lead recording, shape [12, seconds * fs], float32 millivolts."""
    return episodes([(rhythm, seconds)], rng, fs)[0]


def episodes(
    schedule: list[tuple[str, float]], rng: np.random.Generator | None = None, fs: int = FS
) -> tuple[np.ndarray, np.ndarray]:
    """One SYNTHETIC patient whose rhythm changes: `schedule` is [(rhythm, seconds), ...], e.g. sinus,
    then an episode of atrial fibrillation, then sinus again. Returns the recording [12, n] (float32
    mV) and each sample's rhythm index in RHYTHMS. The patient (lead amplitudes, wander, noise) stays
    the same across episodes; each episode's first beat follows the last one at its own interval."""
    for rhythm, _ in schedule:
        if rhythm not in RHYTHMS:
            raise ValueError(f"unknown rhythm {rhythm!r}; choose one of {', '.join(RHYTHMS)}")
    rng = rng or np.random.default_rng()
    n = round(sum(seconds for _, seconds in schedule) * fs)
    t = np.arange(n) / fs
    labels = np.zeros(n, dtype=np.int64)
    fibrillating = np.zeros(n)
    beats: list[tuple[float, bool, bool, float]] = []  # centre, premature, P wave, QT scale
    begin = 0.0
    for k, (rhythm, seconds) in enumerate(schedule):
        last = k == len(schedule) - 1
        times, premature = _rr_intervals(rhythm, seconds, rng, beats[-1][0] - begin if beats else None)
        times = times + begin
        keep = times < (begin + seconds + 1.0 if last else begin + seconds)
        times, premature = times[keep], premature[keep]
        rate = 60.0 / max(np.median(np.diff(times)) if len(times) > 1 else 1.0, 0.25)
        qt_scale = float(np.clip(np.sqrt(60.0 / rate), 0.75, 1.15))  # the QT shortens as the rate rises
        p_wave = rhythm != "atrial_fibrillation"
        beats += [(c, bool(v), p_wave, qt_scale) for c, v in zip(times, premature, strict=True)]
        span = slice(round(begin * fs), round((begin + seconds) * fs))
        labels[span] = RHYTHMS.index(rhythm)
        if rhythm == "atrial_fibrillation":
            fibrillating[span] = 1.0
        begin += seconds
    scale = rng.uniform(0.8, 1.2)  # body habitus, electrode placement
    signals: dict[str, np.ndarray] = {}
    for lead, amps in _AMP.items():
        a = tuple(scale * v * rng.uniform(0.9, 1.1) for v in amps)
        pvc_amps = (0.0, 0.0, -1.3 * a[2] if lead in ("V1", "V2") else 1.4 * a[2], -0.6 * abs(a[3]), -1.2 * a[4])
        x = np.zeros(n)
        for centre, is_pvc, p_wave, qt_scale in beats:
            if is_pvc:
                x += _beat(t, centre, pvc_amps, _PVC_TIMING, False, qt_scale)
            else:
                x += _beat(t, centre, a, _TIMING, p_wave, qt_scale)
        if fibrillating.any():
            f = rng.uniform(4, 9)
            x += (
                rng.uniform(0.03, 0.08)
                * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
                * (1 + 0.3 * np.sin(2 * np.pi * 0.3 * t))
                * fibrillating
            )
        signals[lead] = x
    i, ii = signals["I"], signals["II"]
    signals["III"] = ii - i
    signals["aVR"] = -(i + ii) / 2
    signals["aVL"] = i - ii / 2
    signals["aVF"] = ii - i / 2
    out = np.stack([signals[lead] for lead in LEADS])
    wander = 0.1 * np.sin(2 * np.pi * rng.uniform(0.15, 0.3) * t + rng.uniform(0, 2 * np.pi))
    mains = 0.01 * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t)
    out += wander + mains + rng.normal(0, 0.015, out.shape)
    return out.astype(np.float32), labels


def dataset(count: int, seconds: float = 5.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` SYNTHETIC recordings with balanced rhythm labels: X [count, 12, samples], y [count]."""
    rng = np.random.default_rng(seed)
    y = np.arange(count) % len(RHYTHMS)
    rng.shuffle(y)
    x = np.stack([generate(RHYTHMS[label], seconds, rng) for label in y])
    return x, y.astype(np.int64)
