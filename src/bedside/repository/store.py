"""The on-disk layout: `ROOT/<model>/config.toml` and `ROOT/<model>/<version>/model.onnx`, or
`model.onnx.enc` for a model encrypted at rest (bedside.security.sealed), decrypted into memory
only when it loads, with the key ring the store is given."""

from __future__ import annotations

from pathlib import Path

from bedside.errors import ModelLoadError, model_not_found
from bedside.modelconfig.model import CONFIG_FILE, GRAPH_FILE, ModelConfig, load_config
from bedside.security.keys import KeyProviderError, KeyRing
from bedside.security.sealed import MODEL, SUFFIX, SealedError, open_sealed

MODEL_FILE = "model.onnx"
SEALED_FILE = MODEL_FILE + SUFFIX
NAME_MAX = 255  # bytes in one file name on Linux file systems


class ModelStore:
    def __init__(self, root: Path, keys: KeyRing | None = None, only: frozenset[str] | None = None) -> None:
        self.root = Path(root)
        self.keys = keys  # None: no key configured, so an encrypted model is refused with that reason
        self.only = only  # the folders this store serves (a cluster replica's share); None: all of them

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and not (p / GRAPH_FILE).is_file()
            and (self.only is None or p.name in self.only)
        )

    def folder(self, name: str) -> Path:
        # A name must never climb out of the repository ("../etc"), nor reach the file system with
        # what it cannot take (a NUL, more than NAME_MAX bytes: ENAMETOOLONG was a 500).
        too_long = len(name.encode(errors="replace")) > NAME_MAX
        if "/" in name or "\\" in name or "\x00" in name or name in ("", ".", "..") or too_long:
            raise model_not_found(name)
        path = self.root / name
        try:
            found = path.is_dir()
        except (OSError, ValueError):
            found = False
        if not found:
            raise model_not_found(name)
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
        """model.onnx, else model.onnx.enc; ModelLoadError for neither, or both (which one is meant?)."""
        folder = self.folder(name) / str(version)
        plain, sealed = folder / MODEL_FILE, folder / SEALED_FILE
        if plain.is_file() and sealed.is_file():
            raise ModelLoadError(
                f"version {version} has both {MODEL_FILE} and {SEALED_FILE} ({name}/{version}/): "
                "ambiguous, remove the one that is not meant to be served"
            )
        if sealed.is_file():
            return sealed
        if not plain.is_file():
            raise ModelLoadError(f"version {version} has no {MODEL_FILE} ({name}/{version}/{MODEL_FILE})")
        return plain

    def model_source(self, name: str, version: int) -> tuple[Path, Path | bytes]:
        """(file, what ONNX Runtime loads): the path of a plain model (its external data files sit
        beside it), the decrypted bytes of an encrypted one, never written to disk. ModelLoadError
        saying why an encrypted model does not open: no key, a wrong key, altered or damaged."""
        path = self.model_file(name, version)
        if path.name != SEALED_FILE:
            return path, path
        where = f"{name}/{version}/{SEALED_FILE}"
        if self.keys is None:
            raise ModelLoadError(f"{where} is encrypted and no key is configured (security.key)")
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
        try:
            return path, open_sealed(blob, self.keys, MODEL)
        except (SealedError, KeyProviderError) as exc:
            raise ModelLoadError(f"{where} {exc}" if isinstance(exc, SealedError) else str(exc)) from None
