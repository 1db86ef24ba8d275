"""Golden checks: inputs shipped with a version and the outputs it must reproduce on the box, within
a tolerance, and the latency it must meet, before it takes any traffic.

`golden.json`: {"atol", "rtol", "latency_ms", "note", "cases": [{"inputs": {name: tensor},
"outputs": {name: tensor}}]}, a tensor being {"datatype", "shape", "data"} (data flat, row-major).
The publisher writes it from the team's own cases, or makes it by running the model on seeded random
inputs (then it says so in "note": it catches a model damaged or mis-run on the box, not a wrong model).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from bedside.errors import InvalidInput
from bedside.modelconfig.model import ModelConfig
from bedside.protocol.datatypes import numpy_dtype

GOLDEN_FILE = "golden.json"
LATENCY_RUNS = 50  # single-case runs timed for the latency bound (after one warm-up pass)
MAX_CASES = 64


class GoldenError(InvalidInput):
    """A golden file that cannot be used; the message says why."""


@dataclass
class GoldenResult:
    passed: bool
    reason: str
    cases: int
    p50_ms: float
    p99_ms: float
    latency_bound_ms: float

    def summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "cases": self.cases,
            "p50_ms": round(self.p50_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
            "latency_bound_ms": self.latency_bound_ms,
        }


def _tensor(array: np.ndarray, datatype: str) -> dict[str, Any]:
    return {"datatype": datatype, "shape": list(array.shape), "data": array.reshape(-1).tolist()}


def _array(doc: dict[str, Any]) -> np.ndarray:
    return np.asarray(doc["data"], dtype=numpy_dtype(str(doc["datatype"]))).reshape([int(d) for d in doc["shape"]])


def make_golden(run: Any, config: ModelConfig, cases: int = 4, seed: int = 0, latency_ms: float | None = None) -> bytes:
    """golden.json from `run(feed) -> {output: array}` on seeded random inputs shaped by the config."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for _ in range(cases):
        feed = {}
        for spec in config.inputs:
            if spec.datatype == "BYTES":
                raise GoldenError(f"input {spec.name} is BYTES: give the golden cases with --golden")
            dims = [d if d > 0 else 1 for d in config.full_shape(spec)]
            if config.max_batch_size > 0:
                dims[0] = 1
            dtype = numpy_dtype(spec.datatype)
            sample = rng.standard_normal(dims) if dtype.kind == "f" else rng.integers(0, 2, dims)
            feed[spec.name] = sample.astype(dtype)
        results = run(feed)
        out.append(
            {
                "inputs": {n: _tensor(a, s.datatype) for (n, a), s in zip(feed.items(), config.inputs, strict=True)},
                "outputs": {n: _tensor(np.asarray(a), _datatype(np.asarray(a))) for n, a in results.items()},
            }
        )
    doc: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-3, "note": "outputs of this model at publication", "cases": out}
    if latency_ms is not None:
        doc["latency_ms"] = latency_ms
    return json.dumps(doc).encode()


def _datatype(array: np.ndarray) -> str:
    names = {"f": "FP", "i": "INT", "u": "UINT"}
    if array.dtype == np.bool_:
        return "BOOL"
    if array.dtype.kind in names:
        return f"{names[array.dtype.kind]}{array.dtype.itemsize * 8}"
    raise GoldenError(f"an output of type {array.dtype} cannot be a golden output")


def parse_golden(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        cases = doc["cases"]
        if not isinstance(cases, list) or not 0 < len(cases) <= MAX_CASES:
            raise GoldenError(f"golden.json needs 1-{MAX_CASES} cases")
        for case in cases:
            {n: _array(t) for n, t in case["inputs"].items()}
            {n: _array(t) for n, t in case["outputs"].items()}
        float(doc.get("atol", 1e-4)), float(doc.get("rtol", 1e-3))
        return dict(doc)
    except GoldenError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise GoldenError(f"golden.json is not valid: {type(exc).__name__}") from None


def check_golden(run: Any, golden: dict[str, Any], default_latency_ms: float) -> GoldenResult:
    """Run every case, compare each output, then time single-case runs against the latency bound."""
    atol, rtol = float(golden.get("atol", 1e-4)), float(golden.get("rtol", 1e-3))
    bound = float(golden.get("latency_ms", default_latency_ms))
    cases = [
        ({n: _array(t) for n, t in c["inputs"].items()}, {n: _array(t) for n, t in c["outputs"].items()})
        for c in golden["cases"]
    ]
    for i, (feed, expected) in enumerate(cases):
        try:
            got = run(feed)
        except Exception as exc:  # the model raising on its own golden input is a failed check
            return GoldenResult(False, f"case {i}: the model failed ({type(exc).__name__})", len(cases), 0, 0, bound)
        for name, want in expected.items():
            have = got.get(name)
            if have is None:
                return GoldenResult(False, f"case {i}: no output {name}", len(cases), 0, 0, bound)
            have = np.asarray(have)
            if have.shape != want.shape:
                return GoldenResult(False, f"case {i}: {name} has shape {list(have.shape)}", len(cases), 0, 0, bound)
            if not np.allclose(have, want, atol=atol, rtol=rtol, equal_nan=False):
                worst = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
                why = f"case {i}: {name} differs from the golden output by up to {worst:.3g} (atol {atol}, rtol {rtol})"
                return GoldenResult(False, why, len(cases), 0, 0, bound)
    times = []
    for k in range(LATENCY_RUNS):
        feed = cases[k % len(cases)][0]
        start = time.perf_counter_ns()
        run(feed)
        times.append((time.perf_counter_ns() - start) / 1e6)
    p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
    if p99 > bound:
        return GoldenResult(
            False, f"p99 latency {p99:.3f} ms is over the bound {bound:g} ms", len(cases), p50, p99, bound
        )
    return GoldenResult(True, "", len(cases), p50, p99, bound)


def check_offline(model: bytes, golden: dict[str, Any], default_latency_ms: float) -> GoldenResult:
    """The golden check outside a server (`bedside update`, or a model new on this box)."""
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own errors for a graph it cannot load
        return GoldenResult(False, f"does not load ({type(exc).__name__})", 0, 0, 0, 0)
    names = [o.name for o in session.get_outputs()]
    return check_golden(lambda feed: dict(zip(names, session.run(None, feed), strict=True)), golden, default_latency_ms)
