"""Write an ONNX model into a model repository as a new version, atomically.

The version folder is assembled under a temporary name and renamed into place, so a server that
scans or loads the repository meanwhile never sees half a model. The model's config is inferred
from the graph on first publication and checked against the graph on every later one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort
import tomli_w

from bedside.errors import ModelLoadError
from bedside.modelconfig.graph import check_against_graph, infer_config
from bedside.modelconfig.model import CONFIG_FILE, load_config, parse_config
from bedside.repository.store import MODEL_FILE
from bedside.runtime.session import graph_io


def publish(
    repository: Path,
    name: str,
    model_bytes: bytes,
    description: str = "",
    card: str | None = None,
    report: dict[str, Any] | None = None,
    max_batch_size: int | None = None,
    contract: dict[str, Any] | None = None,
) -> Path:
    folder = Path(repository) / name
    folder.mkdir(parents=True, exist_ok=True)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inputs, outputs = graph_io(session)
    config_path = folder / CONFIG_FILE
    if config_path.exists():
        check_against_graph(load_config(config_path, name), inputs, outputs)
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
        if card is not None:
            (folder / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        target = folder / str(version)
        if target.exists():
            raise ModelLoadError(f"version {version} of {name!r} appeared while publishing; try again")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder / str(version)
