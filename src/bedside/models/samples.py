"""`bedside samples`: the input files the README's examples use, made on this machine in a few
seconds, so every example runs as written on a fresh clone.

  gbm.pkl, sample.npy, gbm_heldout.npz   LightGBM on the REAL Wisconsin Diagnostic Breast Cancer data
                                         that scikit-learn ships (no download)
  ecg_cnn.pt, ecg_sample.npy,            the reference ECG 1D-CNN trained on SYNTHETIC 12-lead ECG, and
  calib.npz, heldout.npz                 SYNTHETIC windows to export, calibrate and gate it with
  monitor.hl7                            a SYNTHETIC recording of ORU^R01 vital signs, 3 beds, 10 minutes
  waveform_ecg.dcm                       the REAL resting 12-lead ECG that pydicom ships

What needs an extra that is not installed is skipped with one line naming the extra; the rest is
still written. README.txt in the folder says what each file is and where its data comes from.
"""

from __future__ import annotations

import pickle
import shutil
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from bedside.tools.replay import synthetic_vitals

STAMP = ".bedside-samples"
ECG_INPUT = "ecg"  # the exported reference ECG network's input name (the npz keys below are written as ecg=)
ECG_TRAIN = {"train": 800, "epochs": 3, "batch": 32}  # about 10 s on two cores
ECG_SEEDS = {"train": 0, "files": 1}  # the files' windows are never the ones trained on
ECG_COUNTS = {"sample": 8, "calib": 96, "heldout": 200}
ECG_STEP_MV = 2.0**-8  # 3.9 uV: the resolution of a 12-lead cart; the windows then compress to ~30 %
GBM_TREES = 50
MONITOR_BEDS = ("ICU-01", "ICU-02", "ICU-03")
MONITOR_SECONDS, MONITOR_EVERY = 600.0, 30.0
MONITOR_START = datetime(2025, 1, 15, 8, 0, tzinfo=timezone(timedelta(hours=1)))  # a morning round, CET
PIPELINE = "pip install -e '.[pipeline]'"


