"""Build the demo model repository from real clinical data that scikit-learn ships.

Nothing is downloaded: both data sets are inside the scikit-learn wheel. Each model is converted to
ONNX and checked against the original on held-out rows before it is written; the repository is
assembled in a temporary folder and renamed into place, so a crash never leaves half a repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from bedside.modelconfig.model import ContractSpec, ModelConfig, TensorSpec, WarmupSpec
from bedside.models.demo_medication import RISK_NOTE, medication_risk, write_graph
from bedside.monitoring.drift import REFERENCE_FILE, make_reference

# v7: the medication check graph; v6: drift references; v5: provenance stamps; v4: configs carry the contract
DEMO_STAMP = ".bedside-demo-v7"
TOLERANCE = 1e-5
_DEFAULTED = {"scheduling", "queue_policy", "tenants"}  # left to bedside's defaults
DISCLAIMER = (
    "**Not for clinical use.** A demonstration model trained on a small public research data set; "
    "it has not been validated prospectively, is not a medical device, and must not inform the "
    "care of any patient."
)


BREAST_NOTE = "Wisconsin Diagnostic Breast Cancer data (569 patients), as shipped in scikit-learn"
DIABETES_NOTE = "diabetes data of Efron et al. 2004 (442 patients), as shipped in scikit-learn"
VITALS_NOTE = "3,000 simulated ward patients (bedside.synthetic.vitals); no real patient data"
ECG_NOTE = "1,500 simulated 12-lead ECG windows (bedside.synthetic.ecg); no real recordings"


def card_line(provenance: str, note: str) -> str:
    """The card's provenance line (imported here: serving an existing demo needs no onnx)."""
    from bedside.pipeline.provenance import card_line as line

    return line(provenance, note)


def default_demo_dir() -> Path:
    return Path(os.environ.get("BEDSIDE_DEMO_DIR", "~/.cache/bedside/demo-repository")).expanduser()


