"""`bedside samples` writes the files the README's examples use, each loadable as those examples load
it: a LightGBM model on the REAL breast-cancer data scikit-learn ships with its rows, the reference
ECG network's weights trained on SYNTHETIC ECG with its windows under the model's input name, a
SYNTHETIC HL7 recording with fixed times, and the REAL DICOM ECG pydicom ships. What needs a
missing extra is skipped in one line; a folder it did not make is left alone."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bedside.cli import app
from bedside.models import samples
from bedside.models.samples import PIPELINE, STAMP, make_samples
from bedside.streams.hl7v2 import parse_oru
from bedside.synthetic.ecg import RHYTHMS
from bedside.tools.hl7file import message_time
from bedside.tools.replay import read_hl7_file

FILES = (
    "gbm.pkl",
    "sample.npy",
    "gbm_heldout.npz",
    "ecg_cnn.pt",
    "ecg_sample.npy",
    "calib.npz",
    "heldout.npz",
    "monitor.hl7",
    "waveform_ecg.dcm",
)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The command, run once into a new folder (it trains the ECG network: ~15 s on two cores)."""
    out = tmp_path_factory.mktemp("samples") / "samples"
    result = CliRunner().invoke(app, ["samples", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_file_is_written_with_a_line_each_and_a_readme(made):
    out, output = made
    lines = output.strip().splitlines()
    assert lines[0].startswith(f"writing sample files into {out}/")
    written = [line.strip().split(" ")[0] for line in lines[1:]]
    expected = [name for name in FILES if (out / name).exists()]
    assert written == [*expected, "README.txt:"]  # one line per file as it is written, then the README
    readme = (out / "README.txt").read_text()
    for name in expected:
        assert f"  {name}" in readme
    assert "REAL data" in readme and "SYNTHETIC data" in readme and "None of them is for clinical use" in readme
    assert (out / STAMP).exists()
    assert sum((out / name).stat().st_size for name in expected) < 10e6


def test_the_breast_cancer_model_its_rows_and_its_export(made):
    pytest.importorskip("lightgbm")
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import roc_auc_score

    from bedside.pipeline.export import export_model

    out, _ = made
    with (out / "gbm.pkl").open("rb") as fh:
        model = pickle.load(fh)
    assert type(model).__name__ == "LGBMClassifier" and model.n_estimators == 50
    sample = np.load(out / "sample.npy")
    held = np.load(out / "gbm_heldout.npz")
    assert set(held.files) == {"features", "y"}  # `features`: the exported tree model's input name
    x, y = held["features"], held["y"]
    assert sample.shape == (16, 30) and sample.dtype == np.float32 and np.array_equal(sample, x[:16])
    assert x.shape == (143, 30) and x.dtype == np.float32 and y.dtype == np.int64 and set(y) == {0, 1}
    real = load_breast_cancer().data.astype(np.float32)
    assert all((real == row).all(axis=1).any() for row in x)  # every row is a real patient's
    assert roc_auc_score(y, model.predict_proba(x)[:, 1]) > 0.95
    result = export_model(model, sample)  # what `bedside export --model-file gbm.pkl --sample sample.npy` does
    assert max(result.max_abs_diff.values()) <= 1e-5


def test_the_ecg_network_and_its_windows(made):
    torch = pytest.importorskip("torch")
    from bedside.models.reference import build

    out, _ = made
    sample = np.load(out / "ecg_sample.npy")
    calib, held = np.load(out / "calib.npz"), np.load(out / "heldout.npz")
    assert set(calib.files) == {"ecg"} and set(held.files) == {"ecg", "y"}  # the model's input name, and labels
    assert sample.shape == (8, 12, 1250) and calib["ecg"].shape == (96, 12, 1250)
    assert held["ecg"].shape == (200, 12, 1250) and held["y"].shape == (200,) and held["y"].dtype == np.int64
    assert {a.dtype for a in (sample, calib["ecg"], held["ecg"])} == {np.dtype(np.float32)}
    assert set(held["y"].tolist()) == set(range(len(RHYTHMS)))
    model = build("ecg_cnn")
    model.load_state_dict(torch.load(out / "ecg_cnn.pt", weights_only=True), strict=True)
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(held["ecg"])).argmax(1).numpy()
    assert (predicted == held["y"]).mean() > 0.8


def test_the_hl7_recording_has_fixed_times_and_parses(made):
    out, _ = made
    messages = read_hl7_file(out / "monitor.hl7")
    assert len(messages) == 60
    times = [message_time(m) for m in messages]
    assert times == sorted(times) and times[-1] - times[0] == 570
    rates: dict[str, list[float]] = {}
    for message, when in zip(messages, times, strict=True):
        assert message.split("|")[6].endswith("+0100")  # recorded local time, offset written
        parsed = parse_oru(message, now=when)  # valid HL7 at the time it was recorded
        assert not parsed.warnings
        rates.setdefault(parsed.bed, []).extend(o.value for o in parsed.observations if o.vital == "respiratory_rate")
    assert set(rates) == {"ICU-01", "ICU-02", "ICU-03"}
    assert np.mean(rates["ICU-01"][-3:]) - np.mean(rates["ICU-01"][:3]) > 3  # the first bed deteriorates


def test_the_real_ecg_is_pydicoms(made):
    pydicom_data = pytest.importorskip("pydicom.data")
    from bedside.tools.ecgfile import read_dicom_ecg

    out, _ = made
    assert (out / "waveform_ecg.dcm").read_bytes() == Path(
        pydicom_data.get_testdata_file("waveform_ecg.dcm")
    ).read_bytes()
    assert read_dicom_ecg(out / "waveform_ecg.dcm").samples.shape == (12, 2500)


def test_a_folder_it_did_not_make_is_left_alone(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["samples", "--out", str(other)], terminal_width=200)
    assert result.exit_code == 2
    assert (
        result.output.strip().splitlines()[-1].startswith(f"{other} is not empty and was not made by `bedside samples`")
    )
    assert "--force" in result.output and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    (tmp_path / "a_file").write_text("x")
    result = CliRunner().invoke(app, ["samples", "--out", str(tmp_path / "a_file")], terminal_width=200)
    assert result.exit_code == 2 and "is a file" in result.output


def test_missing_extras_are_skipped_in_one_line_each_and_the_rest_written(tmp_path, monkeypatch):
    for module in ("torch", "lightgbm", "pydicom.data"):
        monkeypatch.setitem(sys.modules, module, None)  # as if the pipeline extra were not installed
    monkeypatch.setattr(samples, "ECG_COUNTS", {"sample": 2, "calib": 2, "heldout": 5})  # quicker
    out = tmp_path / "lean"
    lines: list[str] = []
    written = make_samples(out, say=lines.append)
    assert written == ["ecg_sample.npy", "calib.npz", "heldout.npz", "monitor.hl7"]
    skipped = [line for line in lines if line.startswith("skipped")]
    assert skipped[0] == f"skipped gbm.pkl, sample.npy, gbm_heldout.npz: lightgbm is missing ({PIPELINE})"
    assert skipped[1] == f"skipped ecg_cnn.pt: torch is missing ({PIPELINE})"
    assert skipped[2].startswith("skipped waveform_ecg.dcm: pydicom's test files are not available")
    assert "Skipped (an extra is missing" in (out / "README.txt").read_text()
    again = make_samples(out, say=lines.append)  # a folder it made: written again without --force
    assert again == written
