"""The publisher's side: a static TUF repository of model versions and the rollout plan.

`repo/metadata/` holds the signed metadata (consistent snapshots: `N.root.json`, `N.targets.json`,
`N.snapshot.json`, and `timestamp.json`), `repo/targets/` the files, each stored under its SHA-256
(`targets/models/<name>/<v>/<sha256>.model.onnx`), so nothing published is ever overwritten and a
box mid-download never sees a file change. Any plain HTTP server can serve the folder.

Keys live in a folder of their own, outside the repository (refused inside it): one PEM per key,
owner-only, and `keys.json` naming each role's keys. Each role has its own keys, threshold and
expiry, as TUF intends: root (offline, rotates the others), targets (what a model version is),
snapshot (which targets metadata is current), timestamp (freshness, re-signed often: `refresh`).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bsdiff4
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    SPECIFICATION_VERSION,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from bedside.errors import InvalidInput
from bedside.security.sealed import write_atomic
from bedside.updates.rollout import PLAN_TARGET, RolloutPlan, check_name

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_DAYS = {"root": 365.0, "targets": 90.0, "snapshot": 7.0, "timestamp": 1.0}
KEYS_FILE = "keys.json"
PUBLIC = 0o644  # metadata and targets: read by whatever web server publishes the folder
DELTA_SUFFIX = ".bsdiff"
# A delta is published only when it saves a fifth or more: a retrain that moves every weight gives a
# delta of ~95 % of the model (bench/update_delta.py), not worth a second file and a patch on the box.
DELTA_WORTH = 0.8
DELTA_BASES = 3  # deltas from this many versions before the new one
SPEC = SPECIFICATION_VERSION


class PublishError(InvalidInput):
    """What the publisher cannot do; the message says why."""


def model_target(name: str, version: int, file: str) -> str:
    return f"models/{name}/{version}/{file}"


def delta_target(name: str, version: int, base: int) -> str:
    return model_target(name, version, f"model.onnx.from-{base}{DELTA_SUFFIX}")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Publisher:
    def __init__(self, repo: Path, keys: Path | None, expiry_days: dict[str, float] | None = None) -> None:
        """`keys`: None to read only (a rollout's status); signing then says a keys folder is needed."""
        self.repo = Path(repo)
        self.keys = Path(keys) if keys is not None else self.repo / ".no-keys-given"
        self.expiry = {**EXPIRY_DAYS, **(expiry_days or {})}
        self.meta = self.repo / "metadata"
        self.files = self.repo / "targets"
        try:
            inside = keys is not None and self.keys.resolve().is_relative_to(self.repo.resolve())
        except OSError:
            inside = False
        if inside:
            raise PublishError("the keys folder must not be inside the repository folder (it would be published)")

    # -- set up ------------------------------------------------------------------------------------

    def init(self, root_keys: int = 1, root_threshold: int = 1) -> None:
        """A new repository: keys for every role, version 1 of each role's metadata."""
        if (self.meta / "root.json").exists():
            raise PublishError("this folder already holds an update repository")
        if not 1 <= root_threshold <= root_keys:
            raise PublishError("the root threshold must be between 1 and the number of root keys")
        self.meta.mkdir(parents=True, exist_ok=True)
        self.files.mkdir(parents=True, exist_ok=True)
        self.keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        root = Root(expires=self._expires("root"), consistent_snapshot=True)
        for role in ROLES:
            for _ in range(root_keys if role == "root" else 1):
                root.add_key(self._new_key(role).public_key, role)
        root.roles["root"].threshold = root_threshold
        self._write_root(Metadata(root))
        self._write_top(Targets(expires=self._expires("targets")), "targets")
        self._publish(None)

    # -- what is published ---------------------------------------------------------------------------

    def targets(self) -> Targets:
        return Metadata[Targets].from_file(str(self.meta / "targets.json")).signed

    def plan(self) -> RolloutPlan:
        info = self.targets().targets.get(PLAN_TARGET)
        return RolloutPlan() if info is None else RolloutPlan.from_json(self._stored(info).read_bytes())

    def versions(self, name: str) -> list[int]:
        prefix = f"models/{name}/"
        found = {int(p.split("/")[2]) for p in self.targets().targets if p.startswith(prefix)}
        return sorted(found)

    def add_version(self, name: str, files: dict[str, bytes]) -> int:
        """Publish `files` (model.onnx, config.toml, MODEL_CARD.md, golden.json) as the next version of
        `name`, with a bsdiff delta from the version before it; returns the new version number."""
        check_name("model", name)
        if "model.onnx" not in files or "golden.json" not in files:
            raise PublishError("a version needs model.onnx and golden.json")
        targets = self.targets()
        published = self.versions(name)
        version = max(published, default=0) + 1
        for file, data in sorted(files.items()):
            self._add(targets, model_target(name, version, file), data)
        for base in published[-DELTA_BASES:]:  # boxes may be behind: a halted version never reached them
            old = self._stored(targets.targets[model_target(name, base, "model.onnx")]).read_bytes()
            delta = bsdiff4.diff(old, files["model.onnx"])
            if len(delta) <= DELTA_WORTH * len(files["model.onnx"]):
                self._add(targets, delta_target(name, version, base), delta)
        self._publish(targets)
        return version

    def set_plan(self, plan: RolloutPlan) -> None:
        targets = self.targets()
        for name, rollout in plan.models.items():
            if rollout.version not in self.versions(name):
                raise PublishError(f"{name} has no published version {rollout.version}")
        self._add(targets, PLAN_TARGET, plan.to_json())
        self._publish(targets)

    def refresh(self) -> None:
        """Sign snapshot and timestamp again with fresh expiry (run it well within a day, e.g. hourly):
        a box refuses metadata past its expiry, so an attacker cannot keep it on old versions."""
        self._publish(None)

    def rotate(self, role: str) -> str:
        """Replace `role`'s keys with a new one; root is signed by the old and the new root keys, so a
        box that trusts the old root follows the chain. Returns the new key id."""
        if role not in ROLES:
            raise PublishError(f"role must be one of {', '.join(ROLES)}")
        root_md = Metadata[Root].from_file(str(self.meta / "root.json"))
        root = root_md.signed
        old_root_signers = self._signers("root")
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        new = self._new_key(role)
        root.add_key(new.public_key, role)
        root.roles[role].threshold = 1
        root.version += 1
        root.expires = self._expires("root")
        self._keep_only(role, new.public_key.keyid)
        extra = old_root_signers if role == "root" else []
        self._write_root(Metadata(root), extra)
        if role == "targets":
            self._publish(self.targets())
        elif role in ("snapshot", "timestamp"):
            self._publish(None)
        return new.public_key.keyid

    # -- signing and writing -----------------------------------------------------------------------

    def _publish(self, targets: Targets | None) -> None:
        """Write targets (if changed), then snapshot, then timestamp: a box reading meanwhile sees the
        old timestamp, which names only metadata already written."""
        if targets is not None:
            targets.version += 1
            targets.expires = self._expires("targets")
            self._write_top(targets, "targets")
        current = self.targets()
        snapshot_md = self._load("snapshot")
        snapshot = Snapshot(expires=self._expires("snapshot")) if snapshot_md is None else snapshot_md.signed
        snapshot.version += 0 if snapshot_md is None else 1
        snapshot.expires = self._expires("snapshot")
        snapshot.meta = {"targets.json": MetaFile(current.version)}
        self._write_top(snapshot, "snapshot")
        timestamp_md = self._load("timestamp")
        timestamp = Timestamp(expires=self._expires("timestamp")) if timestamp_md is None else timestamp_md.signed
        timestamp.version += 0 if timestamp_md is None else 1
        timestamp.expires = self._expires("timestamp")
        timestamp.snapshot_meta = MetaFile(snapshot.version)
        self._write_top(timestamp, "timestamp")

    def _write_top(self, signed: Targets | Snapshot | Timestamp, role: str) -> None:
        md: Metadata[Any] = Metadata(signed)
        for signer in self._signers(role):
            md.sign(signer, append=True)
        raw = md.to_bytes()
        if role != "timestamp":
            write_atomic(self.meta / f"{signed.version}.{role}.json", raw, PUBLIC)
        write_atomic(self.meta / f"{role}.json", raw, PUBLIC)

    def _write_root(self, md: Metadata[Root], extra: list[CryptoSigner] | None = None) -> None:
        for signer in [*(extra or []), *self._signers("root")]:
            md.sign(signer, append=True)
        raw = md.to_bytes()
        write_atomic(self.meta / f"{md.signed.version}.root.json", raw, PUBLIC)
        write_atomic(self.meta / "root.json", raw, PUBLIC)

    def _load(self, role: str) -> Metadata[Any] | None:
        path = self.meta / f"{role}.json"
        return Metadata.from_file(str(path)) if path.exists() else None

    def _add(self, targets: Targets, path: str, data: bytes) -> None:
        info = TargetFile.from_data(path, data, ["sha256"])
        stored = self._stored(info)
        stored.parent.mkdir(parents=True, exist_ok=True)
        if not stored.exists():
            write_atomic(stored, data, PUBLIC)
        targets.targets[path] = info

    def _stored(self, info: TargetFile) -> Path:
        folder, _, base = info.path.rpartition("/")
        return self.files / folder / f"{info.hashes['sha256']}.{base}"

    def _expires(self, role: str) -> datetime:
        return _now() + timedelta(days=self.expiry[role])

    # -- keys ----------------------------------------------------------------------------------------

    def _index(self) -> dict[str, list[str]]:
        path = self.keys / KEYS_FILE
        return {r: list(ids) for r, ids in json.loads(path.read_text()).items()} if path.exists() else {}

    def _new_key(self, role: str) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        keyid = signer.public_key.keyid
        pem = self.keys / f"{keyid}.pem"
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signer.private_bytes)
        index = self._index()
        index.setdefault(role, []).append(keyid)
        write_atomic(self.keys / KEYS_FILE, json.dumps(index, indent=1).encode())
        return signer

    def _keep_only(self, role: str, keyid: str) -> None:
        index = self._index()
        index[role] = [keyid]
        write_atomic(self.keys / KEYS_FILE, json.dumps(index, indent=1).encode())

    def _signers(self, role: str) -> list[CryptoSigner]:
        ids = self._index().get(role, [])
        if not ids:
            raise PublishError(f"no {role} key in the keys folder")
        signers = []
        for keyid in ids:
            try:
                private = load_pem_private_key((self.keys / f"{keyid}.pem").read_bytes(), None)
            except (OSError, ValueError) as exc:
                raise PublishError(f"the {role} key {keyid[:12]} cannot be read ({type(exc).__name__})") from None
            signers.append(CryptoSigner(private))
        return signers
