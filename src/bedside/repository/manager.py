"""Load, reload and unload models from the store, keeping a readable state per model version.

A model that fails (bad config, missing or corrupt file, graph mismatch) is marked UNAVAILABLE with
the reason, and every other model keeps serving. A reload that fails keeps the versions that were
already serving, so a bad push never takes a working model off the air.

A model whose folder has a serving state (repository/serving.py, written by the update agent) loads
the version it names, and while a new version is watched, the one before it too; `stage`, `promote`
and `retire` let the agent bring a version in beside the serving one and switch traffic to it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from bedside.errors import BedsideError, ModelLoadError, model_not_found
from bedside.modelconfig.graph import check_against_graph, infer_config
from bedside.modelconfig.model import ModelConfig
from bedside.monitoring.drift import REFERENCE_FILE, DriftMonitor, DriftReferenceError, parse_reference
from bedside.monitoring.latency import MAX_TENANTS, ModelStats
from bedside.repository.serving import ServingState, read_state
from bedside.repository.store import ModelStore
from bedside.runtime.session import OnnxModel, graph_io, open_session
from bedside.settings import DEFAULTS

log = logging.getLogger("bedside.repository")


class State(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


@dataclass
class VersionStatus:
    version: int
    state: State
    reason: str = ""
    model: OnnxModel | None = None
    stats: ModelStats = field(default_factory=ModelStats)
    provenance: str | None = None  # from the model's metadata once it has loaded; kept after unload
    provenance_note: str = ""


@dataclass
class ModelEntry:
    name: str
    config: ModelConfig | None = None
    versions: dict[int, VersionStatus] = field(default_factory=dict)
    state: State = State.UNLOADED
    reason: str = ""

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in self.versions.items() if s.state is State.READY)


Attach = Callable[[OnnxModel, ModelStats], None]
Detach = Callable[[str, int], None]
Pin = Callable[[str, int | None], None]


def _no_pin(name: str, version: int | None) -> None:
    return None


class RepositoryManager:
    def __init__(
        self,
        store: ModelStore,
        attach: Attach,
        detach: Detach,
        max_tenant_stats: int = MAX_TENANTS,
        pin: Pin = _no_pin,
        drift_window: int = DEFAULTS.limits.drift_window,
        detailed: bool = DEFAULTS.monitoring.histograms,
    ) -> None:
        self.store = store
        self.drift_window = drift_window
        self.detailed = detailed  # histograms, per-priority counts and drift (monitoring.histograms)
        self.max_tenant_stats = max_tenant_stats
        self._attach = attach
        self._detach = detach
        self._pin = pin
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()  # one load or unload at a time; reads need no lock

    def load_all(self) -> None:
        for name in self.store.names():
            try:
                self.load(name)
            except BedsideError:
                pass  # logged by load(), with the reason, as every refused load is
            except Exception as exc:  # one model's surprise must not keep the others from loading
                log.error("model %s could not be loaded: %s", name, type(exc).__name__)
                self._entries[name] = ModelEntry(
                    name, state=State.UNAVAILABLE, reason=f"load failed: {type(exc).__name__}"
                )

    def entry(self, name: str) -> ModelEntry:
        found = self._entries.get(name)
        if found is None:
            if name.startswith("."):
                raise model_not_found(name)  # as names(): hidden folders are no models
            self.store.folder(name)  # one stat, not a listing: a missing model costs what a hidden one does
            return ModelEntry(name)
        return found

    def entries(self) -> list[ModelEntry]:
        known = dict(self._entries)
        for name in self.store.names():
            known.setdefault(name, ModelEntry(name))
        return [known[n] for n in sorted(known)]

    def load(self, name: str) -> ModelEntry:
        self.store.folder(name)  # NotFound for a name that is not in the repository
        with self._lock:
            old = self._entries.get(name)
            new = self._build(name)
            ready = new.ready_versions()
            if not ready and old is not None and old.ready_versions():
                # the refusal stays visible in the index (and the log), not only in the caller's answer
                old.reason = f"last reload refused: {new.reason}"
                for version, status in new.versions.items():
                    if version not in old.versions:
                        old.versions[version] = status
                serving = old.ready_versions()
                log.warning("reload of %s refused (%s); still serving versions %s", name, new.reason, serving)
                raise ModelLoadError(
                    f"reload of {name!r} failed ({new.reason}); still serving versions {old.ready_versions()}"
                )
            if not ready:
                log.warning("model %s is unavailable: %s", name, new.reason)
            for version, status in new.versions.items():
                if old is not None and version in old.versions:
                    status.stats = old.versions[version].stats  # a reload keeps the history
            for version in ready:
                status = new.versions[version]
                assert status.model is not None
                self._attach(status.model, status.stats)
            if old is not None:
                for version in old.ready_versions():
                    if version not in ready:
                        self._detach(name, version)
                for version, status in old.versions.items():  # retired versions keep their statistics
                    if version not in new.versions:
                        new.versions[version] = _retired(status, "not selected by the version policy any more")
            self._entries[name] = new
            state = self.state(name)
            self._pin(name, state.version if state is not None and state.version in ready else None)
        if not ready:
            raise ModelLoadError(f"model {name!r} is unavailable: {new.reason}")
        return new

    def state(self, name: str) -> ServingState | None:
        """The model's serving state on disk (None: none, or unreadable)."""
        return read_state(self.store.root / name)

    # -- what the update agent does, inside the running server ----------------------------------

    def stage(self, name: str, version: int) -> VersionStatus:
        """Load `version` beside what serves, without taking traffic: READY with its model (for the
        agent's checks), or UNAVAILABLE with the reason. Nothing changes until `promote`."""
        entry = self._entries.get(name) or ModelEntry(name)
        probe = ModelEntry(name, entry.config)
        try:
            if probe.config is None:
                probe.config = self.store.config(name)
        except BedsideError as exc:
            return VersionStatus(version, State.UNAVAILABLE, exc.message)
        return self._load_version(probe, version)

    def promote(self, name: str, status: VersionStatus) -> None:
        """Put a staged version on the air and send unversioned requests to it (its state file is
        written first by the caller, so a restart finds the same). The other versions stay attached."""
        assert status.model is not None and status.state is State.READY
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = ModelEntry(name, status.model.config)
            if entry.config is None:
                entry.config = status.model.config
            old = entry.versions.get(status.version)
            if old is not None and old.state is State.READY:
                self._detach(name, status.version)  # a version staged twice: the new session replaces it
            self._attach(status.model, status.stats)
            entry.versions[status.version] = status
            entry.state, entry.reason = State.READY, ""
            self._pin(name, status.version)

    def pin(self, name: str, version: int) -> None:
        """Send unversioned requests to `version`, which must be READY (the rollback switch)."""
        with self._lock:
            entry = self.entry(name)
            if version not in entry.ready_versions():
                raise ModelLoadError(f"{name} v{version} is not loaded; it serves {entry.ready_versions()}")
            self._pin(name, version)

    def retire(self, name: str, version: int, reason: str) -> None:
        """Take one version off the air (queued requests finish; new ones go to the pinned version)."""
        with self._lock:
            entry = self._entries.get(name)
            status = entry.versions.get(version) if entry is not None else None
            if entry is None or status is None:
                return
            if status.state is State.READY:
                self._detach(name, version)
            entry.versions[version] = _retired(status, reason)
            if not entry.ready_versions():
                entry.state, entry.reason = State.UNAVAILABLE, reason

    def unload(self, name: str) -> None:
        with self._lock:
            entry = self.entry(name)
            for version in entry.ready_versions():
                self._detach(name, version)
            # the versions stay listed, UNLOADED, with their statistics: what a model did is not
            # forgotten because it was taken off the air
            versions = {v: _retired(s, "unloaded") for v, s in entry.versions.items()}
            self._entries[name] = ModelEntry(name, entry.config, versions, state=State.UNLOADED, reason="unloaded")

    def _build(self, name: str) -> ModelEntry:
        entry = ModelEntry(name, state=State.LOADING)
        try:
            entry.config = self.store.config(name)
            versions = self.store.versions(name)
            if not versions:
                raise ModelLoadError(f"no version folders (1/, 2/, ...) under {name}/")
            state = self.state(name)
            if state is not None and state.version in versions:
                # under update control: the version the state file names, and while it is watched the
                # one it replaced (loaded, so a rollback is a pin, not a load)
                watched = state.phase == "watching" and state.previous in versions
                wanted = sorted({state.version, *([state.previous] if watched and state.previous else [])})
            else:
                wanted = (
                    entry.config.version_policy if entry.config else infer_config(name, [], []).version_policy
                ).select(versions)
            if not wanted:
                raise ModelLoadError(f"version policy selects none of the versions on disk {versions}")
        except BedsideError as exc:
            entry.state, entry.reason = State.UNAVAILABLE, exc.message
            return entry
        for version in wanted:
            entry.versions[version] = self._load_version(entry, version)
        ready = entry.ready_versions()
        entry.state = State.READY if ready else State.UNAVAILABLE
        if not ready:
            entry.reason = "; ".join(f"v{v}: {s.reason}" for v, s in sorted(entry.versions.items()))
        return entry

    def _load_version(self, entry: ModelEntry, version: int) -> VersionStatus:
        try:
            path, source = self.store.model_source(entry.name, version)  # bytes for an encrypted model
            preference = entry.config.execution_providers if entry.config else ("tensorrt", "cuda", "openvino", "cpu")
            threads = entry.config.threads if entry.config else 0
            instances = entry.config.instances if entry.config else 1
            session = open_session(source, threads, preference, instances, path.name)
            inputs, outputs = graph_io(session)
            config = entry.config or infer_config(entry.name, inputs, outputs)
            check_against_graph(config, inputs, outputs)
            if entry.config is None:
                entry.config = config
            model = OnnxModel(entry.name, version, path, config, session)
            model.warm_up()
        except BedsideError as exc:
            return VersionStatus(version, State.UNAVAILABLE, exc.message)
        except Exception as exc:  # warm-up on a broken graph raises ORT's own errors
            return VersionStatus(version, State.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        log.info("loaded %s v%d on %s (%s weights)", entry.name, version, model.provider, model.provenance)
        stats = ModelStats(self.max_tenant_stats, self.detailed)
        stats.drift = self._drift(entry.name, version) if self.detailed else None
        return VersionStatus(
            version,
            State.READY,
            model=model,
            stats=stats,
            provenance=model.provenance,
            provenance_note=model.provenance_note,
        )

    def _drift(self, name: str, version: int) -> DriftMonitor | None:
        """The version's drift monitor, when it ships a reference; a bad one is logged, not fatal."""
        path = self.store.root / name / str(version) / REFERENCE_FILE
        if not path.is_file():
            return None
        try:
            return DriftMonitor(parse_reference(path.read_bytes()), self.drift_window)
        except (DriftReferenceError, OSError) as exc:
            log.warning("%s v%d: drift reference not used (%s)", name, version, type(exc).__name__)
            return None


def _retired(status: VersionStatus, reason: str) -> VersionStatus:
    """A version no longer served: its state and why, its statistics and provenance; not its session."""
    if status.state is State.UNAVAILABLE:
        return status
    return VersionStatus(
        status.version, State.UNLOADED, reason, None, status.stats, status.provenance, status.provenance_note
    )
