"""The dataplane: the one protocol-neutral API every entry point goes through.

REST, gRPC, the ECG stream and the vitals scorer all call these methods with a model name, an
optional version, an `InferRequest` and a `CallContext`, and get typed results or a typed
`BedsideError` back. Behind it the repository loads models, the scheduler queues and batches
requests, and the runtime runs them; none of those reach a transport, and no transport reaches
them. Security, audit and graphs hook in here, once, for every protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from time import perf_counter_ns
from typing import Any, NoReturn

from bedside.dataplane.access import ADMIN, INFER, MONITOR, Access, restricted
from bedside.dataplane.describe import Describe, parse_version
from bedside.dataplane.graphs import explain_graph_missing, graph_index_row, graph_statistics
from bedside.dataplane.lifecycle import Lifecycle
from bedside.dataplane.metrics import render as render_metrics
from bedside.dataplane.stats import version_statistics
from bedside.dataplane.types import (
    CallContext,
    RepositoryEntry,
    VersionStatistics,
)
from bedside.errors import BedsideError, NotFound, Retired, Unavailable
from bedside.graphs.loaded import GraphSet
from bedside.protocol.types import Caller, InferRequest, InferResponse
from bedside.repository.manager import RepositoryManager, State
from bedside.repository.store import ModelStore
from bedside.scheduler.scheduler import Scheduler
from bedside.scheduler.worker import ModelQueue
from bedside.security.callers import Peer
from bedside.security.keys import KeyRing
from bedside.settings import DEFAULTS, LimitSettings

INTERNAL = CallContext()


class Dataplane(Describe):
    def __init__(
        self,
        repository: Path,
        limits: LimitSettings = DEFAULTS.limits,
        access: Access | None = None,
        keys: KeyRing | None = None,
        histograms: bool = DEFAULTS.monitoring.histograms,
        only: frozenset[str] | None = None,
    ) -> None:
        """`access`: who may do what (default: authentication off, nothing audited); `keys`: the
        key ring that opens encrypted models (`model.onnx.enc`), decrypted into memory only;
        `histograms` (monitoring.histograms): latency buckets, per-priority counts and drift;
        `only`: the models and graphs to serve (a cluster replica's share), None: the whole repository."""
        self._scheduler = Scheduler(limits.max_tenants)
        self._manager = RepositoryManager(
            ModelStore(repository, keys=keys, only=only),
            self._scheduler.attach,
            self._scheduler.detach,
            limits.max_tenant_stats,
            self._scheduler.pin,
            limits.drift_window,
            histograms,
        )
        self._graphs = GraphSet(
            repository, self._graph_model_config, self._infer, limits.max_tenant_stats, histograms, only
        )
        self.access = access or Access()
        self.lifecycle = Lifecycle(self._manager, self.access)  # the update agent's admin calls
        self._audit = self.access.audit
        self._started = False

    # --- who is asking ----------------------------------------------------------------------------

    @property
    def auth_required(self) -> bool:
        """Whether transports must look for credentials (off: every caller is the anonymous one)."""
        return self.access.required

    def authenticate(self, authorization: str | None, peer: Peer | None, transport: str) -> Caller:
        """The caller an `Authorization` value or a verified client certificate names (401 if none)."""
        return self.access.authenticate(authorization, peer, transport)

    def require(self, caller: Caller, role: str, transport: str) -> None:
        """403 unless the caller has `role` (the streams' endpoints: monitor; feeding a bed: see may_feed)."""
        self.access.require(caller, role, transport=transport)

    def may_feed(self, caller: Caller, bed: str, transport: str) -> None:
        self.access.may_feed(caller, bed, transport)

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Load every model in the repository (blocking; run it beside a listening server)."""
        self._manager.load_all()
        self._graphs.load_all()  # after the models: a graph is checked against their configs
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
        if self._audit is None:
            return await self._infer(model, version, request, context)
        # audited: one entry per request, success or not, with its latency (never its data)
        started = perf_counter_ns()
        caller = context.caller
        try:
            response = await self._infer(model, version, request, context)
        except BaseException as exc:  # every request leaves an entry: a 500, a cancelled one too
            outcome = str(exc.status) if isinstance(exc, BedsideError) else (
                "cancelled" if isinstance(exc, asyncio.CancelledError) else "500"
            )  # fmt: skip
            self._audit.record(
                "infer", caller.name, context.tenant, context.transport, model, version or "", request.id or "",
                outcome, (perf_counter_ns() - started) // 1000,
            )  # fmt: skip
            raise
        self._audit.record(
            "infer", caller.name, context.tenant, context.transport, model, response.model_version,
            request.id or "", "ok", (perf_counter_ns() - started) // 1000,
        )  # fmt: skip
        return response

    async def _infer(
        self, model: str, version: str | None, request: InferRequest, context: CallContext
    ) -> InferResponse:
        graph = self._graphs.find(model)
        if graph is not None:
            self._graph_serving(graph, version, context.caller, context.transport)
            return await graph.run(request, context)
        number = parse_version(version)
        caller = context.caller
        queue = self._serving(model, number, caller, context.transport)
        cache = queue.cache
        if cache is not None:
            key = cache.key(context.tenant, request)
            hit = cache.get(key)
            if hit is not None:
                return InferResponse(model, queue.version_text, hit[0], request.id, hit[1], True)
        try:
            future = queue.submit(request, context)
        except Retired:
            # reloaded while this request's body was read: the new queue (or a clear error) takes it
            queue = self._serving(model, number, caller, context.transport)
            future = queue.submit(request, context)
        outputs = await future
        if cache is not None:
            cache.put(key, outputs, {**(queue.answer_parameters or {}), "cached": True})
        return InferResponse(
            model, queue.version_text, outputs, request.id, queue.answer_parameters, queue.signature.finite_only
        )

    def check_served(self, model: str, version: str | None, caller: Caller, transport: str = "") -> int | None:
        """Raise what `infer` would for a model version that is not served (or not the caller's),
        before a transport spends time reading and decoding the body (a wrong URL answers 404
        whatever it carries). Returns the most input elements a request to it can carry (None: not bounded)."""
        try:
            graph = self._graphs.find(model)
            if graph is not None:
                return self._graph_serving(graph, version, caller, transport).signature.max_elements
            return self._serving(model, parse_version(version), caller, transport).signature.max_elements
        except BedsideError as exc:
            self.refused(model, version, caller, transport, exc)
            raise

    def refused(self, model: str, version: str | None, caller: Caller, transport: str, error: BedsideError) -> None:
        """Put an inference refused before it reached `infer` (unknown model, undecodable body, a
        tenant header that is not the caller's) on the audit record, as `infer` does its own."""
        if self._audit is not None:
            self._audit.record(
                "infer", caller.name, caller.tenant, transport, model, version or "", "", str(error.status)
            )

    def _serving(self, model: str, version: int | None, caller: Caller, transport: str) -> ModelQueue:
        """The queue serving this model version, or the 403 / 404 / 503 that says why none does."""
        if INFER not in caller.roles:
            self.access.require(caller, INFER, transport=transport, action="infer")
        queue = self._scheduler.find(model, version)
        if queue is None:
            self._check_model(caller, model, transport)
            if self._graphs.is_graph(model):
                explain_graph_missing(self._graphs, model)
            self._explain_missing(model, version)
        self.access.check_model(caller, model, queue.model.config.access, transport)
        return queue

    def _explain_missing(self, name: str, version: int | None) -> NoReturn:
        entry = self._manager.entry(name)  # raises NotFound for a model not in the repository
        status = entry.versions.get(version) if version is not None else None
        if version is not None and (status is None or status.state is State.UNLOADED):
            why = f" ({status.reason})" if status is not None else ""
            raise NotFound(f"model {name!r} has no version {version} loaded{why}; it serves {entry.ready_versions()}")
        reason = (status.reason if status else "") or entry.reason or entry.state.value.lower()
        raise Unavailable(f"model {name!r} is not ready: {reason}")

    # --- repository control ------------------------------------------------------------------------

    def repository_index(self, caller: Caller, transport: str = "") -> list[RepositoryEntry]:
        """Every model the caller's tenant may see (admin or monitor)."""
        self.access.require(caller, ADMIN, MONITOR, transport=transport)
        rows: list[RepositoryEntry] = []
        for entry in self._manager.entries():
            if not self.access.sees(caller, self._access_of(entry.name)):
                continue
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
        for graph in self._graphs.entries():
            if self.access.sees(caller, self._access_of(graph.name)):
                rows.append(graph_index_row(graph))
        return rows

    async def load(self, name: str, caller: Caller, transport: str = "") -> None:
        load = self._graphs.load if self._graphs.is_graph(name) else self._manager.load
        await self._control("load", load, name, caller, transport)

    async def unload(self, name: str, caller: Caller, transport: str = "") -> None:
        unload = self._graphs.unload if self._graphs.is_graph(name) else self._manager.unload
        await self._control("unload", unload, name, caller, transport)

    async def _control(
        self, action: str, run: Callable[[str], object], name: str, caller: Caller, transport: str
    ) -> None:
        self.access.require(caller, ADMIN, transport=transport, action=action)
        error: Exception | None = None
        try:
            self._check_model(caller, name, transport)
            self.access.require_owner(caller, name, self._access_of(name), transport, action)
            await asyncio.get_running_loop().run_in_executor(None, run, name)
        except Exception as exc:
            error = exc
            raise
        finally:
            self.access.admin_action(caller, transport, action, name, error)

    # --- statistics ----------------------------------------------------------------------------------

    def statistics(
        self, name: str | None, version: str | None, caller: Caller, transport: str = ""
    ) -> list[VersionStatistics]:
        """Per model version, for the models the caller's tenant may see (monitor). A tenant sees
        only its own figures: its own row among the tenants, and on a model it does not own (one
        shared with it) nothing of the model-wide counts that other tenants' requests make up."""
        self.access.require(caller, MONITOR, transport=transport)
        number = parse_version(version)
        graphs = []
        if name:
            self._check_model(caller, name, transport)
            graph = self._graphs.entry(name)
            entries = [] if graph is not None else [self._manager.entry(name)]
            graphs = [graph] if graph is not None and number in (None, 1) else []
        else:
            entries = [e for e in self._manager.entries() if self.access.sees(caller, self._access_of(e.name))]
            graphs = [g for g in self._graphs.entries() if self.access.sees(caller, self._access_of(g.name))]
        rows = []
        for graph in graphs:
            owned = self.access.owns(caller, self._access_of(graph.name))
            row = graph_statistics(graph)
            rows.append(row if not restricted(caller) else row.for_tenant(caller.tenant, owned))
        for entry in entries:
            owned = self.access.owns(caller, self._access_of(entry.name))
            for v, status in sorted(entry.versions.items()):
                if number is not None and v != number:
                    continue
                row = version_statistics(entry.name, v, status, self._scheduler.depth(entry.name, v) or {})
                rows.append(row if not restricted(caller) else row.for_tenant(caller.tenant, owned))
        return rows


def metrics_text(
    dataplane: Dataplane, caller: Caller, transport: str = "", extra: dict[str, Any] | None = None
) -> bytes:
    """/metrics (Prometheus text): the statistics the caller may see (monitor), the audit log's
    counters, and `extra` (the streams' counters, from the server)."""
    rows = dataplane.statistics(None, None, caller, transport)
    audit = dataplane.access.audit
    more = {**(extra or {}), **({"audit": audit.stats()} if audit is not None else {})}
    return render_metrics(rows, more)
