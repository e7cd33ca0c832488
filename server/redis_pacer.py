"""Provider slots shared by every instance on one Redis: the :class:`~server.pacer.Slots` of a cluster.

Providers limit calls per account, so with ``DAC_REDIS_URL`` the per-provider
limit holds across all instances. A provider's slots are one sorted set,
``P{slots:NAME}``: a member per call holding a slot, scored with the server time
(ms) at which it lapses. Taking a slot is one script: drop the lapsed members,
then add this call's if fewer than the limit remain. The holder pushes its
lapse forward every quarter lease, so a slot whose instance died frees itself
after one lease. Giving it back removes the member.

Waiting: on each instance the flights waiting for one provider queue in order
behind an ``asyncio.Lock`` (FIFO); the first of them asks Redis again every
``POLL_S``, and at once when a call of this instance gives its slot back, until
a slot is free or the queue timeout passes (``QueueFull``, 503 with
``Retry-After``). Instances are served in no particular order among themselves. The queue wait is measured as in :class:`~server.pacer.Pacer`.

Taking ahead: the flight registry asks for a slot in the same round trip as the
leadership of a new flight (:meth:`RedisPacer.ahead`, then :meth:`RedisPacer.taken`),
so a leader that finds a slot free reaches the upstream with no round trip of
its own here. Such a grant waits on its instance for the next ``slot`` of that
provider (through the same FIFO gate, so it never overtakes a waiter); one not
used within half a lease is given back, and Redis frees it after one lease anyway.
"""

from __future__ import annotations

import asyncio
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

#: how often the first waiter of an instance asks again for a slot
POLL_S = 0.02

# KEYS[1] the provider's slots. ARGV: member, limit, lease ms. 1 when the member now holds a slot.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""

# KEYS[1] the provider's slots. ARGV: member, lease ms. Pushes the member's lapse forward.
_KEEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return n
"""


@dataclass(frozen=True, slots=True)
class Ahead:
    """A slot asked for ahead of :meth:`RedisPacer.slot`: the command to put in the caller's pipeline."""

    provider: str
    member: str
    command: tuple[Any, ...]  # EVALSHA sha 1 key member limit lease


