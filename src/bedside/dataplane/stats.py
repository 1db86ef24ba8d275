"""A model version's statistics in the dataplane's typed form."""

from __future__ import annotations

from bedside.dataplane.types import Duration, VersionStatistics
from bedside.repository.manager import VersionStatus


def version_statistics(name: str, version: int, status: VersionStatus, depth: dict[str, int]) -> VersionStatistics:
    s = status.stats
    return VersionStatistics(
        name=name,
        version=str(version),
        state=status.state.value,
        inference_count=s.inferences,
        execution_count=s.executions,
        success=Duration(s.request.count, s.request.total_ns),
        failure=Duration(s.failures, 0),
        queue=Duration(s.queue.count, s.queue.total_ns),
        compute=Duration(s.compute.count, s.compute.total_ns),
        last_inference_ms=s.last_inference_ms,
        batch_sizes=dict(s.batch_sizes),
        queue_depth=depth,
        detail=s.to_dict(),
    )
