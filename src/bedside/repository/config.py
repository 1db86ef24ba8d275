"""Model configuration: parsed from `config.toml`, inferred from the ONNX graph when absent, and
checked against the graph at load so a wrong config fails at load time, not on the first patient.

Shapes follow Triton's convention: with `max_batch_size > 0` the config shape leaves out the batch
dimension, which is always the first one of the graph.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.errors import ModelLoadError
from bedside.protocol.datatypes import DATATYPES
from bedside.scheduler.policy import SchedulingPolicy, parse_policy

CONFIG_FILE = "config.toml"
PROVIDERS = ("tensorrt", "cuda", "openvino", "cpu")
DEFAULT_MAX_BATCH = 32


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
        }
        if self.warmup is not None:
            doc["warmup"] = self.warmup.to_dict()
        doc.update(self.scheduling.to_dict())
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
}


def load_config(path: Path, folder_name: str) -> ModelConfig:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(doc, folder_name)


def parse_config(doc: dict[str, Any], folder_name: str) -> ModelConfig:
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ModelLoadError(f"unknown config keys: {', '.join(sorted(unknown))}")
    name = doc.get("name", folder_name)
    if name != folder_name:
        raise ModelLoadError(f"config name {name!r} differs from its folder {folder_name!r}")
    platform = doc.get("platform", "onnxruntime_onnx")
    if platform != "onnxruntime_onnx":
        raise ModelLoadError(f"platform {platform!r} is not supported; use 'onnxruntime_onnx'")
    max_batch = _int(doc, "max_batch_size", 0, minimum=0)
    if "inputs" not in doc or "outputs" not in doc:
        raise ModelLoadError("config needs [[inputs]] and [[outputs]] tables (or no config file)")
    providers = tuple(doc.get("execution_providers", PROVIDERS))
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or not providers:
        raise ModelLoadError(f"execution_providers {list(providers)}: each must be one of {', '.join(PROVIDERS)}")
    config = ModelConfig(
        name=name,
        description=str(doc.get("description", "")),
        max_batch_size=max_batch,
        inputs=_tensors(doc["inputs"], "inputs"),
        outputs=_tensors(doc["outputs"], "outputs"),
        version_policy=_policy(doc.get("version_policy", {})),
        instances=_int(doc, "instances", 1, minimum=1),
        threads=_int(doc, "threads", 0, minimum=0),
        execution_providers=providers,
        warmup=_warmup(doc.get("warmup", {})),
        scheduling=parse_policy(
            doc.get("scheduling"), doc.get("dynamic_batching"), doc.get("queue_policy"), doc.get("tenants")
        ),
    )
    if config.scheduling.reserved_instances >= config.instances:
        raise ModelLoadError(
            f"scheduling.reserved_instances {config.scheduling.reserved_instances} leaves no instance for "
            f"routine work; raise instances (now {config.instances})"
        )
    return config


def _int(doc: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelLoadError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _tensors(raw: Any, where: str) -> tuple[TensorSpec, ...]:
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
    latest = raw.get("latest", 1)
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
    sizes = raw.get("batch_sizes", [1])
    if not isinstance(sizes, list) or not all(isinstance(b, int) and b > 0 for b in sizes):
        raise ModelLoadError("warmup.batch_sizes must list positive integers")
    fill = raw.get("fill", "zeros")
    if fill not in ("zeros", "random"):
        raise ModelLoadError("warmup.fill must be 'zeros' or 'random'")
    iterations = raw.get("iterations", 2)
    if not isinstance(iterations, int) or iterations < 1:
        raise ModelLoadError("warmup.iterations must be a positive integer")
    return WarmupSpec(tuple(sizes), fill, iterations)


# --- the graph side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraphTensor:
    name: str
    datatype: str
    shape: tuple[int, ...] | None  # None: rank unknown


def infer_config(name: str, inputs: list[GraphTensor], outputs: list[GraphTensor]) -> ModelConfig:
    """A config for a model folder that has none: batch if every tensor has a dynamic first dim."""
    tensors = inputs + outputs
    batched = all(t.shape and t.shape[0] == -1 for t in tensors)

    def spec(t: GraphTensor) -> TensorSpec:
        shape = t.shape or (-1,)
        return TensorSpec(t.name, t.datatype, shape[1:] if batched else shape)

    return ModelConfig(
        name=name,
        description="config inferred from the ONNX graph",
        max_batch_size=DEFAULT_MAX_BATCH if batched else 0,
        inputs=tuple(spec(t) for t in inputs),
        outputs=tuple(spec(t) for t in outputs),
        inferred=True,
    )


def check_against_graph(config: ModelConfig, inputs: list[GraphTensor], outputs: list[GraphTensor]) -> None:
    graph_in = {t.name: t for t in inputs}
    graph_out = {t.name: t for t in outputs}
    missing = [n for n in graph_in if n not in {s.name for s in config.inputs}]
    if missing:
        raise ModelLoadError(f"graph inputs {missing} are not in the config")
    for spec in config.inputs:
        _check_tensor(config, spec, graph_in.get(spec.name), "input", strict=True)
    for spec in config.outputs:
        _check_tensor(config, spec, graph_out.get(spec.name), "output", strict=False)


def _check_tensor(config: ModelConfig, spec: TensorSpec, graph: GraphTensor | None, kind: str, strict: bool) -> None:
    if graph is None:
        raise ModelLoadError(f"config {kind} {spec.name!r} is not in the ONNX graph")
    if graph.datatype != spec.datatype:
        raise ModelLoadError(f"{kind} {spec.name!r}: config says {spec.datatype}, the graph has {graph.datatype}")
    if graph.shape is None:
        return
    want = config.full_shape(spec)
    if len(want) != len(graph.shape):
        raise ModelLoadError(
            f"{kind} {spec.name!r}: config shape {list(want)} (batch included) has rank "
            f"{len(want)}, the graph's {list(graph.shape)} has rank {len(graph.shape)}"
        )
    if config.max_batch_size > 0 and graph.shape[0] != -1:
        raise ModelLoadError(
            f"{kind} {spec.name!r}: the graph's first dimension is fixed at {graph.shape[0]}, "
            "so it cannot batch; set max_batch_size = 0 and give the full shape"
        )
    for i, (c, g) in enumerate(zip(want, graph.shape, strict=True)):
        if g != -1 and c != g and (strict or c != -1):
            raise ModelLoadError(f"{kind} {spec.name!r}: dimension {i} is {c} in the config but {g} in the graph")
