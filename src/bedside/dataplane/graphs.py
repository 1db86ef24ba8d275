"""The dataplane's view of inference graphs: their metadata, index rows and statistics, in the same
typed forms as a model's, so every transport serves a graph exactly as it serves a model."""

from __future__ import annotations

from typing import NoReturn

from bedside.dataplane.types import (
    Duration,
    ModelMetadata,
    RepositoryEntry,
    TensorMetadata,
    VersionStatistics,
)
from bedside.errors import Unavailable
from bedside.graphs.engine import Graph
from bedside.graphs.loaded import GraphEntry, GraphSet
from bedside.monitoring.latency import ModelStats

PLATFORM = "bedside_graph"


def explain_graph_missing(graphs: GraphSet, name: str) -> NoReturn:
    entry = graphs.entry(name)
    reason = (entry.reason or entry.state.lower()) if entry is not None else "not loaded"
    raise Unavailable(f"graph {name!r} is not ready: {reason}")


def graph_metadata(graph: Graph) -> ModelMetadata:
    config = graph.config
    return ModelMetadata(
        name=graph.name,
        versions=(graph.version_text,),
        platform=PLATFORM,
        inputs=tuple(TensorMetadata(s.name, s.datatype, s.shape) for s in config.inputs),
        outputs=tuple(TensorMetadata(s.name, s.datatype, s.shape) for s in config.outputs),
    )


def graph_index_row(entry: GraphEntry) -> RepositoryEntry:
    version = entry.graph.version_text if entry.graph is not None else None
    return RepositoryEntry(entry.name, version, entry.state, entry.reason, provider=PLATFORM if version else None)


def graph_statistics(entry: GraphEntry) -> VersionStatistics:
    """A graph's row: requests through it as a model's, and per step its outcomes and latency."""
    s: ModelStats = entry.stats
    detail = s.to_dict()
    if entry.graph is not None:
        detail["steps"] = entry.graph.statistics()
        if entry.graph.cache is not None:
            detail["cache"] = entry.graph.cache.stats()
    return VersionStatistics(
        name=entry.name,
        version=entry.graph.version_text if entry.graph is not None else "1",
        state=entry.state,
        inference_count=s.request.count,
        execution_count=s.request.count,
        success=Duration(s.request.count, s.request.total_ns),
        failure=Duration(s.failures, 0),
        queue=Duration(0, 0),
        compute=Duration(s.request.count, s.request.total_ns),
        last_inference_ms=s.last_inference_ms,
        detail=detail,
    )
