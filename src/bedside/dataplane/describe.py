"""What the dataplane says about models and graphs without running them: who may see which, their
metadata, configs, readiness and stream contracts. A mixin of `Dataplane`, kept apart so the class
that holds the hot path stays small enough to read in one sitting."""

from __future__ import annotations

from dataclasses import replace

from bedside import __version__
from bedside.dataplane.access import DESCRIBE, INFER, NO_TENANT, Access, restricted
from bedside.dataplane.graphs import explain_graph_missing, graph_metadata
from bedside.dataplane.types import ModelContract, ModelMetadata, ServerMetadata, TensorMetadata
from bedside.errors import BedsideError, NotFound, Unavailable
from bedside.graphs.engine import Graph
from bedside.graphs.loaded import GraphSet
from bedside.modelconfig.model import AccessSpec, ModelConfig, TensorSpec
from bedside.protocol.types import SYSTEM, Caller
from bedside.repository.manager import ModelEntry, RepositoryManager, State

EXTENSIONS = ("binary_tensor_data", "model_repository", "statistics", "model_configuration")


def parse_version(version: str | None) -> int | None:
    """'' or None: the newest ready version. Only ASCII digits count: '²' is a digit to Python."""
    if version is None or version == "":
        return None
    if not (version.isascii() and version.isdigit()) or len(version) > 18 or int(version) < 1:
        raise NotFound(f"version {version[:32]!r} is not a positive integer")
    return int(version)


class Describe:
    _manager: RepositoryManager
    _graphs: GraphSet
    access: Access

    def _graph_serving(self, graph: Graph, version: str | None, caller: Caller, transport: str) -> Graph:
        if INFER not in caller.roles:
            self.access.require(caller, INFER, transport=transport, action="infer")
        self.access.check_model(caller, graph.name, graph.config.access, transport)
        if version and version != graph.version_text:
            parse_version(version)
            raise NotFound(f"graph {graph.name!r} has no version {version}; it serves [{graph.version_text}]")
        return graph

    def _graph_model_config(self, name: str) -> ModelConfig:
        """A graph step's model config: the loaded one, else its config.toml (a model may load later)."""
        config = self._manager.entry(name).config or self._manager.store.config(name)
        if config is None:
            raise Unavailable(f"model {name!r} has no config.toml and is not loaded, so its tensors are unknown")
        return config

    def _check_model(self, caller: Caller, name: str, transport: str = "") -> None:
        """404, worded as for a model that does not exist, unless the caller may see this one."""
        self.access.check_model(caller, name, self._access_of(name), transport)

    def _access_of(self, name: str) -> AccessSpec | None:
        """The model's [access] from its loaded config, else from its folder (None: no config.toml,
        the default tenant's). A config that cannot be read gives no tenant access: its [access]
        is unknown, so only the server itself and an unauthenticated operator see the model."""
        graph = self._graphs.entry(name)
        if graph is not None:
            return graph.access or NO_TENANT  # a graph.toml that cannot be read: no tenant's
        entry = self._manager.entry(name)  # NotFound for a model that does not exist
        if entry.config is not None:
            return entry.config.access
        try:
            config = self._manager.store.config(name)
        except BedsideError:
            return NO_TENANT
        return None if config is None else config.access

    def server_metadata(self, caller: Caller) -> ServerMetadata:
        del caller  # any authenticated caller (the transport has authenticated it)
        return ServerMetadata("bedside", __version__, EXTENSIONS)

    def _ready_entry(
        self, name: str, version: int | None, caller: Caller, transport: str = ""
    ) -> tuple[ModelEntry, ModelConfig, int]:
        self.access.require(caller, *DESCRIBE, transport=transport)
        self._check_model(caller, name, transport)
        entry = self._manager.entry(name)
        if version is not None and version not in entry.versions:
            raise NotFound(f"model {name!r} has no version {version}")
        ready = entry.ready_versions()
        if entry.config is None or (version is None and not ready):
            raise Unavailable(f"model {name!r} is not ready: {entry.reason or entry.state.value.lower()}")
        return entry, entry.config, ready[-1] if version is None else version

    def _described_graph(self, name: str, version: str | None, caller: Caller, transport: str) -> Graph | None:
        """The graph `name` for a describe call (403/404/503 as for a model), or None: not a graph."""
        if not self._graphs.is_graph(name):
            return None
        self.access.require(caller, *DESCRIBE, transport=transport)
        self._check_model(caller, name, transport)
        graph = self._graphs.find(name)
        if graph is None:
            explain_graph_missing(self._graphs, name)
        return self._graph_serving(graph, version, SYSTEM, transport)

    def model_metadata(self, name: str, version: str | None, caller: Caller, transport: str = "") -> ModelMetadata:
        graph = self._described_graph(name, version, caller, transport)
        if graph is not None:
            return graph_metadata(graph)
        number = parse_version(version)
        entry, config, chosen = self._ready_entry(name, number, caller, transport)
        return ModelMetadata(
            name=name,
            versions=tuple(str(v) for v in entry.ready_versions()) if number is None else (str(chosen),),
            platform=config.platform,
            inputs=tuple(_tensor(config, s) for s in config.inputs),
            outputs=tuple(_tensor(config, s) for s in config.outputs),
        )

    def model_config(self, name: str, version: str | None, caller: Caller, transport: str = "") -> ModelConfig:
        graph = self._described_graph(name, version, caller, transport)
        if graph is not None:
            return graph.config
        config = self._ready_entry(name, parse_version(version), caller, transport)[1]
        if not restricted(caller) or not config.scheduling.tenants:
            return config
        # the per-tenant scheduling table names tenants: a caller sees only its own row
        mine = {t: p for t, p in config.scheduling.tenants.items() if t == caller.tenant}
        return replace(config, scheduling=replace(config.scheduling, tenants=mine))

    def model_ready(self, name: str, version: str | None, caller: Caller, transport: str = "") -> bool:
        self.access.require(caller, *DESCRIBE, transport=transport)
        self._check_model(caller, name, transport)
        if self._graphs.is_graph(name):
            graph = self._graphs.find(name)
            return graph is not None and version in (None, "", graph.version_text)
        entry = self._manager.entry(name)
        number = parse_version(version)
        if number is None:
            return bool(entry.ready_versions())
        if number not in entry.versions:
            raise NotFound(f"model {name!r} has no version {number}")
        return entry.versions[number].state is State.READY

    def contract(self, name: str) -> ModelContract:
        """How a stream uses this model: its input, score output and labels, from its config."""
        _, config, version = self._ready_entry(name, None, SYSTEM)
        spec = config.contract
        inputs = {s.name: s for s in config.inputs}
        return ModelContract(
            name=name,
            version=str(version),
            max_batch_size=config.max_batch_size,
            input=_tensor(config, inputs[spec.input] if spec.input else config.inputs[0]),
            score_output=spec.score_output or _default_score_output(config),
            labels=spec.labels,
            positive_class=spec.positive_class,
        )


def _default_score_output(config: ModelConfig) -> str:
    """Without a contract: an output named `probabilities` (what scikit-learn, LightGBM and XGBoost
    converters write beside `label`), else the first floating-point output, else the first one."""
    names = [s.name for s in config.outputs]
    if "probabilities" in names:
        return "probabilities"
    floats = [s.name for s in config.outputs if s.datatype in ("FP16", "FP32", "FP64")]
    return floats[0] if floats else names[0]


def _tensor(config: ModelConfig, spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(spec.name, spec.datatype, config.full_shape(spec))
