"""How many boxes a 500-bed hospital needs: measured costs, a simulation per box, a served check.

    python bench/cluster_sizing.py [--workload bench/workloads/hospital500.toml] [--cores 2] [--quick]

1. Models: the demo repository's ecg_rhythm, vitals_deterioration, medication_risk and the
   medication_check graph (`bedside demo`, built on first use), and imaging_resnet18, a stand-in
   for an imaging model: the ResNet-18 reference architecture with random weights, exported here
   (needs torch; without it the imaging share is left out, and the output says so).
2. Costs: measured as `bedside plan` measures them (planning/profile.py: memory, latency per batch
   size, the extra after idle), in this process, on this box.
3. The streams' costs outside the models, on a served ward box: a real `bedside serve` of the ward
   models with HL7 on, and a load generator (`bedside.tools.replay`, its own process, on the same
   cores) streaming --served-beds beds (12-lead ECG at 250 Hz in 0.2 s chunks, HL7 vitals every
   15 s); over 15 s of steady streaming, the server process's CPU less the models' (their
   executions by batch size times the measured cost) is its event loop: a line through the runs
   gives its fixed cores and its ms per ECG window. The HL7 ingest process's CPU per bed is the rest.
4. Sizing (planning/cluster.py): a ward box serves whole wards (ECG and vitals of its beds), central
   boxes serve imaging and the medication check. Each box is simulated with bedside's own queues
   and the measured costs, the event loop as a queue of its own in front of the ECG model; the
   fewest boxes whose busiest box meets every p99 target, N+1 (one box lost, its wards moved to the
   others, still meets), and the headroom: how much more load the busiest box carries before a
   target is first missed.
5. Served check: the ward box of the answer (the most beds a box holds, one box lost included)
   served for real on this box, its ECG window->score p99 as the server measures it; if it misses
   the target the simulation was optimistic, and the next count is checked (at most 3); a miss
   while other processes kept the box busy is inconclusive, measured again (3 tries), and said so.

Prints the tables and the answer (also as markdown); writes bench/results/cluster_sizing.json and
cluster_sizing.md. --cores N sizes boxes of N cores (the costs stay this box's); --streams-from FILE
reuses an earlier run's streams' costs. --quick: fewer timed runs, shorter simulations, no served
steps (the streams' costs are then not counted: inference alone, optimistic), about 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    ROOT,
    console,
    machine,
    main_guard,
    parse_args,
    result_path,
    say,
    table,
    write_results,
)
from _sizing_report import answer_rows, box_row, costs_table, markdown, ms, served_row, to_json
from _sizing_served import WARD_MODELS, Served, check_served, fit_streams, serve_ward

# isort: split
from bedside.planning import cluster, planner
from bedside.planning.profile import measure, model_folders
from bedside.planning.workload import Workload, load_workload

DEMO = ("ecg_rhythm", "vitals_deterioration", "medication_risk", "medication_check")
LOOPED = ("ecg_rhythm",)  # demands whose requests go through the server's event loop (ECG windows)
IMAGING = "imaging_resnet18"
IMAGING_MAX_BATCH = 1  # one image per request, and too few requests for batches to form (0.02/s)


def build_repo(root: Path, demo: Path) -> list[str]:
    """The models of the workload in one repository; returns what could not be built, with why."""
    missing: list[str] = []
    for name in DEMO:
        if not (demo / name).is_dir():
            raise RuntimeError(
                f"the demo repository has no {name}: rebuild it with `bedside demo --force` "
                "(ecg_rhythm needs torch: the pipeline extra)"
            )
        shutil.copytree(demo / name, root / name)
    try:
        import tomllib

        import tomli_w

        from bedside.models import reference
        from bedside.pipeline.workflow import export_to_repository
    except ImportError as exc:
        return [f"{IMAGING}: needs the pipeline extra ({exc.name} is missing); imaging left out"]
    say(f"  exporting {IMAGING} (ResNet-18 reference architecture, random weights: cost, not answers)...")
    x = reference.sample("resnet18", rows=2)
    export_to_repository(
        root, IMAGING, reference.build("resnet18"), {"image": x}, provenance="untrained", source="resnet18"
    )
    config = root / IMAGING / "config.toml"
    doc = tomllib.loads(config.read_text(encoding="utf-8"))
    doc["max_batch_size"] = IMAGING_MAX_BATCH
    config.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return missing


def without(workload: Workload, names: set[str]) -> Workload:
    """The workload less the demands that cannot be served here (and less them in the site)."""
    site = workload.site
    if site is not None:
        site = type(site)(site.beds, site.ward_beds, tuple(n for n in site.central if n not in names))
    return Workload([d for d in workload.demands if d.name not in names], workload.seconds, site)


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=Path, default=ROOT / "bench" / "workloads" / "hospital500.toml")
    parser.add_argument("--cores", type=float, default=float(os.cpu_count() or 1), help="cores of one box")
    parser.add_argument("--memory-mb", type=float, default=None, help="memory of one box (default: available here)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model and batch size")
    parser.add_argument("--served-beds", default="50,250", help="beds streamed to measure the streams' costs")
    parser.add_argument("--served", type=int, default=1, help="1: measure the streams' costs, check the answer served")
    parser.add_argument(
        "--streams-from", type=Path, default=None, help="the streams' costs of an earlier run (its JSON), not measured"
    )
    parser.add_argument("--min-samples", type=int, default=200, help="simulated requests per judged level")
    parser.add_argument("--max-events", type=int, default=200_000, help="simulated arrivals per box at most")
    parser.add_argument("--headroom-precision", type=float, default=0.05, help="of the headroom factor")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, runs=10, served=0, min_samples=40, max_events=15_000, headroom_precision=0.25)
    if args.cores <= 0 or args.runs < 10 or not all(b.isdigit() and int(b) > 0 for b in args.served_beds.split(",")):
        parser.error("--cores above 0, --runs 10 or more, --served-beds numbers of beds, e.g. 50,250")
    workload = load_workload(args.workload)
    if workload.site is None:
        parser.error(f"{args.workload.name} has no [site] table (beds, ward_beds, central)")
    site = workload.site
    say(f"cluster_sizing: {site.beds} beds in wards of {site.ward_beds}, boxes of {args.cores:g} cores")
    from bedside.models.demo import default_demo_dir, ensure_demo

    if not (default_demo_dir() / "ecg_rhythm").is_dir():
        say("  building the demo repository (first run only: minutes, it trains the ECG model)...")
    demo = ensure_demo()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        notes += build_repo(repo, demo)
        models, graphs = model_folders(repo)
        left_out = {d.name for d in workload.demands if not set(d.calls or {d.name: 1}) <= set(models)}
        if left_out:
            notes.append(f"left out, their models are not here: {', '.join(sorted(left_out))}")
            workload = without(workload, left_out)
        planner.check_workload(workload, set(models), set(graphs))
        say(f"  measuring {', '.join(models)} as `bedside plan` does ({args.runs} runs per batch size)...")
        profile = measure(repo, names=sorted(workload.models_called()), runs=args.runs)
        if profile.unavailable:
            raise RuntimeError(f"models that do not load: {profile.unavailable}")
        table(f"measured on this box ({profile.box.get('cpu_count')} cores)", costs_table(profile),
              list(costs_table(profile)[0]))  # fmt: skip
        setups = planner.setups(repo, profile, workload.models_called())
        served: list[dict[str, Any]] = []
        ward_repo = Path(tmp) / "ward"
        for name in WARD_MODELS:
            shutil.copytree(repo / name, ward_repo / name)
        costs = {m: profile.models[m] for m in WARD_MODELS}
        streams = {"loop_ms": 0.0, "loop_cores": 0.0, "ingest_cores_per_bed": 0.0}
        if args.streams_from is not None:
            streams = {k: float(v) for k, v in json.loads(args.streams_from.read_text())["streams"].items()}
            notes.append(f"the streams' costs of an earlier run ({args.streams_from.name}), not measured again")
        elif args.served:
            say(
                "what the streams cost outside the models, on a served ward box (the load generator on the same cores):"
            )
            for beds in [int(b) for b in args.served_beds.split(",")]:
                served.append({"purpose": "stream costs", **serve_ward(ward_repo, beds, costs)})
            streams = fit_streams(served)
            say(
                f"  the event loop: {streams['loop_cores']:.3f} cores + {streams['loop_ms']:.3f} ms per ECG window; "
                f"HL7 ingest {streams['ingest_cores_per_bed'] * 1e3:.3f} millicores per bed"
            )
        else:
            notes.append("stream costs not measured (--quick or --served 0): inference alone, optimistic")
        spec = cluster.BoxSpec(
            cores=args.cores,
            budget_mb=args.memory_mb or planner.default_budget_mb(),
            reserve_mb=profile.base_mb,
            stream_cores_per_bed=streams["ingest_cores_per_bed"],
            loop_ms=tuple((name, streams["loop_ms"]) for name in LOOPED),
            loop_cores=streams["loop_cores"],
            wake_ms=profile.wake_ms,
            seed=args.seed,
            min_samples=args.min_samples,
            max_events=args.max_events,
        )
        say("simulating the boxes:")
        sizing = cluster.size_cluster(
            workload, setups, profile, spec, args.headroom_precision, progress=lambda line: say(f"  {line}")
        )
        for kind in sizing.kinds():
            rows = [box_row(kind, o, args.cores) for o in kind.options]
            table(f"{kind.kind} boxes: p99 / target ms per model and priority (x: misses)", rows, list(rows[0]))
        checked = check_served(sizing, ward_repo, costs) if args.served and sizing.ward.needed else None
        served += checked.rows if checked else []
    rows = answer_rows(sizing)
    table("the answer, simulated", rows, list(rows[0]))
    served_rows = [served_row(r) for r in served]
    if served_rows:
        table("served on this box (ECG window->score p99, target 10 ms)", served_rows, list(served_rows[0]))
    for line in notes + [n for k in sizing.kinds() for n in k.notes]:
        console.print(f"[yellow]{line}[/yellow]")
    verdict, ward_needed, ward_recommended = answer(sizing, checked)
    console.print(f"[bold]{verdict}[/bold]", soft_wrap=True)
    md = f"{markdown(rows)}\n\n" + (f"{markdown(served_rows)}\n\n" if served_rows else "") + f"{verdict}\n"
    print(md)
    result_path("cluster_sizing.md").write_text(md, encoding="utf-8")
    central_needed = sizing.central.needed if sizing.central else 0
    central_recommended = sizing.central.recommended if sizing.central else 0
    write_results(
        "cluster_sizing",
        {
            "workload": args.workload.name,
            "site": {
                "beds": sizing.site.beds,
                "ward_beds": sizing.site.ward_beds,
                "wards": sizing.site.wards(),
                "central": list(sizing.site.central),
            },
            "rates": {
                d.name: {"rate": d.rate, "rows": d.rows, "priorities": d.priorities, "targets_ms": d.targets_ms}
                for d in workload.demands
            },
            "box": {"cores": spec.cores, "memory_mb": round(spec.budget_mb)},
            "streams": streams,
            "profile": {
                name: {
                    "threads": m.threads,
                    "instances": m.instances,
                    "memory_mb": round(m.session_mb + m.run_mb, 2),
                    "mean_ms": {str(b): round(m.mean_ms(b), 4) for b in m.latency_ms},
                    "idle_penalty_ms": {str(g): v for g, v in m.idle_penalty_ms.items()},
                }
                for name, m in profile.models.items()
            },
            "wake_ms": profile.wake_ms,
            "sizing": to_json(sizing),
            "served": served,
            "simulated": {"boxes_needed": sizing.boxes_needed(), "boxes_recommended": sizing.boxes_recommended()},
            "served_beds_per_box_ok": checked.beds_ok if checked else None,
            "answer": {
                "ward_boxes_needed": ward_needed,
                "ward_boxes_recommended": ward_recommended,
                "central_boxes_needed": central_needed,
                "central_boxes_recommended": central_recommended,
                "boxes_needed": None if ward_needed is None else ward_needed + (central_needed or 0),
                "boxes_recommended": None
                if ward_recommended is None
                else ward_recommended + (central_recommended or 0),
                "text": verdict,
            },
            "notes": notes,
            "machine": machine(),
        },
    )


def answer(sizing: cluster.ClusterSizing, served: Served | None) -> tuple[str, int | None, int | None]:
    """The verdict line, and the ward boxes needed and recommended: the simulation's, or more when
    the served check needed more."""
    ward, central = sizing.ward, sizing.central
    if sizing.boxes_needed() is None:
        return "no number of boxes tried meets every target (see the notes)", None, None
    assert ward.needed is not None and ward.recommended is not None
    cores = f"{sizing.spec.cores:g}-core boxes"
    c_needed, c_rec = (central.needed or 0, central.recommended or 0) if central else (0, 0)
    text = f"simulated: {ward.needed} ward box(es) + {c_needed} central meet every p99 target"
    needed, recommended = ward.needed, ward.recommended
    if served is not None and served.inconclusive:
        last = served.rows[-1]
        text += (
            f"; served check inconclusive: other work held {last['other_work_cores']:.2f} of this box's cores "
            f"(at {last['beds']} beds, ECG p99 {ms(last['ecg_p99_ms'])} ms): run it on a quiet box"
        )
    elif served is not None:
        if served.beds_ok is None:
            last = served.rows[-1]
            text += (
                f"; served: even {last['beds']} beds on one box miss the ECG target (p99 {ms(last['ecg_p99_ms'])} ms)"
            )
            return text, None, None
        assert served.needed is not None and served.recommended is not None
        ok = next(r for r in reversed(served.rows) if r["met"] and r["beds"] == served.beds_ok)
        text += (
            f"; served on this box: {served.beds_ok} beds on one ward box meet the ECG target "
            f"(p99 {ms(ok['ecg_p99_ms'])} ms)"
        )
        needed, recommended = max(needed, served.needed), max(recommended, served.recommended)
    text += (
        f". {sizing.site.beds} beds on {cores}: {needed} ward + {c_needed} central = {needed + c_needed} needed; "
        f"recommended {recommended} ward + {c_rec} central = {recommended + c_rec}, so that any one box can be lost"
    )
    return text, needed, recommended


if __name__ == "__main__":
    main_guard(main)
