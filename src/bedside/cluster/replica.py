"""One replica of a model (or graph) deployment: bedside's own engine, whole, in a Ray actor.

The replica loads only its share of the repository (the model, or a graph and its models) into a
`Dataplane` with its scheduler, batching and priorities, and answers each exchange the front sends
with the same REST `App` a single box runs, in memory (server.inproc): so an answer from the
cluster is byte for byte the box's. It also tells the autoscaler how long its requests waited.
"""

from __future__ import annotations

import os
from pathlib import Path
from time import perf_counter_ns

from bedside.cluster.autoscale import QUEUE_DELAY
from bedside.dataplane import Dataplane
from bedside.protocol.types import SYSTEM
from bedside.security.keys import load_keyring
from bedside.server.grpc import InferenceServicer
from bedside.server.grpc.inproc import GRPCAnswer, GRPCCall, call_service
from bedside.server.inproc import HTTPAnswer, HTTPCall, call_app
from bedside.server.rest import App
from bedside.server.run import build_access
from bedside.settings import Settings


class ModelReplica:
    def __init__(self, repository: str, serves: list[str], settings: Settings) -> None:
        access, self._audit = build_access(settings)  # the callers file and audit log: shared paths
        keys = load_keyring(settings.security.key, os.environ)
        self.dataplane = Dataplane(
            Path(repository),
            settings.limits,
            access,
            keys=keys,
            histograms=settings.monitoring.histograms,
            only=frozenset(serves),
        )
        self.dataplane.start()  # blocking, in the actor's constructor: Ray routes nothing here until it returns
        self.app = App(self.dataplane, settings.server)
        self.grpc_handler = InferenceServicer(self.dataplane, settings.server.inline_decode_kb << 10).handler()
        self._front_wait_ns = 0  # waited at the front's gate since the last report
        self._queue_seen = (0, 0)  # (requests, ns in bedside's queue), cumulative, at the last report
        self._reported_ns = perf_counter_ns()

    async def http(self, call: HTTPCall, front_wait_us: int = 0) -> HTTPAnswer:
        self._front_wait_ns += front_wait_us * 1000
        return await call_app(self.app, call)

    async def grpc(self, call: GRPCCall, front_wait_us: int = 0) -> GRPCAnswer:
        self._front_wait_ns += front_wait_us * 1000
        return await call_service(self.grpc_handler, call)

    async def ready(self) -> bool:
        return self.dataplane.ready()

    def check_health(self) -> None:
        """Ray's periodic probe: a replica whose models did not load is replaced."""
        if not self.dataplane.ready():
            raise RuntimeError("the replica's models are not loaded")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Mean wait per request since the last report, in ms (front gate + bedside's queue)."""
        requests = queued_ns = 0
        for row in self.dataplane.statistics(None, None, SYSTEM, "cluster"):
            requests += row.queue.count
            queued_ns += row.queue.ns
        new_requests = requests - self._queue_seen[0]
        waited_ns = queued_ns - self._queue_seen[1] + self._front_wait_ns
        self._queue_seen = (requests, queued_ns)
        self._front_wait_ns = 0
        return {QUEUE_DELAY: waited_ns / new_requests / 1e6 if new_requests > 0 else 0.0}

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica
        dataplane, audit = getattr(self, "dataplane", None), getattr(self, "_audit", None)
        if dataplane is not None:
            dataplane.close()
        if audit is not None:
            audit.close()  # what is still in memory is written
