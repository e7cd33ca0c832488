"""A per-provider limit on concurrent upstream calls.

Each provider gets a lane of ``max_concurrency`` slots. A flight takes a slot
before it writes its turn and calls upstream, and gives it back when the call
ends however it ends (done, failed, cancelled). Flights that find every slot
taken wait in FIFO order; the time a flight waited is its queue wait. A wait
longer than the queue timeout raises :class:`~server.errors.QueueFull` (503)
whose ``retry_after`` estimates when a slot is likely to be free: the
recent mean time a call holds its slot, times the calls queued ahead per
slot, at least one second.

Who writes what: a lane's counters only in :meth:`Pacer.slot`, on the event
loop; ``asyncio.Semaphore`` wakes its waiters in the order they came, and a
newcomer does not overtake a waiter while any is queued.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from .errors import QueueFull

__all__ = ["DEFAULT_QUEUE_TIMEOUT_S", "Pacer", "Slots"]

DEFAULT_QUEUE_TIMEOUT_S = 30.0
#: weight of the newest call in the running mean of slot hold times
HOLD_SMOOTHING = 0.2
MIN_RETRY_AFTER_S = 1.0


class Slots(Protocol):
    """Provider slots as a flight takes them: :class:`Pacer` in one process, a shared
    implementation across instances (``server.redis_pacer``)."""

    def slot(self, provider: str, limit: int) -> AbstractAsyncContextManager[float]:
        """Hold one of ``provider``'s at most ``limit`` slots; yields the seconds waited.

        Raises :class:`~server.errors.QueueFull` after the queue timeout. The slot is
        given back however the block ends."""
        ...

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per provider: its limit, calls running, flights waiting (as this process sees them)."""
        ...


class _Lane:
    """One provider's slots."""

    __slots__ = ("limit", "semaphore", "running", "waiting", "peak", "mean_hold_s")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.semaphore = asyncio.Semaphore(limit)
        self.running = 0  # calls holding a slot
        self.waiting = 0  # flights queued for one
        self.peak = 0  # highest ``running`` seen
        self.mean_hold_s: float | None = None  # running mean of how long a call holds its slot

    def retry_after(self, queue_timeout_s: float) -> float:
        """Seconds until a client turned away now would likely find a slot."""
        hold = self.mean_hold_s if self.mean_hold_s is not None else queue_timeout_s
        rounds = math.ceil((self.waiting + 1) / self.limit)
        return max(MIN_RETRY_AFTER_S, hold * rounds)


class Pacer:
    def __init__(self, *, queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S) -> None:
        self.queue_timeout_s = queue_timeout_s
        self._lanes: dict[str, _Lane] = {}

    def lane(self, provider: str, limit: int) -> _Lane:
        """The lane of ``provider``; its limit is fixed by the first call."""
        lane = self._lanes.get(provider)
        if lane is None:
            lane = self._lanes[provider] = _Lane(max(1, limit))
        return lane

    @asynccontextmanager
    async def slot(self, provider: str, limit: int) -> AsyncIterator[float]:
        """Hold one of ``provider``'s slots; yields the seconds spent waiting for it."""
        lane = self.lane(provider, limit)
        started = time.perf_counter()
        if lane.semaphore.locked():
            lane.waiting += 1
            try:
                async with asyncio.timeout(self.queue_timeout_s):
                    await lane.semaphore.acquire()
            except TimeoutError:
                raise QueueFull(
                    f"provider {provider!r} is busy: {lane.running} calls running (its limit) and "
                    f"{lane.waiting - 1} more waiting, and no slot freed within "
                    f"{self.queue_timeout_s:g}s; try again later",
                    retry_after=lane.retry_after(self.queue_timeout_s),
                ) from None
            finally:
                lane.waiting -= 1
        else:
            await lane.semaphore.acquire()  # free: returns at once
        lane.running += 1
        lane.peak = max(lane.peak, lane.running)
        acquired = time.perf_counter()
        try:
            yield acquired - started
        finally:
            held = time.perf_counter() - acquired
            lane.mean_hold_s = held if lane.mean_hold_s is None else (
                (1 - HOLD_SMOOTHING) * lane.mean_hold_s + HOLD_SMOOTHING * held)
            lane.running -= 1
            lane.semaphore.release()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per provider: its limit, calls running, flights waiting."""
        return {
            name: {"limit": lane.limit, "running": lane.running, "waiting": lane.waiting}
            for name, lane in self._lanes.items()
        }
