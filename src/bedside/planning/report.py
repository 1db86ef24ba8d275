"""A plan for people (rich tables and a verdict line) and for machines (JSON)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from bedside.planning.planner import Evaluation, Plan
from bedside.planning.profile import Profile

LEVEL_NAMES = {1: "1 STAT"}


def verdict(plan: Plan) -> str:
    """The one line the command ends with."""
    n = plan.boxes_needed()
    per = plan.packing.box_count()
    if n is None:
        return "no number of boxes meets the targets: " + "; ".join(plan.notes[:1])
    if n == 1:
        return "this box meets the targets"
    if plan.needed is not None and plan.needed.replicas == 1:
        return f"needs {n} boxes: the models do not fit in one box's memory ({per} boxes hold them)"
    how = f" ({plan.needed.replicas if plan.needed else '?'} copies of {per} boxes)" if per > 1 else ""
    return f"needs {n} boxes{how} to meet the targets, the load split evenly between them"


def predictions_table(evaluation: Evaluation, title: str) -> Table:
    table = Table(title=title)
    table.add_column("model / graph", overflow="fold")
    table.add_column("priority")
    for column in ("req/s", "queue ms p50 / p95 / p99", "p99 ms", "target p99 ms"):
        table.add_column(column, justify="right")
    table.add_column("")
    for r in evaluation.rows:
        mark = "" if r.met is None else ("[green]ok[/green]" if r.met else "[red]misses[/red]")
        if r.rejected:
            mark += f" [red]{r.rejected} refused[/red]"
        table.add_row(
            r.name + (" (graph)" if r.kind == "graph" else ""),
            LEVEL_NAMES.get(r.level, str(r.level)),
            f"{r.rate:g}",
            " / ".join(_ms(r.queue_ms.get(p)) for p in ("p50", "p95", "p99")) if r.queue_ms else "-",
            _ms(r.p99_ms),
            _ms(r.target_ms),
            mark.strip(),
        )
    return table


def packing_table(plan: Plan, profile: Profile) -> Table:
    p = plan.packing
    table = Table(
        title=f"memory: boxes of {p.budget_mb:,.0f} MB, {p.reserve_mb:.0f} MB for the server, "
        f"{p.headroom:.0%} kept free"
    )
    table.add_column("box", justify="right")
    table.add_column("models (instances)", overflow="fold")
    for column in ("used MB", "for models MB", "busiest instance"):
        table.add_column(column, justify="right")
    for i, box in enumerate(p.boxes, 1):
        models = ", ".join(f"{name} x{n}" for name, n in sorted(box.instances.items()))
        busy = [plan.one.utilisation[m] for m in box.instances if m in plan.one.utilisation]
        table.add_row(
            str(i), models, f"{box.used_mb:.1f}", f"{box.capacity_mb:,.1f}", f"{max(busy):.1%}" if busy else "-"
        )
    return table


def profile_table(profile: Profile, names: list[str]) -> Table:
    table = Table(title=f"measured on {profile.box.get('processor', '?')}, {profile.box.get('cpu_count', '?')} cores")
    table.add_column("model", overflow="fold")
    for column in ("instances", "threads", "session MB", "per instance MB", "batch 1 ms", "largest batch ms"):
        table.add_column(column, justify="right")
    for name in names:
        m = profile.models.get(name)
        if m is None:
            continue
        largest = max(m.latency_ms)
        table.add_row(
            name,
            str(m.instances),
            str(m.threads),
            f"{m.session_mb:.1f}",
            f"{m.run_mb:.2f}",
            f"{m.mean_ms(1):.3f}",
            f"{m.mean_ms(largest):.3f} (x{largest})",
        )
    return table


def to_json(plan: Plan, profile: Profile) -> dict[str, Any]:
    return {
        "verdict": verdict(plan),
        "meets_targets_on_one_copy": plan.one.meets(),
        "boxes_needed": plan.boxes_needed(),
        "cores": plan.cores,
        "simulated_seconds": plan.seconds,
        "packing": {
            "budget_mb": plan.packing.budget_mb,
            "reserve_mb": plan.packing.reserve_mb,
            "headroom": plan.packing.headroom,
            "boxes": [
                {"instances": b.instances, "used_mb": round(b.used_mb, 2), "capacity_mb": round(b.capacity_mb, 2)}
                for b in plan.packing.boxes
            ],
        },
        "predictions": _evaluation(plan.one),
        "with_boxes_needed": None if plan.needed is None else _evaluation(plan.needed),
        "notes": plan.notes,
        "profile": {
            "box": profile.box,
            "base_mb": profile.base_mb,
            "models": {
                name: {
                    "session_mb": m.session_mb,
                    "run_mb": m.run_mb,
                    "threads": m.threads,
                    "mean_ms": {str(b): round(m.mean_ms(b), 4) for b in m.latency_ms},
                }
                for name, m in profile.models.items()
            },
            "unavailable": profile.unavailable,
        },
    }


def _evaluation(e: Evaluation) -> dict[str, Any]:
    return {
        "replicas": e.replicas,
        "meets_targets": e.meets(),
        "utilisation": {k: round(v, 4) for k, v in e.utilisation.items()},
        "mean_batch": {k: round(v, 3) for k, v in e.mean_batch.items()},
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "priority": r.level,
                "rate": r.rate,
                "simulated_requests": r.count,
                "rejected": r.rejected,
                "queue_ms": {k: round(v, 4) for k, v in r.queue_ms.items()},
                "p99_ms": None if r.p99_ms is None else round(r.p99_ms, 4),
                "target_p99_ms": r.target_ms,
                "met": r.met,
            }
            for r in e.rows
        ],
    }


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"