class SamplesError(ValueError):
    pass


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SamplesError(f"{out} is a file; give a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / STAMP).exists() and not force:
        raise SamplesError(
            f"{out} is not empty and was not made by `bedside samples`; choose another --out, or add --force "
            "to write the sample files into it (files of the same names are replaced)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).write_text("made by `bedside samples`; rerunning it here replaces these files\n")


def _gbm(out: Path, say: Callable[[str], None]) -> list[str]:
    try:
        import lightgbm as lgb
        from sklearn.datasets import load_breast_cancer
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        say(f"skipped gbm.pkl, sample.npy, gbm_heldout.npz: {exc.name} is missing ({PIPELINE})")
        return []
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = (data.target == 0).astype(np.int64)  # scikit-learn codes malignant as 0; the model predicts malignancy
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    clf = lgb.LGBMClassifier(
        n_estimators=GBM_TREES, num_leaves=15, learning_rate=0.1, min_child_samples=10, random_state=0, verbose=-1
    ).fit(x_tr, y_tr)
    auroc = roc_auc_score(y_te, np.asarray(clf.predict_proba(x_te))[:, 1])
    with (out / "gbm.pkl").open("wb") as fh:
        pickle.dump(clf, fh)
    say(f"gbm.pkl ({_size(out / 'gbm.pkl')}): LightGBM, {GBM_TREES} trees, held-out AUROC {auroc:.3f} (REAL data)")
    np.save(out / "sample.npy", x_te[:16])
    say(f"sample.npy ({_size(out / 'sample.npy')}): 16 held-out rows x 30 features, float32")
    np.savez(out / "gbm_heldout.npz", features=x_te, y=y_te)
    say(f"gbm_heldout.npz ({_size(out / 'gbm_heldout.npz')}): features {list(x_te.shape)} and y, {len(y_te)} rows")
    return ["gbm.pkl", "sample.npy", "gbm_heldout.npz"]


def _ecg_windows() -> tuple[np.ndarray, np.ndarray]:
    from bedside.synthetic.ecg import dataset

    x, y = dataset(sum(ECG_COUNTS.values()), seed=ECG_SEEDS["files"])
    return (np.round(x / ECG_STEP_MV) * ECG_STEP_MV).astype(np.float32), y


def _ecg(out: Path, say: Callable[[str], None]) -> list[str]:
    x, y = _ecg_windows()
    n_sample, n_calib = ECG_COUNTS["sample"], ECG_COUNTS["calib"]
    sample, calib = x[:n_sample], x[n_sample : n_sample + n_calib]
    held_x, held_y = x[n_sample + n_calib :], y[n_sample + n_calib :]
    written = []
    try:
        import torch
    except ImportError:
        say(f"skipped ecg_cnn.pt: torch is missing ({PIPELINE})")
    else:
        from bedside.models.train import train_ecg_cnn

        model, _, _ = train_ecg_cnn(seed=ECG_SEEDS["train"], **ECG_TRAIN)
        with torch.no_grad():
            accuracy = float((model(torch.from_numpy(held_x)).argmax(1).numpy() == held_y).mean())
        torch.save(model.state_dict(), out / "ecg_cnn.pt")
        say(
            f"ecg_cnn.pt ({_size(out / 'ecg_cnn.pt')}): reference ecg_cnn weights, accuracy {accuracy:.1%} "
            f"on heldout.npz (SYNTHETIC ECG)"
        )
        written.append("ecg_cnn.pt")
    np.save(out / "ecg_sample.npy", sample)
    say(f"ecg_sample.npy ({_size(out / 'ecg_sample.npy')}): {list(sample.shape)} float32 SYNTHETIC windows")
    np.savez_compressed(out / "calib.npz", ecg=calib)
    say(f"calib.npz ({_size(out / 'calib.npz')}): {ECG_INPUT} {list(calib.shape)} SYNTHETIC calibration windows")
    np.savez_compressed(out / "heldout.npz", ecg=held_x, y=held_y)
    say(f"heldout.npz ({_size(out / 'heldout.npz')}): {ECG_INPUT} {list(held_x.shape)} and y, SYNTHETIC")
    return [*written, "ecg_sample.npy", "calib.npz", "heldout.npz"]


def monitor_recording() -> str:
    """The SYNTHETIC recording: one ORU^R01 per bed every 30 s for 10 minutes, in time order, segments
    one per line and a blank line between messages, stamped at fixed (recorded) times."""
    start = MONITOR_START.timestamp()
    offset_min = int(MONITOR_START.utcoffset().total_seconds() // 60)  # type: ignore[union-attr]
    messages = [
        (offset, bed, message)
        for seed, bed in enumerate(MONITOR_BEDS)
        for offset, message in synthetic_vitals(bed, MONITOR_SECONDS, MONITOR_EVERY, seed, start, offset_min)
    ]
    messages.sort(key=lambda m: (m[0], m[1]))
    return "\n".join(m.replace("\r", "\n") for _, _, m in messages)


def _monitor(out: Path, say: Callable[[str], None]) -> list[str]:
    text = monitor_recording()
    (out / "monitor.hl7").write_text(text, encoding="ascii", newline="\n")
    count = text.count("MSH|")
    say(
        f"monitor.hl7 ({_size(out / 'monitor.hl7')}): {count} ORU^R01 messages, {len(MONITOR_BEDS)} beds, "
        f"{MONITOR_SECONDS / 60:.0f} min recorded {MONITOR_START:%Y-%m-%d %H:%M %z} (SYNTHETIC)"
    )
    return ["monitor.hl7"]


def _dicom(out: Path, say: Callable[[str], None]) -> list[str]:
    try:
        from pydicom.data import get_testdata_file

        source = get_testdata_file("waveform_ecg.dcm")
    except Exception as exc:  # not installed, or a pydicom without its test files
        say(f"skipped waveform_ecg.dcm: pydicom's test files are not available ({exc}; {PIPELINE})")
        return []
    if source is None:
        say(f"skipped waveform_ecg.dcm: this pydicom does not ship it ({PIPELINE})")
        return []
    shutil.copyfile(str(source), out / "waveform_ecg.dcm")
    say(f"waveform_ecg.dcm ({_size(out / 'waveform_ecg.dcm')}): a REAL resting 12-lead ECG, 10 s at 1000 Hz")
    return ["waveform_ecg.dcm"]


README = """Sample files for the bedside README's examples, made by `bedside samples` on {made}.
None of them is for clinical use.

REAL data
  gbm.pkl          A pickled LightGBM classifier (lightgbm.LGBMClassifier, {trees} trees, 15 leaves)
                   predicting that a breast mass is malignant (label 1), trained on the Wisconsin
                   Diagnostic Breast Cancer data (WDBC; Wolberg, Street and Mangasarian, UCI Machine
                   Learning Repository, CC BY 4.0) as shipped in scikit-learn (load_breast_cancer):
                   569 fine-needle aspirates, 30 nucleus features. Stratified split, random_state 0:
                   426 rows trained on, 143 held out.
  sample.npy       16 held-out rows, float32 [16, 30]: the numeric check sample for
                   `bedside export ... --model-file gbm.pkl --sample sample.npy`.
  gbm_heldout.npz  All 143 held-out rows: `features` float32 [143, 30] (the exported model's input
                   name) and `y` int64 labels, for `bedside optimize ... --eval gbm_heldout.npz`.
  waveform_ecg.dcm A real resting 12-lead ECG (DICOM 12-Lead ECG Waveform Storage; Mortara ELI 250,
                   2013, anonymised; 10 s at 1000 Hz; the cart reads sinus rhythm, RR 982 ms), copied
                   from the test files pydicom ships (pydicom/data/test_files/waveform_ecg.dcm).

SYNTHETIC data (generated by bedside.synthetic: models trained on it are demonstrations only)
  ecg_cnn.pt       state_dict of the reference ECG 1D-CNN (bedside.models.reference.build("ecg_cnn"),
                   5 rhythm classes) trained for {epochs} epochs on {train} SYNTHETIC 12-lead windows
                   (bedside.models.train.train_ecg_cnn, seed {seed_train}). Load it with
                   torch.load(path, weights_only=True).
  ecg_sample.npy   {n_sample} SYNTHETIC 12-lead windows, float32 [{n_sample}, 12, 1250] (5 s at 250 Hz, mV).
  calib.npz        `{name}`: {n_calib} SYNTHETIC windows [{n_calib}, 12, 1250], int8-static calibration.
  heldout.npz      `{name}`: {n_held} SYNTHETIC windows [{n_held}, 12, 1250] and `y` int64 rhythm labels
                   (0 normal_sinus, 1 sinus_bradycardia, 2 sinus_tachycardia, 3 atrial_fibrillation,
                   4 pvc), for the accuracy gate.
                   The windows of these three files come from bedside.synthetic.ecg.dataset with seed
                   {seed_files} (training used seed {seed_train}), rounded to 3.9 uV.
  monitor.hl7      A recording-like HL7 v2 file: {n_messages} ORU^R01 vital-sign messages (heart rate,
                   respiratory rate, blood pressure, SpO2, temperature, ACVPU, O2 flow) from beds
                   {beds}, one message every {every:.0f} s per bed for {minutes:.0f} minutes from
                   {start:%Y-%m-%d %H:%M} (UTC offset {start:%z}), the first bed deteriorating.
                   SYNTHETIC values from bedside.synthetic.vitals. Its times are fixed, as in any
                   recording: `bedside replay --hl7-file` re-times them to now (--keep-times sends
                   them as recorded, and the server refuses observations older than 1 h).

{written}
{skipped}"""


def make_samples(out: Path, force: bool = False, say: Callable[[str], None] = print) -> list[str]:
    """Write the sample files into `out` (see the module's docstring); return the names written.
    SamplesError when `out` is not empty and was not made here, unless `force`."""
    _prepare(out, force)
    started = time.monotonic()
    written: list[str] = []
    for step in (_gbm, _ecg, _monitor, _dicom):
        written += step(out, say)
    expected = ["gbm.pkl", "sample.npy", "gbm_heldout.npz", "ecg_cnn.pt", "ecg_sample.npy", "calib.npz"]
    expected += ["heldout.npz", "monitor.hl7", "waveform_ecg.dcm"]
    missing = [name for name in expected if name not in written]
    readme = README.format(
        made=time.strftime("%Y-%m-%d %H:%M %z"),
        trees=GBM_TREES,
        epochs=ECG_TRAIN["epochs"],
        train=ECG_TRAIN["train"],
        seed_train=ECG_SEEDS["train"],
        seed_files=ECG_SEEDS["files"],
        n_sample=ECG_COUNTS["sample"],
        n_calib=ECG_COUNTS["calib"],
        n_held=ECG_COUNTS["heldout"],
        name=ECG_INPUT,
        n_messages=int(MONITOR_SECONDS / MONITOR_EVERY) * len(MONITOR_BEDS),
        beds=", ".join(MONITOR_BEDS),
        every=MONITOR_EVERY,
        minutes=MONITOR_SECONDS / 60,
        start=MONITOR_START,
        written=textwrap.fill(f"Written here: {', '.join(written)}.", 100),
        skipped=textwrap.fill(f"Skipped (an extra is missing: {PIPELINE}): {', '.join(missing)}.", 100) + "\n"
        if missing
        else "",
    )
    (out / "README.txt").write_text(readme, encoding="utf-8")
    total = sum((out / name).stat().st_size for name in written)
    took = time.monotonic() - started
    say(f"README.txt: what each file is; {len(written)} files, {total / 1e6:.1f} MB, made in {took:.0f} s")
    return written


__all__ = ["SamplesError", "make_samples", "monitor_recording"]
