"""STAT first at the front of the cluster: a bounded number of requests in flight to a model's
replicas, and the rest waiting here by priority level, then by arrival.

Ray Serve's handles queue what the replicas cannot take in arrival order, so a burst of routine
requests would sit ahead of a STAT one. Keeping the replicas exactly full (in flight = replicas x
their max_ongoing) and holding the excess here lets a STAT request take the next free place.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from bedside.errors import Overloaded


class PriorityGate:
    def __init__(self, limit: int, max_waiting: int) -> None:
        self.limit = max(1, limit)  # requests in flight at most (replicas x max_ongoing)
        self.max_waiting = max_waiting  # bounded: beyond it a request is refused at once (429)
        self.in_flight = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self, level: int) -> None:
        """Return once this request may go to a replica (level 0 is STAT and goes first)."""
        if self.in_flight < self.limit and not self._waiting:
            self.in_flight += 1
            return
        if len(self._waiting) >= self.max_waiting:
            self.refused += 1
            raise Overloaded(
                f"{len(self._waiting)} requests already wait for this model's replicas (cluster.front_queue); "
                "retry shortly",
                {"Retry-After": "1"},
            )
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (level, next(self._order), ticket))
        try:
            await ticket  # leave() hands its place over: in_flight is already counted for us
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self.leave()  # given a place just as the caller went away: pass it on
            else:
                self._waiting = [w for w in self._waiting if w[2] is not ticket]
                heapq.heapify(self._waiting)
            raise

    def leave(self) -> None:
        self.in_flight -= 1
        self._admit()

    def resize(self, limit: int) -> None:
        """The replicas changed (autoscaling, a replica lost): admit up to the new limit."""
        self.limit = max(1, limit)
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self.in_flight < self.limit:
            _, _, ticket = heapq.heappop(self._waiting)
            if not ticket.done():
                self.in_flight += 1
                ticket.set_result(None)
