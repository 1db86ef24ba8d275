"""The on-disk layout: `ROOT/<model>/config.toml` and `ROOT/<model>/<version>/model.onnx`."""

from __future__ import annotations

from pathlib import Path

from bedside.errors import ModelLoadError, NotFound
from bedside.modelconfig.model import CONFIG_FILE, ModelConfig, load_config

MODEL_FILE = "model.onnx"
NAME_MAX = 255  # bytes in one file name on Linux file systems


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def folder(self, name: str) -> Path:
        # A name must never climb out of the repository ("../etc"), nor reach the file system with
        # what it cannot take (a NUL, more than NAME_MAX bytes: ENAMETOOLONG was a 500).
        too_long = len(name.encode(errors="replace")) > NAME_MAX
        if "/" in name or "\\" in name or "\x00" in name or name in ("", ".", "..") or too_long:
            raise NotFound(f"model {name[:64]!r} is not in the repository")
        path = self.root / name
        try:
            found = path.is_dir()
        except (OSError, ValueError):
            found = False
        if not found:
            raise NotFound(f"model {name[:64]!r} is not in the repository")
        return path

    def config(self, name: str) -> ModelConfig | None:
        path = self.folder(name) / CONFIG_FILE
        return load_config(path, name) if path.exists() else None

    def versions(self, name: str) -> list[int]:
        return sorted(
            int(p.name)
            for p in self.folder(name).iterdir()
            if p.is_dir() and p.name.isascii() and p.name.isdigit() and int(p.name) > 0
        )

    def model_file(self, name: str, version: int) -> Path:
        path = self.folder(name) / str(version) / MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(f"version {version} has no {MODEL_FILE} ({name}/{version}/{MODEL_FILE})")
        return path
