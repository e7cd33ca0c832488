"""Provider slots on Redis, with two pacers in this process standing for two instances (their own
Redis connections, one key prefix per test): one queue for both, in arrival order, fair per org."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from server import redis_pacer
from server.errors import QueueFull, RegistryUnavailable
from server.redis_pacer import RedisPacer
from tools import fuzz_pacer

from .fake_upstream import wait_until
from .helpers import within
from .redis_engine import RedisServer

Pacers = Callable[..., tuple[RedisPacer, RedisPacer]]


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    yield client, redis_server.new_prefix()
    await client.aclose()


@pytest.fixture
async def pacers(redis_server: RedisServer, redis: tuple[aioredis.Redis, str]) -> AsyncIterator[Pacers]:
    """``pacers(queue_timeout_s=..., lease_s=...)``: two instances' pacers on the test's prefix."""
    clients: list[aioredis.Redis] = []

    def make(queue_timeout_s: float = 10.0, lease_s: float = 2.0) -> tuple[RedisPacer, RedisPacer]:
        made = []
        for _ in range(2):
            clients.append(aioredis.Redis.from_url(redis_server.url, protocol=2))
            made.append(RedisPacer(clients[-1], prefix=redis[1], lease_s=lease_s, queue_timeout_s=queue_timeout_s))
        return made[0], made[1]

    yield make
    for client in clients:
        await client.aclose()


class Calls:
    """Calls that take a slot, note when they got it, and hold it until released."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self._release: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Future[None]] = []

    def start(self, pacer: RedisPacer, name: str, org: str) -> None:
        self._release[name] = asyncio.Event()

        async def call() -> None:
            async with pacer.slot("prov", 1, org=org):
                self.order.append(name)
                await self._release[name].wait()

        self.tasks.append(asyncio.ensure_future(call()))

    def finish(self, name: str) -> None:
        """Give ``name``'s slot back, with nobody waiting for it."""
        self._release[name].set()

    async def release(self, name: str) -> None:
        """Give ``name``'s slot back; returns once the next call holds it."""
        served = len(self.order)
        self._release[name].set()
        await wait_until(lambda: len(self.order) > served, f"the slot {name} gave back to be taken")


async def queued(redis: tuple[aioredis.Redis, str], n: int) -> None:
    """Wait until ``n`` waiters are in the shared queue."""
    client, prefix = redis

    async def count() -> None:
        while await client.zcard(f"{prefix}{{slots:prov}}:waiting") < n:
            await asyncio.sleep(0.005)

    await within(count(), 5, f"{n} waiters in the queue")


