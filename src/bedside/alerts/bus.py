"""The alert bus: every score and alert goes to each subscriber (an SSE stream, the HL7 sender)
through a bounded queue. A slow subscriber loses its oldest events (counted), never the server's
memory."""

from __future__ import annotations

import asyncio
from collections import deque

from bedside.alerts.events import Alert, Event
from bedside.settings import DEFAULTS


class AlertBus:
    def __init__(
        self, queue_size: int = DEFAULTS.alerts.subscriber_queue, history: int = DEFAULTS.alerts.history
    ) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self.queue_size = queue_size
        self.recent: deque[Alert] = deque(maxlen=history)
        self.dropped = 0
        self.published = 0
        self.alerts_by_level = {1: 0, 2: 0, 3: 0}  # alerts raised since start, per level

    def publish(self, event: Event) -> None:
        self.published += 1
        if isinstance(event, Alert):
            self.recent.append(event)
            self.alerts_by_level[event.level] = self.alerts_by_level.get(event.level, 0) + 1
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(self.queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)
