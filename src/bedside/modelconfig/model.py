"""Model configuration: parsed from `config.toml`, inferred from the ONNX graph when absent, and
checked against the graph at load so a wrong config fails at load time, not on the first patient.

Shapes follow Triton's convention: with `max_batch_size > 0` the config shape leaves out the batch
dimension, which is always the first one of the graph.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bedside.errors import ModelLoadError
from bedside.modelconfig.cache import CacheSpec, parse_cache
from bedside.modelconfig.cluster import ClusterSpec, parse_cluster
from bedside.modelconfig.scheduling import SchedulingPolicy, parse_policy
from bedside.protocol.datatypes import DATATYPES
from bedside.protocol.types import DEFAULT_TENANT

CONFIG_FILE = "config.toml"
GRAPH_FILE = "graph.toml"  # a folder with one is an inference graph (bedside.graphs), not a model
PROVIDERS = ("tensorrt", "cuda", "openvino", "cpu")
DEFAULT_MAX_BATCH = 32
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a dynamic dimension

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    latest: int | None = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]

    def to_dict(self) -> dict[str, Any]:
        if self.all:
            return {"all": True}
        if self.specific:
            return {"specific": list(self.specific)}
        return {"latest": self.latest}


@dataclass(frozen=True, slots=True)
class WarmupSpec:
    batch_sizes: tuple[int, ...] = (1,)
    fill: str = "zeros"  # zeros | random
    iterations: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "fill": self.fill, "iterations": self.iterations}


@dataclass(frozen=True, slots=True)
class ContractSpec:
    """How streams use the model (`[contract]`): which input they feed, which output carries the
    score, the class labels in output order (as a Triton label file) and the positive class of a
    risk score. Empty: the only input, the first output, no labels, the last column is the risk."""

    input: str | None = None
    score_output: str | None = None
    labels: tuple[str, ...] = ()
    positive_class: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.input:
            doc["input"] = self.input
        if self.score_output:
            doc["score_output"] = self.score_output
        if self.labels:
            doc["labels"] = list(self.labels)
        if self.positive_class:
            doc["positive_class"] = self.positive_class
        return doc


@dataclass(frozen=True, slots=True)
class AccessSpec:
    """Which tenants may see and use the model (`[access]`), when callers authenticate: its owner
    and the tenants it is shared with ("*": every tenant). Left out: owned by the default tenant."""

    owner: str = DEFAULT_TENANT
    shared_with: tuple[str, ...] = ()

    def admits(self, tenant: str) -> bool:
        return tenant == self.owner or tenant in self.shared_with or "*" in self.shared_with


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    description: str = ""
    platform: str = "onnxruntime_onnx"
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    instances: int = 1
    threads: int = 0  # 0: decided from the box and the model size
    execution_providers: tuple[str, ...] = PROVIDERS
    warmup: WarmupSpec | None = field(default_factory=WarmupSpec)
    scheduling: SchedulingPolicy = field(default_factory=SchedulingPolicy)
    contract: ContractSpec = field(default_factory=ContractSpec)
    cache: CacheSpec | None = None  # answers kept for identical inputs, per tenant (off by default)
    cluster: ClusterSpec | None = None  # replicas, CPUs, memory on a Ray Serve cluster (bedside cluster only)
    access: AccessSpec = field(default_factory=AccessSpec)  # not in to_dict: tenants see no other tenant's name
    # NaN/Infinity in inputs or outputs: refused by default (a clinical score from a NaN is no score)
    allow_non_finite: bool = False
    inferred: bool = False

    def full_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        return ((-1, *spec.shape)) if self.max_batch_size > 0 else spec.shape

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "platform": self.platform,
            "max_batch_size": self.max_batch_size,
            "instances": self.instances,
            "threads": self.threads,
            "execution_providers": list(self.execution_providers),
            "version_policy": self.version_policy.to_dict(),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "allow_non_finite": self.allow_non_finite,
        }
        if self.warmup is not None:
            doc["warmup"] = self.warmup.to_dict()
        doc.update(self.scheduling.to_dict())
        if self.cache is not None:
            doc["cache"] = self.cache.to_dict()
        if self.cluster is not None:
            doc["cluster"] = self.cluster.to_dict()
        if self.contract.to_dict():
            doc["contract"] = self.contract.to_dict()
        return doc


_TOP_KEYS = {
    "name",
    "description",
    "platform",
    "max_batch_size",
    "instances",
    "threads",
    "execution_providers",
    "version_policy",
    "inputs",
    "outputs",
    "warmup",
    "scheduling",
    "dynamic_batching",
    "queue_policy",
    "tenants",
    "contract",
    "allow_non_finite",
    "access",
    "cache",
    "cluster",
}


# The parsers take their defaults from the dataclasses, so each default is written once.
_FIELD: dict[str, Any] = {f.name: f.default for f in fields(ModelConfig)}
_PLATFORM = _FIELD["platform"]
_WARMUP = WarmupSpec()


def read_toml(path: Path, folder_name: str) -> dict[str, Any]:
    """A repository folder's TOML file (config.toml, graph.toml), or ModelLoadError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {folder_name}/{path.name}: {exc.__class__.__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"{folder_name}/{path.name} is not valid TOML: {exc}") from None


