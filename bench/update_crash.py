"""Crash test of the model update at scale: kill -9 of the update agent at every install step and at
random instants, then a restart, which must serve exactly the old version or the new one.

    python bench/update_crash.py [--kills 500] [--payload-kb 1024] [--seed 0] [--quick]

Prints tables and writes bench/results/update_crash.json and update_crash.md (--quick: 50 kills,
results in bench/results/quick/). The lab is tests/test_updates_crash.py's (read its docstring for
the details): one loopback update repository (v1: y = 2x, v2: y = 3x, a bsdiff delta between them)
served by a child process; for each trial a box is copied from a template, a forked child updates it
from v1 to v2 (as `bedside update` does, or inside a server: a Dataplane and its lifecycle) and is
killed with SIGKILL, then a second forked child is the restarted box: install.recover(), a fresh
Dataplane load (READY, an unversioned x = 1 answers 2.0 or 3.0, the answering version's file hashes
to exactly the box's v1 or the published v2, no .incoming-* left, serving.json parses and names a
whole version, every version folder holds exactly its files), then the agent's next pass, which must
bring the box to v2, and a fresh load again, which must serve v2.

Kills: a third of them at checkpoints (every step of install.py and the agent's switch, round robin
over the scenarios), the rest at seeded random instants: half from the start of the run (uniform
within the run's duration, measured without a kill: loading, TUF refresh, download, install, golden
check), half from the start of the install (the first write to the repository; uniform within the
install's measured duration). A random delay that outlasts the run is no kill (counted apart), and
trials go on until `--kills` processes were really killed. Partial versions and updates that do not
complete after the crash must both be 0: the script fails (exit 1) after writing its results
otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    NAME,
    ROOT,
    console,
    machine,
    main_guard,
    parse_args,
    popen,
    result_path,
    say,
    table,
    write_results,
)

# isort: split
sys.path.insert(0, str(ROOT))
from tests.test_updates_crash import AFTER, SCENARIOS, CrashLab, Kill, Timing, Trial, describe

STEP_SHARE = 1 / 3  # of the kills: at checkpoints; the rest at random instants
BUCKETS = 4  # random delays: quarters of the window they are drawn in
OUTCOMES = ["kills", "old", "new", "partial", "not completed", "parts left", "ms/trial"]


def plan_kills(timings: dict[str, Timing], kills: int, seed: int) -> list[Kill]:
    """Checkpoint kills round robin over (scenario, step), then random ones round robin over the
    scenarios, in turn from the start of the run, of the install and of the switch."""
    rng = random.Random(seed)
    pairs = [(s, step) for s in SCENARIOS for step in timings[s.name].steps]
    stepped = [Kill(s, step=step) for s, step in (pairs[i % len(pairs)] for i in range(round(kills * STEP_SHARE)))]
    randoms = []
    for i in range(kills - len(stepped)):
        scenario = SCENARIOS[i % len(SCENARIOS)]
        after = AFTER[(i // len(SCENARIOS)) % len(AFTER)]
        randoms.append(Kill(scenario, delay_s=rng.uniform(0.0, timings[scenario.name].span(after)), after=after))
    return stepped + randoms


def bucket(trial: Trial, timings: dict[str, Timing]) -> str:
    after = trial.kind.removeprefix("random-")
    span = timings[trial.scenario].span(after)
    q = min(BUCKETS - 1, int((trial.delay_s or 0.0) / span * BUCKETS)) if span > 0 else 0
    return f"{after} {q * 100 // BUCKETS}-{(q + 1) * 100 // BUCKETS} %"


LANDED = {"start": "before the install", "install": "install begun", "switch": "switch begun"}
ORDER = list(dict.fromkeys(s for sc in SCENARIOS for s in sc.steps))
RANKS = {
    **{f"random, {LANDED['start']}": -2.0, f"random, {LANDED['install']}": -1.0},
    **{f"random, after {s}": float(i) for i, s in enumerate(ORDER)},
    f"random, {LANDED['switch']}": ORDER.index("version durable") + 0.5,
}


def landed_at(trial: Trial) -> str:
    """Where a random kill landed: after the last checkpoint the run passed, or the phase it began."""
    return f"random, {LANDED[trial.reached]}" if trial.reached in LANDED else f"random, after {trial.reached}"


TRIAL_COLUMNS = "scenario | kill (step, or random-<from> +delay ms) | last checkpoint | served | next pass | ms"


def trial_line(trial: Trial) -> str:
    """One trial in one line of the JSON (the seed reproduces the rest)."""
    how = str(trial.step) if trial.kind == "step" else f"{trial.kind} +{(trial.delay_s or 0.0) * 1e3:.2f}"
    served = trial.served if trial.killed else f"{trial.served} (not killed)"
    return " | ".join([trial.scenario, how, trial.reached, served, trial.outcome, f"{trial.total_s * 1e3:.0f}"])


def tally(trials: list[Trial]) -> dict[str, Any]:
    killed = [t for t in trials if t.killed]
    return {
        "trials": len(trials),
        "kills": len(killed),
        "finished first": len(trials) - len(killed),
        "old": sum(t.served == "old" for t in killed),
        "new": sum(t.served == "new" for t in killed),
        "partial": sum(t.served == "partial" for t in trials),
        "not completed": sum(not t.completed for t in trials),
        "parts left": sum(t.leftover_parts > 0 for t in trials),
        "ms/trial": f"{1e3 * sum(t.total_s for t in trials) / max(1, len(trials)):.0f}",
        "update ms": f"{1e3 * sum(t.update_s for t in trials) / max(1, len(trials)):.0f}",
        "restart ms": f"{1e3 * sum(t.restart_s for t in trials) / max(1, len(trials)):.0f}",
    }


def grouped(trials: list[Trial], key: Any, first: str) -> list[dict[str, Any]]:
    groups: dict[str, list[Trial]] = defaultdict(list)
    for trial in trials:
        groups[key(trial)].append(trial)
    return [{first: name, **tally(group)} for name, group in groups.items()]


def markdown(sections: list[tuple[str, list[dict[str, Any]], list[str]]], notes: list[str]) -> str:
    lines = ["# Update crash test: kill -9 during an install, then a restart", ""]
    for title, rows, columns in sections:
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |"]
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
        lines.append("")
    return "\n".join([*lines, *(f"- {n}" for n in notes), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=500, help="processes killed (trials go on until so many were)")
    parser.add_argument("--payload-kb", type=int, default=1024, help="size of the model's weights, KiB")
    parser.add_argument("--calibration-runs", type=int, default=5, help="runs without a kill per scenario")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill instants")
    args = parse_args(parser, kills=50, calibration_runs=2)
    started = time.perf_counter()
    say(
        f"{NAME}: kill -9 of the update agent, {args.kills} kills over {len(SCENARIOS)} scenarios, "
        f"models of {args.payload_kb} KiB; each kill followed by a restart and the agent's next pass"
    )
    trials: list[Trial] = []
    unplanned = 0
    with tempfile.TemporaryDirectory(prefix="update-crash-", ignore_cleanup_errors=True) as folder:
        say(f"{NAME}: publishing v1 and v2, building the box templates...")
        with CrashLab(Path(folder), payload_kb=args.payload_kb, popen=popen) as lab:
            timings: dict[str, Timing] = {}
            say(f"{NAME}: runs without a kill ({args.calibration_runs} per scenario), to time them:")
            for scenario in SCENARIOS:
                timings[scenario.name] = timing = lab.calibrate(scenario, args.calibration_runs)
                say(
                    f"  {scenario.name}: run {timing.run_s * 1e3:.0f} ms, install {timing.install_s * 1e3:.0f} ms, "
                    f"switch {timing.switch_s * 1e3:.1f} ms, {len(timing.steps)} checkpoints"
                )
                if list(timing.steps) != list(scenario.steps):
                    raise RuntimeError(f"{scenario.name}: checkpoints {timing.steps}, expected {list(scenario.steps)}")
            planned = plan_kills(timings, args.kills, args.seed)
            extra = random.Random(args.seed + 1)
            say(f"{NAME}: {len(planned)} trials planned...")
            done = 0
            while planned:
                kill = planned.pop(0)
                trial = lab.trial(kill)
                trials.append(trial)
                if not trial.ok:
                    say(f"  FAILED: {describe(trial)}")
                if not trial.killed and kill.step is None and kill.delay_s is not None:
                    # the run ended before the kill: another random instant, so that --kills are real kills
                    unplanned += 1
                    span = timings[kill.scenario.name].span(kill.after)
                    planned.append(Kill(kill.scenario, delay_s=extra.uniform(0.0, span), after=kill.after))
                elif not trial.killed:
                    raise RuntimeError(f"not killed: {describe(trial)}")
                done += 1
                if done % 50 == 0:
                    counts = Counter(t.served for t in trials if t.killed)
                    say(
                        f"  {done} trials, {sum(t.killed for t in trials)} kills: old {counts['old']}, "
                        f"new {counts['new']}, partial {sum(t.served == 'partial' for t in trials)}"
                    )
    seconds = time.perf_counter() - started

    total = tally(trials)
    by_scenario = grouped(trials, lambda t: t.scenario, "scenario")
    step_rows = grouped([t for t in trials if t.kind == "step"], lambda t: f"at {t.step}", "killed")
    step_rows.sort(key=lambda r: ORDER.index(r["killed"].removeprefix("at ")))
    randoms = [t for t in trials if t.kind.startswith("random")]
    landed = grouped([t for t in randoms if t.killed], landed_at, "killed")
    landed.sort(key=lambda r: RANKS.get(r["killed"], 99))
    delays = sorted(grouped(randoms, lambda t: bucket(t, timings), "random delay"), key=lambda r: r["random delay"])
    total_row = {"scenario": "all", "killed": "all", "random delay": "all", **total}

    scenario_cols = ["scenario", "trials", *OUTCOMES, "update ms", "restart ms"]
    point_cols = ["killed", *OUTCOMES]
    delay_cols = ["random delay", "trials", "finished first", *OUTCOMES]
    sections = [
        ("By scenario", [*by_scenario, total_row], scenario_cols),
        ("By kill point (checkpoints; random kills by the last checkpoint passed)", [*step_rows, *landed], point_cols),
        ("Random delays, by quarter of the window they were drawn in", delays, delay_cols),
    ]
    for title, rows, columns in sections:
        table(title, rows, columns)
    calibration = {
        name: {
            "run_ms": round(t.run_s * 1e3, 1),
            "install_ms": round(t.install_s * 1e3, 1),
            "switch_ms": round(t.switch_s * 1e3, 1),
            "steps": t.steps,
        }
        for name, t in timings.items()
    }
    notes = [
        f"{total['kills']} processes killed with SIGKILL ({sum(t.kind == 'step' for t in trials)} at checkpoints, "
        f"{sum(t.killed and t.kind != 'step' for t in trials)} at random instants; {unplanned} random delays "
        "outlasted the run and were drawn again): the restarted box served the old version "
        f"{total['old']} times and the new one {total['new']} times; partial versions: {total['partial']}; "
        f"updates that did not complete after the restart: {total['not completed']}.",
        "old: v1 answered 2.0 from a file hashing to the box's v1 (the published v1, or the hand-placed v1 of "
        "the 'v1 placed by hand' templates); new: v2 answered 3.0 from a file hashing to the published v2; for "
        "'model new on the box', old is 'no model'. partial: anything else at the restart (not READY, another "
        "answer or hash, a .incoming-* left, an unreadable serving.json, a version folder without exactly its "
        "files, a traceback).",
        "not completed: the agent's next pass (in the restarted process; in a server for the server scenarios) "
        "did not end with v2 serving, or a fresh load afterwards did not serve v2.",
        "parts left: trials whose state/staging still held .part files once the update had completed. Verified "
        "downloads are dropped as soon as they are read, and the rest of a version's parts by forget() after its "
        "install; a kill between the switch and forget() leaves them (e.g. the complete full model of 'downloads "
        "done before', unused because the delta applied), and the next pass, finding the version up to date, "
        "leaves them to clean(), which drops parts older than a week (source.STALE_PART_S). Not a failure.",
        "Scenarios: v1 installed by the agent (serving.json pins it; delta download), the same with every "
        "download done and verified but its .part not yet dropped, v1 placed by hand (no serving.json: adopt() "
        "writes it; other bytes than the published v1, so the delta does not apply: full download), the same "
        "with the model's download cut halfway (continued), a box without the model (the agent's _add path), "
        "and the two v1 boxes inside a server (Dataplane + lifecycle; the second one watched after the switch).",
        f"Timing per scenario without a kill (fastest of {args.calibration_runs}): "
        + "; ".join(
            f"{n}: run {c['run_ms']:g} ms, install {c['install_ms']:g} ms, switch {c['switch_ms']:g} ms"
            for n, c in calibration.items()
        )
        + ".",
        f"ms/trial: copy of the template, the killed run, the restart with its checks, the next pass and a "
        f"fresh load; forked processes on {machine()['cpu_count']} cores, the box on the local disk (fsyncs "
        "are real).",
        f"Whole run: {seconds:.0f} s" + (" (--quick: a smoke run)" if args.quick else "") + ".",
    ]
    for note in notes:
        console.print(f"- {note}", style="dim", markup=False, highlight=False)
    result_path("update_crash.md").write_text(markdown(sections, notes))
    write_results(
        "update_crash",
        {
            "settings": {
                "kills": args.kills,
                "payload_kb": args.payload_kb,
                "calibration_runs": args.calibration_runs,
                "seed": args.seed,
                "step_share": STEP_SHARE,
                "scenarios": [asdict(s) for s in SCENARIOS],
                "quick": bool(args.quick),
            },
            "totals": total,
            "by_scenario": by_scenario,
            "by_kill_point": step_rows + landed,
            "random_delays": delays,
            "calibration": calibration,
            "trial_columns": TRIAL_COLUMNS,
            "trials": [trial_line(t) for t in trials],
            "failed": [asdict(t) for t in trials if not t.ok],
            "notes": notes,
            "seconds": round(seconds, 1),
            "machine": machine(),
        },
    )
    if total["partial"] or total["not completed"]:
        raise RuntimeError(
            f"{total['partial']} partial versions, {total['not completed']} updates not completed after a crash "
            "(see the FAILED lines and the trials in the results)"
        )


if __name__ == "__main__":
    main_guard(main)
