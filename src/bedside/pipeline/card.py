"""The short model card `bedside export` writes when a model has none: provenance first, in bold,
then the framework, the inputs and outputs and the numerical check. A card someone wrote by hand
(one without MARKER) is never replaced."""

from __future__ import annotations

from pathlib import Path

import onnx

from bedside.pipeline import provenance as prov

CARD_FILE = "MODEL_CARD.md"
# ONNX element types as config.toml and the protocol name them
DATATYPES = {"FLOAT": "FP32", "DOUBLE": "FP64", "FLOAT16": "FP16", "STRING": "BYTES"}
MARKER = "<!-- written by bedside export: replace this file with your own card and bedside leaves it alone -->"


def replaceable(folder: Path) -> bool:
    """No card yet, or one bedside wrote (and may rewrite for the new version)."""
    path = folder / CARD_FILE
    if not path.exists():
        return True
    try:
        return path.read_text(encoding="utf-8").startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def _tensors(values: list[onnx.ValueInfoProto]) -> list[str]:
    lines = []
    for value in values:
        kind = value.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(kind.elem_type) if kind.elem_type else "?"
        dtype = DATATYPES.get(dtype, dtype)
        dims = [
            d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "batch" if i == 0 else "?")
            for i, d in enumerate(kind.shape.dim)
        ]
        lines.append(f"- `{value.name}`: {dtype} [{', '.join(dims)}]")
    return lines


def export_card(
    name: str,
    version: int,
    model: onnx.ModelProto,
    framework: str,
    source: str,
    max_abs_diff: dict[str, float],
    rows: int,
    tolerance: float,
    rtol: float,
    provenance: str,
    note: str | None = None,
) -> str:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    check = ", ".join(f"`{k}` {v:.2g}" for k, v in max_abs_diff.items()) or "no outputs compared"
    return "\n".join(
        [
            MARKER,
            f"# {name} (version {version})",
            "",
            prov.card_line(provenance, note),
            "",
            "## Model",
            f"Framework: {framework}. Source: {source}. Exported to ONNX"
            + (f" (opset {opset})" if opset else "")
            + " by `bedside export`.",
            "",
            "## Inputs",
            *_tensors(list(model.graph.input)),
            "",
            "## Outputs",
            *_tensors(list(model.graph.output)),
            "",
            "## Numerical check",
            f"ONNX Runtime vs the source model on the {rows}-row sample, max |difference| per output: {check} "
            f"(allowed: {tolerance:g} + {rtol:g} x |source value|): passed.",
            "",
            "## Intended use",
            "Not stated: replace this card with one that gives the data, the validation and the intended use.",
            "",
        ]
    )
