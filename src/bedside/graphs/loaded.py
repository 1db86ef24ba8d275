"""The graphs of a repository: the folders with a graph.toml, loaded after the models they call.

A graph that fails its checks is UNAVAILABLE with the reason (in the repository index and the
answer to a call), and every other graph and model keeps serving; a reload that fails keeps the
graph that was serving. A graph's statistics survive its reloads, as a model's do; its response
cache does not (a reload may change what it answers).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from bedside.errors import BedsideError, ModelLoadError, model_not_found
from bedside.graphs.check import ModelConfigOf, plan_graph
from bedside.graphs.engine import CallModel, Graph
from bedside.graphs.spec import load_graph_spec
from bedside.modelconfig.model import GRAPH_FILE, AccessSpec
from bedside.monitoring.latency import ModelStats

log = logging.getLogger("bedside.graphs")


def is_graph_folder(folder: Path) -> bool:
    return (folder / GRAPH_FILE).is_file()


def graph_names(root: Path, only: frozenset[str] | None = None) -> list[str]:
    """The graphs of a repository folder, by name (`only`: those among them; None: all)."""
    if not root.is_dir():
        return []
    found = (p.name for p in root.iterdir() if not p.name.startswith(".") and is_graph_folder(p))
    return sorted(name for name in found if only is None or name in only)


@dataclass
class GraphEntry:
    name: str
    state: str = "UNLOADED"  # READY | UNAVAILABLE | UNLOADED
    reason: str = ""
    graph: Graph | None = None
    access: AccessSpec | None = None  # from graph.toml once read
    stats: ModelStats = field(default_factory=ModelStats)


class GraphSet:
    def __init__(
        self,
        root: Path,
        model_config: ModelConfigOf,
        call: CallModel,
        max_tenant_stats: int,
        detailed: bool,
        only: frozenset[str] | None = None,
    ) -> None:
        self.root = root
        self.only = only  # the graphs served here (a cluster replica's share); None: all of them
        self._model_config = model_config
        self._call = call
        self._max_tenant_stats = max_tenant_stats
        self._detailed = detailed
        self._entries: dict[str, GraphEntry] = {}
        self._ready: dict[str, Graph] = {}  # the hot path's one look-up
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return graph_names(self.root, self.only)

    def is_graph(self, name: str) -> bool:
        if name in self._entries:
            return True
        odd = "/" in name or "\\" in name or "\x00" in name or name.startswith(".")
        if odd or len(name.encode(errors="replace")) > 255:
            return False
        try:
            return is_graph_folder(self.root / name)
        except (OSError, ValueError):  # a name the file system cannot take is no graph (and no model: a 404)
            return False

    def find(self, name: str) -> Graph | None:
        return self._ready.get(name)

    def entry(self, name: str) -> GraphEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[GraphEntry]:
        known = dict(self._entries)
        for name in self.names():
            known.setdefault(name, GraphEntry(name))
        return [known[n] for n in sorted(known)]

    def load_all(self) -> None:
        for name in self.names():
            with contextlib.suppress(BedsideError):  # logged by load(), with the reason
                self.load(name)

    def load(self, name: str) -> Graph:
        if not self.is_graph(name):
            raise model_not_found(name)
        folder = self.root / name
        with self._lock:
            old = self._entries.get(name)
            stats = old.stats if old is not None else ModelStats(self._max_tenant_stats, self._detailed)
            try:
                spec = load_graph_spec(folder / GRAPH_FILE, name)
                graph = Graph(spec, plan_graph(spec, self._model_config, folder), self._call, stats)
            except BedsideError as exc:
                if old is not None and old.graph is not None:
                    old.reason = f"last reload refused: {exc.message}"
                    log.warning("reload of graph %s refused (%s); the loaded one keeps serving", name, exc.message)
                    raise ModelLoadError(f"reload of graph {name!r} failed ({exc.message}); still serving") from None
                self._entries[name] = GraphEntry(name, "UNAVAILABLE", exc.message, None, None, stats)
                log.warning("graph %s is unavailable: %s", name, exc.message)
                raise ModelLoadError(f"graph {name!r} is unavailable: {exc.message}") from None
            self._entries[name] = GraphEntry(name, "READY", "", graph, spec.access, stats)
            self._ready[name] = graph
        log.info("loaded graph %s (%d steps)", name, len(spec.steps))
        return graph

    def unload(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                if not self.is_graph(name):
                    raise model_not_found(name)
                return
            self._ready.pop(name, None)
            self._entries[name] = GraphEntry(name, "UNLOADED", "unloaded", None, entry.access, entry.stats)
