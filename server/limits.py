"""What one org may take: requests per minute, flights at once, threads kept.

Each limit is a setting (``DAC_ORG_RPM``, ``DAC_ORG_MAX_FLIGHTS``,
``DAC_ORG_MAX_THREADS``; 0 turns it off). A request over a limit gets
:class:`~server.errors.LimitExceeded`: ``429``, the limit's name (the
setting's, lower case, without ``DAC_``) and a ``Retry-After`` that estimates
when the org is under it again:

- ``org_rpm``: a sliding window of the last minute's requests; the wait is
  until the oldest of them leaves the window.
- ``org_max_flights``: flights the org leads that have not ended (joining a
  running flight is free); the wait is the mean time a flight has lasted.
- ``org_max_threads``: threads the org keeps; nothing frees one but a delete,
  so the wait is a minute, and the message says to delete.

Who writes what: everything here runs on the event loop, in synchronous
steps (a check and its count are one step), except the thread check, which
awaits the store's count under a lock per org so two creations cannot both
pass it.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from .config import Settings
from .errors import LimitExceeded

__all__ = ["OrgLimits"]

WINDOW_S = 60.0
#: requests between two sweeps of the windows of orgs that went quiet
SWEEP_EVERY = 1024
#: weight of the newest flight in the running mean of flight durations
SMOOTHING = 0.2
#: what a client over its thread limit is told to wait (only a delete frees one)
THREADS_RETRY_AFTER_S = 60.0


class OrgLimits:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = settings.org_rpm
        self.max_flights = settings.org_max_flights
        self.max_threads = settings.org_max_threads
        self._clock = clock
        self._windows: dict[str, deque[float]] = {}
        self._admitted = 0
        self._flights: dict[str, int] = {}
        self._mean_flight_s: float | None = None
        self._thread_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- requests per minute -------------------------------------------------------

    def admit(self, org: str) -> None:
        """Count one request of ``org``; raise when it made ``org_rpm`` in the last minute."""
        if not self.rpm:
            return
        now = self._clock()
        window = self._windows.get(org)
        if window is None:
            window = self._windows[org] = deque()
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        if len(window) >= self.rpm:
            raise LimitExceeded(
                f"org {org!r} made {self.rpm} requests in the last minute, its limit (DAC_ORG_RPM)",
                limit="org_rpm", retry_after=max(1.0, window[0] + WINDOW_S - now))
        window.append(now)
        self._admitted += 1
        if self._admitted % SWEEP_EVERY == 0:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        for org in [o for o, w in self._windows.items() if not w or w[-1] <= now - WINDOW_S]:
            del self._windows[org]

    # -- flights at once -------------------------------------------------------------

    def take_flight(self, org: str) -> None:
        """Count a new flight of ``org``; raise when it leads ``org_max_flights`` already."""
        running = self._flights.get(org, 0)
        if self.max_flights and running >= self.max_flights:
            wait = self._mean_flight_s if self._mean_flight_s is not None else 1.0
            raise LimitExceeded(
                f"org {org!r} has {running} answers in progress, its limit (DAC_ORG_MAX_FLIGHTS); "
                "wait for one to end", limit="org_max_flights", retry_after=max(1.0, wait))
        self._flights[org] = running + 1

    def release_flight(self, org: str, lasted_s: float) -> None:
        """A flight counted by :meth:`take_flight` ended after ``lasted_s`` seconds."""
        running = self._flights.get(org, 0) - 1
        if running > 0:
            self._flights[org] = running
        else:
            self._flights.pop(org, None)
        mean = self._mean_flight_s
        self._mean_flight_s = lasted_s if mean is None else (1 - SMOOTHING) * mean + SMOOTHING * lasted_s

    def flights(self, org: str) -> int:
        return self._flights.get(org, 0)

    # -- threads kept ----------------------------------------------------------------

    @asynccontextmanager
    async def new_thread(self, org: str, count: Callable[[], Awaitable[int]]) -> AsyncIterator[None]:
        """Hold the org's thread check while its new thread is created; raise when the
        org keeps ``org_max_threads`` already (``count`` reads how many)."""
        if not self.max_threads:
            yield
            return
        lock = self._thread_locks.get(org)
        if lock is None:
            lock = self._thread_locks[org] = asyncio.Lock()
        async with lock:
            kept = await count()
            if kept >= self.max_threads:
                raise LimitExceeded(
                    f"org {org!r} keeps {kept} threads, its limit (DAC_ORG_MAX_THREADS); delete some first",
                    limit="org_max_threads", retry_after=THREADS_RETRY_AFTER_S)
            yield
