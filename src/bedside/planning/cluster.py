"""Size a hospital: how many boxes carry its workload within every priority's p99 target, and with
what margin (bench/cluster_sizing.py; the sizing note is docs/sizing-500-beds.md).

The hospital (the workload's [site]) is served by two kinds of box, sized independently:
- ward boxes, each serving whole wards: the streams of their beds (ECG windows, the vitals scorer)
  and every demand not named central, each box taking the share of the site's rate that it holds of
  its beds. Wards go largest first onto the box with the fewest beds (longest-processing-time
  first), so the busiest box holds at most one ward more than the lightest. Only the busiest box is
  simulated: more beds on a box never make its queues faster.
- central boxes, serving the demands named `central` (imaging, the medication check), the load
  split evenly between them behind a load balancer.

Each box is simulated with planner.evaluate (bedside's own queues on a simulated clock, the measured
costs per model and batch size), plus what the streams cost outside the models (bench/cluster_sizing.py
measures both on a served box):
- the server's event loop, one thread whatever the cores: each request of a demand in `loop_ms`
  (an ECG window: its WebSocket frames, windowing, R-peak detection, the result) costs it that many
  ms, and `loop_cores` keep it busy regardless (timers, the status page, the scorer's rules). It is
  simulated as one more queue (LOOP) in front of the model, one instance, first come first served:
  the demand's p99 is then the loop's p99 plus the model's (an upper bound, as for a graph);
- `stream_cores_per_bed` of CPU per bed in other processes (HL7 ingest), as background load on
  the box's cores.
Per kind of box:
- needed: the fewest boxes whose busiest box meets every target;
- recommended: needed + 1 (N+1), checked: when any one box is lost and its wards move to the others
  (largest first onto the lightest), the busiest survivor still meets the targets (one more box
  if it does not);
- headroom: the factor by which the busiest box's load (its rates and its stream CPU) can grow
  before a target is first missed (bisection, to `precision`);
- utilisation: mean cores busy on the busiest box (each model's busy time x its threads, the loop's,
  and the stream CPU) over the box's cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.planning.binpack import DoesNotFit, ModelSize, Packing, pack
from bedside.planning.planner import Evaluation, Setup, evaluate, sizes_of, streams
from bedside.planning.profile import Profile
from bedside.planning.simulate import Empirical
from bedside.planning.workload import Site, Workload, WorkloadError

WARD, CENTRAL = "ward", "central"
LOOP = "event loop"  # the server's event loop, simulated as a queue of its own
MAX_HEADROOM = 64.0  # a box that carries more than this many times its load: "over x64"
MAX_CENTRAL = 16  # central boxes tried before giving up
MIN_SECONDS = 10.0  # simulated seconds per box at least, unless that is more than max_events arrivals


@dataclass(frozen=True)
class BoxSpec:
    """One box of the cluster, and how precisely to simulate it."""

    cores: float
    budget_mb: float  # memory for the server and its models
    reserve_mb: float = 0.0  # the server with no model loaded (profile.base_mb)
    memory_headroom: float = 0.1  # fraction of the budget kept free
    stream_cores_per_bed: float = 0.0  # CPU per bed outside the models and the loop (HL7 ingest)
    loop_ms: tuple[tuple[str, float], ...] = ()  # (demand, the event loop's ms per request)
    loop_cores: float = 0.0  # the event loop's CPU whatever the load, cores
    busy_cores: float = 0.0  # other work on every box
    wake_ms: float = 0.0
    seed: int = 0
    min_samples: int = 200  # simulated requests aimed at per judged level (one with a target)
    max_events: int = 100_000  # simulated arrivals per box at most; fewer samples are flagged rough
    max_seconds: float = 100_000.0  # simulated seconds at most: rare requests (imaging, 0.02/s) need hours


@dataclass
class BoxResult:
    beds: float  # beds whose stream CPU the box carries (0: a central box)
    factor: float  # the share of its kind's load (rates) it carries
    background: float  # cores busy outside the models
    seconds: float  # simulated
    rough: bool  # some judged level got fewer than min_samples simulated requests
    evaluation: Evaluation
    cores_busy: float

    def meets(self) -> bool:
        return self.evaluation.meets()


@dataclass
class Option:
    boxes: int
    beds: list[int]  # beds per box (ward boxes); empty for central boxes
    busiest: BoxResult


@dataclass
class KindSizing:
    kind: str  # ward | central
    demands: list[str]
    options: list[Option] = field(default_factory=list)  # counts simulated, 1 up
    needed: int | None = None  # None: no count tried meets the targets
    recommended: int | None = None
    after_loss: BoxResult | None = None  # the busiest survivor when one of `recommended` is lost
    headroom: dict[int, tuple[float, float] | None] = field(default_factory=dict)  # boxes -> (meets, misses)
    notes: list[str] = field(default_factory=list)

    def option(self, boxes: int) -> Option | None:
        return next((o for o in self.options if o.boxes == boxes), None)


@dataclass
class ClusterSizing:
    site: Site
    spec: BoxSpec
    ward: KindSizing
    central: KindSizing | None

    def kinds(self) -> list[KindSizing]:
        return [self.ward] + ([self.central] if self.central is not None else [])

    def boxes_needed(self) -> int | None:
        counts = [k.needed for k in self.kinds()]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    def boxes_recommended(self) -> int | None:
        counts = [k.recommended for k in self.kinds()]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def split_wards(wards: list[int], boxes: int) -> list[list[int]]:
    """Whole wards (beds each) onto `boxes` boxes: largest ward first onto the box with the fewest
    beds (the first such box on a tie)."""
    if boxes < 1:
        raise ValueError("at least one box")
    out: list[list[int]] = [[] for _ in range(boxes)]
    for ward in sorted(wards, reverse=True):
        min(out, key=sum).append(ward)
    return out


def beds_after_loss(split: list[list[int]]) -> int | None:
    """The most beds a surviving box holds when any one box is lost and its wards move to the
    others, largest first onto the lightest survivor; None when no box would be left."""
    if len(split) < 2:
        return None
    worst = 0
    for lost in range(len(split)):
        survivors = [list(box) for i, box in enumerate(split) if i != lost]
        for ward in sorted(split[lost], reverse=True):
            min(survivors, key=sum).append(ward)
        worst = max(worst, max(sum(box) for box in survivors))
    return worst


class Sizer:
    """Simulates one box of a kind at a given load, each load once."""

    def __init__(self, workload: Workload, setups: dict[str, Setup], profile: Profile, spec: BoxSpec) -> None:
        if workload.site is None:
            raise WorkloadError("the workload has no [site] table: beds, ward_beds and the central demands")
        self.site, self.setups, self.spec = workload.site, setups, spec
        central = set(self.site.central)
        self.parts = {
            WARD: [d for d in workload.demands if d.name not in central],
            CENTRAL: [d for d in workload.demands if d.name in central],
        }
        self.packings: dict[str, Packing] = {}
        self.loop = dict(spec.loop_ms)
        for kind, demands in self.parts.items():
            if not demands:
                continue
            models = sorted(Workload(demands).models_called())
            sizes = sizes_of(setups, profile, models)
            if any(d.name in self.loop for d in demands):
                sizes.append(ModelSize(LOOP, 1, 0.0, 0.0))  # no memory of its own: it is the server's
            packing = pack(sizes, spec.budget_mb, spec.reserve_mb, spec.memory_headroom)
            if packing.box_count() > 1:
                raise DoesNotFit(
                    f"the models of a {kind} box ({', '.join(models)}) do not fit one box's memory "
                    f"({spec.budget_mb:,.0f} MB): a larger box is needed"
                )
            self.packings[kind] = packing
        self._cache: dict[tuple[str, float, float], BoxResult] = {}

    def box(self, kind: str, factor: float, beds: float = 0.0) -> BoxResult:
        """The busiest box of `kind` carrying `factor` of its kind's rates and `beds` beds' stream CPU."""
        key = (kind, round(factor, 9), round(beds, 6))
        if key not in self._cache:
            self._cache[key] = self._simulate(kind, factor, beds)
        return self._cache[key]

    def _simulate(self, kind: str, factor: float, beds: float) -> BoxResult:
        spec = self.spec
        demands = [replace(d, rate=d.rate * factor) for d in self.parts[kind]]
        setups = self.setups
        looped = [d for d in demands if d.name in self.loop and d.calls is None and d.rate > 0]
        if looped:  # each request through the loop first: its cost, and the loop's fixed CPU spread over them
            rate = sum(d.rate for d in looped)
            ms = (spec.loop_cores * 1e3 + sum(d.rate * self.loop[d.name] for d in looped)) / rate
            setups = {**setups, LOOP: Setup(LOOP, SchedulingPolicy(aging_us=0), 0, 1, 1, Empirical({1: [ms]}))}
            names = {d.name for d in looped}
            demands = [replace(d, calls={LOOP: 1, d.name: 1}) if d.name in names else d for d in demands]
        part = Workload(demands)
        seconds, rough = self._seconds(part, setups)
        background = spec.busy_cores + beds * spec.stream_cores_per_bed
        result = evaluate(
            part, setups, self.packings[kind], 1, spec.cores, seconds, background, spec.seed, spec.wake_ms
        )
        busy = background + sum(
            u * setups[m].instances * min(float(setups[m].threads), spec.cores) for m, u in result.utilisation.items()
        )
        return BoxResult(beds, factor, background, seconds, rough, result, busy)

    def _seconds(self, part: Workload, setups: dict[str, Setup]) -> tuple[float, bool]:
        """Long enough for min_samples requests at the rarest judged level, within max_events
        arrivals in all and max_seconds."""
        judged = []
        for d in part.demands:
            levels = d.priorities or {setups[m].policy.default_priority: 1.0 for m in (d.calls or {d.name: 1})}
            judged += [d.rate * f for level, f in levels.items() if d.rate * f > 0 and d.target(level) is not None]
        arrivals = sum(s.rate for ss in streams(part, setups).values() for s in ss)
        if not judged or arrivals <= 0:
            return MIN_SECONDS, False
        wanted = self.spec.min_samples / min(judged)
        seconds = min(max(wanted, MIN_SECONDS), self.spec.max_events / arrivals, self.spec.max_seconds)
        return seconds, seconds < wanted

    def headroom(self, kind: str, factor: float, beds: float, precision: float = 0.05) -> tuple[float, float] | None:
        """(a load factor that meets, a larger one that misses) around where the busiest box first
        misses a target, within `precision`; (0, 1) if it misses already; None beyond MAX_HEADROOM."""

        def meets(m: float) -> bool:
            return self.box(kind, factor * m, beds * m).meets()

        if not meets(1.0):
            return (0.0, 1.0)
        lo, hi = 1.0, 2.0
        while meets(hi):
            if hi >= MAX_HEADROOM:
                return None
            lo, hi = hi, hi * 2
        while hi / lo > 1 + precision:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if meets(mid) else (lo, mid)
        return (lo, hi)


def size_cluster(
    workload: Workload,
    setups: dict[str, Setup],
    profile: Profile,
    spec: BoxSpec,
    headroom_precision: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> ClusterSizing:
    """The fewest ward and central boxes that meet every target, the recommended N+1 counts, and the
    margin of each (see the module's docstring)."""
    sizer = Sizer(workload, setups, profile, spec)
    say = progress or _quiet
    site = sizer.site
    wards = site.wards()
    ward = KindSizing(WARD, [d.name for d in sizer.parts[WARD]])
    for boxes in range(1, len(wards) + 1):
        split = split_wards(wards, boxes)
        busiest = max(sum(b) for b in split)
        say(f"ward boxes: {boxes}, busiest holds {busiest} beds")
        result = sizer.box(WARD, busiest / site.beds, busiest)
        ward.options.append(Option(boxes, [sum(b) for b in split], result))
        if result.meets() and ward.needed is None:
            ward.needed = boxes
        if ward.needed is not None and boxes >= ward.needed + 2:
            break  # two more counts for the scaling table, then enough
    if ward.needed is None:
        ward.notes.append(f"even {len(wards)} ward boxes, one ward each, miss a target")
    else:
        ward.recommended = ward.needed + 1
        while True:  # N+1: one box lost, its wards moved to the others
            after = beds_after_loss(split_wards(wards, ward.recommended))
            assert after is not None
            say(f"ward boxes: {ward.recommended} with one lost, busiest survivor holds {after} beds")
            ward.after_loss = sizer.box(WARD, after / site.beds, after)
            if ward.after_loss.meets() or ward.recommended > len(wards):
                break
            ward.recommended += 1
        for boxes in sorted({ward.needed, ward.recommended}):
            beds = max(sum(b) for b in split_wards(wards, boxes))
            say(f"ward boxes: {boxes}, headroom of the busiest")
            ward.headroom[boxes] = sizer.headroom(WARD, beds / site.beds, beds, headroom_precision)
    central = _size_central(sizer, headroom_precision, say) if sizer.parts[CENTRAL] else None
    for kind in [ward] + ([central] if central else []):
        if any(o.busiest.rough for o in kind.options):
            kind.notes.append(
                f"some {kind.kind} box simulations got fewer than {spec.min_samples} requests at a judged "
                "level (max_events): their p99 is rough"
            )
    return ClusterSizing(site, spec, ward, central)


def _size_central(sizer: Sizer, precision: float, report: Callable[[str], None]) -> KindSizing:
    central = KindSizing(CENTRAL, [d.name for d in sizer.parts[CENTRAL]])
    for boxes in range(1, MAX_CENTRAL + 1):
        report(f"central boxes: {boxes}")
        result = sizer.box(CENTRAL, 1.0 / boxes)
        central.options.append(Option(boxes, [], result))
        if result.meets():
            central.needed = boxes
            break
    if central.needed is None:
        central.notes.append(f"even {MAX_CENTRAL} central boxes miss a target")
        return central
    central.recommended = central.needed + 1  # one lost: the others carry 1/needed each, which meets
    central.after_loss = central.options[-1].busiest
    report("central boxes: headroom")
    central.headroom[central.needed] = sizer.headroom(CENTRAL, 1.0 / central.needed, 0.0, precision)
    return central


def _quiet(line: str) -> None:
    pass
