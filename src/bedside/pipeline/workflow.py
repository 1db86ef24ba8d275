"""Repository-level steps: export a model into a repository, optimize a published version behind
the accuracy gate. The optimized model becomes a new version only if the gate passes; otherwise the
refusal and its report are saved beside the model and nothing is published."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bedside.errors import NotFound
from bedside.pipeline import gate
from bedside.pipeline.export import ExportResult, export_model
from bedside.pipeline.optimize import optimize_file
from bedside.pipeline.publish import publish
from bedside.repository.store import ModelStore


def export_to_repository(
    repository: Path,
    name: str,
    model: Any,
    sample: Any,
    description: str = "",
    contract: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Path, ExportResult]:
    """Export, check and publish; `contract` ([contract] of config.toml) is written with a new config."""
    result = export_model(model, sample, **kwargs)
    report = {"framework": result.framework, "max_abs_diff": result.max_abs_diff}
    path = publish(repository, name, result.to_bytes(), description=description, report=report, contract=contract)
    return path, result


def optimize_version(
    repository: Path,
    name: str,
    method: str,
    eval_x: dict[str, np.ndarray],
    eval_y: np.ndarray | None,
    metric: str = "auroc",
    tolerance_pp: float = 1.0,
    calibration: dict[str, np.ndarray] | None = None,
    version: int | None = None,
) -> tuple[Path, gate.GateReport]:
    """Optimize `name` (its latest version unless given); publish as a new version if the gate passes.

    Raises gate.AccuracyGateFailed (with the report, also written to <model>/refused/) otherwise."""
    store = ModelStore(repository)
    versions = store.versions(name)
    if not versions:
        raise NotFound(f"model {name!r} has no versions in {repository}")
    source = store.model_file(name, version or versions[-1])
    with tempfile.TemporaryDirectory() as tmp:
        candidate = optimize_file(source, Path(tmp) / "model.onnx", method, calibration)
        report = gate.check(source, candidate, eval_x, eval_y, metric, tolerance_pp, method)
        doc = {**report.to_dict(), "source": str(source.relative_to(repository))}
        if not report.passed:
            refused = store.folder(name) / "refused"
            refused.mkdir(exist_ok=True)
            (refused / f"{method}-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(doc, indent=2))
            raise gate.AccuracyGateFailed(report)
        return publish(repository, name, candidate.read_bytes(), report=doc), report
