"""The front of the cluster (the Ray Serve ingress): the gateway's backend.

For each model it holds a priority gate (STAT first, bounded) sized to the replicas that run now,
sends each exchange to the model's deployment through its Ray handle, and sends it again when the
replica died under it (an inference has no side effect, so a second try is safe): a request is
answered by a replica or refused with a reason (503 + Retry-After), never lost in silence.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter_ns
from typing import Any

from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from bedside.cluster.gate import PriorityGate
from bedside.cluster.plan import Placement
from bedside.errors import Unavailable, model_not_found
from bedside.server.gateway import Gateway
from bedside.server.grpc.gateway import GRPCGateway
from bedside.server.grpc.inproc import GRPCAnswer, GRPCCall
from bedside.server.inproc import HTTPAnswer, HTTPCall
from bedside.settings import Settings

log = logging.getLogger("bedside.cluster")
APP_NAME = "bedside"
FRONT = "bedside-front"
# a replica (or its node) went away under the request: another replica can take it
LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, ReplicaUnavailableError)
REFRESH_S = 1.0  # how often the front learns how many replicas each model has (autoscaling)
READY_TIMEOUT_S = 2.0


class ClusterBackend:
    def __init__(self, placements: list[Placement], handles: dict[str, Any], settings: Settings) -> None:
        cluster = settings.cluster
        self.placements = {p.name: p for p in placements}
        self.handles = handles  # deployment name -> DeploymentHandle
        self.max_ongoing = cluster.max_ongoing
        self.retries = cluster.retries
        share = cluster.front_replicas  # each front replica keeps its share of the replicas full
        self.gates = {
            p.name: PriorityGate(max(1, p.min_replicas * cluster.max_ongoing // share), cluster.front_queue)
            for p in placements
        }
        self._share = share
        self.retried = 0
        self.lost = 0
        self._refresher: asyncio.Task[None] | None = None

    def serves(self, model: str) -> bool:
        return model in self.placements

    # REST (server.gateway.Backend) and gRPC (server.grpc.gateway.GRPCBackend): the same routes,
    # to the replica's `http` or `grpc` method
    async def forward(self, model: str, priority: Any, call: HTTPCall) -> HTTPAnswer:
        answer: HTTPAnswer = await self._forward("http", model, priority, call)
        return answer

    async def forward_grpc(self, model: str, priority: Any, call: GRPCCall) -> GRPCAnswer:
        answer: GRPCAnswer = await self._forward("grpc", model, priority, call)
        return answer

    async def forward_any(self, call: HTTPCall) -> HTTPAnswer:
        answer: HTTPAnswer = await self._send("http", self._first(), call, 0)
        return answer

    async def forward_grpc_any(self, call: GRPCCall) -> GRPCAnswer:
        answer: GRPCAnswer = await self._send("grpc", self._first(), call, 0)
        return answer

    async def gather(self, call: HTTPCall) -> list[HTTPAnswer]:
        return list(await asyncio.gather(*(self._send("http", p, call, 0) for p in self.placements.values())))

    async def gather_grpc(self, call: GRPCCall) -> list[GRPCAnswer]:
        return list(await asyncio.gather(*(self._send("grpc", p, call, 0) for p in self.placements.values())))

    def _first(self) -> Placement:
        if not self.placements:
            raise Unavailable("the cluster serves no model: the repository is empty")
        return next(iter(self.placements.values()))

    async def _forward(self, kind: str, model: str, priority: Any, call: Any) -> Any:
        placement = self.placements.get(model)
        if placement is None:
            raise model_not_found(model)  # the box's words for a model it does not have
        self._refresh_soon()
        gate = self.gates[model]
        started = perf_counter_ns()
        await gate.enter(placement.level(priority))
        try:
            waited_us = (perf_counter_ns() - started) // 1000
            return await self._send(kind, placement, call, waited_us)
        finally:
            gate.leave()

    async def ready(self) -> bool:
        async def one(placement: Placement) -> bool:
            try:
                handle = self.handles[placement.deployment]
                return bool(await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S))
            except (RayError, DeploymentUnavailableError, ReplicaUnavailableError, TimeoutError):
                return False

        return bool(self.placements) and all(await asyncio.gather(*(one(p) for p in self.placements.values())))

    async def _send(self, kind: str, placement: Placement, call: Any, waited_us: int) -> Any:
        method = getattr(self.handles[placement.deployment], kind)  # the replica's http or grpc
        for attempt in range(self.retries + 1):
            try:
                return await method.remote(call, waited_us)
            except LOST as exc:
                if attempt == self.retries:
                    self.lost += 1
                    log.warning("%s: replica lost, %d retries failed (%s)", placement.name, attempt, _kind(exc))
                    raise Unavailable(
                        f"the replicas of {placement.name!r} stopped while answering ({attempt} retries); "
                        "the request was not answered: send it again",
                        {"Retry-After": "1"},
                    ) from None
                self.retried += 1
            except DeploymentUnavailableError:
                raise Unavailable(
                    f"{placement.name!r} has no replica running; retry shortly", {"Retry-After": "1"}
                ) from None
            except RayError as exc:
                log.error("%s: the replica failed (%s)", placement.name, _kind(exc))
                raise Unavailable(f"a replica of {placement.name!r} failed; retry", {"Retry-After": "1"}) from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def _refresh_soon(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        """Resize each gate to the replicas running now, every REFRESH_S while requests come."""
        try:
            status = await asyncio.get_running_loop().run_in_executor(None, serve.status)
            deployments = status.applications[APP_NAME].deployments
        except Exception as exc:  # the controller busy or restarting: the last sizes hold
            log.warning("replica counts not refreshed (%s); the front keeps the last ones", _kind(exc))
        else:
            for name, placement in self.placements.items():
                found = deployments.get(placement.deployment)
                if found is not None:
                    running = sum(n for state, n in found.replica_states.items() if _name(state) == "RUNNING")
                    self.gates[name].resize(max(1, running * self.max_ongoing // self._share))
        await asyncio.sleep(REFRESH_S)


def _name(state: Any) -> str:
    return str(getattr(state, "value", state))


def _kind(exc: BaseException) -> str:
    return type(exc).__name__  # never the text: a replica's message may quote a request


@serve.ingress()
class Front:
    """The ingress deployment: the gateway (server.gateway) over ClusterBackend."""

    def __init__(self, placements: list[Placement], handles: dict[str, Any], settings: Settings) -> None:
        self.backend = ClusterBackend(placements, handles, settings)
        self.gateway = Gateway(self.backend, settings.server.max_body_mb << 20)
        self.grpc_gateway = GRPCGateway(self.backend)

    def __serve_build_asgi_app__(self) -> Gateway:
        return self.gateway

    # gRPC: Ray Serve's gRPC proxy calls the method named as the RPC (server.grpc.gateway registers them)
    async def _grpc(self, method: str, request: Any, grpc_context: Any) -> Any:
        return await self.grpc_gateway.reply(method, request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:  # named as the RPC
        return await self._grpc("ModelInfer", request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ModelMetadata", request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ModelReady", request, grpc_context)

    async def ModelConfig(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ModelConfig", request, grpc_context)

    async def ModelStatistics(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ModelStatistics", request, grpc_context)

    async def ServerLive(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ServerLive", request, grpc_context)

    async def ServerReady(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ServerReady", request, grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ServerMetadata", request, grpc_context)

    async def RepositoryIndex(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("RepositoryIndex", request, grpc_context)

    async def RepositoryModelLoad(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("RepositoryModelLoad", request, grpc_context)

    async def RepositoryModelUnload(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("RepositoryModelUnload", request, grpc_context)
