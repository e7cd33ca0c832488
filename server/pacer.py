"""A per-provider limit on concurrent upstream calls, shared fairly between orgs.

Each provider gets a lane of ``max_concurrency`` slots. A flight takes a slot
before it writes its turn and calls upstream, and gives it back when the call
ends however it ends (done, failed, cancelled). Flights that find every slot
taken wait in a queue of their org, and a freed slot goes to the orgs in
turn (round-robin): the next org with a waiter gets it, first come first
served within the org, so one org's backlog holds another org's first
request for at most one turn. The time a flight waited is its queue wait.

A wait longer than the queue timeout raises :class:`~server.errors.QueueFull`
(503) whose ``retry_after`` estimates the real wait of a request of that org
sent now: the recent mean time a call holds its slot, times the rounds until
its turn (in round-robin each other org is served at most as many times as
this org has waiters, plus one), at least one second.

Who writes what: a lane's queues and counters only in :meth:`Pacer.slot` and
:meth:`_Lane.release`, on the event loop. A newcomer never overtakes a
waiter: while anyone waits, a newcomer queues too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from contextlib import AbstractAsyncContextManager
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

    def slot(self, provider: str, limit: int, *, org: str = "") -> AbstractAsyncContextManager[float]:
        """Hold one of ``provider``'s at most ``limit`` slots, queued as ``org``; yields the
        seconds waited. Freed slots go to the waiting orgs in turn (round-robin).

        Raises :class:`~server.errors.QueueFull` after the queue timeout. The slot is
        given back however the block ends."""
        ...

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per provider: its limit, calls running, flights waiting (as this process sees them)."""
        ...


class _Lane:
    """One provider's slots and its queues, one per org."""

    __slots__ = ("limit", "running", "waiting", "peak", "mean_hold_s", "_queues")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0  # calls holding a slot
        self.waiting = 0  # flights queued for one
        self.peak = 0  # highest ``running`` seen
        self.mean_hold_s: float | None = None  # running mean of how long a call holds its slot
        #: per org, its waiters in arrival order; the dict's order is the round-robin's
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}

    def try_take(self) -> bool:
        if self.running < self.limit and not self.waiting:
            self.running += 1
            self.peak = max(self.peak, self.running)
            return True
        return False

    def enqueue(self, org: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(org)
        if queue is None:
            queue = self._queues[org] = deque()
        queue.append(waiter)
        self.waiting += 1
        return waiter

    def forget(self, org: str, waiter: asyncio.Future[None]) -> None:
        """A waiter gave up (timeout, cancel) before it was handed a slot."""
        queue = self._queues.get(org)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.waiting -= 1
            if not queue:
                del self._queues[org]

    def release(self) -> None:
        """A call gave its slot back: hand it to the next org in turn."""
        self.running -= 1
        while self.running < self.limit and self._queues:
            org = next(iter(self._queues))
            queue = self._queues.pop(org)
            waiter = queue.popleft()
            self.waiting -= 1
            if queue:
                self._queues[org] = queue  # to the back of the round
            self.running += 1
            self.peak = max(self.peak, self.running)
            waiter.set_result(None)

    def retry_after(self, org: str, queue_timeout_s: float) -> float:
        """Seconds until a request of ``org`` turned away now would likely find a slot."""
        hold = self.mean_hold_s if self.mean_hold_s is not None else queue_timeout_s
        own = len(self._queues.get(org, ())) + 1
        ahead = sum(min(len(q), own) for name, q in self._queues.items() if name != org) + own
        rounds = math.ceil(ahead / self.limit)
        return max(MIN_RETRY_AFTER_S, hold * rounds)


class _Slot:
    """The ``async with`` of :meth:`Pacer.slot` (a class: every flight takes one)."""

    __slots__ = ("_acquired", "_lane", "_org", "_pacer", "_provider")

    def __init__(self, pacer: Pacer, provider: str, limit: int, org: str) -> None:
        self._pacer = pacer
        self._provider = provider
        self._org = org
        self._lane = pacer.lane(provider, limit)
        self._acquired = 0.0

    async def __aenter__(self) -> float:
        lane = self._lane
        started = time.perf_counter()
        if not lane.try_take():
            await self._pacer._wait(lane, self._provider, self._org)
        self._acquired = time.perf_counter()
        return self._acquired - started

    async def __aexit__(self, *_: object) -> None:
        lane = self._lane
        held = time.perf_counter() - self._acquired
        lane.mean_hold_s = held if lane.mean_hold_s is None else (
            (1 - HOLD_SMOOTHING) * lane.mean_hold_s + HOLD_SMOOTHING * held)
        lane.release()


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

    def slot(self, provider: str, limit: int, *, org: str = "") -> _Slot:
        """Hold one of ``provider``'s slots, queued as ``org``; yields the seconds spent waiting."""
        return _Slot(self, provider, limit, org)

    async def _wait(self, lane: _Lane, provider: str, org: str) -> None:
        """Queue for a slot of ``lane`` until it is handed over; QueueFull after the queue timeout."""
        waiter = lane.enqueue(org)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await asyncio.shield(waiter)
        except TimeoutError:
            if waiter.done():  # handed a slot in the same instant: keep it
                return
            lane.forget(org, waiter)
            raise QueueFull(
                f"provider {provider!r} is busy: {lane.running} calls running (its limit) and "
                f"{lane.waiting} more waiting, and no slot freed within "
                f"{self.queue_timeout_s:g}s; try again later",
                retry_after=lane.retry_after(org, self.queue_timeout_s),
            ) from None
        except BaseException:
            if waiter.done():  # the slot was handed over as the waiter left: give it on
                lane.release()
            else:
                lane.forget(org, waiter)
            raise

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per provider: its limit, calls running, flights waiting."""
        return {
            name: {"limit": lane.limit, "running": lane.running, "waiting": lane.waiting}
            for name, lane in self._lanes.items()
        }
