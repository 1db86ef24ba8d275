"""Which version of a model answers, when an update agent manages it: `ROOT/<model>/serving.json`.

The file is the one switch of an update. It is replaced whole (written beside, fsync'd, renamed over,
the folder fsync'd), so after a power cut it names either the old version or the new one. Version
folders only appear by a rename of a complete, fsync'd folder (updates/install.py), so the version it
names is always whole. A model without the file is served as its version policy says.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bedside.security.sealed import write_atomic

SERVING_FILE = "serving.json"
REFUSED_MAX = 64  # versions remembered as refused per model; the oldest are forgotten first


@dataclass
class ServingState:
    version: int  # answers requests that name no version
    previous: int | None = None  # kept on disk and loaded while `version` is watched: the rollback target
    phase: str = "serving"  # serving | watching (the new version takes traffic under watch)
    watch_until: float = 0.0  # wall clock (s) when the watch ends
    refused: dict[str, str] = field(default_factory=dict)  # version -> why it was refused or rolled back
    changed_at: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServingState:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), int) or doc["version"] < 1:
            raise ValueError("no positive integer 'version'")
        previous = doc.get("previous")
        return cls(
            version=doc["version"],
            previous=previous if isinstance(previous, int) and previous > 0 else None,
            phase=str(doc.get("phase", "serving")),
            watch_until=float(doc.get("watch_until", 0.0)),
            refused={str(k): str(v) for k, v in dict(doc.get("refused", {})).items()},
            changed_at=float(doc.get("changed_at", 0.0)),
        )

    def refuse(self, version: int, reason: str) -> None:
        self.refused[str(version)] = reason[:300]
        while len(self.refused) > REFUSED_MAX:
            self.refused.pop(next(iter(self.refused)))


def read_state(model_folder: Path) -> ServingState | None:
    """The model's serving state, or None when it has none (or it cannot be read: a damaged file must
    not stop the model from serving; the version policy decides, as before any update)."""
    try:
        return ServingState.from_json((model_folder / SERVING_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None


def write_state(model_folder: Path, state: ServingState) -> None:
    """Replace the state file atomically and durably (security.sealed's writer: temp file, fsync,
    rename, folder fsync)."""
    write_atomic(model_folder / SERVING_FILE, state.to_json())


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in `folder` (one level) and the folder itself, before it is renamed into place."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)
