"""Autoscaling a model's replicas on queue delay (Ray Serve custom policy and replica metrics).

Each replica reports the mean time its requests waited over the last interval: at the front's
priority gate plus in bedside's own scheduler queue (`queue_delay_ms`). The policy wants as many
replicas as brings that delay under the model's target, or the requests in flight under
`target_ongoing` per replica, whichever asks for more. It scales down one replica at a time, and
only when both are well under target, so a replica added for a spike is not removed by the very
drop in delay it caused. Ray applies the delays (upscale_delay_s, downscale_delay_s) and bounds.
"""

from __future__ import annotations

import math
from typing import Any

QUEUE_DELAY = "queue_delay_ms"
DOWN_BELOW = 0.5  # both ratios under this for a scale-down: a band of hysteresis, not a set point


class QueueDelayPolicy:
    def __init__(self, target_queue_ms: float, target_ongoing: float) -> None:
        self.target_queue_ms = target_queue_ms
        self.target_ongoing = target_ongoing

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        current = ctx.current_num_replicas
        if current == 0:
            return ctx.target_num_replicas, {}
        delays = list((ctx.aggregated_metrics or {}).get(QUEUE_DELAY, {}).values())
        delay_ratio = (sum(delays) / len(delays)) / self.target_queue_ms if delays else 0.0
        ongoing_ratio = ctx.total_num_requests / (self.target_ongoing * current)
        return self.desired(current, delay_ratio, ongoing_ratio), {"delay_ratio": round(delay_ratio, 3)}

    @staticmethod
    def desired(current: int, delay_ratio: float, ongoing_ratio: float) -> int:
        ratio = max(delay_ratio, ongoing_ratio)
        if ratio > 1:
            return math.ceil(current * ratio)
        if delay_ratio < DOWN_BELOW and ongoing_ratio < DOWN_BELOW:
            return current - 1
        return current
