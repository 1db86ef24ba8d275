"""Atomic installation of a verified version into the model repository.

Versions sit side by side (`<model>/<v>/`). A version folder is written under a hidden name,
every file fsync'd, then renamed into place; the switch of traffic is `serving.json`, replaced whole
(repository/serving.py). Before the first new version of a model lands, the state file is written to
pin what serves now, so the version policy ("latest") never puts an unchecked version on the air after
a restart. A model the box does not have yet is assembled whole under a hidden name, checked there,
and renamed into the repository with its state file inside it. Leftover hidden folders from a power
cut are removed by `recover()`: whatever instant the power went, the box serves the old or the new
version, never a mix.

`checkpoint(step)` is called between the steps, so a test can kill the process at every one of them.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bedside.errors import BedsideError
from bedside.modelconfig.model import CONFIG_FILE
from bedside.repository.serving import SERVING_FILE, ServingState, fsync_dir, fsync_tree, read_state, write_state
from bedside.repository.store import MODEL_FILE, SEALED_FILE, ModelStore
from bedside.security.keys import KeyRing
from bedside.security.sealed import MODEL, seal

INCOMING = ".incoming-"
SHIPPED_CONFIG = "published-config.toml"  # the publisher's config.toml, kept with its version for reference
Checkpoint = Callable[[str], None]


class InstallError(BedsideError):
    status = 409


def _no_checkpoint(step: str) -> None:
    return None


def recover(repository: Path) -> int:
    """Remove what a power cut left half-written (`.incoming-*` folders, state-file temps); returns how many."""
    removed = 0
    if not repository.is_dir():
        return 0
    for parent in [repository, *(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for leftover in parent.glob(INCOMING + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
            removed += 1
        for temp in parent.glob(f".{SERVING_FILE}.*.tmp"):  # a state file write cut short
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


def installed_model(store: ModelStore, name: str, version: int) -> bytes | None:
    """The plain bytes of an installed version's model (decrypted in memory), or None."""
    try:
        _, source = store.model_source(name, version)
        return source if isinstance(source, bytes) else Path(source).read_bytes()
    except (BedsideError, OSError):
        return None


def write_version(
    parent: Path,
    version: int,
    files: dict[str, bytes],
    keys: KeyRing | None,
    checkpoint: Checkpoint = _no_checkpoint,
) -> Path:
    """`parent/<version>/` holding `files` (the model sealed when a key is configured), atomically.
    An existing folder is kept if it holds the same model (an install cut short after its rename),
    refused otherwise."""
    final = parent / str(version)
    model = files["model.onnx"]
    if final.exists():
        have = installed_model(ModelStore(parent.parent, keys), parent.name, version)
        if have is not None and hashlib.sha256(have).digest() == hashlib.sha256(model).digest():
            return final
        raise InstallError(f"{parent.name} v{version} is already on this box with another model; not replaced")
    staging = parent / f"{INCOMING}{version}-{time.time_ns()}"
    staging.mkdir(parents=True)
    checkpoint("staging created")
    if keys is not None:
        (staging / SEALED_FILE).write_bytes(seal(model, keys, MODEL))
    else:
        (staging / MODEL_FILE).write_bytes(model)
    checkpoint("model written")
    for name, data in files.items():
        if name == "model.onnx":
            continue
        (staging / (SHIPPED_CONFIG if name == CONFIG_FILE else name)).write_bytes(data)
    checkpoint("files written")
    fsync_tree(staging)
    checkpoint("files synced")
    staging.rename(final)
    checkpoint("version renamed")
    fsync_dir(parent)
    checkpoint("version durable")
    return final


def discard_version(model_folder: Path, version: int) -> None:
    """Remove a version that will never serve (refused or rolled back; the state file already says
    so): renamed to a hidden name first, so a cut mid-removal leaves a leftover `recover()` deletes,
    never a half version folder that a version policy could load."""
    folder = model_folder / str(version)
    if not folder.exists():
        return
    doomed = model_folder / f"{INCOMING}{version}-discarded-{time.time_ns()}"
    folder.rename(doomed)
    fsync_dir(model_folder)
    shutil.rmtree(doomed, ignore_errors=True)


def adopt(model_folder: Path, serving: int) -> ServingState:
    """The model's state file, written first if it has none, pinning what serves now."""
    state = read_state(model_folder)
    if state is None:
        state = ServingState(version=serving, changed_at=time.time())
        write_state(model_folder, state)
    return state


def new_model_folder(repository: Path, name: str, config: bytes) -> Path:
    """A hidden folder to assemble a model the box does not have yet (config first)."""
    folder = repository / f"{INCOMING}model-{name}-{time.time_ns()}"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_bytes(config)
    return folder


def place_new_model(folder: Path, repository: Path, name: str, version: int, checkpoint: Checkpoint) -> None:
    """Pin the checked version and rename the assembled model folder into the repository."""
    write_state(folder, ServingState(version=version, changed_at=time.time()))
    checkpoint("state written")
    fsync_tree(folder)
    checkpoint("model synced")
    folder.rename(repository / name)
    checkpoint("model renamed")
    fsync_dir(repository)
