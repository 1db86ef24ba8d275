"""The alert bus: every score and alert goes to each subscriber (an SSE stream) through a bounded
queue. A slow subscriber loses its oldest events (counted), never the server's memory."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

QUEUE = 1024
HISTORY = 512


class AlertBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.dropped = 0
        self.published = 0

    def publish(self, event: dict[str, Any]) -> None:
        self.published += 1
        if event.get("type") == "alert":
            self.recent.append(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)
