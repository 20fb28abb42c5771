"""One forward pass at a time, and a bounded line of requests waiting for their turn.

Waiting requests queue on the event loop (an asyncio lock), not in threads. Without
a bound, a burst of clients holds ever more parsed bodies in memory and each waits
ever longer; past `max_waiting` a request is refused at once with a hint of when to
come back (Retry-After: the line's length times a moving average of one turn).
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

MAX_RETRY_AFTER_SECONDS = 60


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting
        self.retry_after = retry_after


class ForwardQueue:
    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.turn_seconds = 1.0  # a first guess; then a moving average of real turns

    def retry_after(self) -> int:
        """Whole seconds until the line ahead has likely cleared (1 to MAX_RETRY_AFTER_SECONDS)."""
        estimate = math.ceil(self.turn_seconds * (self.waiting + 1))
        return max(1, min(MAX_RETRY_AFTER_SECONDS, estimate))

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the model for one request; raises QueueFull if the line is already full."""
        busy = self.lock.locked() or self.waiting > 0
        if busy and self.waiting >= self.max_waiting:
            raise QueueFull(self.waiting, self.retry_after())
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        start = time.monotonic()
        try:
            yield
        finally:
            self.turn_seconds = 0.7 * self.turn_seconds + 0.3 * (time.monotonic() - start)
            self.lock.release()
