"""Python steps of inference graphs: the registered functions a graph may name.

A graph config names a Python step by its registered name, never by a module path: a repository
folder cannot make the server import code of its choosing. Steps come from packages that declare an
entry point in the group `bedside.graph_steps` (bedside's own medication steps do so in its
pyproject); importing that module registers its steps here.

A step type declares its ports (name, datatype, full shape, optional) so a graph is type-checked at
load, and a `build(parameters, folder)` that returns the function to run: the place to read a data
file once (the medication formulary, a dosing table) rather than on every request.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from bedside.errors import ModelLoadError
from bedside.protocol.types import Caller

ENTRY_POINT_GROUP = "bedside.graph_steps"
log = logging.getLogger("bedside.graphs")


@dataclass(frozen=True, slots=True)
class Port:
    """One tensor a step takes or gives. `shape` is the full shape (-1: any size; None: any rank)."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None = None
    optional: bool = False  # an input the step can do without (its source step degraded)


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step knows of the request it serves: who asks, for which tenant, how urgently, and how
    long is left. Model steps pass the same tenant and priority to their model's queue."""

    graph: str
    step: str
    tenant: str
    priority: int | str | None
    caller: Caller
    deadline_ns: int  # perf_counter_ns() by which the graph must answer


Tensors = dict[str, np.ndarray]
StepFunction = Callable[[Tensors, StepContext], Tensors | Awaitable[Tensors]]
Builder = Callable[[Mapping[str, Any], Path], StepFunction]


@dataclass(frozen=True, slots=True)
class StepType:
    name: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    build: Builder
    doc: str = ""
    # awaited steps (async functions) can be timed out and run beside model steps; a plain function
    # runs inline on the event loop (tens of microseconds: a thread hop would cost more than the step)
    is_async: bool = False


_REGISTRY: dict[str, StepType] = {}
_discovered = False


def register(step_type: StepType) -> StepType:
    """Add a step type. Registering a name twice with a different definition is a programming error."""
    known = _REGISTRY.get(step_type.name)
    if known is not None and known != step_type:
        raise ValueError(f"graph step {step_type.name!r} is registered twice")
    _REGISTRY[step_type.name] = step_type
    return step_type


def step(
    name: str, inputs: tuple[Port, ...], outputs: tuple[Port, ...], is_async: bool = False
) -> Callable[[StepFunction], StepFunction]:
    """Register a function that needs no set-up as a step type (decorator)."""

    def wrap(fn: StepFunction) -> StepFunction:
        register(StepType(name, inputs, outputs, lambda _params, _folder: fn, fn.__doc__ or "", is_async))
        return fn

    return wrap


def find(name: str) -> StepType:
    """The registered step type, or a ModelLoadError that lists the known ones."""
    if name not in _REGISTRY:
        discover()
    found = _REGISTRY.get(name)
    if found is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ModelLoadError(f"no graph step named {name!r} is registered (known: {known})")
    return found


def discover() -> None:
    """Import every module that declares steps through the entry point group (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(point.value.split(":")[0])
        except Exception as exc:  # one broken plug-in must not keep the other steps away
            log.error("graph steps %s could not be imported: %s", point.name, type(exc).__name__)


def registered() -> list[str]:
    discover()
    return sorted(_REGISTRY)
