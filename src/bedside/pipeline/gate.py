"""The accuracy gate: an optimized model replaces the original only if it stays within a set margin
of the original's metric on held-out data (default: at most 1 percentage point worse).

When no labels exist (random-weight latency models), the metric is `agreement`: the share of
held-out rows where the candidate's top class equals the original's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bedside.errors import BedsideError, InvalidInput

METRICS = ("auroc", "accuracy", "f1", "agreement")


@dataclass
class GateReport:
    method: str
    metric: str
    baseline: float
    candidate: float
    drop_pp: float
    tolerance_pp: float
    passed: bool
    rows: int
    size_bytes_before: int
    size_bytes_after: int
    p50_ms_before: float
    p50_ms_after: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "REFUSED"
        return (
            f"{self.method}: {self.metric} {self.baseline:.2f} -> {self.candidate:.2f} "
            f"(drop {self.drop_pp:.2f} pp, limit {self.tolerance_pp:g} pp) {verdict}; "
            f"size {self.size_bytes_before / 1e6:.2f} -> {self.size_bytes_after / 1e6:.2f} MB; "
            f"p50 {self.p50_ms_before:.3f} -> {self.p50_ms_after:.3f} ms"
        )


class AccuracyGateFailed(BedsideError):
    status = 422

    def __init__(self, report: GateReport) -> None:
        super().__init__(f"accuracy gate refused the optimized model: {report.summary()}")
        self.report = report


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _outputs(
    session: ort.InferenceSession, x: dict[str, np.ndarray], output: str | None, batch: int = 64
) -> np.ndarray:
    name = output or session.get_outputs()[-1].name  # classifiers put probabilities last
    rows = len(next(iter(x.values())))
    parts = [session.run([name], {k: v[i : i + batch] for k, v in x.items()})[0] for i in range(0, rows, batch)]
    return np.concatenate(parts)


def _predicted(scores: np.ndarray) -> np.ndarray:
    if scores.ndim == 2 and scores.shape[1] > 1:
        return scores.argmax(axis=1)
    return (scores.reshape(-1) > 0.5).astype(int)


def _classes(y: np.ndarray, width: int, metric: str) -> np.ndarray:
    """Labels as class indices that fit an output `width` columns wide (1: a score of class 1)."""
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise InvalidInput(
            f"the labels `y` hold {y.dtype.name} values; {metric} needs class indices (0, 1, ...), one per row"
        )
    classes = max(width, 2)
    found = np.unique(y)
    if found.min() < 0 or found.max() >= classes:
        raise InvalidInput(
            f"the labels `y` hold classes {found[:10].tolist()}; the model's output has {width} column(s), "
            f"scoring classes 0..{classes - 1}: {metric} cannot pair them. `y` must hold each row's class index, "
            "in the order of the output's columns; or use --metric agreement (no labels)"
        )
    return y.astype(np.int64)


def _auroc(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if scores.ndim > 2:
        raise InvalidInput(
            f"auroc needs one score per row or one probability per class; the output has shape {list(scores.shape)}; "
            "use --metric agreement"
        )
    width = 1 if scores.ndim == 1 else scores.shape[1]
    y = _classes(y, width, "auroc")
    present = np.unique(y)
    if width <= 2:
        if len(present) < 2:
            raise InvalidInput(f"auroc needs rows of both classes; the labels `y` hold only class {present[0]}")
        return float(roc_auc_score(y, scores[:, -1] if scores.ndim == 2 else scores))
    if len(present) < width:
        missing = sorted(set(range(width)) - set(present.tolist()))
        raise InvalidInput(
            f"auroc over {width} classes (one-vs-rest) needs rows of every class; the labels `y` have none of "
            f"classes {missing}; add such rows or use --metric accuracy"
        )
    sums = scores.sum(axis=1)
    if np.any(scores < -1e-6) or np.any(np.abs(sums - 1.0) > 1e-2):
        raise InvalidInput(
            f"auroc over {width} classes needs per-class probabilities (rows that sum to 1); this output does not "
            "look like probabilities (logits? end the model in softmax); use --metric accuracy"
        )
    probabilities = np.clip(scores, 0.0, None) / sums[:, None]  # FP16 / INT8 rounding: rows sum to 1 +- 1e-3
    return float(roc_auc_score(y, probabilities, multi_class="ovr", average="macro", labels=list(range(width))))


def _score(metric: str, scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score, f1_score

    scores = scores.astype(np.float64)
    if metric == "auroc":
        return 100.0 * _auroc(scores, y)
    width = scores.shape[1] if scores.ndim == 2 else 1
    predicted = _predicted(scores)
    if metric == "agreement":
        return 100.0 * accuracy_score(y, predicted)
    y = _classes(y, width, metric)
    if metric == "accuracy":
        return 100.0 * accuracy_score(y, predicted)
    if metric == "f1":
        binary = width <= 2
        return 100.0 * f1_score(y, predicted, average="binary" if binary else "macro", zero_division=0.0)
    raise InvalidInput(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def p50_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int = 30) -> float:
    session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def check(
    baseline_path: Path,
    candidate_path: Path,
    x: dict[str, np.ndarray],
    y: np.ndarray | None,
    metric: str = "auroc",
    tolerance_pp: float = 1.0,
    method: str = "",
    output: str | None = None,
) -> GateReport:
    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric != "agreement" and y is None:
        raise InvalidInput(
            f"metric {metric!r} needs labels: the held-out data has no `y` (one label per row); "
            "add it, or use --metric agreement (the same answers as the original, no labels needed)"
        )
    base, cand = _session(baseline_path), _session(candidate_path)
    base_out = _outputs(base, x, output)
    cand_out = _outputs(cand, x, output)
    y = _predicted(base_out) if metric == "agreement" or y is None else y
    before = _score(metric, base_out, y)  # data that does not fit the model is refused here
    try:  # a candidate whose answers cannot be scored (NaN, no longer probabilities) fails the gate
        after = _score(metric, cand_out, y) if np.all(np.isfinite(cand_out)) else 0.0
    except InvalidInput:
        after = 0.0
    one_row = {k: v[:1] for k, v in x.items()}
    drop = before - after
    return GateReport(
        method=method,
        metric=metric,
        baseline=round(before, 4),
        candidate=round(after, 4),
        drop_pp=round(drop, 4),
        tolerance_pp=tolerance_pp,
        passed=bool(drop <= tolerance_pp),
        rows=len(y),
        size_bytes_before=baseline_path.stat().st_size,
        size_bytes_after=candidate_path.stat().st_size,
        p50_ms_before=round(p50_ms(base, one_row), 4),
        p50_ms_after=round(p50_ms(cand, one_row), 4),
    )
