"""What a cluster deploys: one Ray Serve deployment per model and per graph of the repository,
each with its replica bounds, queue-delay target, CPUs and memory, read from the folder's
`[cluster]` table and, where it says nothing, from the `cluster` settings.

A graph's replicas load the graph and every model it calls: its steps run in-process, as on the
box, instead of a cross-process hop per step (the medication check's latency is the reason those
models are then loaded twice in the cluster: once in their own deployment, once in the graph's).
Memory is what placement packs by: a replica reserves its process base plus a multiple of its
model files' size (or the folder's `memory_mb`), and Ray starts it only on a node with that free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.errors import BedsideError, InvalidInput
from bedside.graphs.loaded import graph_names
from bedside.graphs.spec import load_graph_spec
from bedside.modelconfig.cluster import ClusterSpec
from bedside.modelconfig.model import GRAPH_FILE
from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.repository.store import ModelStore
from bedside.settings import ClusterSettings

log = logging.getLogger("bedside.cluster")
MODEL, GRAPH = "model", "graph"
_DEFAULT_POLICY = SchedulingPolicy()


@dataclass(frozen=True)
class Placement:
    name: str  # the model's or graph's name, as clients write it
    kind: str  # MODEL or GRAPH
    serves: tuple[str, ...]  # the repository folders a replica loads
    min_replicas: int
    max_replicas: int
    target_queue_ms: float
    cpus: float
    memory_bytes: int
    policy: SchedulingPolicy  # the model's priority levels (a graph: the default three)

    @property
    def deployment(self) -> str:
        return f"{self.kind}-{self.name}"  # a prefix: no model name can take the front's name

    def level(self, priority: Any) -> int:
        """0-based level of a priority as the caller wrote it (0: STAT). One the model refuses is
        routine here; the replica then refuses it with the box's words."""
        try:
            return self.policy.level_of(priority, "")
        except InvalidInput:
            return self.policy.priority_levels - 1


def plan(repository: Path, settings: ClusterSettings) -> list[Placement]:
    """Every model and graph of the repository, models first, by name. A folder whose config
    cannot be read is left out with its reason logged (as the box leaves it UNAVAILABLE)."""
    store = ModelStore(repository)
    placements = []
    for name in store.names():
        try:
            config = store.config(name)
        except BedsideError as exc:
            log.warning("model %s is not deployed: %s", name, exc.message)
            continue
        policy = config.scheduling if config is not None else _DEFAULT_POLICY
        spec = config.cluster if config is not None else None
        placements.append(_placement(repository, name, MODEL, (name,), spec, policy, settings))
    for name in graph_names(repository):
        try:
            graph = load_graph_spec(repository / name / GRAPH_FILE, name)
        except BedsideError as exc:
            log.warning("graph %s is not deployed: %s", name, exc.message)
            continue
        models = sorted({step.model for step in graph.steps if step.model is not None})
        serves = (name, *models)
        placements.append(_placement(repository, name, GRAPH, serves, graph.cluster, _DEFAULT_POLICY, settings))
    return placements


def _placement(
    repository: Path,
    name: str,
    kind: str,
    serves: tuple[str, ...],
    spec: ClusterSpec | None,
    policy: SchedulingPolicy,
    settings: ClusterSettings,
) -> Placement:
    spec = spec or ClusterSpec()
    low = spec.min_replicas if spec.min_replicas is not None else settings.min_replicas
    high = spec.max_replicas if spec.max_replicas is not None else max(settings.max_replicas, low)
    if spec.memory_mb is not None:
        memory = spec.memory_mb << 20
    else:
        files = sum(_size(repository / folder) for folder in serves)
        memory = (settings.replica_base_mb << 20) + int(files * settings.model_memory_factor)
    return Placement(
        name=name,
        kind=kind,
        serves=serves,
        min_replicas=low,
        max_replicas=max(high, low, 1),
        target_queue_ms=spec.target_queue_ms if spec.target_queue_ms is not None else settings.target_queue_ms,
        cpus=spec.cpus if spec.cpus is not None else settings.replica_cpus,
        memory_bytes=memory,
        policy=policy,
    )


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
