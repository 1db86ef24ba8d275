"""A graph's config: `ROOT/<graph>/graph.toml`, parsed and checked for what it says on its own.

    name = "medication_check"
    deadline_ms = 80                      # the whole graph answers within this, or fails
    [[inputs]]                            # the graph's inputs, full shapes (-1: any size)
    name = "barcode"; datatype = "BYTES"; shape = [1]
    [[outputs]]                           # what it answers, each from a step's output
    name = "verdict"; from = "verdict.verdict"
    [[steps]]
    name = "product"; function = "medication.product"   # a registered Python step
    inputs = { barcode = "barcode" }                    # step input = graph input or "step.output"
    [[steps]]
    name = "risk"; model = "medication_risk"            # a repository model (version: newest)
    inputs = { features = "features.features" }
    timeout_ms = 20; optional = true                    # its failure degrades the answer, and says so

Whether the names resolve, the types match and the steps form no cycle is checked against the
models and step types at load (graphs/check.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.errors import ModelLoadError
from bedside.modelconfig.cache import CacheSpec, parse_cache
from bedside.modelconfig.cluster import ClusterSpec, parse_cluster
from bedside.modelconfig.model import GRAPH_FILE, AccessSpec, TensorSpec, parse_access, parse_tensors, read_toml
from bedside.settings import DEFAULTS

PLATFORM = "bedside_graph"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_TOP = {"name", "description", "deadline_ms", "inputs", "outputs", "steps", "access", "cache", "cluster", "version"}
_STEP = {"name", "model", "version", "function", "inputs", "timeout_ms", "optional", "parameters"}


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    inputs: dict[str, str]  # the step's input -> a graph input, or "step.output"
    model: str | None = None
    version: int | None = None
    function: str | None = None
    timeout_ms: float | None = None  # None: bounded by the graph's deadline only
    optional: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutputSpec:
    name: str
    source: str  # "step.output"


@dataclass(frozen=True, slots=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[OutputSpec, ...]
    steps: tuple[StepSpec, ...]
    deadline_ms: float = DEFAULTS.limits.graph_deadline_ms
    description: str = ""
    version: int = 1
    access: AccessSpec = field(default_factory=AccessSpec)
    cache: CacheSpec | None = None
    cluster: ClusterSpec | None = None  # bedside cluster only


def load_graph_spec(path: Path, folder_name: str) -> GraphSpec:
    return parse_graph_spec(read_toml(path, folder_name), folder_name)


def parse_graph_spec(doc: dict[str, Any], folder_name: str) -> GraphSpec:
    unknown = set(doc) - _TOP
    if unknown:
        raise ModelLoadError(f"{GRAPH_FILE}: unknown keys {', '.join(sorted(unknown))}")
    name = doc.get("name", folder_name)
    if name != folder_name:
        raise ModelLoadError(f"graph name {name!r} differs from its folder {folder_name!r}")
    limits = DEFAULTS.limits
    deadline = _number(doc, "deadline_ms", limits.graph_deadline_ms, 0.01, limits.graph_max_deadline_ms)
    version = doc.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelLoadError("graph version must be a positive integer")
    inputs = parse_tensors(doc.get("inputs"), "inputs")
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ModelLoadError("a graph needs at least one [[steps]] table")
    if len(raw_steps) > limits.graph_max_steps:
        raise ModelLoadError(f"a graph has at most {limits.graph_max_steps} steps (limits.graph_max_steps)")
    steps = tuple(_step(raw, deadline) for raw in raw_steps)
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ModelLoadError("two steps share a name")
    clash = set(names) & {t.name for t in inputs}
    if clash:
        raise ModelLoadError(f"step names {sorted(clash)} are also graph inputs; rename one")
    return GraphSpec(
        name=name,
        description=str(doc.get("description", "")),
        inputs=inputs,
        outputs=_outputs(doc.get("outputs")),
        steps=steps,
        deadline_ms=deadline,
        version=version,
        access=parse_access(doc.get("access")),
        cache=parse_cache(doc.get("cache")),
        cluster=parse_cluster(doc.get("cluster")),
    )


def _step(raw: Any, deadline_ms: float) -> StepSpec:
    if not isinstance(raw, dict):
        raise ModelLoadError("each [[steps]] entry must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ModelLoadError(f"step name {str(name)[:64]!r} must be 1-64 letters, digits, '_' or '-'")
    stray = set(raw) - _STEP
    if stray:
        raise ModelLoadError(f"step {name!r}: unknown keys {', '.join(sorted(stray))}")
    model, function = raw.get("model"), raw.get("function")
    if (model is None) == (function is None):
        raise ModelLoadError(f"step {name!r} needs exactly one of model (a repository model) or function")
    for key, value in (("model", model), ("function", function)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ModelLoadError(f"step {name!r}: {key} must be a name in quotes")
    version = raw.get("version")
    if version is not None and (model is None or not isinstance(version, int) or version < 1):
        raise ModelLoadError(f"step {name!r}: version must be a positive integer, on a model step")
    mapping = raw.get("inputs", {})
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ModelLoadError(f'step {name!r}: inputs must map each step input to a source, e.g. {{ x = "prep.x" }}')
    timeout = raw.get("timeout_ms")
    if timeout is not None:
        timeout = _number(raw, "timeout_ms", 0.0, 0.01, deadline_ms, f"step {name!r}: ")
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise ModelLoadError(f"step {name!r}: optional must be true or false")
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ModelLoadError(f"step {name!r}: parameters must be a table")
    return StepSpec(name, dict(mapping), model, version, function, timeout, optional, parameters)


def _outputs(raw: Any) -> tuple[OutputSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ModelLoadError('a graph needs [[outputs]] tables, each with name and from = "step.output"')
    found = []
    for item in raw:
        if not isinstance(item, dict) or set(item) - {"name", "from"}:
            raise ModelLoadError('each [[outputs]] entry takes name and from = "step.output"')
        name, source = item.get("name"), item.get("from")
        if not isinstance(name, str) or not name or not isinstance(source, str) or "." not in source:
            raise ModelLoadError(f'output {str(name)[:64]!r} needs a name and from = "step.output"')
        found.append(OutputSpec(name, source))
    if len({o.name for o in found}) != len(found):
        raise ModelLoadError("outputs repeat a name")
    return tuple(found)


def _number(doc: dict[str, Any], key: str, default: float, low: float, high: float, where: str = "") -> float:
    value = doc.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ModelLoadError(f"{where}{key} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)
