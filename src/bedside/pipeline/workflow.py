"""Repository-level steps: export a model into a repository, optimize a published version behind
the accuracy gate. The optimized model becomes a new version only if the gate passes; otherwise the
refusal and its report are saved beside the model and nothing is published.

Every version either step writes carries its provenance (pipeline/provenance.py): an export says
where its weights came from; an optimized version inherits its source version's."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bedside.errors import InvalidInput, NotFound
from bedside.pipeline import card as cards
from bedside.pipeline import gate
from bedside.pipeline import provenance as prov
from bedside.pipeline.data import match_inputs
from bedside.pipeline.export import RTOL, TOLERANCE, ExportResult, export_model
from bedside.pipeline.optimize import METHODS, NotApplicable, optimize_file, reduced_precision, why_not
from bedside.pipeline.publish import publish
from bedside.repository.store import SEALED_FILE, ModelStore


def export_to_repository(
    repository: Path,
    name: str,
    model: Any,
    sample: Any,
    description: str = "",
    contract: dict[str, Any] | None = None,
    provenance: str = "trained",
    provenance_note: str | None = None,
    card: str | None = None,
    source: str = "",
    **kwargs: Any,
) -> tuple[Path, ExportResult]:
    """Export, check and publish, stamped with `provenance` (trained, synthetic or untrained: where
    the weights came from; the caller knows, bedside cannot tell). `contract` ([contract] of
    config.toml) is written with a new config. `card` is the model card; without one, a short card
    (provenance, framework, inputs and outputs, numerical check) is written unless the model already
    has a card that bedside did not write. `source` names the model in that card (e.g. the file)."""
    prov.check(provenance, provenance_note)
    result = export_model(model, sample, **kwargs)
    report = {"framework": result.framework, "max_abs_diff": result.max_abs_diff, "provenance": provenance}
    written: Any = card
    if card is None and cards.replaceable(Path(repository) / name):
        rows = len(sample) if not isinstance(sample, dict) else len(next(iter(sample.values())))

        def written(version: int) -> str:
            return cards.export_card(
                name,
                version,
                result.model,
                result.framework,
                source or type(model).__name__,
                result.max_abs_diff,
                rows,
                kwargs.get("tolerance", TOLERANCE),
                kwargs.get("rtol", RTOL),
                provenance,
                provenance_note,
            )

    path = publish(
        repository,
        name,
        result.to_bytes(),
        description=description,
        report=report,
        contract=contract,
        card=written,
        provenance=provenance,
        provenance_note=provenance_note,
    )
    return path, result


def _fp32_version(store: ModelStore, name: str, versions: list[int]) -> int | None:
    """The latest version at full precision (not INT8, not FP16)."""
    for v in reversed(versions):
        if store.model_file(name, v).name == SEALED_FILE:
            continue  # cannot be optimized as it is (see optimize_version)
        if not reduced_precision(onnx.load(str(store.model_file(name, v)), load_external_data=False)):
            return v
    return None


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

    Refused before any work (InvalidInput): an unknown method or metric, a method that cannot help
    this model (already INT8 or FP16; a tree ensemble and INT8 or FP16), a labelled metric on an untrained
    version (only agreement means anything there), data that does not fit the model's inputs.
    Raises gate.AccuracyGateFailed (with the report, also written to <model>/refused/) when the
    optimized model is not good enough."""
    if method not in METHODS:
        raise NotApplicable(f"unknown optimization {method!r}; choose one of {', '.join(METHODS)}")
    if metric not in gate.METRICS:
        raise InvalidInput(f"unknown metric {metric!r}; choose one of {', '.join(gate.METRICS)}")
    store = ModelStore(repository)
    versions = store.versions(name)
    if not versions:
        raise NotFound(f"model {name!r} has no versions in {repository}")
    if version is not None and version not in versions:
        raise NotFound(f"model {name!r} has no version {version}; its versions: {', '.join(map(str, versions))}")
    number = version or versions[-1]
    source = store.model_file(name, number)
    if source.name == SEALED_FILE:
        raise NotApplicable(
            f"model {name} version {number} is encrypted ({SEALED_FILE}): optimize a plain model, "
            "then bedside encrypt the result"
        )
    model = onnx.load(str(source), load_external_data=False)
    provenance, note = prov.of(model)
    lowered = reduced_precision(model)
    if lowered and method != "graph":
        fp32 = _fp32_version(store, name, versions)
        fix = f"optimize the FP32 version with --version {fp32}" if fp32 else "export the FP32 model again first"
        raise NotApplicable(f"version {number} of {name} is already {lowered}; {fix}")
    refusal = why_not(model, method)
    if refusal:
        raise NotApplicable(f"{method} does not apply to version {number} of {name}: {refusal}")
    del model
    if provenance == "untrained" and metric != "agreement":
        raise InvalidInput(
            f"version {number} of {name} is UNTRAINED (random weights): its {metric} means nothing, and a gate on "
            "it would pass or refuse by chance; only --metric agreement (the optimized model gives the same "
            "answers as this one) is meaningful there"
        )
    inputs = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()
    eval_x = match_inputs(inputs, eval_x, "the held-out data (--eval)", eval_y)
    if method == "int8-static":
        if not calibration:
            raise NotApplicable(
                "int8-static needs calibration data (--calibration FILE.npz): a few hundred representative "
                f"inputs, one array per model input ({', '.join(i.name for i in inputs)})"
            )
        calibration = match_inputs(inputs, calibration, "the calibration data (--calibration)", labelled=False)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = optimize_file(source, Path(tmp) / "model.onnx", method, calibration)
        report = gate.check(source, candidate, eval_x, eval_y, metric, tolerance_pp, method)
        doc = {**report.to_dict(), "source": str(source.relative_to(repository)), "provenance": provenance}
        if not report.passed:
            refused = store.folder(name) / "refused"
            refused.mkdir(exist_ok=True)
            (refused / f"{method}-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(doc, indent=2))
            raise gate.AccuracyGateFailed(report)
        # the optimized version has the source's weights, so the source's provenance (none if unstamped)
        path = publish(
            repository, name, candidate.read_bytes(), report=doc, provenance=provenance, provenance_note=note
        )
        return path, report
