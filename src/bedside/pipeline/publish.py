"""Write an ONNX model into a model repository as a new version, atomically.

The version folder is assembled under a temporary name and renamed into place, so a server that
scans or loads the repository meanwhile never sees half a model. The model's config is inferred
from the graph on first publication and checked against the graph on every later one. Given a
`provenance`, the model is stamped with it (pipeline/provenance.py) before it is written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import tomli_w

from bedside.errors import InvalidInput, ModelLoadError
from bedside.modelconfig.graph import check_against_graph, infer_config
from bedside.modelconfig.model import CONFIG_FILE, load_config, parse_config
from bedside.pipeline import provenance as prov
from bedside.repository.store import MODEL_FILE
from bedside.runtime.session import graph_io


class ConfigMismatch(ModelLoadError, InvalidInput):
    """The model does not fit the config.toml of the model it is published under."""


def publish(
    repository: Path,
    name: str,
    model_bytes: bytes,
    description: str = "",
    card: str | Callable[[int], str] | None = None,
    report: dict[str, Any] | None = None,
    max_batch_size: int | None = None,
    contract: dict[str, Any] | None = None,
    provenance: str | None = None,
    provenance_note: str | None = None,
) -> Path:
    """Publish `model_bytes` as the next version of `name`; return the version folder.

    `provenance` (trained, synthetic or untrained) and its one-line note are stamped into the model
    (None: the bytes are written as given, with whatever stamp they carry). `card` is written as the
    model's MODEL_CARD.md: text, or a function of the new version number that returns it."""
    if provenance is not None:
        model_bytes = prov.stamp(model_bytes, provenance, provenance_note)
    folder = Path(repository) / name
    folder.mkdir(parents=True, exist_ok=True)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inputs, outputs = graph_io(session)
    config_path = folder / CONFIG_FILE
    if config_path.exists():
        try:
            check_against_graph(load_config(config_path, name), inputs, outputs)
        except ModelLoadError as exc:
            raise ConfigMismatch(
                f"this model does not fit {name}'s existing config ({exc.message}); publish it under another name, "
                f"or remove {config_path} if {name} really changed"
            ) from None
    else:
        config = infer_config(name, inputs, outputs)
        doc = {k: v for k, v in config.to_dict().items() if k in ("name", "max_batch_size", "inputs", "outputs")}
        doc["description"] = description or f"{name}, exported by bedside"
        if max_batch_size is not None and config.max_batch_size:
            doc["max_batch_size"] = max_batch_size
        if contract:
            doc["contract"] = contract
            parse_config(doc, name, folder)  # a contract that does not fit the graph is refused here
        config_path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    versions = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    version = max(versions, default=0) + 1
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=folder))
    try:
        (staging / MODEL_FILE).write_bytes(model_bytes)
        if report is not None:
            (staging / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        target = folder / str(version)
        if target.exists():
            raise ModelLoadError(f"version {version} of {name!r} appeared while publishing; try again")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if card is not None:  # the card describes a version that exists
        text = card(version) if callable(card) else card
        (folder / "MODEL_CARD.md").write_text(text, encoding="utf-8")
    return folder / str(version)
