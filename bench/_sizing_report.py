"""The output of bench/cluster_sizing.py: its tables (rich and markdown) and its JSON."""

from __future__ import annotations

from typing import Any

from bedside.planning import cluster
from bedside.planning.profile import Profile

# --- output --------------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 10 else f"{value:.1f}")


def level_p99(result: cluster.BoxResult) -> dict[str, Any]:
    return {
        f"{r.name} {r.level}": {"p99_ms": r.p99_ms, "target_ms": r.target_ms, "met": r.met, "n": r.count}
        for r in result.evaluation.rows
    }


def box_row(kind: cluster.KindSizing, option: cluster.Option, cores: float) -> dict[str, str]:
    b = option.busiest
    row = {
        "boxes": str(option.boxes),
        "busiest box": f"{max(option.beds)} beds" if option.beds else f"1/{option.boxes} of the load",
        "cores busy": f"{b.cores_busy:.2f} of {cores:g} ({b.cores_busy / cores:.0%})",
    }
    if cluster.LOOP in b.evaluation.utilisation:
        row["event loop busy"] = f"{b.evaluation.utilisation[cluster.LOOP]:.0%}"
    for r in b.evaluation.rows:
        row[f"{r.name} p{r.level}"] = f"{ms(r.p99_ms)} / {ms(r.target_ms)}" + ("" if r.met is not False else " x")
    row["meets"] = "yes" if b.meets() else "no"
    return row


def headroom_text(h: tuple[float, float] | None) -> str:
    if h is None:
        return f"over x{cluster.MAX_HEADROOM:g}"
    if h[0] == 0:
        return "none (misses already)"
    return f"x{h[0]:.2f} (misses by x{h[1]:.2f})"


def answer_rows(sizing: cluster.ClusterSizing) -> list[dict[str, str]]:
    rows = []
    for kind in sizing.kinds():
        needed, rec = kind.needed, kind.recommended
        opt = kind.option(needed) if needed is not None else None
        util = f"{opt.busiest.cores_busy / sizing.spec.cores:.0%}" if opt is not None else "-"
        loss = kind.after_loss
        rows.append(
            {
                "boxes": f"{kind.kind} ({', '.join(kind.demands)})",
                "needed": str(needed) if needed is not None else "none meets",
                "busiest box utilisation": util,
                "headroom at needed": headroom_text(kind.headroom.get(needed)) if needed is not None else "-",
                "recommended (N+1)": str(rec) if rec is not None else "-",
                "one lost: busiest survivor": "-" if loss is None else (
                    f"{loss.beds:g} beds, meets" if loss.beds else "meets"
                ) if loss.meets() else "misses",
                "headroom at recommended": headroom_text(kind.headroom.get(rec)) if rec in kind.headroom else "-",
            }
        )  # fmt: skip
    return rows


def served_row(r: dict[str, Any]) -> dict[str, str]:
    return {
        "purpose": r["purpose"],
        "beds": str(r["beds"]),
        "ECG p50 / p99 ms": f"{ms(r['ecg_p50_ms'])} / {ms(r['ecg_p99_ms'])}",
        "windows": f"{r['ecg_windows']}/{r['ecg_windows_expected']}",
        "server cores": f"{r['server_cores']:.2f}",
        "of which models": f"{r['model_cores']:.3f}",
        "windows/s": f"{r['windows_per_s']:.0f}",
        "loop cores": f"{r['loop_cores']:.3f}",
        "generator / other work cores": f"{r['generator_cores']:.2f} / {r['other_work_cores']:.2f}",
        "meets": "inconclusive" if r.get("inconclusive") else ("yes" if r["met"] else "no"),
    }


def markdown(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def to_json(sizing: cluster.ClusterSizing) -> dict[str, Any]:
    def result(b: cluster.BoxResult) -> dict[str, Any]:
        return {
            "beds": b.beds,
            "load_share": round(b.factor, 6),
            "stream_cores": round(b.background, 4),
            "cores_busy": round(b.cores_busy, 4),
            "utilisation": round(b.cores_busy / sizing.spec.cores, 4),
            "simulated_seconds": round(b.seconds, 1),
            "p99_rough": b.rough,
            "meets": b.meets(),
            "levels": level_p99(b),
            "mean_batch": {k: round(v, 3) for k, v in b.evaluation.mean_batch.items()},
            "busy": {k: round(v, 4) for k, v in b.evaluation.utilisation.items()},
        }

    return {
        kind.kind: {
            "demands": kind.demands,
            "scan": [{"boxes": o.boxes, "beds_per_box": o.beds, "busiest": result(o.busiest)} for o in kind.options],
            "needed": kind.needed,
            "recommended": kind.recommended,
            "one_lost_busiest_survivor": None if kind.after_loss is None else result(kind.after_loss),
            "headroom": {
                str(k): None if v is None else {"meets_at": round(v[0], 3), "misses_at": round(v[1], 3)}
                for k, v in kind.headroom.items()
            },
            "notes": kind.notes,
        }
        for kind in sizing.kinds()
    }


def costs_table(profile: Profile) -> list[dict[str, str]]:
    rows = []
    for name, m in profile.models.items():
        largest = max(m.latency_ms)
        rows.append(
            {
                "model": name,
                "instances x threads": f"{m.instances} x {m.threads}",
                "memory MB": f"{m.session_mb + m.run_mb:.1f}",
                "batch 1 ms": f"{m.mean_ms(1):.3f}",
                "largest batch ms": f"{m.mean_ms(largest):.3f} (x{largest})",
                "after 20 ms idle +ms": f"{m.idle_penalty_ms.get(20.0, 0.0):.3f}",
            }
        )
    return rows
