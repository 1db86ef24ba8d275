"""The graph side of a model config: a config inferred from an ONNX graph's inputs and outputs when
the folder has none, and a written config checked against the graph at load."""

from __future__ import annotations

from dataclasses import dataclass

from bedside.errors import ModelLoadError
from bedside.modelconfig.model import DEFAULT_MAX_BATCH, ModelConfig, TensorSpec


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
