"""What one pass of the update agent did to one model: logged, reported, printed by `bedside update`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    """What one pass did to one model."""

    model: str
    action: (
        str  # up-to-date, not-eligible, paused, halted, deferred, busy, refused, installed, watching, kept, rolled-back
    )
    version: int | None = None  # the version the plan wants
    serving: int | None = None  # what serves after the pass
    reason: str = ""
    golden: dict[str, Any] | None = None
    downloaded: int = 0
    delta: bool = False
    delta_refused: str = ""  # why a published delta was not used (the full model was)
