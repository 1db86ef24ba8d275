"""Drift of a model's inputs and output on the box, against the training reference its version ships.

`drift_reference.json` (in the version folder) holds, per input feature and for the score, the bin
edges of the training data (deciles) and the training counts in each bin. The box keeps the last
`limits.drift_window` input rows and scores in memory (a ring, copied in by the worker after each
batch, ~1 µs; never written, logged or exported) and, when statistics are asked for, bins them
with the same edges and compares: the population stability index (PSI) and the two-sample
Kolmogorov-Smirnov distance over the bins. Only these figures leave the box, never a value.

State per feature: `stable` (PSI < 0.1), `watch` (0.1-0.25), `drift` (PSI >= 0.25, or a KS distance
beyond its 1 % critical value), `insufficient` below MIN_ROWS live rows.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

REFERENCE_FILE = "drift_reference.json"
BINS = 10
MIN_ROWS = 100  # live rows before a state other than "insufficient"
PSI_WATCH, PSI_DRIFT = 0.1, 0.25
KS_ALPHA_1PCT = 1.628  # c(alpha) of the two-sample KS test at alpha = 0.01
EPSILON = 1e-4  # an empty bin's share, so the PSI stays finite


class DriftReferenceError(ValueError):
    """A drift reference that cannot be used; the message says why."""


@dataclass(frozen=True)
class Reference:
    input: str
    features: tuple[str, ...]
    edges: tuple[np.ndarray, ...]  # inner bin edges per feature
    counts: tuple[np.ndarray, ...]  # training rows per bin per feature
    score_output: str | None
    score_column: int
    score_edges: np.ndarray | None
    score_counts: np.ndarray | None
    rows: int


def make_reference(
    x: np.ndarray,
    input_name: str,
    feature_names: list[str] | None = None,
    scores: np.ndarray | None = None,
    score_output: str | None = None,
    score_column: int = -1,
) -> bytes:
    """drift_reference.json from training inputs `x` [rows, features] and their scores [rows]."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    names = feature_names or [f"{input_name}[{i}]" for i in range(x.shape[1])]
    doc: dict[str, Any] = {"input": input_name, "rows": len(x), "features": []}
    for j, name in enumerate(names):
        edges, counts = _binned(x[:, j])
        doc["features"].append({"name": str(name), "edges": edges, "counts": counts})
    if scores is not None and score_output is not None:
        edges, counts = _binned(np.asarray(scores, dtype=np.float64))
        doc["score"] = {"output": score_output, "column": score_column, "edges": edges, "counts": counts}
    return json.dumps(doc).encode()


def _binned(values: np.ndarray) -> tuple[list[float], list[int]]:
    edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    return [float(e) for e in edges], [int(c) for c in counts]


def parse_reference(raw: bytes) -> Reference:
    try:
        doc = json.loads(raw)
        features = doc["features"]
        edges = tuple(np.asarray(f["edges"], dtype=np.float64) for f in features)
        counts = tuple(np.asarray(f["counts"], dtype=np.float64) for f in features)
        if not features or any(len(c) != len(e) + 1 or c.sum() <= 0 for e, c in zip(edges, counts, strict=True)):
            raise DriftReferenceError("each feature needs its edges and one more count than edges")
        score = doc.get("score")
        return Reference(
            str(doc["input"]),
            tuple(str(f["name"]) for f in features),
            edges,
            counts,
            None if score is None else str(score["output"]),
            -1 if score is None else int(score.get("column", -1)),
            None if score is None else np.asarray(score["edges"], dtype=np.float64),
            None if score is None else np.asarray(score["counts"], dtype=np.float64),
            int(doc.get("rows", 0)),
        )
    except DriftReferenceError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DriftReferenceError(f"{REFERENCE_FILE} is not valid: {type(exc).__name__}") from None


class DriftMonitor:
    """The live window of one model version and its comparison with the reference."""

    def __init__(self, reference: Reference, window: int) -> None:
        self.reference = reference
        self._x = np.zeros((window, len(reference.features)), dtype=np.float64)
        self._score = np.zeros(window, dtype=np.float64)
        self._next = 0
        self.seen = 0
        self._lock = threading.Lock()  # a worker writes while a scrape reads; both are short

    def observe(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Copy a batch's feature rows (and scores) into the ring; rows of another shape are skipped.
        The common case is two slice copies (~2 µs a batch); only a wrap or a huge batch loops."""
        ref = self.reference
        x = inputs.get(ref.input)
        if x is None or x.ndim == 0 or x.dtype.kind not in "fiu":
            return
        rows = x if x.ndim == 2 else x.reshape(len(x), -1)
        k, size = len(rows), len(self._x)
        if rows.shape[1] != self._x.shape[1] or k == 0:
            return
        score = None
        out = outputs.get(ref.score_output) if ref.score_output is not None else None
        if out is not None and len(out) == k:
            score = out[:, ref.score_column] if out.ndim == 2 else out.reshape(k, -1)[:, ref.score_column]
        with self._lock:
            start = self._next
            if start + k <= size:
                self._x[start : start + k] = rows
                if score is not None:
                    self._score[start : start + k] = score
            else:  # wraps, or more rows than the window: the last `size` rows, in order
                idx = (start + np.arange(k)) % size
                keep = slice(max(0, k - size), k)
                self._x[idx[keep]] = rows[keep]
                if score is not None:
                    self._score[idx[keep]] = score[keep]
            self._next = (start + k) % size
            self.seen += k

    def summary(self) -> dict[str, Any]:
        ref = self.reference
        with self._lock:
            n = min(self.seen, len(self._x))
            x = self._x[:n].copy()
            score = self._score[:n].copy()
        features = {name: _compare(x[:, j], ref.edges[j], ref.counts[j], ref.rows, n)
                    for j, name in enumerate(ref.features)}  # fmt: skip
        out: dict[str, Any] = {"window_rows": n, "reference_rows": ref.rows, "features": features}
        if ref.score_edges is not None and ref.score_counts is not None:
            out["score"] = _compare(score, ref.score_edges, ref.score_counts, ref.rows, n)
        states = [f["state"] for f in features.values()] + ([out["score"]["state"]] if "score" in out else [])
        out["state"] = next((s for s in ("drift", "watch", "stable") if s in states), "insufficient")
        out["drifted"] = sorted(k for k, f in features.items() if f["state"] == "drift")
        return out


def _compare(values: np.ndarray, edges: np.ndarray, ref_counts: np.ndarray, ref_rows: int, n: int) -> dict[str, Any]:
    if n < MIN_ROWS:
        return {"psi": None, "ks": None, "state": "insufficient"}
    live = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1).astype(np.float64)
    p = np.maximum(live / live.sum(), EPSILON)
    q = np.maximum(ref_counts / ref_counts.sum(), EPSILON)
    psi = float(np.sum((p - q) * np.log(p / q)))
    ks = float(np.max(np.abs(np.cumsum(live / live.sum()) - np.cumsum(ref_counts / ref_counts.sum()))))
    m = max(ref_rows, 1)
    critical = KS_ALPHA_1PCT * math.sqrt((n + m) / (n * m))
    state = "drift" if psi >= PSI_DRIFT or ks > critical else "watch" if psi >= PSI_WATCH else "stable"
    return {
        "psi": round(psi, 4),
        "ks": round(ks, 4),
        "ks_critical": round(critical, 4),
        "state": state,
        "bins": [int(c) for c in live],  # live rows per training decile: a histogram, never a value
    }
