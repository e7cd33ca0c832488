"""Provider slots shared by every instance on one Redis: the :class:`~server.pacer.Slots` of a cluster.

Providers limit calls per account, so with ``DAC_REDIS_URL`` the per-provider
limit holds across all instances, and the waiters of every instance share one
queue, served as :class:`~server.pacer.Pacer` serves them in one process: a
freed slot goes to the orgs in turn (round-robin), first come first served
within an org, and a newcomer never overtakes a waiter.

Keys of provider ``NAME`` (``P`` the prefix; ``{slots:NAME}`` is a hash tag, so
they share one Redis Cluster slot and the scripts touch only that slot)::

    P{slots:NAME}          sorted set  a member per call holding a slot, scored with when it lapses (ms)
    P{slots:NAME}:orgs     list        the orgs with waiters, in the order of their turns
    P{slots:NAME}:q:ORG    list        the org's waiters, in arrival order
    P{slots:NAME}:waiting  sorted set  every waiter, scored with when it lapses (ms)
    P{slots:NAME}:left     sorted set  waiters that left the queue, scored with when that is forgotten (ms)

The holder of a slot pushes its lapse forward every quarter lease, so a slot
whose instance died frees itself after one lease; giving it back removes the
member. A waiter lapses the same way (its instance renews it while it waits),
so the waiters of an instance that died are passed over.

On each instance one poller per provider speaks for all of that instance's
waiters: one script call (one round trip) enqueues the newcomers in arrival
order, renews the others, hands every free slot to the next waiter in turn
(whichever instance it is on), and answers which of this instance's waiters
now hold one. It calls again every ``POLL_S`` while any waits, at once when a
newcomer arrives. A waiter handed a slot holds it from that moment (its lapse
runs), and learns of it at its instance's next call. A waiter that leaves (its
client went away, or its queue timeout passed) is marked as left for four leases:
its instance's poll may still be on its way (on another connection), and must
not queue it again when it reaches Redis after the leaving.

Taking ahead: the flight registry asks for a slot in the same round trip as the
leadership of a new flight (:meth:`RedisPacer.ahead`, then :meth:`RedisPacer.taken`),
so a leader that finds a slot free reaches the upstream with no round trip of its
own here. Such a slot is granted only while no call waits in the queue (of any
instance), so it never overtakes a waiter. It waits on its instance for the next
``slot`` of that provider; one not used within half a lease is given back, and
Redis frees it after one lease anyway.

A wait past the queue timeout raises :class:`~server.errors.QueueFull` (503 with
``Retry-After``). The queue wait is measured as in :class:`~server.pacer.Pacer`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .errors import QueueFull, RegistryUnavailable
from .pacer import HOLD_SMOOTHING, MIN_RETRY_AFTER_S

__all__ = ["POLL_S", "Ahead", "RedisPacer"]

log = logging.getLogger(__name__)

#: how often an instance with waiters asks again for slots
POLL_S = 0.02

# KEYS: holders, orgs, waiting, left. ARGV: the org queues' key prefix, limit, lease ms, then per
# waiter of the caller: member, org, 1 (new: enqueue it) | 0 (renew it). Returns the caller's members
# that hold a slot now.
_QUEUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
for i = 4, #ARGV, 3 do
  local m, org = ARGV[i], ARGV[i + 1]
  -- a waiter that left while this call was on its way is not queued again
  if not redis.call('ZSCORE', KEYS[1], m) and not redis.call('ZSCORE', KEYS[4], m) then
    local q = ARGV[1] .. org
    -- a newcomer, or a waiter its queue lost (it lapsed, or Redis lost the key): in line again
    if ARGV[i + 2] == '1' or not redis.call('LPOS', q, m) then
      if redis.call('LLEN', q) == 0 then
        redis.call('LREM', KEYS[2], 0, org)
        redis.call('RPUSH', KEYS[2], org)
      end
      redis.call('RPUSH', q, m)
    end
    redis.call('PEXPIRE', q, 4 * lease)  -- the queue lives as long as its waiters ask
    redis.call('ZADD', KEYS[3], now + lease, m)
  end
end
while redis.call('ZCARD', KEYS[1]) < limit do
  local org = redis.call('LPOP', KEYS[2])
  if not org then break end
  local q = ARGV[1] .. org
  local m = redis.call('LPOP', q)
  while m do
    local lapse = redis.call('ZSCORE', KEYS[3], m)
    redis.call('ZREM', KEYS[3], m)
    if lapse and tonumber(lapse) > now then break end
    m = redis.call('LPOP', q)
  end
  if redis.call('LLEN', q) > 0 then
    redis.call('RPUSH', KEYS[2], org)
    redis.call('PEXPIRE', q, 4 * lease)
  end
  if m then redis.call('ZADD', KEYS[1], now + lease, m) end
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], 4 * lease) end
local got = {}
for i = 4, #ARGV, 3 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then table.insert(got, ARGV[i]) end
end
return got
"""

