"""Load-time checks of a graph against the models and step types it names, and its execution plan.

Everything that can be known before the first patient is refused here, with the step and tensor it
concerns: an unknown model or step, an input mapped to nothing or to a tensor of another datatype or
shape, a cycle, a required input fed by an optional step, a step whose outputs nothing uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bedside.errors import BedsideError, ModelLoadError
from bedside.graphs.spec import GraphSpec, StepSpec
from bedside.graphs.steps import Port, StepFunction, find
from bedside.modelconfig.model import ModelConfig, TensorSpec

ModelConfigOf = Callable[[str], ModelConfig]  # a model's config, or ModelLoadError/NotFound


@dataclass(frozen=True, slots=True)
class PlannedStep:
    spec: StepSpec
    index: int
    sources: tuple[tuple[str, str], ...]  # (the step's input, the value that feeds it)
    deps: tuple[int, ...]  # upstream steps
    outputs: tuple[str, ...]  # what the step gives that something uses ("step.output" keys: name.output)
    optional_inputs: frozenset[str]
    function: StepFunction | None  # a Python step's function; None for a model step
    is_async: bool


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[PlannedStep, ...]  # in a topological order
    outputs: tuple[TensorSpec, ...]  # the graph's outputs with the datatype and shape of their source


def plan_graph(spec: GraphSpec, model_config: ModelConfigOf, folder: Path) -> Plan:
    ports_in: dict[str, dict[str, Port]] = {}
    ports_out: dict[str, dict[str, Port]] = {}
    functions: dict[str, tuple[StepFunction, bool]] = {}
    for step in spec.steps:
        ports_in[step.name], ports_out[step.name] = _ports(step, model_config)
        if step.function is not None:
            step_type = find(step.function)
            try:
                functions[step.name] = (step_type.build(step.parameters, folder), step_type.is_async)
            except BedsideError as exc:
                raise ModelLoadError(f"step {step.name!r} ({step.function}): {exc.message}") from None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"step {step.name!r} ({step.function}) cannot start: {exc}") from None
    graph_inputs = {t.name: Port(t.name, t.datatype, t.shape) for t in spec.inputs}
    optional = {s.name for s in spec.steps if s.optional}
    used: set[str] = set()
    edges: dict[str, set[str]] = {s.name: set() for s in spec.steps}
    for step in spec.steps:
        mine = ports_in[step.name]
        stray = sorted(set(step.inputs) - set(mine))
        if stray:
            raise ModelLoadError(f"step {step.name!r} has no inputs {stray}; it takes {sorted(mine)}")
        for port in mine.values():
            source = step.inputs.get(port.name)
            if source is None:
                if port.optional:
                    continue
                raise ModelLoadError(
                    f"step {step.name!r}: input {port.name!r} is not mapped to any graph input or step output"
                )
            given = _source(source, graph_inputs, ports_out, step.name)
            _same_type(given, port, f"step {step.name!r} input {port.name!r} from {source!r}")
            upstream = source.split(".", 1)[0] if source not in graph_inputs else None
            if upstream is not None:
                used.add(source)
                edges[step.name].add(upstream)
                if upstream in optional and not port.optional and not step.optional:
                    raise ModelLoadError(
                        f"step {step.name!r} needs {source!r}, but step {upstream!r} is optional and may give "
                        "nothing: make this step optional too, or its input optional"
                    )
    outputs = []
    for out in spec.outputs:
        port = _source(out.source, {}, ports_out, f"output {out.name!r}")
        used.add(out.source)
        outputs.append(TensorSpec(out.name, port.datatype, port.shape if port.shape is not None else (-1,)))
    order = _topological(spec, edges)
    idle = [s.name for s in spec.steps if not any(k.split(".", 1)[0] == s.name for k in used)]
    if idle:
        raise ModelLoadError(f"nothing uses the outputs of steps {idle}: map them to a step or a graph output")
    index = {name: i for i, name in enumerate(order)}
    by_name = {s.name: s for s in spec.steps}
    planned = []
    for name in order:
        step = by_name[name]
        function, is_async = functions.get(name, (None, True))
        planned.append(
            PlannedStep(
                spec=step,
                index=index[name],
                sources=tuple(step.inputs.items()),
                deps=tuple(sorted(index[d] for d in edges[name])),
                outputs=tuple(sorted(k.split(".", 1)[1] for k in used if k.split(".", 1)[0] == name)),
                optional_inputs=frozenset(p.name for p in ports_in[name].values() if p.optional),
                function=function,
                is_async=is_async,
            )
        )
    return Plan(tuple(planned), tuple(outputs))


def _ports(step: StepSpec, model_config: ModelConfigOf) -> tuple[dict[str, Port], dict[str, Port]]:
    if step.function is not None:
        step_type = find(step.function)
        return {p.name: p for p in step_type.inputs}, {p.name: p for p in step_type.outputs}
    assert step.model is not None
    try:
        config = model_config(step.model)
    except BedsideError as exc:
        raise ModelLoadError(f"step {step.name!r}: model {step.model!r} cannot be used: {exc.message}") from None

    def port(spec: TensorSpec) -> Port:
        return Port(spec.name, spec.datatype, config.full_shape(spec))

    return {s.name: port(s) for s in config.inputs}, {s.name: port(s) for s in config.outputs}


def _source(source: str, graph_inputs: dict[str, Port], ports_out: dict[str, dict[str, Port]], where: str) -> Port:
    if source in graph_inputs:
        return graph_inputs[source]
    step, _, output = source.partition(".")
    if step not in ports_out:
        raise ModelLoadError(f"{where}: {source!r} is neither a graph input nor a step's output")
    if output not in ports_out[step]:
        raise ModelLoadError(f"{where}: step {step!r} gives no {output!r}; it gives {sorted(ports_out[step])}")
    return ports_out[step][output]


def _same_type(given: Port, wanted: Port, where: str) -> None:
    if given.datatype != wanted.datatype:
        raise ModelLoadError(f"{where}: datatype {given.datatype} where {wanted.datatype} is expected")
    if given.shape is None or wanted.shape is None:
        return
    if len(given.shape) != len(wanted.shape) or any(
        g != w and g != -1 and w != -1 for g, w in zip(given.shape, wanted.shape, strict=True)
    ):
        raise ModelLoadError(f"{where}: shape {list(given.shape)} where {list(wanted.shape)} is expected (-1 = any)")


def _topological(spec: GraphSpec, edges: dict[str, set[str]]) -> list[str]:
    """Kahn's order (config order among equals); a cycle is refused with the steps on it."""
    waiting = {name: set(deps) for name, deps in edges.items()}
    order: list[str] = []
    while waiting:
        ready = [s.name for s in spec.steps if s.name in waiting and not waiting[s.name]]
        if not ready:
            raise ModelLoadError(f"the steps {sorted(waiting)} form a cycle (each waits for another)")
        for name in ready:
            order.append(name)
            del waiting[name]
        for deps in waiting.values():
            deps.difference_update(ready)
    return order
