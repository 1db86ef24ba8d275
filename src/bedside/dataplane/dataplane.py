"""The dataplane: the one protocol-neutral API every entry point goes through.

REST, gRPC, the ECG stream and the vitals scorer all call these methods with a model name, an
optional version, an `InferRequest` and a `CallContext`, and get typed results or a typed
`BedsideError` back. Behind it the repository loads models, the scheduler queues and batches
requests, and the runtime runs them; none of those reach a transport, and no transport reaches
them. Security, audit and graphs hook in here, once, for every protocol.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NoReturn

from bedside import __version__
from bedside.dataplane.types import (
    CallContext,
    Duration,
    ModelContract,
    ModelMetadata,
    RepositoryEntry,
    ServerMetadata,
    TensorMetadata,
    VersionStatistics,
)
from bedside.errors import NotFound, Retired, Unavailable
from bedside.modelconfig.model import ModelConfig, TensorSpec
from bedside.protocol.types import InferRequest, InferResponse
from bedside.repository.manager import ModelEntry, RepositoryManager, State
from bedside.repository.store import ModelStore
from bedside.scheduler.scheduler import Scheduler
from bedside.scheduler.worker import ModelQueue
from bedside.settings import DEFAULTS, LimitSettings

EXTENSIONS = ("binary_tensor_data", "model_repository", "statistics", "model_configuration")
INTERNAL = CallContext()


def parse_version(version: str | None) -> int | None:
    """'' or None: the newest ready version. Only ASCII digits count: '²' is a digit to Python."""
    if version is None or version == "":
        return None
    if not (version.isascii() and version.isdigit()) or len(version) > 18 or int(version) < 1:
        raise NotFound(f"version {version[:32]!r} is not a positive integer")
    return int(version)


class Dataplane:
    def __init__(self, repository: Path, limits: LimitSettings = DEFAULTS.limits) -> None:
        self._scheduler = Scheduler(limits.max_tenants)
        self._manager = RepositoryManager(
            ModelStore(repository), self._scheduler.attach, self._scheduler.detach, limits.max_tenant_stats
        )
        self._started = False

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Load every model in the repository (blocking; run it beside a listening server)."""
        self._manager.load_all()
        self._started = True

    def close(self) -> None:
        self._scheduler.close()

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._started

    # --- inference: the hot path ---------------------------------------------------------------

    async def infer(
        self, model: str, version: str | None, request: InferRequest, context: CallContext = INTERNAL
    ) -> InferResponse:
        number = parse_version(version)
        queue = self._serving(model, number)
        try:
            future = queue.submit(request, context)
        except Retired:
            # reloaded while this request's body was read: the new queue (or a clear error) takes it
            queue = self._serving(model, number)
            future = queue.submit(request, context)
        outputs = await future
        return InferResponse(
            model, queue.version_text, outputs, request.id, queue.answer_parameters, queue.signature.finite_only
        )

    def check_served(self, model: str, version: str | None) -> int | None:
        """Raise what `infer` would for a model version that is not served, before a transport
        spends time reading and decoding the body (a wrong URL answers 404 whatever it carries).
        Returns the most input elements a request to it can carry (None: not bounded)."""
        return self._serving(model, parse_version(version)).signature.max_elements

    def _serving(self, model: str, version: int | None) -> ModelQueue:
        """The queue serving this model version, or the NotFound / Unavailable that says why none does."""
        queue = self._scheduler.find(model, version)
        if queue is None:
            self._explain_missing(model, version)
        return queue

    def _explain_missing(self, name: str, version: int | None) -> NoReturn:
        entry = self._manager.entry(name)  # raises NotFound for a model not in the repository
        status = entry.versions.get(version) if version is not None else None
        if version is not None and (status is None or status.state is State.UNLOADED):
            why = f" ({status.reason})" if status is not None else ""
            raise NotFound(f"model {name!r} has no version {version} loaded{why}; it serves {entry.ready_versions()}")
        reason = (status.reason if status else "") or entry.reason or entry.state.value.lower()
        raise Unavailable(f"model {name!r} is not ready: {reason}")

    # --- metadata ------------------------------------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("bedside", __version__, EXTENSIONS)

    def _ready_entry(self, name: str, version: int | None) -> tuple[ModelEntry, ModelConfig, int]:
        entry = self._manager.entry(name)
        if version is not None and version not in entry.versions:
            raise NotFound(f"model {name!r} has no version {version}")
        ready = entry.ready_versions()
        if entry.config is None or (version is None and not ready):
            raise Unavailable(f"model {name!r} is not ready: {entry.reason or entry.state.value.lower()}")
        return entry, entry.config, ready[-1] if version is None else version

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        number = parse_version(version)
        entry, config, chosen = self._ready_entry(name, number)
        return ModelMetadata(
            name=name,
            versions=tuple(str(v) for v in entry.ready_versions()) if number is None else (str(chosen),),
            platform=config.platform,
            inputs=tuple(_tensor(config, s) for s in config.inputs),
            outputs=tuple(_tensor(config, s) for s in config.outputs),
        )

    def model_config(self, name: str, version: str | None) -> ModelConfig:
        return self._ready_entry(name, parse_version(version))[1]

    def model_ready(self, name: str, version: str | None) -> bool:
        entry = self._manager.entry(name)
        number = parse_version(version)
        if number is None:
            return bool(entry.ready_versions())
        if number not in entry.versions:
            raise NotFound(f"model {name!r} has no version {number}")
        return entry.versions[number].state is State.READY

    def contract(self, name: str) -> ModelContract:
        """How a stream uses this model: its input, score output and labels, from its config."""
        _, config, version = self._ready_entry(name, None)
        spec = config.contract
        inputs = {s.name: s for s in config.inputs}
        return ModelContract(
            name=name,
            version=str(version),
            max_batch_size=config.max_batch_size,
            input=_tensor(config, inputs[spec.input] if spec.input else config.inputs[0]),
            score_output=spec.score_output or _default_score_output(config),
            labels=spec.labels,
            positive_class=spec.positive_class,
        )

    # --- repository control ------------------------------------------------------------------------

    def repository_index(self) -> list[RepositoryEntry]:
        rows: list[RepositoryEntry] = []
        for entry in self._manager.entries():
            if not entry.versions:
                rows.append(RepositoryEntry(entry.name, None, entry.state.value, entry.reason))
            for version, status in sorted(entry.versions.items()):
                model = status.model
                rows.append(
                    RepositoryEntry(
                        entry.name,
                        str(version),
                        status.state.value,
                        status.reason or (entry.reason if status.state is State.READY else ""),
                        model.provider if model is not None else None,
                        status.provenance,
                        status.provenance_note,
                    )
                )
        return rows

    async def load(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._manager.load, name)

    async def unload(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._manager.unload, name)

    # --- statistics ----------------------------------------------------------------------------------

    def statistics(self, name: str | None = None, version: str | None = None) -> list[VersionStatistics]:
        number = parse_version(version)
        entries = [self._manager.entry(name)] if name else self._manager.entries()
        rows = []
        for entry in entries:
            for v, status in sorted(entry.versions.items()):
                if number is not None and v != number:
                    continue
                s = status.stats
                rows.append(
                    VersionStatistics(
                        name=entry.name,
                        version=str(v),
                        state=status.state.value,
                        inference_count=s.inferences,
                        execution_count=s.executions,
                        success=Duration(s.request.count, s.request.total_ns),
                        failure=Duration(s.failures, 0),
                        queue=Duration(s.queue.count, s.queue.total_ns),
                        compute=Duration(s.compute.count, s.compute.total_ns),
                        last_inference_ms=s.last_inference_ms,
                        batch_sizes=dict(s.batch_sizes),
                        queue_depth=self._scheduler.depth(entry.name, v) or {},
                        detail=s.to_dict(),
                    )
                )
        return rows


def _default_score_output(config: ModelConfig) -> str:
    """Without a contract: an output named `probabilities` (what scikit-learn, LightGBM and XGBoost
    converters write beside `label`), else the first floating-point output, else the first one."""
    names = [s.name for s in config.outputs]
    if "probabilities" in names:
        return "probabilities"
    floats = [s.name for s in config.outputs if s.datatype in ("FP16", "FP32", "FP64")]
    return floats[0] if floats else names[0]


def _tensor(config: ModelConfig, spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(spec.name, spec.datatype, config.full_shape(spec))
