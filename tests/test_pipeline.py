"""The model pipeline: export with a numerical check, optimization behind the accuracy gate, pruning,
publication into a repository, and serving what it publishes."""

from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np
import onnx
import pytest
import torch
import xgboost as xgb
from onnx import numpy_helper
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from bedside.pipeline import gate
from bedside.pipeline.export import ExportError, ExportMismatch, export_model, export_torch, verify
from bedside.pipeline.optimize import OptimizeError, optimize_file
from bedside.pipeline.prune import prune_channels
from bedside.pipeline.workflow import export_to_repository, optimize_version
from bedside.repository.store import ModelStore


@pytest.fixture(scope="module")
def wdbc():
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = (data.target == 0).astype(np.int64)
    return train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2), torch.nn.Softmax(dim=1)
    )


def trained_mlp(x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(30), *mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.nll_loss(torch.log(model(xt) + 1e-9), yt).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("framework", ["pytorch", "scikit-learn", "LightGBM", "XGBoost"])
def test_export_round_trips_within_1e5(framework, wdbc):
    x_tr, x_te, y_tr, _ = wdbc
    model = {
        "pytorch": lambda: trained_mlp(x_tr, y_tr),
        "scikit-learn": lambda: LogisticRegression(max_iter=5000).fit(x_tr, y_tr),
        "LightGBM": lambda: lgb.LGBMClassifier(n_estimators=40, verbose=-1).fit(x_tr, y_tr),
        "XGBoost": lambda: xgb.XGBClassifier(n_estimators=40, max_depth=3).fit(x_tr, y_tr),
    }[framework]()
    result = export_model(model, x_te)
    assert result.framework == framework
    assert result.max_abs_diff and all(d <= 1e-5 for d in result.max_abs_diff.values())
    onnx.checker.check_model(result.model)


def test_a_planted_mismatch_is_caught_and_named(wdbc):
    _, x_te, _, _ = wdbc
    module = mlp().eval()
    result = export_torch(module, x_te[:16])
    tampered = onnx.ModelProto()
    tampered.CopyFrom(result.model)
    # a weight nudged by 0.5 %: small enough to look plausible, far beyond the 1e-5 check
    weight = next(w for w in tampered.graph.initializer if len(w.dims) == 2 and w.dims[0] == 2)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.005, weight.name))
    x = (x_te[:16] - x_te.mean(0)) / x_te.std(0)  # unsaturated outputs, so every weight matters
    expected = {"output": module(torch.from_numpy(x)).detach().numpy()}
    verify(result.model, {"input": x}, expected)  # the faithful export passes
    with pytest.raises(ExportMismatch, match=r"output 'output': ONNX differs from the source model by up to"):
        verify(tampered, {"input": x}, expected)


def test_unsupported_models_and_opsets_get_clear_errors(wdbc):
    _, x_te, _, _ = wdbc
    with pytest.raises(ExportError, match=r"no exporter for builtins\.dict"):
        export_model({"weights": [1, 2]}, x_te)
    with pytest.raises(ExportError, match="opset 7 is not supported"):
        export_torch(mlp(), x_te[:4], opset=7)

    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(np.sort(x.numpy(), axis=1))  # leaves the graph: cannot be traced faithfully

    with pytest.raises(ExportError, match="outputs do not depend on it"):
        export_torch(Unexportable(), x_te[:4])


def test_export_publishes_a_new_version_atomically(tmp_path, wdbc):
    x_tr, x_te, y_tr, _ = wdbc
    clf = lgb.LGBMClassifier(n_estimators=30, verbose=-1).fit(x_tr, y_tr)
    first, _ = export_to_repository(tmp_path, "wdbc_gbm", clf, x_te, description="test")
    second, _ = export_to_repository(tmp_path, "wdbc_gbm", clf, x_te)
    assert (first.name, second.name) == ("1", "2")
    assert json.loads((second / "report.json").read_text())["framework"] == "LightGBM"
    assert ModelStore(tmp_path).config("wdbc_gbm").max_batch_size > 0
    assert not [p for p in (tmp_path / "wdbc_gbm").iterdir() if p.name.startswith(".")]  # no staging left behind
    # a different graph under the same name is refused against the existing config
    from bedside.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="config"):
        export_to_repository(tmp_path, "wdbc_gbm", mlp(), x_te[:4])


