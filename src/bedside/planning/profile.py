"""Measure what each model of a repository costs on this box: resident memory and execution latency
per batch size. Saved as JSON so a plan can be redone (another workload, another config) without
measuring again, or measured on the target box and planned elsewhere.

Models load exactly as `bedside serve` loads them (RepositoryManager: version policy, session
options, execution provider, warm-up), one after another in this process. Memory is the growth of
this process's resident set (RSS, /proc/self/statm) across the load: the session, its weights, its
warm-up arena. An execution's working memory (`run_mb`) is the further growth from running the
largest batch, and never less than that batch's input and output tensors: each instance running at
the same time needs its own. Latency is timed as the server's worker times compute: merging the
batch's single-row requests, the run, splitting the outputs.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bedside.errors import BedsideError
from bedside.modelconfig.model import ModelConfig
from bedside.protocol.datatypes import numpy_dtype
from bedside.repository.manager import RepositoryManager
from bedside.repository.store import ModelStore
from bedside.runtime.session import OnnxModel
from bedside.scheduler.batching import merge, split

FORMAT = "bedside-plan-profile/1"
GRAPH_FILE = "graph.toml"  # a folder with one is a graph (steps calling models), not a model
IDLE_GAPS_MS = (0.5, 2.0, 5.0, 20.0)
MAX_BATCH_MEASURED = 256  # larger batches are extrapolated by the simulator from the two largest measured


class ProfileError(BedsideError):
    """A profile file that cannot be used (exit 2 on the command line)."""

    status = 400


@dataclass
class ModelProfile:
    name: str
    version: int  # the version unversioned requests reach: the one timed
    versions_loaded: int  # versions the policy loads: all count in memory
    max_batch_size: int
    instances: int
    threads: int  # intra-op threads the session got (config, or chosen from the model's size)
    file_mb: float
    session_mb: float  # RSS growth across the load, all versions
    run_mb: float  # working memory of one execution of the largest batch
    latency_ms: dict[int, list[float]] = field(default_factory=dict)  # batch size -> measured runs
    # idle gap ms -> median extra ms of a batch-1 run after the instance sat idle that long
    idle_penalty_ms: dict[float, float] = field(default_factory=dict)

    def mean_ms(self, batch: int) -> float:
        runs = self.latency_ms.get(batch)
        return float(np.mean(runs)) if runs else float("nan")


@dataclass
class Profile:
    box: dict[str, Any]
    base_mb: float  # RSS of this process before any model: what a server costs with no model
    models: dict[str, ModelProfile]
    unavailable: dict[str, str] = field(default_factory=dict)  # model -> why it did not load
    wake_ms: float = 0.0  # mean time for a worker thread waiting on a condition to run once notified

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "box": self.box,
            "base_mb": self.base_mb,
            "models": [
                {
                    **asdict(m),
                    "latency_ms": {str(b): v for b, v in m.latency_ms.items()},
                    "idle_penalty_ms": {str(g): v for g, v in m.idle_penalty_ms.items()},
                }
                for m in self.models.values()
            ],
            "unavailable": self.unavailable,
            "wake_ms": self.wake_ms,
        }
        return json.dumps(doc, indent=1)


def rss_mb() -> float:
    """This process's resident set now, MB. Linux reads /proc; elsewhere the peak, which only grows
    (so a delta is still the growth, if later peaks hide behind earlier ones)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def box_info() -> dict[str, Any]:
    import onnxruntime

    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def model_folders(root: Path) -> tuple[list[str], list[str]]:
    """(models, graphs) in the repository. The store lists models only; a graph is a folder with a
    graph.toml."""
    graphs = sorted(p.name for p in root.iterdir() if (p / GRAPH_FILE).is_file()) if root.is_dir() else []
    return [n for n in ModelStore(root).names() if n not in graphs], graphs


def measure(
    root: Path,
    names: list[str] | None = None,
    runs: int = 200,
    budget_s: float = 0.5,
    progress: Any = None,
) -> Profile:
    """Load every model of the repository (or `names`) and measure it. A model that does not load is
    listed in `unavailable` with the reason, as the server would report it."""
    store = ModelStore(root)
    manager = RepositoryManager(store, attach=lambda model, stats: None, detach=lambda name, version: None)
    wanted = names if names is not None else model_folders(root)[0]
    gc.collect()
    base = rss_mb()
    # ONNX Runtime allocates process-wide state (thread pools, allocators, kernel registry) on the
    # first session; load something once first so the first model is not charged for it.
    if wanted:
        try:
            manager.load(wanted[0])
            manager.unload(wanted[0])
        except BedsideError:
            pass
    models: dict[str, ModelProfile] = {}
    unavailable: dict[str, str] = {}
    for name in wanted:
        if progress is not None:
            progress(f"measuring {name}")
        gc.collect()
        before = rss_mb()
        try:
            entry = manager.load(name)
        except BedsideError as exc:
            unavailable[name] = exc.message
            continue
        gc.collect()
        loaded = rss_mb() - before
        ready = entry.ready_versions()
        status = entry.versions[ready[-1]]
        assert status.model is not None
        models[name] = _measure_model(status.model, len(ready), loaded, runs, budget_s)
        manager.unload(name)  # the arena is not given back to the OS: the next delta starts from here
    return Profile(box_info(), round(base, 1), models, unavailable, round(wake_ms(), 4))


