"""`bedside bench`: latency and size of the reference clinical models, FP32 and INT8, at batch 1,
beside the published edge-device figures. Prints a table, writes JSON and a PNG plot.

Per model: build (the GBM and the ECG CNN are trained; the others have random weights, which is
enough for latency and is said in the output), export with the numerical check, quantize (static
INT8 for convolutional models, dynamic INT8 for recurrent and transformer ones), pass the INT8 model
through the accuracy gate, then time both with the session options the server uses.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bedside.pipeline import gate
from bedside.pipeline.optimize import optimize_file
from bedside.runtime.session import open_session

# Published p95 (ms) at batch 1: NVIDIA Jetson Orin Nano and Raspberry Pi 5 (None: not published).
EDGE = {
    "gbm": (1.2, 3.5),
    "ecg_cnn": (2.8, 15.0),
    "vitals_lstm": (5.1, 45.0),
    "resnet18": (18.0, 350.0),
    "efficientnet_b0": (11.0, 180.0),
    "ner_bert": (65.0, None),
}
TARGET_P95_MS = {"gbm": 0.3, "ecg_cnn": 1.0, "vitals_lstm": 3.0, "resnet18": 15.0, "ner_bert": 50.0}


@dataclass
class Prepared:
    onnx_path: Path
    feed: dict[str, np.ndarray]
    eval_x: dict[str, np.ndarray]
    eval_y: np.ndarray | None
    metric: str
    int8: str | None
    weights: str


def _export(module: Any, sample: dict[str, np.ndarray], out: Path, tolerance: float = 1e-4) -> Path:
    from bedside.pipeline.export import export_torch

    result = export_torch(module, sample, output_names=["output"], tolerance=tolerance)
    out.write_bytes(result.to_bytes())
    return out


def _prepare(name: str, work: Path, quick: bool) -> Prepared:
    rng = np.random.default_rng(0)
    if name == "gbm":
        from sklearn.datasets import load_breast_cancer

        from bedside.models.demo import build_demo

        repo = build_demo(work / "demo")
        x = load_breast_cancer().data.astype(np.float32)
        y = (load_breast_cancer().target == 0).astype(int)
        return Prepared(
            repo / "breast_mass_malignancy" / "1" / "model.onnx",
            {"features": x[:1]},
            {"features": x},
            y,
            "auroc",
            None,
            "trained (WDBC, real data)",
        )
    from bedside.models.reference import build

    if name == "ecg_cnn":
        from bedside.models.train import train_ecg_cnn

        module, _, (x_te, y_te) = train_ecg_cnn(400 if quick else 2000, 1 if quick else 3)
        path = _export(module, {"ecg": x_te[:8]}, work / f"{name}.onnx")
        return Prepared(
            path, {"ecg": x_te[:1]}, {"ecg": x_te}, y_te, "accuracy", "int8-static", "trained (SYNTHETIC ECG)"
        )
    if name == "vitals_lstm":
        x = rng.standard_normal((256, 60, 8)).astype(np.float32)
        path = _export(build(name), {"window": x[:8]}, work / f"{name}.onnx")
        return Prepared(path, {"window": x[:1]}, {"window": x}, None, "agreement", "int8-dynamic", "random")
    if name in ("resnet18", "efficientnet_b0"):
        x = rng.standard_normal((32 if quick else 64, 3, 224, 224)).astype(np.float32)
        path = _export(build(name), {"image": x[:2]}, work / f"{name}.onnx")
        return Prepared(path, {"image": x[:1]}, {"image": x}, None, "agreement", "int8-static", "random")
    if name == "ner_bert":
        ids = rng.integers(1000, 30000, (32, 128)).astype(np.int64)
        mask = np.ones_like(ids)
        path = _export(build(name), {"input_ids": ids[:2], "attention_mask": mask[:2]}, work / f"{name}.onnx", 1e-3)
        return Prepared(
            path,
            {"input_ids": ids[:1], "attention_mask": mask[:1]},
            {"input_ids": ids, "attention_mask": mask},
            None,
            "agreement",
            "int8-dynamic",
            "random",
        )
    raise KeyError(name)


def _latency(path: Path, feed: dict[str, np.ndarray], seconds: float, min_runs: int = 20) -> dict[str, float]:
    session = open_session(path, 0, ("cpu",))
    for _ in range(3):
        session.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
        if len(times) >= 5000:
            break
    ms = np.asarray(times) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "p95_ms": round(float(p95), 3),
        "p99_ms": round(float(p99), 3),
        "runs": len(ms),
    }


def _flat_token_gate(prepared: Prepared, candidate: Path) -> gate.GateReport:
    """Token classifiers: agreement per token (flatten [N, T, labels] to [N*T, labels])."""
    import onnxruntime as ort

    def outputs(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rows = len(prepared.eval_x["input_ids"])
        return np.concatenate(
            [session.run(None, {k: v[i : i + 8] for k, v in prepared.eval_x.items()})[0] for i in range(0, rows, 8)]
        )

    base, cand = outputs(prepared.onnx_path), outputs(candidate)
    agree = 100.0 * float((base.argmax(-1) == cand.argmax(-1)).mean())
    one = {k: v[:1] for k, v in prepared.eval_x.items()}
    return gate.GateReport(
        "int8-dynamic",
        "agreement",
        100.0,
        round(agree, 4),
        round(100.0 - agree, 4),
        1.0,
        100.0 - agree <= 1.0,
        int(base.shape[0] * base.shape[1]),
        prepared.onnx_path.stat().st_size,
        candidate.stat().st_size,
        round(gate.p50_ms(ort.InferenceSession(str(prepared.onnx_path)), one, 5), 3),
        round(gate.p50_ms(ort.InferenceSession(str(candidate)), one, 5), 3),
    )


def run(
    models: list[str],
    out_dir: Path,
    seconds: float = 2.0,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in models:
            if progress:
                progress(f"{name}: build and export")
            prepared = _prepare(name, work, quick)
            fp32 = _latency(prepared.onnx_path, prepared.feed, seconds)
            row: dict[str, Any] = {
                "model": name,
                "weights": prepared.weights,
                "fp32_size_mb": round(prepared.onnx_path.stat().st_size / 1e6, 2),
                **{f"fp32_{k}": v for k, v in fp32.items() if k != "runs"},
                "jetson_orin_nano_p95_ms": EDGE[name][0],
                "raspberry_pi5_p95_ms": EDGE[name][1],
                "target_p95_ms": TARGET_P95_MS.get(name),
            }
            if progress:
                progress(
                    f"{name}: {prepared.int8} and accuracy gate"
                    if prepared.int8
                    else f"{name}: no INT8 for tree ensembles"
                )
            if prepared.int8:
                int8_path = optimize_file(
                    prepared.onnx_path, work / f"{name}.int8.onnx", prepared.int8, prepared.eval_x
                )
                report = (
                    _flat_token_gate(prepared, int8_path)
                    if name == "ner_bert"
                    else gate.check(
                        prepared.onnx_path,
                        int8_path,
                        prepared.eval_x,
                        prepared.eval_y,
                        prepared.metric,
                        1.0,
                        prepared.int8,
                    )
                )
                int8 = _latency(int8_path, prepared.feed, seconds)
                row.update(
                    {
                        "int8_method": prepared.int8,
                        "int8_size_mb": round(int8_path.stat().st_size / 1e6, 2),
                        **{f"int8_{k}": v for k, v in int8.items() if k != "runs"},
                        "int8_speedup_p50": round(fp32["p50_ms"] / int8["p50_ms"], 2),
                        "int8_size_ratio": round(prepared.onnx_path.stat().st_size / int8_path.stat().st_size, 2),
                        "gate_metric": report.metric,
                        "gate_fp32": report.baseline,
                        "gate_int8": report.candidate,
                        "gate_passed": report.passed,
                    }
                )
            best = min(row["fp32_p95_ms"], row["int8_p95_ms"] if row.get("gate_passed") else float("inf"))
            row["best_p95_ms"] = best
            row["beats_jetson_p95"] = best < EDGE[name][0]
            rows.append(row)
    import onnxruntime

    doc = {
        "rows": rows,
        "batch": 1,
        "machine": {"cpu_count": __import__("os").cpu_count(), "onnxruntime": onnxruntime.__version__},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reference_models.json").write_text(json.dumps(doc, indent=2))
    plot(rows, out_dir / "reference_models.png")
    return doc


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    series = [
        ("bedside FP32 (this box)", [r["fp32_p95_ms"] for r in rows]),
        ("bedside INT8 (this box)", [r.get("int8_p95_ms", np.nan) for r in rows]),
        ("Jetson Orin Nano", [r["jetson_orin_nano_p95_ms"] for r in rows]),
        ("Raspberry Pi 5", [r["raspberry_pi5_p95_ms"] or np.nan for r in rows]),
    ]
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - 1.5) * 0.2, values, 0.2, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylabel("p95 latency at batch 1 (ms, log scale)")
    ax.set_title("Reference clinical models: bedside on a 2-core CPU vs published edge figures")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