def _damaged_copy(src, dst):
    """The same graph with its weight matrices replaced by noise of the same scale."""
    rng = np.random.default_rng(1)
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2:
            noise = rng.standard_normal(arr.shape).astype(np.float32) * arr.std()
            init.CopyFrom(numpy_helper.from_array(noise, init.name))
    onnx.save(model, str(dst))
    return dst


def test_the_gate_refuses_a_damaged_model_and_passes_a_sound_one(tmp_path, wdbc):
    x_tr, x_te, y_tr, y_te = wdbc
    src = tmp_path / "fp32.onnx"
    src.write_bytes(export_torch(trained_mlp(x_tr, y_tr), x_te[:8]).to_bytes())
    damaged = _damaged_copy(src, tmp_path / "damaged.onnx")
    report = gate.check(src, damaged, {"input": x_te}, y_te, "auroc", 1.0, "damage")
    assert not report.passed and report.drop_pp > 1.0
    sound = gate.check(src, src, {"input": x_te}, y_te, "auroc", 1.0, "identity")
    assert sound.passed and sound.drop_pp == 0 and sound.baseline > 90


def test_int8_static_is_smaller_passes_the_gate_and_is_served(tmp_path, wdbc, serving_factory):
    x_tr, x_te, y_tr, y_te = wdbc
    # standardised inputs, as a real pipeline feeds them: raw WDBC spans 0..4000, which 8 bits cannot hold
    mean, std = x_tr.mean(0), x_tr.std(0)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    torch.manual_seed(0)
    wide = torch.nn.Sequential(
        torch.nn.BatchNorm1d(30),
        torch.nn.Linear(30, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 2),
        torch.nn.Softmax(dim=1),
    )
    opt = torch.optim.Adam(wide.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.nll_loss(torch.log(wide(torch.from_numpy(x_tr)) + 1e-9), torch.from_numpy(y_tr)).backward()
        opt.step()
    export_to_repository(tmp_path, "wdbc_mlp", wide.eval(), x_te[:8])
    path, report = optimize_version(
        tmp_path, "wdbc_mlp", "int8-static", {"input": x_te}, y_te, "auroc", 1.0, {"input": x_tr[:128]}
    )
    assert report.passed and path.name == "2"
    assert report.size_bytes_after < report.size_bytes_before / 2.5
    assert json.loads((path / "report.json").read_text())["method"] == "int8-static"

    server = serving_factory(tmp_path)
    from tests.test_server import post_json

    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [20, 30], "data": x_te[:20].ravel().tolist()}]}
    status, v2 = post_json(server, "/v2/models/wdbc_mlp/versions/2/infer", doc)
    assert status == 200 and v2["model_version"] == "2"
    p_int8 = np.array(v2["outputs"][0]["data"]).reshape(20, 2)
    p_fp32 = wide(torch.from_numpy(x_te[:20])).detach().numpy()
    assert np.abs(p_int8 - p_fp32).max() < 0.05 and (p_int8.argmax(1) == p_fp32.argmax(1)).all()


def test_a_refused_optimization_publishes_nothing_and_keeps_its_report(tmp_path, wdbc):
    x_tr, x_te, y_tr, y_te = wdbc
    export_to_repository(tmp_path, "wdbc_mlp", trained_mlp(x_tr, y_tr), x_te[:8])
    with pytest.raises(gate.AccuracyGateFailed, match="REFUSED"):
        # a negative margin cannot be met: the gate must refuse and leave the repository as it was
        optimize_version(tmp_path, "wdbc_mlp", "int8-dynamic", {"input": x_te}, y_te, "auroc", -5.0)
    assert ModelStore(tmp_path).versions("wdbc_mlp") == [1]
    (refusal,) = (tmp_path / "wdbc_mlp" / "refused").iterdir()
    assert json.loads(refusal.read_text())["passed"] is False


