"""Put it together: pack the repository's instances into boxes, simulate each box under its share of
the workload, judge the predictions against the targets, and find how many boxes meet them.

More boxes means replicas: every box of the packing again, the load split evenly between them (a
load balancer in front). A model whose instances the packing spread over several boxes sends each
box the share of its load that the box has of its instances. To keep the prediction's precision
the same whatever the split, a box with 1/N of the load is simulated N times as long, so every
evaluation simulates about as many requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bedside.errors import BedsideError
from bedside.modelconfig.model import ModelConfig
from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.planning.binpack import ModelSize, Packing, pack
from bedside.planning.profile import Profile
from bedside.planning.simulate import Empirical, ModelResult, SimModel, Stream, simulate
from bedside.planning.workload import Demand, Workload, WorkloadError
from bedside.repository.store import ModelStore

MAX_REPLICAS = 256  # beyond: the targets are out of reach of more boxes (a target below the compute time)
MIN_SAMPLES = 200  # fewer simulated requests at a level: its p99 is flagged as rough


@dataclass
class Row:
    """The prediction for one model or graph at one priority level."""

    name: str
    kind: str  # model | graph
    level: int
    rate: float  # requests per second reaching this row (whole load, before any split)
    count: int  # simulated requests counted
    rejected: int  # refused by the queue (full, or the tenant's in-flight quota)
    queue_ms: dict[str, float]  # mean, p50, p95, p99 of the queue delay (models only)
    p99_ms: float | None  # inside the server: queue + compute; a graph: the sum of its calls'
    target_ms: float | None
    met: bool | None  # None: no target


@dataclass
class Evaluation:
    replicas: int
    rows: list[Row]
    utilisation: dict[str, float]  # model -> busy fraction of its instances, worst box
    mean_batch: dict[str, float]

    def meets(self) -> bool:
        return all(r.met is not False for r in self.rows)


@dataclass
class Plan:
    packing: Packing
    one: Evaluation  # the workload on one copy of the packing: "this box" when it is one box
    needed: Evaluation | None  # the smallest number of replicas that meets the targets, None: none does
    cores: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def boxes_needed(self) -> int | None:
        return None if self.needed is None else self.needed.replicas * self.packing.box_count()


@dataclass(frozen=True)
class Setup:
    """What a model brings to the simulation: its config's scheduling, its measured cost."""

    name: str
    policy: SchedulingPolicy
    max_batch_size: int
    instances: int
    threads: int
    service: Empirical
    idle_penalty: tuple[tuple[float, float], ...] = ()


def setups(root: Path, profile: Profile, names: set[str]) -> dict[str, Setup]:
    """The config of each named model as the repository has it now (so a plan can try another
    `instances` or batching without measuring again), with the profile's measurements."""
    store = ModelStore(root)
    out = {}
    for name in sorted(names):
        measured = profile.models.get(name)
        if measured is None:
            why = profile.unavailable.get(name)
            raise WorkloadError(
                f"model {name!r} does not load: {why}"
                if why
                else f"model {name!r} is not in the profile (measure again without --profile, or with a new file)"
            )
        config: ModelConfig | None = store.config(name) if (root / name).is_dir() else None
        out[name] = Setup(
            name,
            config.scheduling if config else SchedulingPolicy(),
            config.max_batch_size if config else measured.max_batch_size,
            config.instances if config else measured.instances,
            measured.threads,
            Empirical(measured.latency_ms),
            tuple(sorted(measured.idle_penalty_ms.items())),
        )
    return out


def check_workload(workload: Workload, models: set[str], graphs: set[str]) -> None:
    """Every name is a model of the repository, or a graph with the models it calls."""
    for d in workload.demands:
        if d.calls is None:
            if d.name in graphs:
                raise WorkloadError(f"{d.name!r} is a graph: name the models it calls, calls = {{model = count}}")
            if d.name not in models:
                known = ", ".join(sorted(models)) or "none"
                raise WorkloadError(f"the workload names {d.name!r}, which is not a model of the repository ({known})")
        else:
            if d.name in models:
                raise WorkloadError(f"{d.name!r} is a model, not a graph: drop its calls")
            for called in d.calls:
                if called not in models:
                    raise WorkloadError(f"graph {d.name!r} calls {called!r}, which is not a model of the repository")


