"""What a differential model update saves: a bsdiff4 delta from the installed ONNX version to the
new one, against sending the new file whole (raw, or zlib -9 compressed).

    python bench/update_delta.py [--ecg-train 1500] [--ecg-epochs 3] [--tune-windows 500] [--quick]

Prints a table and writes bench/results/update_delta.json and update_delta.md (--quick: 200
windows x 1 epoch and 100 fine-tune windows, results in bench/results/quick/). Every model is a
project model, exported with the project's exporters (bedside.pipeline.export, which checks each
export against its source model numerically):

  ecg_cnn   the ECG 1D-CNN of bedside.models.train.train_ecg_cnn, trained on SYNTHETIC 12-lead
            windows (bedside.synthetic.ecg), FP32 as exported and static INT8 as the demo serves it
            when its accuracy gate passes (bedside.pipeline.optimize, the same 96 calibration windows
            for both versions). Version 1 is train_ecg_cnn(seed=0); the updates: a retrain from
            scratch with seed 1 (new initialisation and new synthetic windows), one more epoch of all
            layers on new windows, and fine-tunes of one epoch on new windows with all but the last
            layers frozen.
  LightGBM  the demo's breast-mass classifier (models/demo.py: its hyperparameters and split), trained
            on REAL data (Wisconsin Diagnostic Breast Cancer, as scikit-learn ships it); updates: a
            retrain on a bootstrap resample of the training split, and 50 more trees (init_model).
  ridge     the demo's diabetes-progression ridge regression, REAL data (Efron et al. 2004 diabetes,
            as scikit-learn ships it); update: a retrain on a bootstrap resample.

Each has a control: the installed model exported a second time (same weights), whose delta should be
a few hundred bytes at most. For every pair: the sizes, the delta's share of the full file, the time
to make the delta (bsdiff4.diff) and to apply it (bsdiff4.patch), and a check that the patched bytes
are the new file exactly (sha256): a mismatch stops the run. A bsdiff4 delta is already
bz2-compressed, so zlib -9 of the full file is the baseline for "just compress it". Training sets
are small and epochs few, to stay within minutes on two cores: the deltas depend on how many weights
change, not on how good the model is.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    NAME,
    console,
    machine,
    main_guard,
    parse_args,
    require,
    result_path,
    say,
    table,
    write_results,
)

# isort: split
import bsdiff4
import numpy as np

ECG_DATA = "SYNTHETIC"  # bedside.synthetic.ecg
WDBC_DATA = "real (WDBC)"  # Wisconsin Diagnostic Breast Cancer, as scikit-learn ships it
DIABETES_DATA = "real (diabetes)"  # Efron et al. 2004, as scikit-learn ships it
CALIBRATION = 96  # windows, as the demo calibrates its INT8 model
COLUMNS = [
    "model",
    "data",
    "update",
    "full_bytes",
    "zlib_bytes",
    "delta_bytes",
    "delta_pct_of_full",
    "delta_pct_of_zlib",
    "values_changed_pct",
    "diff_ms",
    "patch_ms",
    "sha256",
]
HEADS = {
    "full_bytes": "full B",
    "zlib_bytes": "zlib B",
    "delta_bytes": "delta B",
    "delta_pct_of_full": "delta/full",
    "delta_pct_of_zlib": "delta/zlib",
    "values_changed_pct": "changed",
    "diff_ms": "diff ms",
    "patch_ms": "patch ms",
    "sha256": "sha256",
}


# --- measuring one update -----------------------------------------------------------------------


def timed(fn: Callable[[], bytes]) -> tuple[bytes, float]:
    """(result, seconds): the best of up to 5 runs while they take under 0.3 s in all (one run for
    a slow call)."""
    best, spent, runs, out = float("inf"), 0.0, 0, b""
    while runs < 5 and (runs == 0 or spent < 0.3):
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return out, best


def values_changed(old: bytes, new: bytes) -> float | None:
    """Percent of the model's numbers that differ: initializers (by name) and the numeric attributes
    of the nodes (by node and attribute: where tree ensembles and linear models keep their weights).
    None when the two graphs do not line up (other nodes, other shapes: new trees, say)."""
    import onnx
    from onnx import AttributeProto

    numeric = {AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.FLOATS, AttributeProto.INTS}

    def weights(blob: bytes) -> dict[str, np.ndarray]:
        graph = onnx.load_from_string(blob).graph
        found = {f"init:{t.name}": onnx.numpy_helper.to_array(t) for t in graph.initializer}
        for i, node in enumerate(graph.node):
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    found[f"{i}:{node.op_type}:{attr.name}"] = onnx.numpy_helper.to_array(attr.t)
                elif attr.type in numeric:
                    found[f"{i}:{node.op_type}:{attr.name}"] = np.atleast_1d(onnx.helper.get_attribute_value(attr))
        return found

    a, b = weights(old), weights(new)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    total = sum(v.size for v in a.values())
    if not total:
        return None
    changed = sum(int(np.count_nonzero(a[k] != b[k])) for k in a)
    return round(100 * changed / total, 2)


def measure(model: str, data: str, update: str, old: bytes, new: bytes, control: bool = False) -> dict[str, Any]:
    say(f"  {model}: {update}: ", end="")
    if not control and old == new:
        raise RuntimeError(f"{model}, {update}: the new version is byte-identical to the installed one")
    delta, diff_s = timed(lambda: bsdiff4.diff(old, new))
    patched, patch_s = timed(lambda: bsdiff4.patch(old, delta))
    want, got = hashlib.sha256(new).hexdigest(), hashlib.sha256(patched).hexdigest()
    if got != want:
        raise RuntimeError(
            f"{model}, {update}: the patched file is not the new version (sha256 {got[:16]}... != {want[:16]}...; "
            f"{len(patched)} bytes against {len(new)})"
        )
    zipped = len(zlib.compress(new, 9))
    row = {
        "model": model,
        "data": data,
        "update": update,
        "control": control,
        "old_bytes": len(old),
        "full_bytes": len(new),
        "zlib_bytes": zipped,
        "delta_bytes": len(delta),
        "delta_pct_of_full": round(100 * len(delta) / len(new), 2),
        "delta_pct_of_zlib": round(100 * len(delta) / zipped, 2),
        "values_changed_pct": values_changed(old, new),
        "identical_bytes": old == new,
        "diff_ms": round(diff_s * 1e3, 3),
        "patch_ms": round(patch_s * 1e3, 3),
        "sha256_new": want,
        "sha256": "match",
    }
    say(f"{len(new):,} B -> delta {len(delta):,} B ({row['delta_pct_of_full']:g} %), zlib {zipped:,} B")
    return row


# --- the ECG CNN (SYNTHETIC data) ---------------------------------------------------------------


def ecg_onnx(module: Any, sample: np.ndarray) -> bytes:
    """FP32 ONNX bytes, exported as the demo exports its ECG model (demo_ecg.ecg_rhythm)."""
    import torch

    from bedside.pipeline.export import export_torch

    with_softmax = torch.nn.Sequential(module, torch.nn.Softmax(dim=1)).eval()
    return export_torch(with_softmax, {"ecg": sample[:8]}, output_names=["probabilities"]).to_bytes()


def int8(fp32: bytes, calibration: np.ndarray, folder: Path, name: str) -> bytes:
    """Static INT8, as the demo serves its ECG model when the accuracy gate passes."""
    from bedside.pipeline.optimize import optimize_file

    src = folder / f"{name}.fp32.onnx"
    src.write_bytes(fp32)
    return optimize_file(src, folder / f"{name}.int8.onnx", "int8-static", {"ecg": calibration}).read_bytes()


def fine_tune(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    trainable: Callable[[Any], list[Any]],
    all_train_mode: bool = False,
    seed: int = 3,
) -> Any:
    """A copy of `model` trained one epoch on (x, y) with only the modules `trainable` picks unfrozen.
    Those are in train mode, the rest in eval mode (their BatchNorm running statistics stay put),
    unless all_train_mode: the whole model in train mode, as a plain model.train() leaves it."""
    import torch

    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    tuned.requires_grad_(False)
    tuned.eval()
    parts = trainable(tuned)
    for part in parts:
        part.requires_grad_(True)
        part.train()
    if all_train_mode:
        tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.randperm(len(xt))
    for i in range(0, len(xt), 64):
        idx = order[i : i + 64]
        optimizer.zero_grad()
        loss_fn(tuned(xt[idx]), yt[idx]).backward()
        optimizer.step()
    return tuned.eval()


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return round(float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()), 4)


def ecg_rows(train: int, epochs: int, tune: int, folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from bedside.models.train import train_ecg_cnn
    from bedside.synthetic.ecg import dataset

    say(f"{NAME}: ecg_cnn version 1: train_ecg_cnn({train} SYNTHETIC windows, {epochs} epochs, seed 0)...")
    t0 = time.perf_counter()
    v1, acc1, (x_te, y_te) = train_ecg_cnn(train=train, epochs=epochs, seed=0)
    say(f"  {time.perf_counter() - t0:.1f} s, held-out accuracy {acc1:.1%}")
    say(f"{NAME}: ecg_cnn retrain from scratch: seed 1 (new initialisation, new windows)...")
    t0 = time.perf_counter()
    retrained, acc2, _ = train_ecg_cnn(train=train, epochs=epochs, seed=1)
    say(f"  {time.perf_counter() - t0:.1f} s, held-out accuracy (its own windows) {acc2:.1%}")
    say(f"{NAME}: ecg_cnn fine-tunes: one epoch on {tune} new SYNTHETIC windows (seed 2)...")
    t0 = time.perf_counter()
    x_new, y_new = dataset(tune, seed=2)
    tuned = {
        "1 more epoch, all layers": fine_tune(v1, x_new, y_new, lambda m: [m]),
        "fine-tune last block + head": fine_tune(v1, x_new, y_new, lambda m: [m.features[-3:], m.head]),
        "fine-tune head (BN frozen)": fine_tune(v1, x_new, y_new, lambda m: [m.head]),
        "fine-tune head, BN stats drift": fine_tune(v1, x_new, y_new, lambda m: [m.head], all_train_mode=True),
    }
    say(f"  {time.perf_counter() - t0:.1f} s")
    accuracies = {"version 1": acc1, "retrain from scratch (its own held-out windows)": acc2}
    accuracies.update({k: accuracy(m, x_te, y_te) for k, m in tuned.items()})

    say(f"{NAME}: exporting (FP32, and static INT8 calibrated on {CALIBRATION} windows) and diffing...")
    base = ecg_onnx(v1, x_te)
    versions = {"retrain from scratch (seed 1)": ecg_onnx(retrained, x_te)}
    versions.update({k: ecg_onnx(m, x_te) for k, m in tuned.items()})
    fp32 = "ecg_cnn FP32"
    rows = [measure(fp32, ECG_DATA, "control: exported again", base, ecg_onnx(v1, x_te), control=True)]
    rows += [measure(fp32, ECG_DATA, k, base, v) for k, v in versions.items()]
    calibration = x_te[:CALIBRATION]
    base8 = int8(base, calibration, folder, "v1")
    q8 = "ecg_cnn INT8"
    rows.append(
        measure(
            q8,
            ECG_DATA,
            "control: quantized again",
            base8,
            int8(ecg_onnx(v1, x_te), calibration, folder, "v1-again"),
            control=True,
        )
    )
    for i, key in enumerate(("retrain from scratch (seed 1)", "fine-tune head (BN frozen)")):
        rows.append(measure(q8, ECG_DATA, key, base8, int8(versions[key], calibration, folder, f"v{i + 2}")))
    return rows, {"accuracy_on_synthetic_held_out": accuracies}


# --- the demo's tabular models (REAL data) ------------------------------------------------------


def lightgbm_rows() -> list[dict[str, Any]]:
    import lightgbm as lgb
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    from bedside.pipeline.export import export_lightgbm

    say(f"{NAME}: breast_mass_malignancy (LightGBM, the demo's hyperparameters, REAL WDBC data)...")
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = (data.target == 0).astype(np.int64)  # as the demo: malignant is 1
    x_tr, x_te, y_tr, _ = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    params = {"num_leaves": 15, "learning_rate": 0.05, "min_child_samples": 10, "verbose": -1}  # models/demo.py

    def fit(rows: np.ndarray, seed: int, trees: int = 200, init: Any = None) -> Any:
        clf = lgb.LGBMClassifier(n_estimators=trees, random_state=seed, **params)
        return clf.fit(x_tr[rows], y_tr[rows], init_model=init)

    every = np.arange(len(x_tr))
    v1 = fit(every, 0)
    base = export_lightgbm(v1, x_te).to_bytes()
    boot1 = np.random.default_rng(1).integers(0, len(x_tr), len(x_tr))
    boot2 = np.random.default_rng(2).integers(0, len(x_tr), len(x_tr))
    model = "LightGBM"
    return [
        measure(model, WDBC_DATA, "control: exported again", base, export_lightgbm(v1, x_te).to_bytes(), True),
        measure(model, WDBC_DATA, "retrain, bootstrap resample", base, export_lightgbm(fit(boot1, 1), x_te).to_bytes()),
        measure(
            model,
            WDBC_DATA,
            "+50 trees (init_model)",
            base,
            export_lightgbm(fit(boot2, 2, trees=50, init=v1.booster_), x_te).to_bytes(),
        ),
    ]


def ridge_rows() -> list[dict[str, Any]]:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bedside.pipeline.export import export_sklearn

    say(f"{NAME}: diabetes_progression (scaler + ridge, as the demo, REAL diabetes data)...")
    data = load_diabetes(scaled=False)
    x_tr, x_te, y_tr, _ = train_test_split(data.data, data.target, test_size=0.25, random_state=0)

    def fit(rows: np.ndarray) -> bytes:
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))).fit(x_tr[rows], y_tr[rows])
        return export_sklearn(reg, x_te).to_bytes()

    base = fit(np.arange(len(x_tr)))
    boot = np.random.default_rng(1).integers(0, len(x_tr), len(x_tr))
    model = "ridge"
    return [
        measure(model, DIABETES_DATA, "control: exported again", base, fit(np.arange(len(x_tr))), True),
        measure(model, DIABETES_DATA, "retrain, bootstrap resample", base, fit(boot)),
    ]


# --- output -------------------------------------------------------------------------------------


def shown_row(row: dict[str, Any]) -> dict[str, str]:
    out = {k: str(row[k]) for k in ("model", "data", "update", "sha256")}
    for k in ("full_bytes", "zlib_bytes", "delta_bytes"):
        out[k] = f"{row[k]:,}"
    for k in ("delta_pct_of_full", "delta_pct_of_zlib"):
        out[k] = f"{row[k]:.1f} %" if row[k] >= 1 else f"{row[k]:.2f} %"
    changed = row["values_changed_pct"]
    out["values_changed_pct"] = "-" if changed is None else f"{changed:g} %"
    for k in ("diff_ms", "patch_ms"):
        out[k] = f"{row[k]:.1f}" if row[k] >= 1 else f"{row[k]:.2f}"
    if row["control"]:
        out["update"] += " (same bytes)" if row["identical_bytes"] else " (bytes differ)"
    return {HEADS.get(k, k): out[k] for k in COLUMNS}


def markdown(title: str, rows: list[dict[str, str]], notes: list[str]) -> str:
    heads = [HEADS.get(c, c) for c in COLUMNS]
    lines = [f"# {title}", "", "| " + " | ".join(heads) + " |"]
    lines.append("|" + "|".join("---:" if c not in ("model", "data", "update") else "---" for c in COLUMNS) + "|")
    lines += ["| " + " | ".join(r[h].replace("|", "/") for h in heads) + " |" for r in rows]
    return "\n".join([*lines, "", *(f"- {n}" for n in notes), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ecg-train", type=int, default=1500, help="SYNTHETIC training windows per ECG training run")
    parser.add_argument("--ecg-epochs", type=int, default=3, help="epochs per ECG training run")
    parser.add_argument("--tune-windows", type=int, default=500, help="new SYNTHETIC windows for the ECG fine-tunes")
    args = parse_args(parser, ecg_train=200, ecg_epochs=1, tune_windows=100)
    require("torch", "lightgbm", "onnxmltools", "skl2onnx")
    started = time.perf_counter()
    say(
        f"{NAME}: bsdiff4 deltas between installed and new ONNX versions: ecg_cnn ({args.ecg_train} SYNTHETIC "
        f"windows x {args.ecg_epochs} epochs; fine-tunes 1 epoch on {args.tune_windows}), LightGBM and ridge "
        "(REAL data, the demo's)"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as name:
        found, ecg_info = ecg_rows(args.ecg_train, args.ecg_epochs, args.tune_windows, Path(name))
        rows += found
    rows += lightgbm_rows()
    rows += ridge_rows()
    seconds = time.perf_counter() - started

    title = (
        f"Differential model updates: bsdiff4 delta vs the full new file. ecg_cnn: {args.ecg_train} SYNTHETIC "
        f"windows x {args.ecg_epochs} epochs, fine-tunes 1 epoch on {args.tune_windows} new windows "
        "(small runs, to stay within minutes on 2 cores)"
    )
    shown = [shown_row(r) for r in rows]
    table(title, shown, [HEADS.get(c, c) for c in COLUMNS])
    notes = [
        "delta: bsdiff4.diff(installed, new), bz2-compressed inside; zlib -9: the full new file compressed, the "
        "baseline for 'just compress it'. Every delta was applied (bsdiff4.patch) and the result checked "
        "against the new file's sha256.",
        "data: SYNTHETIC = bedside.synthetic.ecg windows (train_ecg_cnn); real (WDBC) = Wisconsin Diagnostic "
        "Breast Cancer, real (diabetes) = Efron et al. 2004, both as scikit-learn ships them, with the demo's "
        "hyperparameters and split (models/demo.py); resamples and retrains are bootstrap samples of the "
        "training split.",
        "changed: share of the model's numbers (initializers, numeric node attributes) that differ, "
        "position by position; '-' where the two graphs do not line up (other trees).",
        "ecg_cnn: BatchNorm is folded into the convolutions at export, so running statistics that move during "
        "a fine-tune (a plain model.train() while only the head is trainable: 'BN stats drift') change every "
        "convolution's weights in the file.",
        f"ecg_cnn INT8: static quantization (bedside.pipeline.optimize), the same {CALIBRATION} calibration "
        "windows for both versions, as the demo serves the model when its accuracy gate passes.",
        "ecg_cnn held-out accuracy on SYNTHETIC windows (context only): "
        + "; ".join(f"{k} {v:.1%}" for k, v in ecg_info["accuracy_on_synthetic_held_out"].items())
        + ".",
        "diff and patch times: the best of up to 5 runs (one for a call over 0.3 s), in this process.",
        f"Whole run: {seconds:.0f} s" + (" (--quick: a smoke run)" if args.quick else "") + ".",
    ]
    for note in notes:
        console.print(f"- {note}", style="dim", markup=False, highlight=False)
    result_path("update_delta.md").write_text(markdown(title, shown, notes))
    write_results(
        "update_delta",
        {
            "settings": {
                "ecg_train_windows": args.ecg_train,
                "ecg_epochs": args.ecg_epochs,
                "tune_windows": args.tune_windows,
                "calibration_windows": CALIBRATION,
                "zlib_level": 9,
                "bsdiff4": bsdiff4.__version__,
                "quick": bool(args.quick),
            },
            "rows": rows,
            "ecg": ecg_info,
            "notes": notes,
            "seconds": round(seconds, 1),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main_guard(main)