def test_optimize_methods_and_errors(tmp_path, wdbc):
    _, x_te, _, _ = wdbc
    src = tmp_path / "m.onnx"
    src.write_bytes(export_torch(mlp(), x_te[:4]).to_bytes())
    half = optimize_file(src, tmp_path / "fp16.onnx", "fp16")
    assert half.stat().st_size < src.stat().st_size * 0.7
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(half)).graph.initializer)
    fused = optimize_file(src, tmp_path / "graph.onnx", "graph")
    assert onnx.load(str(fused)).graph.node
    with pytest.raises(OptimizeError, match="needs a calibration set"):
        optimize_file(src, tmp_path / "x.onnx", "int8-static")
    with pytest.raises(OptimizeError, match="unknown optimization 'int4'"):
        optimize_file(src, tmp_path / "x.onnx", "int4")


def test_structured_pruning_removes_channels_and_shrinks_the_file(tmp_path):
    from bedside.models.reference import ECGNet

    torch.manual_seed(0)
    model = ECGNet().eval()
    x = np.random.default_rng(0).standard_normal((2, 12, 1250)).astype(np.float32)
    before = tmp_path / "before.onnx"
    before.write_bytes(export_torch(model, x).to_bytes())
    result = prune_channels(model, x, ratio=0.4)
    assert result.params_after < 0.5 * result.params_before
    convs = [m for m in result.module.modules() if isinstance(m, torch.nn.Conv1d)]
    assert convs[0].out_channels < 32  # channels removed, not zeroed
    assert result.module(torch.from_numpy(x)).shape == (2, 5)  # the classifier keeps its classes
    after = tmp_path / "after.onnx"
    after.write_bytes(export_torch(result.module, x).to_bytes())
    assert after.stat().st_size < 0.6 * before.stat().st_size


def test_synthetic_ecg_is_labelled_and_plausible():
    from bedside.synthetic.ecg import LEADS, RHYTHMS, dataset, generate

    x, y = dataset(20, seconds=5.0, seed=1)
    assert x.shape == (20, len(LEADS), 1250) and set(y) == set(range(len(RHYTHMS)))
    ecg = generate("normal_sinus", 10.0, np.random.default_rng(0)).astype(np.float64)
    lead = dict(zip(LEADS, ecg, strict=True))
    noise = 0.1  # per-lead noise breaks the identities by a small amount only
    assert np.abs(lead["III"] - (lead["II"] - lead["I"])).std() < noise  # Einthoven
    assert np.abs(lead["aVR"] + (lead["I"] + lead["II"]) / 2).std() < noise
    assert 0.5 < lead["II"].max() < 2.5  # R wave in millivolts
    with pytest.raises(ValueError, match="unknown rhythm"):
        generate("torsades")