def streams(workload: Workload, setups: dict[str, Setup]) -> dict[str, list[Stream]]:
    """The Poisson streams each model receives: its own requests and its graphs' calls."""
    rates: dict[tuple[str, int, int], float] = {}
    for d in workload.demands:
        for model, per_request in (d.calls or {d.name: 1}).items():
            setup = setups[model]
            for level, fraction in _levels(d, setup).items():
                key = (model, level, d.rows)
                rates[key] = rates.get(key, 0.0) + d.rate * fraction * per_request
    out: dict[str, list[Stream]] = {}
    for (model, level, rows), rate in sorted(rates.items()):
        if rate > 0:
            out.setdefault(model, []).append(Stream(level, rate, rows))
    return out


def _levels(d: Demand, setup: Setup) -> dict[int, float]:
    levels = d.priorities or {setup.policy.default_priority: 1.0}
    top = setup.policy.priority_levels
    for level in levels:
        if level > top:
            raise WorkloadError(
                f"[{d.name}] gives priority {level}, but {setup.name!r} has levels 1..{top} "
                "(scheduling.priority_levels)"
            )
    return levels


def plan(
    workload: Workload,
    setups: dict[str, Setup],
    sizes: list[ModelSize],
    budget_mb: float,
    reserve_mb: float,
    cores: float,
    seconds: float,
    headroom: float = 0.1,
    background: float = 0.0,
    seed: int = 0,
    wake_ms: float = 0.0,
) -> Plan:
    packing = pack(sizes, budget_mb, reserve_mb, headroom)
    load = streams(workload, setups)
    cache: dict[int, Evaluation] = {}

    def evaluate(replicas: int) -> Evaluation:
        if replicas not in cache:
            cache[replicas] = _evaluate(
                workload, setups, load, packing, replicas, cores, seconds, background, seed, wake_ms
            )
        return cache[replicas]

    one = evaluate(1)
    notes = []
    needed: Evaluation | None = one if one.meets() else None
    if needed is None:
        low, high = 1, 2
        while high <= MAX_REPLICAS and not evaluate(high).meets():
            low, high = high, high * 2
        if high <= MAX_REPLICAS:
            while high - low > 1:  # more boxes never make a queue slower: the smallest that meets
                mid = (low + high) // 2
                low, high = (low, mid) if evaluate(mid).meets() else (mid, high)
            needed = evaluate(high)
        else:
            notes.append(
                f"even {MAX_REPLICAS} copies of the packing miss a target: a target below what one execution takes"
            )
    thin = sorted({r.name for r in one.rows if r.kind == "model" and 0 < r.count < MIN_SAMPLES})
    if thin:
        notes.append(f"few simulated requests for {', '.join(thin)}: their p99 is rough (raise --seconds)")
    return Plan(packing, one, needed, cores, seconds, notes)


def evaluate(
    workload: Workload,
    setups: dict[str, Setup],
    packing: Packing,
    replicas: int = 1,
    cores: float = 1.0,
    seconds: float = 60.0,
    background: float = 0.0,
    seed: int = 0,
    wake_ms: float = 0.0,
) -> Evaluation:
    """The workload on `replicas` copies of `packing`, once, without searching for a count (the cluster
    sizing does its own search, over boxes that carry different parts of a hospital)."""
    load = streams(workload, setups)
    return _evaluate(workload, setups, load, packing, replicas, cores, seconds, background, seed, wake_ms)