# KEYS: holders, orgs, waiting, left. ARGV: the org queues' key prefix, member, org, lease ms. The
# waiter leaves the queue, marked as left for four leases; 1 when it had been handed a slot meanwhile
# (it holds it), else 0.
_LEAVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local forget = 4 * tonumber(ARGV[4])
redis.call('ZADD', KEYS[4], now + forget, ARGV[2])
redis.call('PEXPIRE', KEYS[4], forget)
local q = ARGV[1] .. ARGV[3]
redis.call('LREM', q, 0, ARGV[2])
if redis.call('LLEN', q) == 0 then redis.call('LREM', KEYS[2], 0, ARGV[3]) end
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
return 0
"""

# KEYS: holders, waiting. ARGV: member, limit, lease ms. 1 when the member now holds a slot: one was free
# and no call waits for one (a slot taken ahead never overtakes a waiter).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 4 * tonumber(ARGV[3]))
return 1
"""

# KEYS[1] the provider's slots. ARGV: member, lease ms. Pushes the member's lapse forward.
_KEEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 4 * tonumber(ARGV[2]))
return n
"""


def _holds(granted: asyncio.Future[None]) -> bool:
    """Whether a waiter was handed a slot (not told that Redis failed)."""
    return granted.done() and granted.exception() is None


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Ahead:
    """A slot asked for ahead of :meth:`RedisPacer.slot`: the command to put in the caller's pipeline."""

    provider: str
    member: str
    command: tuple[Any, ...]  # EVALSHA sha 2 holders waiting member limit lease


class _Lane:
    """One provider as this instance sees it: its waiters here and the poller that speaks for them."""

    __slots__ = ("limit", "keys", "queues", "running", "waiting", "mean_hold_s", "waiters", "fresh", "poller",
                 "wake", "granted", "kept", "leaving")

    def __init__(self, limit: int, keys: list[str], queues: str) -> None:
        self.limit = limit
        self.keys = keys  # holders, orgs, waiting, left
        self.queues = queues  # the org queues' key prefix
        self.running = 0
        self.waiting = 0
        self.mean_hold_s: float | None = None
        #: this instance's waiters, in arrival order: member -> (org, set once it holds a slot)
        self.waiters: dict[str, tuple[str, asyncio.Future[None]]] = {}
        self.fresh: list[str] = []  # waiters not enqueued in Redis yet, in arrival order
        self.poller: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        #: slots taken ahead (member, when) for the next ``slot`` calls
        self.granted: list[tuple[str, float]] = []
        #: waiters that left the queue at their timeout holding a slot: their calls run with it
        self.kept: set[str] = set()
        #: waiters leaving the queue: the polls to come no longer speak for them
        self.leaving: set[str] = set()