def load_config(path: Path, folder_name: str) -> ModelConfig:
    return parse_config(read_toml(path, folder_name), folder_name, path.parent)


def parse_config(doc: dict[str, Any], folder_name: str, folder: Path | None = None) -> ModelConfig:
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ModelLoadError(f"unknown config keys: {', '.join(sorted(unknown))}")
    name = doc.get("name", folder_name)
    if name != folder_name:
        raise ModelLoadError(f"config name {name!r} differs from its folder {folder_name!r}")
    platform = doc.get("platform", _PLATFORM)
    if platform != _PLATFORM:
        raise ModelLoadError(f"platform {platform!r} is not supported; use 'onnxruntime_onnx'")
    max_batch = _int(doc, "max_batch_size", _FIELD["max_batch_size"], minimum=0)
    if "inputs" not in doc or "outputs" not in doc:
        raise ModelLoadError("config needs [[inputs]] and [[outputs]] tables (or no config file)")
    providers = tuple(doc.get("execution_providers", PROVIDERS))
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or not providers:
        raise ModelLoadError(f"execution_providers {list(providers)}: each must be one of {', '.join(PROVIDERS)}")
    inputs, outputs = parse_tensors(doc["inputs"], "inputs"), parse_tensors(doc["outputs"], "outputs")
    config = ModelConfig(
        name=name,
        description=str(doc.get("description", "")),
        max_batch_size=max_batch,
        inputs=inputs,
        outputs=outputs,
        version_policy=_policy(doc.get("version_policy", {})),
        instances=_int(doc, "instances", _FIELD["instances"], minimum=1),
        threads=_int(doc, "threads", _FIELD["threads"], minimum=0),
        execution_providers=providers,
        warmup=_warmup(doc.get("warmup", {})),
        scheduling=parse_policy(
            doc.get("scheduling"), doc.get("dynamic_batching"), doc.get("queue_policy"), doc.get("tenants")
        ),
        contract=_contract(doc.get("contract"), inputs, outputs, folder),
        allow_non_finite=_bool(doc, "allow_non_finite", _FIELD["allow_non_finite"]),
        access=parse_access(doc.get("access")),
        cache=parse_cache(doc.get("cache")),
        cluster=parse_cluster(doc.get("cluster")),
    )
    if config.scheduling.reserved_instances >= config.instances:
        raise ModelLoadError(
            f"scheduling.reserved_instances {config.scheduling.reserved_instances} leaves no instance for "
            f"routine work; raise instances (now {config.instances})"
        )
    return config