def _evaluate(
    workload: Workload,
    setups: dict[str, Setup],
    load: dict[str, list[Stream]],
    packing: Packing,
    replicas: int,
    cores: float,
    seconds: float,
    background: float,
    seed: int,
    wake_ms: float,
) -> Evaluation:
    per_box: list[dict[str, ModelResult]] = []
    for b, box in enumerate(packing.boxes):
        models = []
        for name, count in sorted(box.instances.items()):
            if name not in load:
                continue  # loaded, takes memory, no load: nothing to simulate
            s = setups[name]
            share = packing.share(b, name, sum(x.instances.get(name, 0) for x in packing.boxes)) / replicas
            models.append(
                SimModel(
                    name,
                    s.policy,
                    s.max_batch_size,
                    count,
                    s.threads,
                    s.service,
                    [Stream(st.level, st.rate * share, st.rows) for st in load[name]],
                    s.idle_penalty,
                )
            )
        if models:
            per_box.append(simulate(models, cores, seconds * replicas, seed + b, background, wake_ns=wake_ms * 1e6))
    rows = _rows(workload, load, per_box)
    utilisation: dict[str, float] = {}
    batch: dict[str, float] = {}
    for results in per_box:
        for name, r in results.items():
            utilisation[name] = max(utilisation.get(name, 0.0), r.utilisation)
            batch[name] = max(batch.get(name, 0.0), r.mean_batch)
    return Evaluation(replicas, rows, utilisation, batch)


def _rows(workload: Workload, load: dict[str, list[Stream]], per_box: list[dict[str, ModelResult]]) -> list[Row]:
    """Per model and level the worst box's figures (p99s do not add across boxes; the worst is what a
    patient on the unlucky box sees); counts and rejections add up."""
    merged: dict[tuple[str, int], tuple[int, int, dict[str, float]]] = {}
    for results in per_box:
        for name, result in results.items():
            for level, lr in result.levels.items():
                count, rejected, worst = merged.get((name, level), (0, 0, {}))
                summary = {**{f"queue_{k}": v for k, v in lr.queue_ms.items()}, "p99": lr.latency_ms.get("p99", 0.0)}
                if not worst or summary["p99"] > worst["p99"]:
                    worst = summary
                merged[name, level] = (count + lr.count, rejected + lr.rejected, worst)
    rows = []
    for d in workload.demands:
        levels = sorted({st.level for model in (d.calls or {d.name: 1}) for st in load.get(model, [])})
        if d.priorities is not None:
            levels = sorted(d.priorities)
        for level in levels:
            target = d.target(level)
            fraction = (d.priorities or {level: 1.0}).get(level, 0.0)
            if d.calls is None:
                count, rejected, worst = merged.get((d.name, level), (0, 0, {}))
                queue = {k.removeprefix("queue_"): v for k, v in worst.items() if k.startswith("queue_")}
                p99 = worst.get("p99") if count else None
                kind = "model"
            else:
                parts = [merged.get((m, level), (0, 0, {})) for m in d.calls]
                count = min(p[0] for p in parts)
                rejected = sum(p[1] for p in parts)
                p99 = sum(n * p[2].get("p99", 0.0) for n, p in zip(d.calls.values(), parts, strict=True))
                p99 = p99 if count else None
                queue, kind = {}, "graph"
            met = None if target is None else (p99 is not None and p99 <= target and not rejected)
            if target is not None and p99 is None and d.rate * fraction == 0:
                met = None
            rows.append(Row(d.name, kind, level, d.rate * fraction, count, rejected, queue, p99, target, met))
    return rows


def sizes_of(setups: dict[str, Setup], profile: Profile, names: list[str]) -> list[ModelSize]:
    """What each model of the repository takes in memory: every model the server loads counts,
    with or without load in the workload."""
    out = []
    for name in names:
        m = profile.models.get(name)
        if m is None:
            continue  # a model that does not load takes no memory in the server either
        instances = setups[name].instances if name in setups else m.instances
        out.append(ModelSize(name, instances, m.session_mb, m.run_mb))
    return out


def default_budget_mb() -> float:
    """This box's available memory (MemAvailable: free plus what the kernel can reclaim), MB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    raise BedsideError("cannot tell this box's available memory: give --memory-mb")
