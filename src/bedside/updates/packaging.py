"""What a published version holds, read from a version folder of a model repository: the model
(plain: each box encrypts at rest with its own key), the model's config.toml, its model card, and
golden checks (the team's own, or made here by running the model on seeded random inputs)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import onnxruntime as ort

from bedside.modelconfig.model import CONFIG_FILE, parse_config
from bedside.repository.store import MODEL_FILE, SEALED_FILE
from bedside.updates.golden import GOLDEN_FILE, make_golden, parse_golden
from bedside.updates.publisher import PublishError

CARD_FILE = "MODEL_CARD.md"


def version_files(folder: Path, golden: Path | None = None, latency_ms: float | None = None) -> dict[str, bytes]:
    folder = Path(folder)
    if not folder.is_dir() or not folder.name.isdigit():
        raise PublishError("give a version folder of a model repository, e.g. models/sepsis/3")
    if (folder / SEALED_FILE).exists() and not (folder / MODEL_FILE).exists():
        raise PublishError("this version is encrypted at rest; publish the plain model (each box seals its own copy)")
    if not (folder / MODEL_FILE).is_file():
        raise PublishError(f"the version folder has no {MODEL_FILE}")
    config_path = folder.parent / CONFIG_FILE
    if not config_path.is_file():
        raise PublishError(f"the model folder has no {CONFIG_FILE}; a box new to the model needs it")
    files = {MODEL_FILE: (folder / MODEL_FILE).read_bytes(), CONFIG_FILE: config_path.read_bytes()}
    for card in (folder / CARD_FILE, folder.parent / CARD_FILE):
        if card.is_file():
            files[CARD_FILE] = card.read_bytes()
            break
    source = golden or (folder / GOLDEN_FILE if (folder / GOLDEN_FILE).is_file() else None)
    if source is not None:
        doc = parse_golden(source.read_bytes())
    else:
        config = parse_config(tomllib.loads(files[CONFIG_FILE].decode()), folder.parent.name, folder.parent)
        session = ort.InferenceSession(files[MODEL_FILE], providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        made = make_golden(lambda feed: dict(zip(names, session.run(None, feed), strict=True)), config)
        doc = parse_golden(made)
    if latency_ms is not None:
        doc["latency_ms"] = latency_ms
    files[GOLDEN_FILE] = json.dumps(doc).encode()
    return files
