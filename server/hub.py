"""The hub: the in-process :class:`~server.registry.FlightRegistry`.

It maps coalesce keys and stream ids to flights: a request whose key has a
running flight joins it (``follower``); one whose key has a finished flight
within the result TTL gets its result (``cache``), or its error within the
error TTL; otherwise it starts a new flight (``leader``).

Who writes what (everything runs on the event loop):

- ``_flights``, ``_streams``, ``_cache``, ``_expiry``, ``_live``: only Hub
  methods. A flight is removed by identity (``if self._flights.get(key) is
  flight``), so a finished flight never evicts its successor under the same key.
- a flight's state: only the flight (see :mod:`server.flight`); the hub reads
  it and learns of the end through the flight's ``on_end`` callback.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from .config import Settings
from .errors import ShuttingDown, StoreError
from .flight import Clock, Flight, TurnRequest
from .limits import OrgLimits
from .metrics import Metrics
from .pacer import Slots
from .states import DropReason, FlightState, Role
from .store import Store

__all__ = ["Hub"]


class Hub:
    def __init__(self, *, settings: Settings, store: Store, pacer: Slots, metrics: Metrics,
                 clock: Clock = time.monotonic, limits: OrgLimits | None = None) -> None:
        self.settings = settings
        self.limits = limits
        self._counted: dict[Flight, float] = {}  # flights counted against their org: perf_counter at start
        self.store = store
        self.pacer = pacer
        self.metrics = metrics
        self.clock = clock
        self._flights: dict[str, Flight] = {}
        self._streams: dict[str, Flight] = {}
        self._cache: OrderedDict[Flight, int] = OrderedDict()  # finished 'done' flights -> bytes, LRU
        self._cache_bytes = 0
        self._expiry: dict[Flight, asyncio.TimerHandle] = {}
        self._live: dict[asyncio.Task[None], Flight] = {}  # leader tasks not yet finished
        #: flights registered since the start (started here, or mirrored from another instance)
        self.registered = 0
        self._closing = False
        metrics.watch_cache(entries=lambda: len(self._cache), size_bytes=lambda: self._cache_bytes)

    @property
    def held(self) -> int:
        """Flights this process holds: running, or kept for their TTL."""
        return len(self._streams)

    @property
    def running(self) -> int:
        """Flights whose task runs here: leaders, and readers of another instance's flights."""
        return len(self._live)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def engine(self) -> str:
        return "inprocess"

    # -- joining ---------------------------------------------------------

    async def submit(self, turn: TurnRequest, *, listen: bool) -> tuple[Flight, Role]:
        return self.join(turn, listen=listen)

    def join(self, turn: TurnRequest, *, listen: bool) -> tuple[Flight, Role]:
        """:meth:`submit` in one synchronous step (nothing can slip in between)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down; try again shortly")
        flight, role = self._lookup(turn), Role.FOLLOWER
        if flight is None:
            flight, role = self._start(turn), Role.LEADER
        elif not flight.running:
            role = Role.CACHE
            if flight in self._cache:
                self._cache.move_to_end(flight)
        if listen:
            flight.add_listener()
        return flight, role

    async def accept(self, turn: TurnRequest) -> tuple[Flight, Role, str | None]:
        flight, role = self.join(turn, listen=False)
        return flight, role, flight.expect_attach() if flight.running else None

    def _lookup(self, turn: TurnRequest) -> Flight | None:
        if turn.key is None:
            return None
        flight = self._flights.get(turn.key)
        if flight is None:
            return None
        s = self.settings
        if flight.state is FlightState.RUNNING:
            return flight
        if flight.state is FlightState.DONE:
            if flight.fresh(s.result_ttl_s):
                return None if turn.no_cache else flight
        elif flight.state is FlightState.FAILED and flight.fresh(s.error_ttl_s):
            return flight
        self._remove(flight)  # past its TTL (its timer has not fired yet): drop it now
        return None

    def _start(self, turn: TurnRequest) -> Flight:
        if self.limits is not None:
            self.limits.take_flight(turn.org_id)  # raises when the org leads its limit of flights
        flight = Flight(turn, settings=self.settings, store=self.store, pacer=self.pacer,
                        metrics=self.metrics, clock=self.clock, on_end=self._finished)
        if self.limits is not None:
            self._counted[flight] = time.perf_counter()
        self._register(flight, flight.start())
        return flight

    def _register(self, flight: Flight, task: asyncio.Task[None] | None) -> None:
        """Map ``flight`` by key and stream id; ``task`` (what drives it) is awaited at shutdown."""
        self.registered += 1
        if flight.key is not None:
            self._flights[flight.key] = flight
        self._streams[flight.stream_id] = flight
        if task is not None:
            self._live[task] = flight
            task.add_done_callback(self._live.pop)

    async def stream(self, stream_id: str) -> Flight | None:
        return self._streams.get(stream_id)

    def forget_thread(self, thread_id: str) -> None:
        """Drop the flights of a deleted thread, so nothing answers from it.

        Running ones carry on for their listeners and are dropped when they finish.
        """
        for flight in [f for f in self._streams.values() if f.turn.thread_id == thread_id]:
            flight.forgotten = True
            if not flight.running:
                self._remove(flight)

    async def thread_deleted(self, org_id: str, thread_id: str) -> None:
        """One process: nobody else to tell."""
        self.forget_thread(thread_id)

    async def stop_elsewhere(self, org_id: str, stream_id: str, token: str) -> bool:
        """One process: every listener is here."""
        return False

    def serve_stops(self, stop: Callable[[str, str, str], Awaitable[bool]]) -> None:
        """One process: no Stop call is ever handed over."""

    # -- bookkeeping of finished flights -----------------------------------

    def _finished(self, flight: Flight) -> None:
        """A flight ended: keep it for its TTL, or forget it at once."""
        started = self._counted.pop(flight, None)
        if started is not None and self.limits is not None:
            self.limits.release_flight(flight.turn.org_id, time.perf_counter() - started)
        ttl = self._kept_for(flight)
        if ttl > 0 and flight.state is FlightState.DONE:
            self._cache[flight] = flight.held_bytes
            self._cache_bytes += flight.held_bytes
            self._evict()
        if ttl <= 0:
            self._remove(flight)
        else:
            self._expiry[flight] = asyncio.get_running_loop().call_later(ttl, self._remove, flight)

    def _kept_for(self, flight: Flight) -> float:
        """How long a flight that ended answers identical requests (0: none may take it), the
        same rule for every registry."""
        s = self.settings
        if flight.forgotten or isinstance(flight.error, StoreError):
            return 0.0  # nothing unsaved answers anyone: a repeat starts afresh
        if flight.state is FlightState.DONE:
            if not flight.turn.reusable:
                return 0.0  # no request may take it from the cache
            # what it really holds once compacted, not only its text (measured once)
            if (flight.held_bytes or flight.keep()) > s.cache_max_bytes:
                return 0.0  # too large to keep: it must not push out what the cache holds
            return s.result_ttl_s
        if flight.state is FlightState.FAILED or flight.message is None:
            # a failure answers joiners for the error TTL; so does a flight that ended
            # before its rows existed, for a client still holding its stream_url
            return s.error_ttl_s
        return 0.0

    def _evict(self) -> None:
        s = self.settings
        while self._cache and (len(self._cache) > s.cache_max_entries or self._cache_bytes > s.cache_max_bytes):
            oldest = next(iter(self._cache))
            self._remove(oldest)

    def _remove(self, flight: Flight) -> None:
        """Forget a finished flight; its timer goes too, so nothing keeps it alive."""
        timer = self._expiry.pop(flight, None)
        if timer is not None:
            timer.cancel()
        if flight.key is not None and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if self._streams.get(flight.stream_id) is flight:
            del self._streams[flight.stream_id]
        size = self._cache.pop(flight, None)
        if size is not None:
            self._cache_bytes -= size

    # -- shutdown ----------------------------------------------------------

    async def close(self) -> None:
        """Release what the registry holds beyond its flights: nothing in-process."""

    async def shutdown(self, *, timeout: float = 10.0) -> None:
        """Tell every listener, cancel every flight, and wait for their turns to be saved."""
        self._closing = True
        tasks = list(self._live)
        for flight in list(self._live.values()):
            flight.abort(DropReason.SHUTDOWN)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
