"""The pipeline commands as a new user runs them (`bedside export / optimize / demo / bench`): every
mistake ends in one line and exit code 2, never a traceback; every model written says where its
weights came from (ONNX metadata `bedside.provenance`, and its model card).

The commands run through the real entry point, bedside.cli.main (which turns what a command raises
into one line), in this process; output is not a terminal, as in a log or a pipe."""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import lightgbm as lgb
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.linear_model import RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from bedside.cli import app, main
from bedside.pipeline import provenance

runner = CliRunner()


@dataclass
class Result:
    exit_code: int
    output: str  # stdout and stderr


def bedside(*args: object) -> Result:
    """`bedside ARGS` through bedside.cli.main, as the installed command runs it."""
    out = io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(out), mock.patch.object(sys, "argv", ["bedside", *map(str, args)]):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return Result(code, out.getvalue())


def refused(result: Result, *phrases: str) -> str:
    """Exit 2, one line, no traceback, saying each of `phrases`."""
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    for phrase in phrases:
        assert phrase in out, out
    return out


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def stamp(path: Path) -> tuple[str | None, str | None]:
    return provenance.read(path / "model.onnx")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small models and data, made once: a LightGBM classifier (WDBC), a ridge regression (diabetes,
    float64), a torch MLP saved whole, ECG windows with 5-class labels."""
    root = tmp_path_factory.mktemp("files")
    data = load_breast_cancer()
    x, y = data.data, (data.target == 0).astype(np.int64)
    gbm = lgb.LGBMClassifier(n_estimators=20, num_leaves=7, verbose=-1).fit(x.astype(np.float32), y)
    (root / "gbm.pkl").write_bytes(pickle.dumps(gbm))
    np.save(root / "wdbc64.npy", x[:20])
    np.save(root / "wdbc29.npy", x[:20, :29])
    np.savez(root / "wdbc_eval.npz", features=x[:200].astype(np.float32), y=y[:200])
    np.savez(root / "wdbc_eval_badkey.npz", x=x[:200].astype(np.float32), y=y[:200])
    diabetes = load_diabetes(scaled=False)
    ridge = make_pipeline(StandardScaler(), RidgeCV()).fit(diabetes.data, diabetes.target)
    (root / "ridge.pkl").write_bytes(pickle.dumps(ridge))
    np.save(root / "diabetes64.npy", diabetes.data[:40])
    xs = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2), torch.nn.Softmax(1))
    torch.save(mlp.eval(), root / "mlp.pt")
    np.save(root / "mlp_sample.npy", xs[:8])
    np.savez(root / "mlp_eval.npz", input=xs[:200], y=y[:200])
    np.savez(root / "mlp_eval_nolabels.npz", input=xs[:200])
    np.savez(root / "mlp_eval_7classes.npz", input=xs[:200], y=np.arange(200) % 7)
    np.savez(root / "mlp_calib_badkey.npz", features=xs[:64])
    from bedside.synthetic.ecg import dataset

    ecg, rhythm = dataset(50, seed=3)
    np.savez(root / "ecg_eval.npz", ecg=ecg, y=rhythm)
    np.savez(root / "ecg_calib.npz", ecg=ecg[:16])
    return root


@pytest.fixture(scope="module")
def mlp_repo(files, tmp_path_factory):
    """A repository holding the MLP (version 1), for the refusals, which must leave it as it is."""
    repo = tmp_path_factory.mktemp("mlp_repo")
    ok(bedside("export", "mlp", "-r", repo, "--model-file", files / "mlp.pt", "--sample", files / "mlp_sample.npy"))
    return repo


def test_the_help_lists_the_reference_models_and_what_their_weights_are():
    text = runner.invoke(app, ["export", "--help"], terminal_width=200).output
    for name in ("ecg_cnn", "vitals_lstm", "resnet18", "efficientnet_b0", "ner_bert"):
        assert name in text
    assert "weights are random" in text
    for option in ("--weights", "--untrained", "--provenance", "--provenance-note", "--float64", "--rtol"):
        assert option in text
    assert "--version" in runner.invoke(app, ["optimize", "--help"], terminal_width=200).output


def test_the_cli_names_match_the_library():
    from bedside.cli import pipeline as cli
    from bedside.models.reference import NAMES
    from bedside.pipeline import gate, optimize

    assert cli.REFERENCES == NAMES
    assert cli.PROVENANCES == provenance.PROVENANCES
    assert cli.METHODS == optimize.METHODS and cli.METRICS == gate.METRICS


def test_reference_mistakes_end_in_one_line(tmp_path, files):
    repo = tmp_path / "repo"
    refused(
        bedside("export", "m", "-r", repo, "--reference", "nosuch"),
        "unknown reference model 'nosuch'; choose one of ecg_cnn, vitals_lstm, resnet18, efficientnet_b0, ner_bert",
    )
    refused(bedside("export", "m", "-r", repo, "--reference", "ecg_cnn"), "--weights FILE", "--untrained")
    refused(
        bedside("export", "m", "-r", repo, "--reference", "ecg_cnn", "--untrained", "--weights", files / "x.pt"),
        "not both",
    )
    refused(
        bedside("export", "m", "-r", repo, "--reference", "ecg_cnn", "--untrained", "--provenance", "trained"),
        "cannot be --provenance trained",
    )
    refused(
        bedside("export", "m", "-r", repo, "--reference", "ecg_cnn", "--untrained", "--provenance", "bogus"),
        "'bogus' is not one of trained, synthetic, untrained",
    )
    assert not repo.exists()  # nothing published


def test_a_reference_exported_with_weights_uses_them_and_says_so(tmp_path):
    from bedside.models.reference import build

    module = build("ecg_cnn")
    with torch.no_grad():
        module.head.bias.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0, -6.0]))  # unlike the random build
    weights = tmp_path / "ecg.pt"
    torch.save(module.state_dict(), weights)
    out = ok(bedside("export", "rhythm", "-r", tmp_path, "--reference", "ecg_cnn", "--weights", weights))
    assert "provenance: trained" in out
    version = tmp_path / "rhythm" / "1"
    assert stamp(version) == ("trained", None)
    x = np.random.default_rng(5).standard_normal((3, 12, 1250)).astype(np.float32)
    (got,) = ort.InferenceSession(str(version / "model.onnx")).run(None, {"ecg": x})
    want = torch.softmax(module(torch.from_numpy(x)), 1).detach().numpy()  # per-class probabilities
    np.testing.assert_allclose(got, want, atol=1e-5)
    card = (tmp_path / "rhythm" / "MODEL_CARD.md").read_text()
    assert "**Provenance: trained** (on real data)" in card and "weights from ecg.pt" in card
    assert "`ecg`: FP32 [batch, 12, 1250]" in card and "passed" in card


def test_weights_that_do_not_fit_are_named(tmp_path):
    from bedside.models.reference import ECGNet

    three = tmp_path / "three.pt"
    torch.save(ECGNet(classes=3).state_dict(), three)
    refused(
        bedside("export", "m", "-r", tmp_path, "--reference", "ecg_cnn", "--weights", three),
        "three.pt does not fit ecg_cnn",
        "head.weight: [3, 256] in the file, [5, 256] in ecg_cnn",
        "torch.save(model.state_dict(), FILE)",
    )
    whole = tmp_path / "whole.pt"
    torch.save(ECGNet(), whole)  # a whole module, not a state_dict: not loaded (it could run code)
    refused(
        bedside("export", "m", "-r", tmp_path, "--reference", "ecg_cnn", "--weights", whole),
        "whole.pt is not a state_dict that loads as weights only",
    )
    refused(
        bedside("export", "m", "-r", tmp_path, "--reference", "ecg_cnn", "--weights", tmp_path / "none.pt"),
        "none.pt: No such file or directory",
    )


def test_an_untrained_model_is_stamped_and_the_gate_takes_only_agreement(tmp_path, files):
    out = ok(bedside("export", "bench_ecg", "-r", tmp_path, "--reference", "ecg_cnn", "--untrained"))
    assert provenance.UNTRAINED_LINE in out
    assert stamp(tmp_path / "bench_ecg" / "1") == ("untrained", None)
    card = (tmp_path / "bench_ecg" / "MODEL_CARD.md").read_text()
    assert card.splitlines()[3] == f"**{provenance.UNTRAINED_LINE}.**"  # in bold, before anything else

    common = ["optimize", "bench_ecg", "-r", tmp_path, "--eval", files / "ecg_eval.npz"]
    calib = ["--method", "int8-static", "--calibration", files / "ecg_calib.npz"]
    refused(bedside(*common, *calib), "UNTRAINED", "its auroc means nothing", "--metric agreement")
    refused(bedside(*common, *calib, "--metric", "accuracy"), "its accuracy means nothing")
    out = ok(bedside(*common, *calib, "--metric", "agreement"))
    assert "agreement" in out and "provenance kept from the source version: UNTRAINED" in out
    assert stamp(tmp_path / "bench_ecg" / "2") == ("untrained", None)

    # version 2 is INT8: optimizing it again is refused, naming the version to use
    refused(
        bedside(*common, *calib, "--metric", "agreement"),
        "version 2 of bench_ecg is already INT8; optimize the FP32 version with --version 1",
    )
    ok(bedside(*common, "--method", "graph", "--metric", "agreement", "--version", "1"))
    assert stamp(tmp_path / "bench_ecg" / "3") == ("untrained", None)


def test_optimize_carries_the_provenance_and_auroc_works_over_five_classes(tmp_path, files):
    weights = tmp_path / "w.pt"
    from bedside.models.reference import build

    torch.save(build("ecg_cnn").state_dict(), weights)
    note = "1,500 synthetic windows"
    export = ["export", "rhythm", "-r", tmp_path, "--reference", "ecg_cnn", "--weights", weights]
    out = ok(bedside(*export, "--provenance", "synthetic", "--provenance-note", note))
    assert "SYNTHETIC" in out
    assert "SYNTHETIC: trained on synthetic data" in (tmp_path / "rhythm" / "MODEL_CARD.md").read_text()
    # the default metric, auroc, on 5-class labels: macro one-vs-rest over the per-class probabilities
    out = ok(bedside("optimize", "rhythm", "-r", tmp_path, "--method", "graph", "--eval", files / "ecg_eval.npz"))
    assert "graph: auroc" in out
    assert stamp(tmp_path / "rhythm" / "2") == ("synthetic", note)
    report = json.loads((tmp_path / "rhythm" / "2" / "report.json").read_text())
    held_out = np.load(files / "ecg_eval.npz")
    (p,) = ort.InferenceSession(str(tmp_path / "rhythm" / "1" / "model.onnx")).run(None, {"ecg": held_out["ecg"]})
    expected = 100 * roc_auc_score(held_out["y"], p / p.sum(1, keepdims=True), multi_class="ovr", average="macro")
    assert report["metric"] == "auroc" and report["baseline"] == pytest.approx(expected, abs=1e-3)
    assert report["provenance"] == "synthetic"


def test_held_out_and_calibration_data_must_fit_the_model(mlp_repo, files):
    common = ["optimize", "mlp", "-r", mlp_repo]
    refused(
        bedside(*common, "--method", "graph", "--eval", files / "wdbc_eval_badkey.npz"),
        "has arrays ['x'] (besides the labels `y`); the model takes inputs ['input']",
        "np.savez(FILE, input=..., y=labels)",
    )
    refused(
        bedside(
            *common,
            "--method",
            "int8-static",
            "--eval",
            files / "mlp_eval.npz",
            "--calibration",
            files / "mlp_calib_badkey.npz",
        ),
        "the calibration data (--calibration) has arrays ['features']; the model takes inputs ['input']",
    )
    refused(
        bedside(*common, "--method", "graph", "--eval", files / "mlp_eval_nolabels.npz"),
        "metric 'auroc' needs labels",
        "no `y`",
        "--metric agreement",
    )
    refused(
        bedside(*common, "--method", "graph", "--eval", files / "mlp_eval_7classes.npz"),
        "the labels `y` hold classes [0, 1, 2, 3, 4, 5, 6]; the model's output has 2 column(s)",
    )
    refused(bedside(*common, "--method", "graph", "--eval", files / "mlp_sample.npy"), "holds one unnamed array")
    refused(bedside(*common, "--method", "int8-static", "--eval", files / "mlp_eval.npz"), "--calibration FILE.npz")
    refused(bedside(*common, "--method", "nosuch", "--eval", files / "mlp_eval.npz"), "choose one of int8-static")
    refused(bedside(*common, "--method", "graph", "--eval", files / "mlp_eval.npz", "--metric", "x"), "choose one of")
    refused(bedside(*common, "--method", "graph", "--eval", files / "mlp_eval.npz", "--version", "7"), "no version 7")
    refused(
        bedside("optimize", "nosuch", "-r", mlp_repo, "--method", "graph", "--eval", files / "mlp_eval.npz"),
        "no model 'nosuch'",
        "the models there: mlp",
    )
    assert sorted(p.name for p in (mlp_repo / "mlp").iterdir() if p.is_dir()) == ["1"]  # nothing published


def test_tree_ensembles_are_not_quantized(tmp_path, files):
    ok(bedside("export", "gbm", "-r", tmp_path, "--model-file", files / "gbm.pkl", "--sample", files / "wdbc64.npy"))
    common = ["optimize", "gbm", "-r", tmp_path, "--eval", files / "wdbc_eval.npz"]
    for method in ("int8-static", "int8-dynamic", "fp16"):
        refused(
            bedside(*common, "--method", method, "--calibration", files / "wdbc_eval.npz"),
            f"{method} does not apply to version 1 of gbm: the model is a tree ensemble",
            "the method that applies is graph",
        )
    assert "graph: auroc" in ok(bedside(*common, "--method", "graph"))
    assert stamp(tmp_path / "gbm" / "2") == ("trained", None)


def test_a_float64_sample_makes_fp32_inputs_unless_float64(tmp_path, files):
    export = ["export", "ridge", "-r", tmp_path, "--model-file", files / "ridge.pkl", "--sample"]
    out = ok(bedside(*export, files / "diabetes64.npy"))
    assert "the sample is float64; the model is exported with FP32 inputs" in out
    session = ort.InferenceSession(str(tmp_path / "ridge" / "1" / "model.onnx"))
    assert session.get_inputs()[0].type == "tensor(float)"
    x = np.load(files / "diabetes64.npy")
    (got,) = session.run(None, {"features": x.astype(np.float32)})  # an FP32 client's call
    want = pickle.loads((files / "ridge.pkl").read_bytes()).predict(x)
    assert np.abs(got.ravel() - want).max() < 1e-3 * np.abs(want).max()  # on the outcome's scale (25..346)
    ok(
        bedside(
            "export",
            "ridge64",
            "-r",
            tmp_path,
            "--model-file",
            files / "ridge.pkl",
            "--sample",
            files / "diabetes64.npy",
            "--float64",
        )
    )
    assert ort.InferenceSession(str(tmp_path / "ridge64" / "1" / "model.onnx")).get_inputs()[0].type == "tensor(double)"
    gbm = ["export", "gbm", "-r", tmp_path, "--model-file", files / "gbm.pkl", "--sample"]
    refused(bedside(*gbm, files / "wdbc64.npy", "--float64"), "LightGBM models convert with FP32 inputs only")
    refused(bedside(*gbm, files / "wdbc29.npy"), "the sample has 29 features per row; LGBMClassifier was trained on 30")
    refused(bedside(*gbm[:-1]), "--sample is required with --model-file")
    refused(bedside(*gbm, files / "wdbc64.npy", "--untrained"), "go with --reference")
    card = (tmp_path / "ridge" / "MODEL_CARD.md").read_text()
    assert "**Provenance: trained**" in card and "ridge.pkl" in card and "`features`: FP32 [batch, 10]" in card


def test_a_hand_written_card_is_kept_and_a_bedside_card_follows_the_version(tmp_path, files):
    export = ["export", "gbm", "-r", tmp_path, "--model-file", files / "gbm.pkl", "--sample", files / "wdbc64.npy"]
    ok(bedside(*export))
    card = tmp_path / "gbm" / "MODEL_CARD.md"
    assert "# gbm (version 1)" in card.read_text()
    ok(bedside(*export, "--provenance", "synthetic"))
    assert "# gbm (version 2)" in card.read_text() and "SYNTHETIC" in card.read_text()
    card.write_text("# gbm\nOur own card.\n")
    ok(bedside(*export))
    assert card.read_text() == "# gbm\nOur own card.\n"
    assert [stamp(tmp_path / "gbm" / v)[0] for v in "123"] == ["trained", "synthetic", "trained"]


def test_demo_prints_a_line_per_model_without_a_terminal(tmp_path, monkeypatch):
    import bedside.models.demo as demo

    monkeypatch.setattr(demo, "_ecg_rhythm", lambda: None)  # 20 s of training; its stamp is the same code path
    out = ok(bedside("demo", "--out", tmp_path / "demo"))  # CliRunner's output is not a terminal
    lines = [line for line in out.splitlines() if re.match(r"demo \d/\d: ", line)]
    assert lines == [
        "demo 1/5: breast_mass_malignancy (LightGBM, real data)",
        "demo 2/5: diabetes_progression (ridge regression, real data)",
        "demo 3/5: vitals_deterioration (LightGBM, synthetic data)",
        "demo 4/5: medication_risk (logistic regression, synthetic data)",
        "demo 5/5: ecg_rhythm (1D-CNN, synthetic ECG, INT8 behind the gate)",
    ]
    stamps = {m: stamp(tmp_path / "demo" / m / "1")[0] for m in ("breast_mass_malignancy", "diabetes_progression")}
    assert stamps == {"breast_mass_malignancy": "trained", "diabetes_progression": "trained"}
    assert stamp(tmp_path / "demo" / "vitals_deterioration" / "1")[0] == "synthetic"
    assert "SYNTHETIC" in (tmp_path / "demo" / "vitals_deterioration" / "MODEL_CARD.md").read_text()
    assert (tmp_path / "demo" / demo.DEMO_STAMP).exists()


def test_bench_writes_where_it_says_and_stops_cleanly_on_ctrl_c(tmp_path, monkeypatch):
    out_dir = tmp_path / "results" / "nested"
    out = ok(bedside("bench", "--models", "vitals_lstm", "--quick", "--seconds", "0.05", "--out", out_dir))
    written = [out_dir / "reference_models.json", out_dir / "reference_models.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert f"wrote {written[0].resolve()} and {written[1].resolve()}" in out
    assert json.loads(written[0].read_text())["rows"][0]["model"] == "vitals_lstm"
    refused(bedside("bench", "--models", "gbm,nosuch"), "unknown model(s) nosuch; choose from gbm")

    import bedside.models.benchmark as benchmark

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run", interrupted)
    result = bedside("bench", "--models", "gbm", "--out", tmp_path / "other")
    assert result.exit_code == 130 and result.output.strip() == "interrupted", result.output


def test_the_installed_command_gives_one_line_and_exit_2(tmp_path, files):
    entry = "from bedside.cli import main; main()"
    cases = [
        (["export", "m", "-r", tmp_path, "--reference", "ecg_cnn"], "--untrained (random weights"),
        (["optimize", "m", "-r", tmp_path, "--method", "int4", "--eval", "x.npz"], "unknown optimization method"),
        (
            ["export", "m", "-r", tmp_path, "--model-file", files / "gbm.pkl", "--sample", files / "wdbc29.npy"],
            "29 features per row",
        ),
    ]
    for argv, reason in cases:
        done = subprocess.run(
            [sys.executable, "-c", entry, *map(str, argv)], capture_output=True, text=True, timeout=120
        )
        output = done.stdout + done.stderr
        assert done.returncode == 2 and reason in output and "Traceback" not in output, output
        assert len(output.strip().splitlines()) == 1, output


def test_stamps_replace_earlier_ones_and_notes_are_one_line():
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.helper.set_model_props(model, {"author": "someone"})
    once = provenance.stamp(model.SerializeToString(), "synthetic", "simulated data")
    twice = onnx.load_from_string(provenance.stamp(once, "untrained"))
    assert provenance.of(twice) == ("untrained", None)
    assert {p.key: p.value for p in twice.metadata_props} == {"author": "someone", "bedside.provenance": "untrained"}
    from bedside.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not one of trained, synthetic, untrained"):
        provenance.stamp(once, "pretrained")
    with pytest.raises(InvalidInput, match="one line"):
        provenance.stamp(once, "trained", "two\nlines")