def test_synthetic_arrhythmia_episodes_change_rhythm_within_one_patient():
    from bedside.clinical.ecg import LEAD_II, heart_rate
    from bedside.synthetic.ecg import FS, RHYTHMS, episodes

    schedule = [("normal_sinus", 10.0), ("atrial_fibrillation", 10.0), ("sinus_bradycardia", 10.0)]
    ecg, labels = episodes(schedule, np.random.default_rng(3))
    assert ecg.shape == (12, 30 * FS) and labels.shape == (30 * FS,)
    assert [RHYTHMS[labels[k * 10 * FS]] for k in range(3)] == [r for r, _ in schedule]
    lead_ii = ecg[LEAD_II].astype(np.float64)
    intervals = []
    for k in range(3):  # R peaks per episode, by the stream's own detector
        segment = lead_ii[k * 10 * FS : (k + 1) * 10 * FS]
        rate = heart_rate(segment)
        peaks = np.flatnonzero((segment[1:-1] > 0.5) & (segment[1:-1] >= segment[:-2]) & (segment[1:-1] > segment[2:]))
        intervals.append(np.diff(peaks) / FS)
        assert rate is not None and (rate < 60 if k == 2 else rate >= 60)
    sinus_cv, af_cv = (np.std(i) / np.mean(i) for i in intervals[:2])
    assert sinus_cv < 0.06 < 0.1 < af_cv  # sinus is regular, fibrillation irregularly irregular
    assert np.diff(np.flatnonzero(labels[1:] != labels[:-1])).min() == 10 * FS  # changes at the episode bounds only


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(), reason="no CUDA on this box"
)
def test_cuda_provider_is_chosen_when_present(tmp_path, wdbc):
    from bedside.runtime.session import open_session

    _, x_te, _, _ = wdbc
    src = tmp_path / "m.onnx"
    src.write_bytes(export_torch(mlp(), x_te[:4]).to_bytes())
    assert open_session(src, 0, ("cuda", "cpu")).get_providers()[0] == "CUDAExecutionProvider"


def test_float32_rounding_of_large_outputs_is_within_the_relative_tolerance():
    """A ridge regression on the diabetes outcome scale (25..346), exported with FP32 inputs: float32
    rounding alone differs by ~5e-5, beyond an absolute 1e-5, well within 1e-5 x |value|."""
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import RidgeCV

    data = load_diabetes(scaled=False)
    model = RidgeCV().fit(data.data, data.target)
    x = data.data[:60].astype(np.float32)
    result = export_model(model, x)
    assert 1e-5 < result.max_abs_diff["prediction"] < 1e-3
    with pytest.raises(ExportMismatch, match=r"allowed 1e-05 \+ 0 x \|source value\|"):
        export_model(model, x, rtol=0.0)


def test_auroc_over_classes_needs_probabilities_and_labels_that_fit():
    from sklearn.metrics import roc_auc_score

    from bedside.errors import InvalidInput

    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    logits = rng.standard_normal((90, 3)) + 2.0 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = 100 * roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert gate._score("auroc", p.astype(np.float32), y) == pytest.approx(expected, abs=1e-3)
    assert gate._score("auroc", p[:, 1], (y == 1).astype(int)) == pytest.approx(100 * roc_auc_score(y == 1, p[:, 1]))
    with pytest.raises(InvalidInput, match=r"needs per-class probabilities.*use --metric accuracy"):
        gate._score("auroc", logits, y)
    with pytest.raises(InvalidInput, match=r"hold classes \[0, 1, 2, 3\]; the model's output has 3 column"):
        gate._score("auroc", p, np.arange(90) % 4)
    with pytest.raises(InvalidInput, match=r"none of classes \[2\]"):
        gate._score("auroc", p, np.arange(90) % 2)
    with pytest.raises(InvalidInput, match="class indices"):
        gate._score("accuracy", p, np.array(["a", "b", "c"] * 30))


def test_an_fp16_or_int8_model_is_not_optimized_again(tmp_path, wdbc):
    from bedside.pipeline.optimize import reduced_precision, why_not

    _, x_te, _, _ = wdbc
    src = tmp_path / "m.onnx"
    src.write_bytes(export_torch(mlp(), x_te[:4]).to_bytes())
    half = onnx.load(str(optimize_file(src, tmp_path / "fp16.onnx", "fp16")))
    int8 = onnx.load(str(optimize_file(src, tmp_path / "int8.onnx", "int8-dynamic")))
    assert (reduced_precision(onnx.load(str(src))), reduced_precision(half), reduced_precision(int8)) == (
        None,
        "FP16",
        "INT8",
    )
    assert "already FP16" in why_not(half, "int8-dynamic") and "already INT8" in why_not(int8, "fp16")
    assert why_not(int8, "graph") is None  # fusions keep the precision
    with pytest.raises(OptimizeError, match="already INT8"):
        optimize_file(tmp_path / "int8.onnx", tmp_path / "again.onnx", "int8-dynamic")
