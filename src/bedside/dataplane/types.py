"""What the dataplane takes and returns, independent of any wire protocol.

Every transport (REST, gRPC, the ECG stream, the vitals scorer) turns its own request into an
`InferRequest` plus a `CallContext`, and turns these typed results back into its own wire form.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from bedside.protocol.types import DEFAULT_TENANT, CallContext

__all__ = ["DEFAULT_TENANT", "CallContext"]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size; the batch dimension included

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "extensions": list(self.extensions)}


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    name: str
    version: str | None  # None: the model has no version loaded (see state and reason)
    state: str  # READY | LOADING | UNAVAILABLE | UNLOADED
    reason: str = ""
    provider: str | None = None
    provenance: str | None = None  # trained | synthetic | untrained (None: never loaded)
    provenance_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name}
        if self.version is not None:
            row["version"] = self.version
        row["state"] = self.state
        row["reason"] = self.reason
        if self.provider is not None:
            row["provider"] = self.provider
        if self.provenance is not None:
            row["provenance"] = self.provenance
        if self.provenance_note:
            row["provenance_note"] = self.provenance_note
        return row


@dataclass(frozen=True, slots=True)
class Duration:
    count: int
    ns: int  # cumulative


@dataclass(frozen=True, slots=True)
class VersionStatistics:
    """What one model version has done. The counters are cumulative since load (they survive a
    reload); `detail` holds the windowed percentiles, batch sizes, rejections and tenants."""

    name: str
    version: str
    state: str
    inference_count: int  # rows
    execution_count: int  # model runs
    success: Duration  # admission to result
    failure: Duration
    queue: Duration
    compute: Duration
    last_inference_ms: int  # wall-clock ms since the epoch of the last result; 0: none yet
    batch_sizes: dict[int, int] = field(default_factory=dict)  # rows per execution -> executions
    queue_depth: dict[str, int] = field(default_factory=dict)  # waiting requests per priority level
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state,
            **self.detail,
            "queue_depth": self.queue_depth,
        }

    def for_tenant(self, tenant: str, owned: bool) -> VersionStatistics:
        """What one tenant may see: on its own model, everything but the other tenants' rows; on a
        model shared with it, only its own requests (count, rejections, latency percentiles)."""
        tenants = self.detail.get("tenants", {})
        mine = {tenant: tenants[tenant]} if tenant in tenants else {}
        if owned:
            return replace(self, detail={**self.detail, "tenants": mine})
        row = tenants.get(tenant, {"success_count": 0, "rejected": 0, "latency": {}})
        count = int(row["success_count"])
        return VersionStatistics(
            name=self.name,
            version=self.version,
            state=self.state,
            inference_count=count,
            execution_count=0,
            success=Duration(count, 0),
            failure=Duration(0, 0),
            queue=Duration(0, 0),
            compute=Duration(0, 0),
            last_inference_ms=0,
            detail={"tenant": tenant, **row, "histograms": {"request": row["histogram"]} if "histogram" in row else {}},
        )


@dataclass(frozen=True, slots=True)
class ModelContract:
    """What a stream needs to know to use a model without naming tensors in code: the one input it
    feeds, the output that carries the score, the class labels (in output order) and, for a risk
    score, the positive class. Read from the model's config.toml (`[contract]`)."""

    name: str
    version: str
    max_batch_size: int
    input: TensorMetadata
    score_output: str
    labels: tuple[str, ...] = ()
    positive_class: str | None = None

    def positive_index(self) -> int:
        """Column of the positive class in the score output (the last one when not named)."""
        if self.positive_class is None or not self.labels:
            return -1
        return self.labels.index(self.positive_class)
