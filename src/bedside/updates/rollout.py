"""The rollout plan: which version of each model goes to which boxes, stage by stage.

The plan is one JSON file published as a signed TUF target (`rollout.json`), so a box trusts it as
it trusts a model. A stage is a share of the fleet by a stable hash of the device id (the same boxes
are always the first 5 %), or named groups; a box in an earlier stage stays in the later ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from bedside.errors import InvalidInput

PLAN_TARGET = "rollout.json"
MODEL_FILES = ("model.onnx", "config.toml", "MODEL_CARD.md", "golden.json")  # what a published version holds
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class PlanError(InvalidInput):
    """A rollout plan, stage or device id that cannot be used; the message says why."""


def check_name(kind: str, text: str, limit: int = 128) -> str:
    """Model names and device ids become parts of URLs and file names: a safe alphabet only."""
    if not text or len(text) > limit or not set(text) <= NAME_CHARS or text.startswith("."):
        raise PlanError(f"{kind} {text[:40]!r} must be 1-{limit} of A-Z a-z 0-9 . _ - (not starting with .)")
    return text


@dataclass
class Stage:
    percent: float = 0.0  # the share of the fleet, by device hash
    groups: tuple[str, ...] = ()  # named groups (updates.groups on the box)

    def admits(self, bucket: float, groups: frozenset[str]) -> bool:
        return bucket < self.percent or bool(groups & set(self.groups))

    def label(self) -> str:
        parts = [f"{self.percent:g}%"] if self.percent else []
        return "+".join(parts + [f"group:{g}" for g in self.groups]) or "nobody"


@dataclass
class ModelRollout:
    version: int
    stages: list[Stage]
    stage: int = 0  # index of the current stage
    paused: bool = False
    halted: str = ""  # why the rollout was stopped (a failed canary); nothing more installs
    urgent: bool = False  # installs outside the maintenance window

    def admits(self, device_id: str, groups: frozenset[str]) -> bool:
        bucket = device_bucket(device_id)
        return any(s.admits(bucket, groups) for s in self.stages[: self.stage + 1])

    @property
    def active(self) -> bool:
        return not self.paused and not self.halted


@dataclass
class RolloutPlan:
    models: dict[str, ModelRollout] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {"models": {n: asdict(r) for n, r in sorted(self.models.items())}}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RolloutPlan:
        try:
            doc = json.loads(raw)
            return cls({check_name("model", n): _rollout(r) for n, r in dict(doc.get("models", {})).items()})
        except PlanError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise PlanError(f"the rollout plan is not valid: {type(exc).__name__}") from None


def _rollout(doc: dict[str, Any]) -> ModelRollout:
    stages = [Stage(float(s.get("percent", 0.0)), tuple(str(g) for g in s.get("groups", ()))) for s in doc["stages"]]
    version, stage = int(doc["version"]), int(doc.get("stage", 0))
    if version < 1 or not stages or not 0 <= stage < len(stages):
        raise PlanError("a rollout needs a version >= 1, at least one stage and a stage index within them")
    if any(not 0 <= s.percent <= 100 for s in stages):
        raise PlanError("a stage's percent must be within 0-100")
    return ModelRollout(
        version, stages, stage, bool(doc.get("paused", False)), str(doc.get("halted", "")), bool(doc.get("urgent"))
    )


def parse_stages(text: str) -> list[Stage]:
    """'5,50,100' or 'group:canary,25,100': one stage per comma; a group joins the stage that follows
    it as written ('group:icu+10' is one stage of a group and 10 %)."""
    stages = []
    for item in text.split(","):
        stage = Stage()
        for part in item.strip().split("+"):
            part = part.strip()
            if part.startswith("group:"):
                stage.groups += (check_name("group", part[6:], 64),)
            else:
                try:
                    stage.percent = float(part.rstrip("%"))
                except ValueError:
                    raise PlanError(f"stage {part!r} is neither a percent nor group:NAME") from None
                if not 0 < stage.percent <= 100:
                    raise PlanError(f"stage {part!r}: a percent must be above 0 and at most 100")
        stages.append(stage)
    if not stages:
        raise PlanError("no stages")
    return stages


def device_bucket(device_id: str) -> float:
    """Where a box falls in [0, 100): stable across runs, boxes and Python versions."""
    digest = hashlib.sha256(b"bedside-rollout:" + device_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100
