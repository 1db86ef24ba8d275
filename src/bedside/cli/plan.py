"""`bedside plan`: will this box carry this workload within its targets, and if not, how many boxes will?

Thin: parse, call bedside.planning, print. A mistake in what the user gave (a missing or bad workload
or profile file, an unknown model, a box too small for one instance) is one red line and exit 2,
left to bedside.cli.main like every BedsideError."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from bedside.cli.common import RepoOption, _repository, console, fail

DEFAULT_SECONDS = 60.0


def plan(
    workload: Annotated[
        Path,
        typer.Option(
            "--workload",
            "-w",
            help="TOML file: per model or graph its requests/s, priority mix and p99 targets "
            "(see bench/workloads/ward.toml).",
        ),
    ],
    repository: RepoOption = None,
    memory_mb: Annotated[
        float | None,
        typer.Option(
            help="Memory of one box for models, MB: CPU RAM, or GPU memory for GPU models. "
            "Default: this box's available RAM."
        ),
    ] = None,
    cores: Annotated[
        float | None, typer.Option(help="CPU cores of one box, shared by every model's instances. Default: this box's.")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Measurements to reuse (JSON). When the file does not exist, the models are measured and the "
            "measurements written there."
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON to this file.")] = None,
    seconds: Annotated[
        float | None,
        typer.Option(help=f"Simulated seconds of load (default: the workload's `seconds`, else {DEFAULT_SECONDS:g})."),
    ] = None,
    headroom: Annotated[float, typer.Option(help="Fraction of each box's memory kept free.")] = 0.1,
    busy_cores: Annotated[
        float,
        typer.Option(help="Cores that other work keeps busy on the box (HTTP decoding, other services)."),
    ] = 0.0,
    runs: Annotated[int, typer.Option(help="Timed runs per model and batch size when measuring.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the simulation: the same seed, the same prediction.")] = 0,
) -> None:
    """Plan capacity: measure the models, pack their instances into the box's memory and simulate the
    workload's queues; print predicted queue delay and p99 per model and priority against the
    targets, and how many boxes meet them."""
    from bedside.planning import planner, report
    from bedside.planning.profile import load_profile, measure, model_folders
    from bedside.planning.workload import load_workload

    if memory_mb is not None and memory_mb <= 0:
        fail("--memory-mb must be above 0", 2)
    if cores is not None and cores <= 0:
        fail("--cores must be above 0", 2)
    if seconds is not None and seconds <= 0:
        fail("--seconds must be above 0", 2)
    if not 0 <= headroom < 1 or busy_cores < 0 or runs < 10:
        fail("--headroom is a fraction from 0 to below 1, --busy-cores 0 or more, --runs 10 or more", 2)
    wanted = load_workload(workload)  # before anything is measured: a typo costs a second, not a minute
    root = _repository(repository)
    models, graphs = model_folders(root)
    planner.check_workload(wanted, set(models), set(graphs))
    reused = profile is not None and profile.exists()
    if profile is not None and reused:
        measured = load_profile(profile)
    else:
        with console.status("measuring the models (memory, latency per batch size)..."):
            measured = measure(root, runs=runs, progress=lambda line: console.print(f"  {escape(line)}"))
        if profile is not None:
            profile.parent.mkdir(parents=True, exist_ok=True)
            profile.write_text(measured.to_json(), encoding="utf-8")
            console.print(f"measurements written to {escape(str(profile))}")
    setups = planner.setups(root, measured, wanted.models_called())
    planner.streams(wanted, setups)  # priority levels the models do not have: refused before any output
    if reused:
        console.print(f"using the measurements in {escape(str(profile))} (measured {measured.box.get('measured_at')})")
    missing = sorted(set(models) - set(measured.models) - set(measured.unavailable))
    if missing:
        console.print(f"[yellow]not in the profile, not counted in memory: {escape(', '.join(missing))}[/yellow]")
    sizes = planner.sizes_of(setups, measured, models)
    budget = memory_mb if memory_mb is not None else planner.default_budget_mb()
    box_cores = cores if cores is not None else float(os.cpu_count() or 1)
    simulated = seconds or wanted.seconds or DEFAULT_SECONDS
    with console.status(f"simulating {simulated:g} s of the workload..."):
        result = planner.plan(
            wanted,
            setups,
            sizes,
            budget,
            measured.base_mb,
            box_cores,
            simulated,
            headroom,
            busy_cores,
            seed,
            measured.wake_ms,
        )
    console.print(report.profile_table(measured, models))
    console.print(report.packing_table(result, measured))
    title = "this box" if result.packing.box_count() == 1 else f"one copy of the {result.packing.box_count()} boxes"
    console.print(
        report.predictions_table(
            result.one, f"predicted on {title}: {box_cores:g} cores, {simulated:g} s simulated (seed {seed})"
        )
    )
    if result.needed is not None and result.needed.replicas > 1:
        console.print(
            report.predictions_table(result.needed, f"with {result.boxes_needed()} boxes, the load split between them")
        )
    for line in result.notes:
        console.print(f"[yellow]{escape(line)}[/yellow]", soft_wrap=True)
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report.to_json(result, measured), indent=2), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {json_out}: {exc.strerror or type(exc).__name__}", 2)
    line = report.verdict(result)
    colour = "green" if result.boxes_needed() == 1 else "red"
    console.print(f"[bold {colour}]{escape(line)}[/bold {colour}]", soft_wrap=True)