def wake_ms(samples: int = 200) -> float:
    """Mean time from notifying a condition to the waiting thread running: what a request that finds
    its model's worker idle waits before the worker takes it (worker.py wakes it the same way)."""
    cond = threading.Condition()
    woke: list[float] = []
    sent = [0.0]

    def waiter() -> None:
        with cond:
            for _ in range(samples):
                cond.wait()
                woke.append(time.perf_counter() - sent[0])

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    for _ in range(samples):
        time.sleep(0.001)  # the waiter is asleep on the condition again, as an idle worker is
        with cond:
            sent[0] = time.perf_counter()
            cond.notify()
    thread.join(timeout=5)
    return float(np.mean(woke)) * 1e3 if woke else 0.0


def _measure_model(model: OnnxModel, versions: int, loaded_mb: float, runs: int, budget_s: float) -> ModelProfile:
    config = model.config
    sizes = batch_sizes(config.max_batch_size)
    rng = np.random.default_rng(0)
    latency: dict[int, list[float]] = {}
    # working memory first: the largest batch once, so its arena growth is not mixed with timing
    gc.collect()
    before = rss_mb()
    largest = [_request(config, rng) for _ in range(sizes[-1])] if config.max_batch_size else [_request(config, rng)]
    _execute(model, largest)
    gc.collect()
    run_mb = max(rss_mb() - before, _io_mb(largest, model))
    for size in sizes:
        requests = [_request(config, rng) for _ in range(size)] if config.max_batch_size else largest
        for _ in range(5):  # first runs of a shape pay for allocation
            _execute(model, requests)
        samples: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(samples) < runs and (len(samples) < 10 or time.perf_counter() < deadline):
            t0 = time.perf_counter_ns()
            _execute(model, requests)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        latency[size] = [round(s, 5) for s in samples]
    penalty = _idle_penalty(model, largest[:1] if config.max_batch_size else largest, latency[1], min(runs, 40))
    opts = model.session.get_session_options()
    return ModelProfile(
        name=model.name,
        version=model.version,
        versions_loaded=versions,
        max_batch_size=config.max_batch_size,
        instances=config.instances,
        threads=max(1, opts.intra_op_num_threads),
        file_mb=round(_file_mb(model.path), 3),
        # the weights are in memory whatever the allocator's page reuse made the delta look like
        session_mb=round(max(loaded_mb, versions * _file_mb(model.path)), 2),
        run_mb=round(run_mb, 3),
        latency_ms=latency,
        idle_penalty_ms=penalty,
    )


def _idle_penalty(
    model: OnnxModel, request: list[dict[str, np.ndarray]], hot: list[float], runs: int
) -> dict[float, float]:
    """A run after the instance sat idle is slower than one right after another (caches refilled,
    the core's clock back up): on a 2-core box, 1.8 ms back to back became 2.3 ms after 2 ms idle
    and 2.6 ms after 5 ms. Measured at batch 1 after idle gaps; the simulator adds it by the
    time the instance was idle, so a lightly loaded model is not predicted faster than it runs."""
    base = float(np.median(hot))
    out = {}
    for gap_ms in IDLE_GAPS_MS:
        samples = []
        for _ in range(runs):
            time.sleep(gap_ms / 1e3)
            t0 = time.perf_counter_ns()
            _execute(model, request)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        out[gap_ms] = round(max(0.0, float(np.median(samples)) - base), 5)
    return out


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to the model's largest batch (and the largest itself): enough to interpolate."""
    if max_batch_size <= 0:
        return [1]
    top = min(max_batch_size, MAX_BATCH_MEASURED)
    sizes = [1]
    while sizes[-1] * 2 <= top:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def _request(config: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One request's inputs: one row when the model batches, else its whole fixed shape; random
    values for floating-point inputs (tree models take different paths for different values)."""
    feed = {}
    for spec in config.inputs:
        shape = [1 if d < 0 else d for d in config.full_shape(spec)]
        if config.max_batch_size:
            shape[0] = 1
        if spec.datatype == "BYTES":
            feed[spec.name] = np.full(shape, "", dtype=object)
            continue
        dtype = numpy_dtype(spec.datatype)
        feed[spec.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return feed


def _execute(model: OnnxModel, requests: list[dict[str, np.ndarray]]) -> None:
    outputs = model.run(merge(requests))
    if model.config.max_batch_size:
        split(outputs, [1] * len(requests))


def _io_mb(requests: list[dict[str, np.ndarray]], model: OnnxModel) -> float:
    inputs = sum(a.nbytes for r in requests for a in r.values())
    outputs = sum(a.nbytes for a in model.run(merge(requests)).values())
    return 2 * inputs / 2**20 + outputs / 2**20  # the requests and their merged copy, and the outputs


def _file_mb(path: Path) -> float:
    try:
        return path.stat().st_size / 2**20
    except OSError:
        return 0.0


def load_profile(path: Path) -> Profile:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read the profile {path}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:
        raise ProfileError(f"the profile {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProfileError(f"{path} is not a bedside plan profile (format {FORMAT})")
    try:
        models = {}
        for m in doc["models"]:
            latency = {int(b): [float(x) for x in v] for b, v in m.pop("latency_ms").items()}
            penalty = {float(g): float(v) for g, v in m.pop("idle_penalty_ms", {}).items()}
            models[m["name"]] = ModelProfile(**m, latency_ms=latency, idle_penalty_ms=penalty)
        box, base = dict(doc["box"]), float(doc["base_mb"])
        return Profile(box, base, models, dict(doc.get("unavailable", {})), float(doc.get("wake_ms", 0.0)))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProfileError(f"the profile {path} is damaged ({type(exc).__name__}: {exc}); measure again") from None
