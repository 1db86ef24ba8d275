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

from bedside.errors import BedsideError

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


def _score(metric: str, scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    scores = scores.astype(np.float64)
    if metric == "auroc":
        positive = scores[:, -1] if scores.ndim == 2 else scores
        return 100.0 * roc_auc_score(y, positive)
    predicted = (
        scores.argmax(axis=1) if scores.ndim == 2 and scores.shape[1] > 1 else (scores.reshape(-1) > 0.5).astype(int)
    )
    if metric in ("accuracy", "agreement"):
        return 100.0 * accuracy_score(y, predicted)
    if metric == "f1":
        return 100.0 * f1_score(y, predicted, average="binary" if len(np.unique(y)) <= 2 else "macro")
    raise BedsideError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


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
        raise BedsideError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    base, cand = _session(baseline_path), _session(candidate_path)
    base_out = _outputs(base, x, output)
    cand_out = _outputs(cand, x, output)
    if metric == "agreement":
        y = (
            base_out.argmax(axis=1)
            if base_out.ndim == 2 and base_out.shape[1] > 1
            else (base_out.reshape(-1) > 0.5).astype(int)
        )
    elif y is None:
        raise BedsideError(f"metric {metric!r} needs labels; give them or use 'agreement'")
    before, after = _score(metric, base_out, y), _score(metric, cand_out, y)
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