class RedisPacer:
    def __init__(self, redis: aioredis.Redis, *, prefix: str, lease_s: float, queue_timeout_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self.queue_timeout_s = queue_timeout_s
        self._queue = redis.register_script(_QUEUE)
        self._leave = redis.register_script(_LEAVE)
        self._keep = redis.register_script(_KEEP)
        self._take = redis.register_script(_TAKE)
        self._lanes: dict[str, _Lane] = {}
        self._returning: set[asyncio.Task[None]] = set()

    def key(self, provider: str) -> str:
        return f"{self.prefix}{{slots:{provider}}}"

    def _lane(self, provider: str, limit: int) -> _Lane:
        lane = self._lanes.get(provider)
        if lane is None:
            key = self.key(provider)
            lane = self._lanes[provider] = _Lane(max(1, limit), [key, f"{key}:orgs", f"{key}:waiting", f"{key}:left"],
                                                  f"{key}:q:")
        return lane

    @asynccontextmanager
    async def slot(self, provider: str, limit: int, *, org: str = "") -> AsyncIterator[float]:
        """As :meth:`server.pacer.Pacer.slot`, with one queue for every instance (see the module)."""
        lane = self._lane(provider, limit)
        started = time.perf_counter()
        member = self._grant(lane) or await self._wait(lane, provider, org)
        lane.running += 1
        acquired = time.perf_counter()
        keeper = asyncio.get_running_loop().create_task(self._keep_alive(lane.keys[0], member))
        try:
            yield acquired - started
        finally:
            keeper.cancel()
            held_s = time.perf_counter() - acquired
            lane.mean_hold_s = held_s if lane.mean_hold_s is None else (
                (1 - HOLD_SMOOTHING) * lane.mean_hold_s + HOLD_SMOOTHING * held_s)
            lane.running -= 1
            lane.kept.discard(member)
            await self._release(lane, member)

    def ahead(self, provider: str, limit: int) -> Ahead | None:
        """Ask for a slot of ``provider`` in the caller's round trip, or None when calls wait
        here for one already (a grant would not be theirs to take, and none is likely free)."""
        lane = self._lane(provider, limit)
        if lane.waiters:
            return None
        member = secrets.token_hex(8)
        return Ahead(provider, member, ("EVALSHA", self._take.sha, 2, lane.keys[0], lane.keys[2], member,
                                        lane.limit, self.lease_ms))

    @property
    def scripts(self) -> tuple[Any, ...]:
        """The scripts a caller's pipeline runs by EVALSHA (to load them again after a Redis restart)."""
        return (self._take,)

    def taken(self, ahead: Ahead, reply: Any, *, use: bool) -> None:
        """The reply to ``ahead``'s command: a slot taken is kept for the next ``slot`` of its
        provider when ``use`` (a flight is about to start), else given back."""
        if not reply:
            return
        lane = self._lanes[ahead.provider]
        if use and not lane.waiters:
            lane.granted.append((ahead.member, time.monotonic()))
        else:  # not needed, or calls came to wait meanwhile: the queue decides whose it is
            self._give_back(lane, ahead.member)

    def _give_back(self, lane: _Lane, member: str) -> None:
        """:meth:`_release` a slot nobody here will use, without waiting for it."""
        task = asyncio.get_running_loop().create_task(self._release(lane, member))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    def _grant(self, lane: _Lane) -> str | None:
        """A slot taken ahead for this provider and still fresh (the stale ones are given back)."""
        now = time.monotonic()
        while lane.granted:
            member, when = lane.granted.pop(0)
            if now - when < self.lease_ms / 2000:
                return member
            self._give_back(lane, member)
        return None

    async def _wait(self, lane: _Lane, provider: str, org: str) -> str:
        """Queue for a slot (see the module); the member that holds it."""
        member = secrets.token_hex(8)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.waiters[member] = (org, granted)
        lane.fresh.append(member)
        lane.waiting += 1
        self._poll_soon(lane)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await asyncio.shield(granted)
        except TimeoutError:
            if not await self._left_holding(lane, member, org, granted):
                rounds = math.ceil(lane.waiting / lane.limit)
                hold = lane.mean_hold_s if lane.mean_hold_s is not None else self.queue_timeout_s
                raise QueueFull(
                    f"provider {provider!r} is busy: its {lane.limit} slots are taken across the instances and "
                    f"{lane.waiting - 1} more calls wait here; no slot freed within {self.queue_timeout_s:g}s; "
                    "try again later",
                    retry_after=max(MIN_RETRY_AFTER_S, hold * rounds),
                ) from None
            # handed a slot in the same instant: keep it (a poll that answers late must not give it back)
            lane.kept.add(member)
        except BaseException:
            try:
                held = await self._left_holding(lane, member, org, granted)
            except RegistryUnavailable:
                held = False
            if held:  # the slot came as the waiter left: give it back
                await self._release(lane, member)
            raise
        finally:
            lane.waiting -= 1
            lane.waiters.pop(member, None)
            lane.leaving.discard(member)
            if member in lane.fresh:
                lane.fresh.remove(member)
        return member

    async def _left_holding(self, lane: _Lane, member: str, org: str, granted: asyncio.Future[None]) -> bool:
        """Leave the queue; True when the waiter holds a slot (it was handed one before it left)."""
        lane.leaving.add(member)  # the polls to come no longer speak for it
        if _holds(granted):
            return True
        try:
            return await self._leave_queue(lane, member, org)
        except RegistryUnavailable:
            if _holds(granted):  # the poll on its way answered meanwhile
                return True
            raise

    async def _leave_queue(self, lane: _Lane, member: str, org: str) -> bool:
        """:meth:`_give_up`, carried to its end should the waiter be cancelled meanwhile (its client
        went away): a slot the leaving then finds handed to it is given back."""
        leaving = asyncio.ensure_future(self._give_up(lane, member, org))
        try:
            return await asyncio.shield(leaving)
        except asyncio.CancelledError:
            leaving.add_done_callback(functools.partial(self._left_unheard, lane, member))
            raise

    def _left_unheard(self, lane: _Lane, member: str, leaving: asyncio.Future[bool]) -> None:
        if not leaving.cancelled() and leaving.exception() is None and leaving.result():
            self._give_back(lane, member)

    async def _give_up(self, lane: _Lane, member: str, org: str) -> bool:
        """Leave the queue; True when the waiter was handed a slot meanwhile (it holds it)."""
        if member in lane.fresh:  # never enqueued: nothing to take back
            return False
        try:
            return bool(await self._leave(keys=lane.keys, args=[lane.queues, member, org, self.lease_ms]))
        except RedisError as exc:
            raise RegistryUnavailable(
                f"the provider slots (Redis) do not answer ({exc.__class__.__name__})") from None

    async def _release(self, lane: _Lane, member: str) -> None:
        try:
            await asyncio.shield(self.redis.zrem(lane.keys[0], member))
        except RedisError:
            pass  # it lapses after one lease
        if lane.waiters:
            self._poll_soon(lane)  # this instance's waiters may take it at once

    def _poll_soon(self, lane: _Lane) -> None:
        lane.wake.set()
        if lane.poller is None:
            lane.poller = asyncio.get_running_loop().create_task(self._poll(lane))

    async def _poll(self, lane: _Lane) -> None:
        """Speak for this instance's waiters until none is left (see the module)."""
        try:
            while any(not f.done() and m not in lane.leaving for m, (_, f) in lane.waiters.items()):
                lane.wake.clear()
                fresh, lane.fresh = lane.fresh, []
                args: list[Any] = []
                for member, (org, granted) in lane.waiters.items():
                    if not granted.done() and member not in lane.leaving:
                        args += (member, org, "1" if member in fresh else "0")
                try:
                    got = await self._queue(keys=lane.keys, args=[lane.queues, lane.limit, self.lease_ms, *args])
                except RedisError as exc:
                    # Whether Redis ran the call is unknown (its answer may be what was lost): every
                    # waiter here is told, and leaves the queue it may have joined.
                    for member, (_, granted) in lane.waiters.items():
                        if not granted.done() and member not in lane.leaving:
                            granted.set_exception(RegistryUnavailable(
                                f"the provider slots (Redis) do not answer ({exc.__class__.__name__})"))
                    return
                for member in map(_decode, got):
                    found = lane.waiters.get(member)
                    if found is None:
                        if member in lane.kept:
                            continue  # it left at its timeout holding this slot, and runs with it
                        # It left, and its leaving found it holding this slot and gave it back, or
                        # could not tell (Redis did not answer): give it back now, not after a lease
                        # (a second give-back removes nothing).
                        await self._release(lane, member)
                    elif not found[1].done():
                        found[1].set_result(None)
                if lane.wake.is_set():
                    continue
                try:
                    async with asyncio.timeout(POLL_S):
                        await lane.wake.wait()
                except TimeoutError:
                    pass
        finally:
            lane.poller = None

    async def _keep_alive(self, key: str, member: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 4000)
            try:
                kept = await self._keep(keys=[key], args=[member, self.lease_ms])
            except RedisError:
                continue  # the next beat tries again; a slot that lapses is taken by a waiter
            if not kept:  # its beats missed a whole lease (Redis out of reach, or this loop stalled)
                log.warning("%s: a call's slot lapsed while it ran, and a waiter may hold it now: until this "
                            "call ends, the provider may run one call more than its limit", key)
                return

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: {"limit": lane.limit, "running": lane.running, "waiting": lane.waiting}
                for name, lane in self._lanes.items()}