def ensure_demo(path: Path | None = None, force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Return a demo repository at `path`, building it if it is missing or from an older release.
    `progress` is called with one short line before each model is trained and converted."""
    path = path or default_demo_dir()
    if (path / DEMO_STAMP).exists() and not force:
        return path
    return build_demo(path, progress=progress)


@dataclass
class BuiltModel:
    config: ModelConfig
    onnx_bytes: bytes
    card: str
    provenance: str  # stamped into the model (pipeline/provenance.py)
    note: str
    drift_reference: bytes | None = None  # training histograms for on-box drift (monitoring/drift.py)


def build_demo(path: Path, ecg: bool = True, progress: Callable[[str], None] | None = None) -> Path:
    """Train, convert and check the demo models and write them as a repository at `path`.
    `progress` is called with one short line before each model (e.g. for a log without a terminal)."""
    steps: list[tuple[str, str, Callable[[], BuiltModel | None]]] = [
        ("breast_mass_malignancy", "LightGBM, real data", _breast_mass_malignancy),
        ("diabetes_progression", "ridge regression, real data", _diabetes_progression),
        ("vitals_deterioration", "LightGBM, synthetic data", _vitals_deterioration),
        ("medication_risk", "logistic regression, synthetic data", _medication_risk),
    ]
    if ecg and importlib.util.find_spec("torch") is not None:
        steps.append(("ecg_rhythm", "1D-CNN, synthetic ECG, INT8 behind the gate", _ecg_rhythm))
    models: list[BuiltModel] = []
    try:
        from bedside.pipeline.provenance import stamp  # onnx: the demo extra

        for i, (name, what, make) in enumerate(steps, 1):
            if progress is not None:
                progress(f"demo {i}/{len(steps)}: {name} ({what})")
            built = make()
            if built is not None:
                models.append(built)
    except ImportError as exc:
        raise RuntimeError(
            f"building the demo models needs the demo extra ({exc.name} is missing): pip install 'bedside[demo]'"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        for built in models:
            folder = staging / built.config.name
            (folder / "1").mkdir(parents=True)
            (folder / "1" / "model.onnx").write_bytes(stamp(built.onnx_bytes, built.provenance, built.note))
            doc = {k: v for k, v in built.config.to_dict().items() if k not in _DEFAULTED}
            (folder / "config.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
            (folder / "MODEL_CARD.md").write_text(built.card, encoding="utf-8")
            if built.drift_reference is not None:
                (folder / "1" / REFERENCE_FILE).write_bytes(built.drift_reference)
        write_graph(staging / "medication_check")  # after medication_risk, the model it calls
        (staging / DEMO_STAMP).write_text("built by bedside demo\n", encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def check_close(name: str, onnx_out: np.ndarray, reference: np.ndarray, tolerance: float = TOLERANCE) -> float:
    diff = float(np.max(np.abs(onnx_out.astype(np.float64) - reference.astype(np.float64))))
    if not diff <= tolerance:
        raise RuntimeError(f"{name}: ONNX output differs from the source model by {diff:.3g} > {tolerance:g}")
    return diff


def _run_onnx(model: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _lightgbm_onnx(clf: Any, width: int, name: str, x_te: np.ndarray) -> tuple[Any, np.ndarray, float]:
    """Convert a LightGBM classifier and check it on held-out rows; return (model, reference proba, diff)."""
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = convert_lightgbm(
        clf, initial_types=[("features", FloatTensorType([None, width]))], zipmap=False, target_opset=15
    )
    # The converter declares `label` as shape [1]; it has one entry per row.
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    label, proba = _run_onnx(model, {"features": x_te})
    reference = clf.predict_proba(x_te)
    diff = check_close(name, proba, reference)
    if not np.array_equal(label, clf.predict(x_te)):
        raise RuntimeError(f"{name}: ONNX labels differ from LightGBM's")
    return model, reference, diff


def _breast_mass_malignancy() -> BuiltModel:
    import lightgbm as lgb
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = (data.target == 0).astype(np.int64)  # scikit-learn codes malignant as 0; we predict malignancy
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    clf = lgb.LGBMClassifier(
        n_estimators=200, num_leaves=15, learning_rate=0.05, min_child_samples=10, random_state=0, verbose=-1
    ).fit(x_tr, y_tr)
    model, reference, diff = _lightgbm_onnx(clf, 30, "breast_mass_malignancy", x_te)
    auroc = roc_auc_score(y_te, reference[:, 1])
    config = ModelConfig(
        name="breast_mass_malignancy",
        description="Probability that a breast mass is malignant, from 30 fine-needle-aspirate nucleus "
        "features (Wisconsin Diagnostic Breast Cancer data). LightGBM. Not for clinical use.",
        max_batch_size=64,
        inputs=(TensorSpec("features", "FP32", (30,)),),
        outputs=(TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (2,))),
        warmup=WarmupSpec(batch_sizes=(1, 8), fill="zeros", iterations=3),
        contract=ContractSpec(score_output="probabilities", labels=("benign", "malignant"), positive_class="malignant"),
    )
    card = f"""# breast_mass_malignancy (version 1)

{card_line("trained", BREAST_NOTE)}

Predicts whether a breast mass sampled by fine-needle aspiration is **malignant** (label 1) or benign
(label 0). `probabilities[:, 1]` is the probability of malignancy.

{DISCLAIMER}

## Data
Wisconsin Diagnostic Breast Cancer (WDBC), as shipped inside scikit-learn (`load_breast_cancer`):
569 patients, 212 malignant, 357 benign; 30 features computed from digitised images of the aspirate
(mean, standard error and worst value of 10 nucleus measurements). Stratified split: 426 training,
143 held out (random_state 0).

## Model
LightGBM gradient-boosted trees (200 trees, 15 leaves, learning rate 0.05), converted to ONNX with
onnxmltools (opset 15, ai.onnx.ml trees). ONNX vs LightGBM on the held-out rows: max absolute
probability difference {diff:.2g} (limit {TOLERANCE:g}); identical labels.

## Performance (held-out, n={len(y_te)})
AUROC {auroc:.4f}

## Inputs
`features`: FP32, shape [batch, 30], in this order:
{", ".join(data.feature_names)}

## Intended use
Demonstrating and testing the bedside inference server. Not intended for diagnosis.
"""
    drift = make_reference(
        x_tr, "features", list(data.feature_names), np.asarray(clf.predict_proba(x_tr))[:, 1], "probabilities"
    )
    return BuiltModel(config, model.SerializeToString(), card, "trained", BREAST_NOTE, drift)


def _diabetes_progression() -> BuiltModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import DoubleTensorType
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import mean_absolute_error, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_diabetes(scaled=False)
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.25, random_state=0)
    reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))).fit(x_tr, y_tr)
    model = to_onnx(reg, initial_types=[("features", DoubleTensorType([None, 10]))], target_opset=15)
    (out,) = _run_onnx(model, {"features": x_te})
    reference = reg.predict(x_te)
    diff = check_close("diabetes_progression", out.ravel(), reference)
    r2, mae = r2_score(y_te, reference), mean_absolute_error(y_te, reference)
    config = ModelConfig(
        name="diabetes_progression",
        description="Quantitative measure of diabetes disease progression one year after baseline, from "
        "age, sex, BMI, blood pressure and six serum measurements. Ridge regression. Not for clinical use.",
        max_batch_size=64,
        inputs=(TensorSpec("features", "FP64", (10,)),),
        outputs=(TensorSpec("variable", "FP64", (1,)),),
        warmup=WarmupSpec(batch_sizes=(1,), fill="zeros", iterations=3),
    )
    card = f"""# diabetes_progression (version 1)

{card_line("trained", DIABETES_NOTE)}

Predicts a quantitative measure of diabetes disease progression one year after baseline (the
study's outcome scale, roughly 25-346).

{DISCLAIMER}

## Data
The diabetes data of Efron et al. (2004), "Least Angle Regression", as shipped inside scikit-learn
(`load_diabetes(scaled=False)`): 442 patients, 10 baseline variables. Split: 331 training, 111 held
out (random_state 0).

## Model
Standardisation + ridge regression (alpha by cross-validation), converted with skl2onnx (opset 15)
in double precision. ONNX vs scikit-learn on the held-out rows: max absolute difference {diff:.2g}
(limit {TOLERANCE:g}).

## Performance (held-out, n={len(y_te)})
R^2 {r2:.3f}, mean absolute error {mae:.1f} units.

## Inputs
`features`: FP64, shape [batch, 10]: age (years), sex (1/2), BMI (kg/m2), mean blood pressure
(mmHg), s1 total serum cholesterol, s2 LDL, s3 HDL, s4 total/HDL ratio, s5 log serum triglycerides,
s6 blood glucose.

## Intended use
Demonstrating and testing the bedside inference server. Not intended for prognosis.
"""
    drift = make_reference(x_tr, "features", list(data.feature_names), reg.predict(x_tr), "variable", 0)
    return BuiltModel(config, model.SerializeToString(), card, "trained", DIABETES_NOTE, drift)


def _vitals_deterioration() -> BuiltModel:
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score

    from bedside.clinical.features import NAMES, WIDTH
    from bedside.synthetic.vitals import dataset

    x, y = dataset(3000, seed=0)
    x_tr, y_tr, x_te, y_te = x[:2400], y[:2400], x[2400:], y[2400:]
    clf = lgb.LGBMClassifier(n_estimators=150, num_leaves=15, learning_rate=0.05, random_state=0, verbose=-1).fit(
        x_tr, y_tr
    )
    model, reference, diff = _lightgbm_onnx(clf, WIDTH, "vitals_deterioration", x_te)
    auroc = roc_auc_score(y_te, reference[:, 1])
    config = ModelConfig(
        name="vitals_deterioration",
        description="Risk that a ward patient is deteriorating, from the last hour of vital signs. Trained on "
        "SYNTHETIC trajectories. Not for clinical use.",
        max_batch_size=256,
        inputs=(TensorSpec("features", "FP32", (WIDTH,)),),
        outputs=(TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (2,))),
        warmup=WarmupSpec(batch_sizes=(1, 32), fill="zeros", iterations=3),
        # the scorer reads the risk from here: probabilities[:, deteriorating]
        contract=ContractSpec(
            score_output="probabilities", labels=("stable", "deteriorating"), positive_class="deteriorating"
        ),
    )
    card = f"""# vitals_deterioration (version 1)

{card_line("synthetic", VITALS_NOTE)}

Scores the risk that a ward patient is deteriorating (`probabilities[:, 1]`) from the last hour of
vital signs, as bedside's per-bed stream computes them every 15 s.

{DISCLAIMER}

**Trained on SYNTHETIC data.** No labelled in-hospital deterioration time series ships in any
package available offline, so `bedside.synthetic.vitals` simulates 3,000 ward patients (30 %
deteriorating with a random onset and severity: heart and respiratory rates rise, blood pressure
and SpO2 fall, temperature moves, consciousness may decline; 12 % chronically on oxygen; 15 % of
readings dropped, 5 % of vital signs never monitored). Its held-out AUROC ({auroc:.3f} on 600
synthetic patients) says nothing about real patients. When this model is unavailable, too slow or
its input too incomplete, bedside alerts from NEWS2 and qSOFA and says so.

## Model
LightGBM (150 trees, 15 leaves) -> ONNX (onnxmltools, opset 15); ONNX vs LightGBM max |diff|
{diff:.2g} on the held-out rows.

## Inputs
`features`: FP32 [batch, {WIDTH}], in this order: {", ".join(NAMES)}.
"""
    drift = make_reference(x_tr, "features", list(NAMES), np.asarray(clf.predict_proba(x_tr))[:, 1], "probabilities")
    return BuiltModel(config, model.SerializeToString(), card, "synthetic", VITALS_NOTE, drift)


def _medication_risk() -> BuiltModel:
    config, onnx_bytes, features, auroc = medication_risk()
    card = f"""# medication_risk (version 1)

{card_line("synthetic", RISK_NOTE)}

Scores the risk of an adverse drug event at a bedside medication administration
(`probabilities[:, 1]`), as one step of the `medication_check` graph.

{DISCLAIMER}

**Trained on SYNTHETIC data**: no labelled adverse-drug-event data ships offline. 5,000 simulated
administrations, risk made up to rise with age, lower kidney function, more drugs, a worse ANSM
interaction, high-alert and renally cleared drugs. Held-out AUROC {auroc:.3f} on 1,000 synthetic rows,
which says nothing about real patients.

## Model
Logistic regression (scikit-learn) -> ONNX (skl2onnx, opset 15).

## Inputs
`features`: FP32 [batch, 8]: {features} (as `medication.features` computes them).
"""
    return BuiltModel(config, onnx_bytes, card, "synthetic", RISK_NOTE)


def _ecg_rhythm() -> BuiltModel | None:
    from bedside.models.demo_ecg import ecg_rhythm

    return ecg_rhythm()