def parse_access(raw: Any) -> AccessSpec:
    if raw is None:
        return AccessSpec()
    if not isinstance(raw, dict) or set(raw) - {"owner", "shared_with"}:
        raise ModelLoadError('access takes owner (a tenant) and shared_with (a list of tenants, or ["*"])')
    owner = raw.get("owner", DEFAULT_TENANT)
    shared = raw.get("shared_with", [])
    if not isinstance(shared, list):
        raise ModelLoadError("access.shared_with must be a list of tenant names")
    for tenant in [owner, *(t for t in shared if t != "*")]:
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise ModelLoadError(f"access: tenant {str(tenant)[:64]!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return AccessSpec(owner, tuple(shared))


def _int(doc: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelLoadError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(doc: dict[str, Any], key: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise ModelLoadError(f"{key} must be true or false, got {value!r}")
    return value


def parse_tensors(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ModelLoadError(f"{where} must be a non-empty list of tables")
    specs = []
    for item in raw:
        if not isinstance(item, dict):
            raise ModelLoadError(f"each entry of {where} must be a table")
        stray = set(item) - {"name", "datatype", "shape"}
        if stray:
            raise ModelLoadError(
                f"{where} {item.get('name', '?')!r} has unknown keys {', '.join(sorted(stray))}; an entry takes "
                "name, datatype and shape (model-wide keys go above the first [[inputs]] table)"
            )
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise ModelLoadError(f"an entry of {where} has no name")
        if datatype not in DATATYPES:
            raise ModelLoadError(
                f"{where} {name!r}: datatype {datatype!r} is not one of {', '.join(sorted(DATATYPES))}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape
        ):
            raise ModelLoadError(f"{where} {name!r}: shape must list positive sizes or -1")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    if len({s.name for s in specs}) != len(specs):
        raise ModelLoadError(f"{where} repeats a tensor name")
    return tuple(specs)


def _contract(
    raw: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], folder: Path | None
) -> ContractSpec:
    if raw is None:
        return ContractSpec()
    if not isinstance(raw, dict) or set(raw) - {"input", "score_output", "labels", "labels_file", "positive_class"}:
        raise ModelLoadError("contract takes input, score_output, labels (or labels_file) and positive_class")
    for key in ("input", "score_output", "positive_class"):
        if key in raw and not isinstance(raw[key], str):
            raise ModelLoadError(f"contract.{key} must be a name in quotes, got {type(raw[key]).__name__}")
    input_name = raw.get("input")
    if input_name is not None and input_name not in {s.name for s in inputs}:
        raise ModelLoadError(f"contract.input {input_name!r} is not one of the inputs {[s.name for s in inputs]}")
    score = raw.get("score_output")
    by_name = {s.name: s for s in outputs}
    if score is not None and score not in by_name:
        raise ModelLoadError(f"contract.score_output {score!r} is not one of the outputs {sorted(by_name)}")
    labels = _labels(raw, folder)
    width = (by_name[score] if score else outputs[0]).shape[-1:] or (-1,)
    if labels and width[0] != -1 and width[0] != len(labels):
        raise ModelLoadError(
            f"contract has {len(labels)} labels but output {score or outputs[0].name!r} gives {width[0]} scores per row"
        )
    positive = raw.get("positive_class")
    if positive is not None and positive not in labels:
        raise ModelLoadError(f"contract.positive_class {positive!r} is not one of the labels {list(labels)}")
    return ContractSpec(input_name, score, labels, positive)


def _labels(raw: dict[str, Any], folder: Path | None) -> tuple[str, ...]:
    if "labels" in raw and "labels_file" in raw:
        raise ModelLoadError("contract takes labels or labels_file, not both")
    if "labels_file" in raw:
        name = raw["labels_file"]
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise ModelLoadError("contract.labels_file must be a file name in the model folder")
        if folder is None:
            raise ModelLoadError("contract.labels_file needs the model folder")
        try:
            text = (folder / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ModelLoadError(f"contract.labels_file {name!r} cannot be read from the model folder") from None
        values: Any = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        values = raw.get("labels", [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ModelLoadError("contract.labels must list non-empty strings")
    if len(set(values)) != len(values):
        raise ModelLoadError("contract.labels repeats a label")
    return tuple(values)


def _policy(raw: Any) -> VersionPolicy:
    if not isinstance(raw, dict) or len(raw) > 1 or set(raw) - {"latest", "specific", "all"}:
        raise ModelLoadError("version_policy takes one of: latest = N, specific = [..], all = true")
    if "all" in raw:
        return VersionPolicy(latest=None, all=bool(raw["all"]))
    if "specific" in raw:
        versions = raw["specific"]
        if not isinstance(versions, list) or not versions or not all(isinstance(v, int) and v > 0 for v in versions):
            raise ModelLoadError("version_policy.specific must list positive version numbers")
        return VersionPolicy(latest=None, specific=tuple(versions))
    latest = raw.get("latest", VersionPolicy().latest)
    if not isinstance(latest, int) or latest < 1:
        raise ModelLoadError("version_policy.latest must be a positive integer")
    return VersionPolicy(latest=latest)


def _warmup(raw: Any) -> WarmupSpec | None:
    if raw is False:
        return None
    if not isinstance(raw, dict) or set(raw) - {"batch_sizes", "fill", "iterations", "enabled"}:
        raise ModelLoadError("warmup takes batch_sizes, fill, iterations, enabled")
    if raw.get("enabled", True) is False:
        return None
    sizes = raw.get("batch_sizes", list(_WARMUP.batch_sizes))
    if not isinstance(sizes, list) or not all(isinstance(b, int) and b > 0 for b in sizes):
        raise ModelLoadError("warmup.batch_sizes must list positive integers")
    fill = raw.get("fill", _WARMUP.fill)
    if fill not in ("zeros", "random"):
        raise ModelLoadError("warmup.fill must be 'zeros' or 'random'")
    iterations = raw.get("iterations", _WARMUP.iterations)
    if not isinstance(iterations, int) or iterations < 1:
        raise ModelLoadError("warmup.iterations must be a positive integer")
    return WarmupSpec(tuple(sizes), fill, iterations)
