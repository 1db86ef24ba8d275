"""How a rollout is going, read from the boxes' reports, and the publisher's decision to go on.

A box that rolled the version back, or refused it (golden check, load failure), marks the stage
failed: the rollout is halted with that box's reason and nothing more installs it. A stage goes on
only when enough boxes of it report the version kept (past its watch) and none failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bedside.updates.rollout import ModelRollout, device_bucket


@dataclass
class StageHealth:
    kept: list[str] = field(default_factory=list)  # serving the version, watch over
    watching: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # device -> why it refused or rolled back
    behind: list[str] = field(default_factory=list)  # in the stage, not (yet) on the version
    outside: int = 0  # reporting boxes not in the rollout's stages so far

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": len(self.kept),
            "watching": len(self.watching),
            "failed": self.failed,
            "behind": len(self.behind),
            "outside": self.outside,
        }


def stage_health(name: str, rollout: ModelRollout, reports: dict[str, dict[str, Any]]) -> StageHealth:
    health = StageHealth()
    version = str(rollout.version)
    for device, report in sorted(reports.items()):
        state = (report.get("serving") or {}).get(name) or {}
        refused = state.get("refused") or {}
        if version in refused:
            health.failed[device] = str(refused[version])[:300]
            continue
        groups = frozenset(report.get("groups") or ())
        if not rollout.admits(device, groups):
            health.outside += 1
            continue
        if str(state.get("version")) == version:
            (health.watching if state.get("phase") == "watching" else health.kept).append(device)
        else:
            health.behind.append(device)
    return health


def decide(rollout: ModelRollout, health: StageHealth, min_kept: int) -> tuple[str, str]:
    """(action, reason): halt, wait, advance or done."""
    if health.failed:
        device, why = next(iter(health.failed.items()))
        return "halt", f"{len(health.failed)} box(es) refused or rolled back v{rollout.version}; {device}: {why}"
    if health.behind:  # a stage is proven by its own boxes, not by those of the stages before it
        return "wait", f"{len(health.behind)} box(es) of this stage not on v{rollout.version} yet"
    if health.watching or len(health.kept) < min_kept:
        return "wait", f"{len(health.kept)} box(es) kept v{rollout.version}, {len(health.watching)} under watch; " \
            f"{min_kept} needed"  # fmt: skip
    if rollout.stage + 1 >= len(rollout.stages):
        return "done", f"the last stage ({rollout.stages[-1].label()}) is healthy"
    return "advance", f"stage {rollout.stage + 1} healthy ({len(health.kept)} kept)"


__all__ = ["StageHealth", "decide", "device_bucket", "stage_health"]
