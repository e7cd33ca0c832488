"""A per-provider limit on concurrent upstream calls.

Each provider gets a FIFO semaphore of ``max_concurrency`` slots. A flight
waits for a slot before calling upstream; the time it waited is its queue wait.
A wait longer than the queue timeout raises :class:`QueueFull`, whose
``retry_after`` tells the client when to come back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import QueueFull

__all__ = ["DEFAULT_QUEUE_TIMEOUT_S", "Pacer"]

DEFAULT_QUEUE_TIMEOUT_S = 30.0


class _Lane:
    """One provider's slots. ``asyncio.Semaphore`` wakes waiters in FIFO order."""

    __slots__ = ("limit", "semaphore", "running", "waiting", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.semaphore = asyncio.Semaphore(limit)
        self.running = 0  # written only by Pacer.slot
        self.waiting = 0  # written only by Pacer.slot
        self.peak = 0  # highest ``running`` seen; tests read it


class Pacer:
    def __init__(self, *, queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S) -> None:
        self.queue_timeout_s = queue_timeout_s
        self._lanes: dict[str, _Lane] = {}

    def lane(self, provider: str, limit: int) -> _Lane:
        lane = self._lanes.get(provider)
        if lane is None:
            lane = self._lanes[provider] = _Lane(max(1, limit))
        return lane

    @asynccontextmanager
    async def slot(self, provider: str, limit: int) -> AsyncIterator[float]:
        """Hold one of ``provider``'s slots; yields the seconds spent waiting."""
        lane = self.lane(provider, limit)
        started = time.perf_counter()
        lane.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await lane.semaphore.acquire()
        except TimeoutError:
            raise QueueFull(
                f"provider {provider!r} has {lane.limit} calls running and "
                f"{lane.waiting - 1} waiting; try again shortly",
                retry_after=max(1.0, self.queue_timeout_s / 2),
            ) from None
        finally:
            lane.waiting -= 1
        lane.running += 1
        lane.peak = max(lane.peak, lane.running)
        try:
            yield time.perf_counter() - started
        finally:
            lane.running -= 1
            lane.semaphore.release()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {
            name: {"limit": lane.limit, "running": lane.running, "waiting": lane.waiting}
            for name, lane in self._lanes.items()
        }