class _Lane:
    __slots__ = ("limit", "gate", "running", "waiting", "mean_hold_s", "granted", "freed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.gate = asyncio.Lock()
        self.running = 0
        self.waiting = 0
        self.mean_hold_s: float | None = None
        #: slots taken ahead (member, when) for the next ``slot`` calls
        self.granted: list[tuple[str, float]] = []
        #: set when a call of this instance gave its slot back (the first waiter asks again at once)
        self.freed = asyncio.Event()


class RedisPacer:
    def __init__(self, redis: aioredis.Redis, *, prefix: str, lease_s: float, queue_timeout_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self.queue_timeout_s = queue_timeout_s
        self._take = redis.register_script(_TAKE)
        self._keep = redis.register_script(_KEEP)
        self._lanes: dict[str, _Lane] = {}
        self._returning: set[asyncio.Task[None]] = set()

    def key(self, provider: str) -> str:
        return f"{self.prefix}{{slots:{provider}}}"

    def _lane(self, provider: str, limit: int) -> _Lane:
        lane = self._lanes.get(provider)
        if lane is None:
            lane = self._lanes[provider] = _Lane(max(1, limit))
        return lane

    @property
    def scripts(self) -> tuple[Any, ...]:
        """The scripts a caller's pipeline runs by EVALSHA (to load them again after a Redis restart)."""
        return (self._take,)

    def ahead(self, provider: str, limit: int) -> Ahead | None:
        """Ask for a slot of ``provider`` in the caller's round trip, or None when calls wait
        here for one already (a grant would not be theirs to take, and none is likely free)."""
        lane = self._lane(provider, limit)
        if lane.waiting or lane.gate.locked():
            return None
        member = secrets.token_hex(8)
        return Ahead(provider, member,
                     ("EVALSHA", self._take.sha, 1, self.key(provider), member, lane.limit, self.lease_ms))

    def taken(self, ahead: Ahead, reply: Any, *, use: bool) -> None:
        """The reply to ``ahead``'s command: a slot taken is kept for the next ``slot`` of its
        provider when ``use`` (a flight is about to start), else given back."""
        if not reply:
            return
        if use:
            lane = self._lanes[ahead.provider]
            lane.granted.append((ahead.member, time.monotonic()))
            lane.freed.set()  # a call waiting here meanwhile takes it
        else:
            self._give_back(self.key(ahead.provider), ahead.member)

    def _give_back(self, key: str, member: str) -> None:
        async def zrem() -> None:
            try:
                await self.redis.zrem(key, member)
            except RedisError:
                pass  # it lapses after one lease
        task = asyncio.get_running_loop().create_task(zrem())
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    def _grant(self, lane: _Lane, key: str) -> str | None:
        """A slot taken ahead for this provider and still fresh (the stale ones are given back)."""
        now = time.monotonic()
        while lane.granted:
            member, when = lane.granted.pop(0)
            if now - when < self.lease_ms / 2000:
                return member
            self._give_back(key, member)
        return None

    async def _try(self, key: str, member: str, limit: int) -> bool:
        try:
            return bool(await self._take(keys=[key], args=[member, limit, self.lease_ms]))
        except RedisError as exc:
            raise RegistryUnavailable(
                f"the provider slots (Redis) do not answer ({exc.__class__.__name__})") from None

    @asynccontextmanager
    async def slot(self, provider: str, limit: int, *, org: str = "") -> AsyncIterator[float]:
        """As :meth:`server.pacer.Pacer.slot`; across instances waiters are not ordered by org
        (each instance polls for a free slot), so ``org`` is not used here."""
        lane = self._lane(provider, limit)
        key, member = self.key(provider), secrets.token_hex(8)
        started = time.perf_counter()
        lane.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                async with lane.gate:
                    lane.freed.clear()
                    while True:
                        granted = self._grant(lane, key)
                        if granted is not None:
                            member = granted
                            break
                        if await self._try(key, member, lane.limit):
                            break
                        try:
                            async with asyncio.timeout(POLL_S):
                                await lane.freed.wait()
                        except TimeoutError:
                            pass
                        lane.freed.clear()
        except TimeoutError:
            rounds = math.ceil(lane.waiting / lane.limit)
            hold = lane.mean_hold_s if lane.mean_hold_s is not None else self.queue_timeout_s
            raise QueueFull(
                f"provider {provider!r} is busy: its {lane.limit} slots are taken across the instances and "
                f"{lane.waiting - 1} more calls wait here; no slot freed within {self.queue_timeout_s:g}s; "
                "try again later",
                retry_after=max(MIN_RETRY_AFTER_S, hold * rounds),
            ) from None
        finally:
            lane.waiting -= 1
        lane.running += 1
        acquired = time.perf_counter()
        keeper = asyncio.get_running_loop().create_task(self._keep_alive(key, member))
        try:
            yield acquired - started
        finally:
            keeper.cancel()
            held = time.perf_counter() - acquired
            lane.mean_hold_s = held if lane.mean_hold_s is None else (
                (1 - HOLD_SMOOTHING) * lane.mean_hold_s + HOLD_SMOOTHING * held)
            lane.running -= 1
            try:
                await asyncio.shield(self.redis.zrem(key, member))
            except RedisError:
                pass  # it lapses after one lease
            if lane.waiting:
                lane.freed.set()

    async def _keep_alive(self, key: str, member: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 4000)
            try:
                await self._keep(keys=[key], args=[member, self.lease_ms])
            except RedisError:
                pass  # the next beat tries again; a slot that lapses is taken by a waiter

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: {"limit": lane.limit, "running": lane.running, "waiting": lane.waiting}
                for name, lane in self._lanes.items()}