async def test_waiters_on_two_instances_are_served_in_arrival_order_and_orgs_in_turn(
        pacers: Pacers, redis: tuple[aioredis.Redis, str]) -> None:
    one, two = pacers()
    calls = Calls()
    calls.start(one, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    # org x's waiters arrive on alternate instances, then org y's first
    for n, (pacer, name, org) in enumerate([(one, "x1", "x"), (two, "x2", "x"), (one, "x3", "x"),
                                            (two, "y1", "y")], start=1):
        calls.start(pacer, name, org)
        await queued(redis, n)
    for name in ("held", "x1", "y1", "x2"):
        await calls.release(name)
    assert calls.order == ["held", "x1", "y1", "x2", "x3"]
    calls.finish("x3")
    await within(asyncio.gather(*calls.tasks), 5, "every call to end")
    assert await redis[0].zcard(f"{redis[1]}{{slots:prov}}") == 0  # every slot given back


async def test_a_wait_past_the_queue_timeout_is_a_503_and_leaves_the_queue(
        pacers: Pacers, redis: tuple[aioredis.Redis, str]) -> None:
    one, two = pacers(queue_timeout_s=0.3)
    calls = Calls()
    calls.start(one, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    with pytest.raises(QueueFull) as refused:
        async with two.slot("prov", 1, org="y"):
            pass
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    client, prefix = redis
    assert await client.zcard(f"{prefix}{{slots:prov}}:waiting") == 0
    assert await client.llen(f"{prefix}{{slots:prov}}:orgs") == 0
    # the next waiter is not held up by the one that left
    calls.start(two, "next", "y")
    await queued(redis, 1)
    await calls.release("held")
    assert calls.order == ["held", "next"]
    calls.finish("next")
    await within(asyncio.gather(*calls.tasks), 5, "every call to end")


async def test_a_cancelled_waiter_gives_its_turn_to_the_next(pacers: Pacers, redis: tuple[aioredis.Redis, str]) -> None:
    one, two = pacers()
    calls = Calls()
    calls.start(one, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    calls.start(two, "leaves", "x")
    await queued(redis, 1)
    calls.start(one, "stays", "x")
    await queued(redis, 2)
    calls.tasks[1].cancel()  # its client went away while it waited
    await calls.release("held")
    assert calls.order == ["held", "stays"]
    calls.finish("stays")
    await within(asyncio.gather(*calls.tasks, return_exceptions=True), 5, "every call to end")
    assert await redis[0].zcard(f"{redis[1]}{{slots:prov}}") == 0


async def test_a_slot_asked_for_ahead_never_overtakes_a_waiter_of_another_instance(
        pacers: Pacers, redis: tuple[aioredis.Redis, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_pacer, "POLL_S", 3600.0)  # the waiter asks again only when woken
    one, two = pacers()
    client, prefix = redis
    calls = Calls()
    calls.start(one, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    calls.start(one, "waits", "y")
    await queued(redis, 1)
    await client.zrem(f"{prefix}{{slots:prov}}", *await client.zrange(f"{prefix}{{slots:prov}}", 0, -1))
    # the slot is free now, but a call waits for it on the first instance: a new leader on the
    # second is refused its slot ahead, and will queue behind
    ahead = two.ahead("prov", 1)
    assert ahead is not None
    await client.script_load(redis_pacer._TAKE)  # the command is an EVALSHA: a caller's pipeline loads it
    assert await client.execute_command(*ahead.command) == 0
    assert await client.zcard(f"{prefix}{{slots:prov}}") == 0
    calls.finish("held")
    await wait_until(lambda: calls.order == ["held", "waits"], "the waiter to take the freed slot")
    calls.finish("waits")
    await within(asyncio.gather(*calls.tasks), 5, "every call to end")
    # with nobody waiting, a slot asked for ahead is granted and serves the next call at once
    ahead = two.ahead("prov", 1)
    assert ahead is not None
    reply = await client.execute_command(*ahead.command)
    assert reply == 1
    two.taken(ahead, reply, use=True)
    async with two.slot("prov", 1, org="y"):
        assert await client.zrange(f"{prefix}{{slots:prov}}", 0, -1) == [ahead.member.encode()]
    assert await client.zcard(f"{prefix}{{slots:prov}}") == 0


async def test_a_waiter_behind_a_call_longer_than_the_queue_keys_live_is_still_served(
        redis_server: RedisServer, redis: tuple[aioredis.Redis, str]) -> None:
    client, prefix = redis
    # The waiter's instance has a 0.2 s lease: a queue key nobody renewed would lapse after 4 leases,
    # well within the long call. The long call's has a 30 s one, so its slot cannot lapse meanwhile
    # should its beats be late on a loaded machine.
    pacers = [RedisPacer(aioredis.Redis.from_url(redis_server.url, protocol=2), prefix=prefix, lease_s=lease_s,
                         queue_timeout_s=10) for lease_s in (30.0, 0.2)]
    calls = Calls()
    try:
        calls.start(pacers[0], "long", "x")
        await wait_until(lambda: calls.order == ["long"], "the long call to take the only slot")
        calls.start(pacers[1], "waits", "y")
        await queued(redis, 1)
        await asyncio.sleep(1.5)  # longer than 4 leases: the waiter's queue lives while it asks
        assert await client.exists(f"{prefix}{{slots:prov}}:q:y") == 1
        await calls.release("long")
        assert calls.order == ["long", "waits"]
        calls.finish("waits")
        await within(asyncio.gather(*calls.tasks), 5, "every call to end")
    finally:
        for task in calls.tasks:
            task.cancel()
        await asyncio.gather(*calls.tasks, return_exceptions=True)
        for pacer in pacers:
            await pacer.redis.aclose()


class HeldBack:
    """One of a pacer's scripts (``_queue``, its polls, or ``_leave``) whose first call that
    ``holds(args)`` waits at the door to Redis until ``go`` is set. Given ``fail``, it then fails
    instead of reaching Redis, or once Redis ran it (its answer lost) when ``ran``."""

    def __init__(self, pacer: RedisPacer, script: str, holds: Callable[[list[Any]], bool],
                 fail: Exception | None = None, ran: bool = False) -> None:
        self.pacer, self.script, self.real = pacer, script, getattr(pacer, script)
        self.holds, self.fail, self.ran = holds, fail, ran
        self.entered, self.go, self.done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        setattr(pacer, script, self)

    async def __call__(self, *, keys: list[str], args: list[Any]) -> Any:
        if self.entered.is_set() or not self.holds(args):
            return await self.real(keys=keys, args=args)
        self.entered.set()
        try:
            await within(self.go.wait(), 10, f"the test to let the held {self.script} through")
            if self.fail is None:
                return await self.real(keys=keys, args=args)
            if self.ran:
                await self.real(keys=keys, args=args)
            raise self.fail
        finally:
            self.done.set()

    def restore(self) -> None:
        setattr(self.pacer, self.script, self.real)


def renewing(args: list[Any]) -> bool:
    """A poll that renews a waiter already queued (its flags: 1 new, 0 renew)."""
    return "0" in args[5::3]


async def handed(redis: tuple[aioredis.Redis, str]) -> None:
    """Wait until a slot is held (a waiter was handed one)."""
    client, prefix = redis
    while await client.zcard(f"{prefix}{{slots:prov}}") == 0:
        await asyncio.sleep(0.005)


async def queue_is_empty(redis: tuple[aioredis.Redis, str]) -> None:
    client, prefix = redis
    assert await client.zcard(f"{prefix}{{slots:prov}}:waiting") == 0
    assert await client.exists(f"{prefix}{{slots:prov}}:orgs") == 0
    assert not await client.keys(f"{prefix}{{slots:prov}}:q:*")


@pytest.mark.parametrize("poll", ["queues it", "renews it"])
@pytest.mark.parametrize("leaves", ["cancelled", "timed out"])
async def test_a_waiter_that_leaves_while_its_poll_is_on_its_way_is_not_queued_again_by_it(
        leaves: str, poll: str, pacers: Pacers, redis: tuple[aioredis.Redis, str]) -> None:
    """The waiter leaves while its instance's poll is on its way to Redis, and its leaving gets
    there first (another connection). The poll must not queue it again: a waiter nobody waits
    for would be handed the next free slot and hold it for a whole lease."""
    one, two = pacers(queue_timeout_s=1.0 if leaves == "timed out" else 10.0)
    client, prefix = redis
    calls = Calls()
    calls.start(two, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    polls = HeldBack(one, "_queue", renewing if poll == "renews it" else lambda args: True)
    calls.start(one, "leaves", "y")
    await within(polls.entered.wait(), 5, "the waiter's poll to leave for Redis")
    if leaves == "cancelled":
        calls.tasks[1].cancel()  # its client went away
    with pytest.raises(asyncio.CancelledError if leaves == "cancelled" else QueueFull):
        await within(calls.tasks[1], 5, "the waiter to leave")
    polls.go.set()  # the poll reaches Redis now
    await within(polls.done.wait(), 5, "the held poll to be answered")
    polls.restore()
    await queue_is_empty(redis)
    # the slot the held call gives back goes to the next caller, not to the waiter that left
    calls.finish("held")
    await within(calls.tasks[0], 5, "the held call to end")
    async with asyncio.timeout(5), one.slot("prov", 1, org="z"):
        assert await client.zcard(f"{prefix}{{slots:prov}}") == 1
    assert await client.zcard(f"{prefix}{{slots:prov}}") == 0


@pytest.mark.parametrize("failed", ["renewing it, before Redis", "queueing it, after Redis ran it"])
async def test_waiters_told_that_redis_failed_leave_the_queue(
        failed: str, pacers: Pacers, redis: tuple[aioredis.Redis, str]) -> None:
    """A poll fails (a connection reset), before it reached Redis or after Redis ran it and queued
    the waiter: the waiters it spoke for get a 503, and leave the shared queue, where another
    instance would hand them the next free slot for a lease."""
    one, two = pacers()
    client, prefix = redis
    calls = Calls()
    calls.start(two, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    ran = failed.endswith("ran it")
    polls = HeldBack(one, "_queue", (lambda args: True) if ran else renewing,
                     fail=RedisConnectionError("reset"), ran=ran)
    calls.start(one, "told", "y")
    await within(polls.entered.wait(), 5, "the waiter's poll to leave for Redis")
    polls.go.set()
    with pytest.raises(RegistryUnavailable):
        await within(calls.tasks[1], 5, "the waiter to be told")
    polls.restore()
    await queue_is_empty(redis)
    calls.finish("held")
    await within(calls.tasks[0], 5, "the held call to end")
    async with asyncio.timeout(5), two.slot("prov", 1, org="z"):
        assert await client.zcard(f"{prefix}{{slots:prov}}") == 1


async def test_a_waiter_cancelled_while_it_leaves_at_its_timeout_still_leaves_and_gives_back_its_slot(
        pacers: Pacers, redis: tuple[aioredis.Redis, str]) -> None:
    """The waiter's queue timeout passes, and its client goes away while its leaving is on its way,
    by when another instance's poll has handed it the slot. The leaving still happens, and that
    slot goes back at once: with a 30 s lease, the next waiter would otherwise wait 30 s."""
    one, two = pacers(queue_timeout_s=0.5, lease_s=30.0)
    two.queue_timeout_s = 30.0  # only the first waiter times out
    client, prefix = redis
    calls = Calls()
    calls.start(two, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    leaving = HeldBack(one, "_leave", lambda args: True)
    calls.start(one, "leaves", "y")
    await queued(redis, 1)
    calls.start(two, "next", "z")
    await queued(redis, 2)
    await within(leaving.entered.wait(), 5, "the waiter to time out and leave")
    # the slot is freed; the poll of the next waiter's instance hands it to the first in line
    calls.finish("held")
    await within(calls.tasks[0], 5, "the held call to end")
    await within(handed(redis), 5, "the freed slot to be handed to the first waiter in line")
    assert "next" not in calls.order
    calls.tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(calls.tasks[1], 5, "the waiter to be cancelled")
    leaving.go.set()
    await wait_until(lambda: "next" in calls.order, "the next waiter to be handed the slot given back")
    leaving.restore()
    calls.finish("next")
    await within(asyncio.gather(*calls.tasks[2:]), 5, "every call to end")
    assert await client.zcard(f"{prefix}{{slots:prov}}") == 0
    await queue_is_empty(redis)


async def test_a_slot_that_lapsed_while_its_call_ran_is_reported(
        redis_server: RedisServer, redis: tuple[aioredis.Redis, str], caplog: pytest.LogCaptureFixture) -> None:
    client, prefix = redis
    pacer = RedisPacer(aioredis.Redis.from_url(redis_server.url, protocol=2), prefix=prefix, lease_s=0.2,
                       queue_timeout_s=5)
    try:
        async with asyncio.timeout(5), pacer.slot("prov", 1, org="x"):
            # as if its beats had missed a lease: the slot is gone from Redis while the call runs
            await client.delete(f"{prefix}{{slots:prov}}")
            await wait_until(lambda: "slot lapsed while it ran" in caplog.text, "the lapse to be reported")
            await asyncio.sleep(0.2)  # four more beats
        assert sum("slot lapsed" in r.getMessage() for r in caplog.records) == 1  # once, not at every beat
        assert all(r.levelname == "WARNING" and "{slots:prov}" in r.getMessage()
                   for r in caplog.records if "slot lapsed" in r.getMessage())
    finally:
        await pacer.redis.aclose()


async def test_a_waiter_that_timed_out_but_kept_its_slot_is_not_robbed_of_it_by_its_poll(
        pacers: Pacers, redis: tuple[aioredis.Redis, str]) -> None:
    """The poll that hands the waiter its slot is answered after the waiter's queue timeout:
    the waiter's leaving finds it holds the slot and keeps it (its call runs). The poll's late
    answer then names a member no longer waiting: that is no ghost, and its slot stays held."""
    one, two = pacers(queue_timeout_s=0.3)
    client, prefix = redis
    calls = Calls()
    calls.start(two, "held", "x")
    await wait_until(lambda: calls.order == ["held"], "the first call to take the only slot")
    real_queue, real_leave = one._queue, one._leave
    left = asyncio.Event()

    async def late_queue(**kwargs: object) -> object:
        got = await real_queue(**kwargs)
        if got:  # a slot handed over: its answer arrives after the waiter's leaving
            await left.wait()
        return got

    async def leave(**kwargs: object) -> object:
        try:
            return await real_leave(**kwargs)
        finally:
            left.set()

    one._queue, one._leave = late_queue, leave  # type: ignore[assignment]
    calls.start(one, "kept", "y")
    await queued(redis, 1)
    calls.finish("held")  # the next poll hands the slot to "kept"; its answer is held back
    await within(left.wait(), 5, "the waiter to time out and leave")
    await wait_until(lambda: "kept" in calls.order, "the waiter to run with the slot it kept")
    lane = one._lanes["prov"]
    await wait_until(lambda: lane.poller is None, "the poll to finish")
    assert await client.zcard(f"{prefix}{{slots:prov}}") == 1  # "kept" still holds its slot
    calls.finish("kept")
    await within(asyncio.gather(*calls.tasks), 5, "every call to end")


@pytest.mark.parametrize("fail", [False, True], ids=["healthy Redis", "failing polls"])
async def test_many_callers_on_two_instances_never_exceed_the_limit_and_leave_nothing_behind(
        fail: bool, redis_server: RedisServer) -> None:
    """The fuzz's SHORT FORM (``python -m tools.fuzz_pacer --seeds 20 --calls 600 [--fail]``): random
    orgs, queue timeouts, cancels and slots taken ahead; every script call delayed at random around
    Redis; with failing polls, some fail before Redis ran them and some after."""
    report = await within(fuzz_pacer.run(7, calls=200, fail=fail, redis_url=redis_server.url,
                                         prefix=redis_server.new_prefix()), 90, "the fuzz run")
    assert report.broken == [], report.line()
    outcomes = report.outcomes
    assert outcomes["served"] > 0 and outcomes["queue_full"] > 0 and outcomes["cancelled"] > 0, outcomes
    assert report.most_inside == fuzz_pacer.LIMIT  # the limit was reached, not just kept
    if fail:
        assert outcomes["polls_failed"] > 0 and outcomes["redis_failed"] > 0, outcomes
