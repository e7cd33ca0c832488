"""The flight registry on Redis, with two gateways in this process sharing one Redis and one
PostgreSQL (the tests with separate processes, nginx and kill -9 are in test_cluster.py).

Each test has a Redis key prefix and a PostgreSQL schema of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from server import redis_pacer
from server.appkeys import HEAP_TRIM, PACER
from server.config import Settings
from server.errors import UpstreamError
from server.metrics import Metrics
from server.pg_store import PostgresStore
from server.redis_hub import RedisHub
from server.redis_pacer import RedisPacer
from server.redis_sweep import Sweeper
from server.store import draft_turn

from .engines import PostgresServer
from .fake_upstream import wait_until
from .helpers import Gateway, ScriptedCall, ScriptedProvider, collect, registry, start_gateway, text_of, within
from .redis_engine import RedisServer

Pair = Callable[..., Awaitable[tuple[Gateway, Gateway]]]


@pytest.fixture
async def pair(redis_server: RedisServer, postgres: PostgresServer) -> AsyncIterator[Pair]:
    """``await pair(provider, **settings)``: two gateways (A, B) on the test's Redis prefix and schema."""
    started: list[Gateway] = []
    prefix, url = redis_server.new_prefix(), postgres.new_url()

    async def make(provider: ScriptedProvider | None = None, **settings: Any) -> tuple[Gateway, Gateway]:
        providers = registry(provider) if provider is not None else None
        base = Settings.from_env({}).with_(**{"auth": "header", "redis_url": redis_server.url,
                                              "redis_prefix": prefix, "database_url": url, **settings})
        for _ in range(2):
            gw = await start_gateway(base, providers)
            started.append(gw)
            hub = gw.hub
            assert isinstance(hub, RedisHub)
            await within(hub.ctl_ready.wait(), 5, "the ctl channel")
        return started[-2], started[-1]

    yield make
    for gw in reversed(started):
        await gw.close()


async def test_readyz_names_redis(pair: Pair) -> None:
    a, _ = await pair()
    async with a.session.get(f"{a.url}/readyz") as resp:
        assert await resp.json() == {"status": "ready", "store": "postgresql", "registry": "redis"}


async def test_identical_requests_on_two_instances_make_one_call(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider)
    tid = await a.new_thread()
    body = {"content": "hello", "provider": "scripted"}
    first = asyncio.ensure_future(a.post(tid, body))
    call = await provider.next_call()
    others = [asyncio.ensure_future(gw.post(tid, body)) for gw in (a, b, b, a, b)]
    await wait_until(lambda: sum(f.listeners for f in b.hub._streams.values()) == 3,
                     "the followers on B")
    call.send("one ", "two ", "three")
    call.finish()
    answers = await within(asyncio.gather(first, *others), what="every answer")
    assert [status for status, _ in answers] == [200] * 6
    assert {body["message"]["content"] for _, body in answers} == {"one two three"}
    assert sorted(body["coalesce"] for _, body in answers) == ["follower"] * 5 + ["leader"]
    assert len(provider.calls) == 1
    messages = (await b.thread(tid))["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    status, cached = await b.post(tid, body)  # finished: B answers from Redis, no call
    assert (status, cached["coalesce"], cached["message"]["content"]) == (200, "cache", "one two three")
    assert len(provider.calls) == 1


@asynccontextmanager
async def mirrored(a: Gateway, b: Gateway, provider: ScriptedProvider,
                   content: str) -> AsyncIterator[tuple[ScriptedCall, aiohttp.ClientResponse, aiohttp.ClientResponse]]:
    """A client of A streams a flight A leads, its first delta sent; a client of B streams the
    same flight (B's mirror of it) and has read that delta. Both clients leave at the end."""
    tid = await a.new_thread()
    body = {"content": content, "provider": "scripted"}
    async with a.open_stream(tid, body) as on_a:
        call = await provider.next_call()
        call.send("first ")
        async with b.open_stream(tid, body) as on_b:
            await within(on_b.content.readuntil(b"first"), what="B to see the first delta")
            yield call, on_a, on_b


async def test_the_upstream_closes_only_when_the_last_instance_lets_go(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider)
    async with mirrored(a, b, provider, "long one") as (call, on_a, on_b):
        on_a.close()  # A's only client leaves
        flight = await a.hub.stream(call_stream(a))
        await wait_until(lambda: flight.listeners == 0, "A's listener to leave")
        await asyncio.sleep(a.settings.cancel_grace_s * 3)
        call.send("second ")
        await within(on_b.content.readuntil(b"second"), what="B to go on after A left")
        assert not call.closed.is_set()
    # B's client leaves too: now the upstream closes
    left = time.perf_counter()
    await within(call.closed.wait(), 2, "the upstream to close")
    assert call.closed_at is not None and call.closed_at - left < 0.3


def call_stream(gw: Gateway) -> str:
    """The stream id of the one flight ``gw`` leads."""
    (stream_id,) = gw.hub._led
    return str(stream_id)


async def test_a_failure_answers_from_the_other_instance_within_the_error_ttl(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider)
    tid = await a.new_thread()
    body = {"content": "doomed", "provider": "scripted"}
    first = asyncio.ensure_future(a.post(tid, body))
    call = await provider.next_call()
    call.fail(UpstreamError("the provider is down", status=502))
    status, answer = await within(first)
    assert status == 502 and answer["error"]["type"] == "upstream_error"
    status, again = await b.post(tid, body)
    assert (status, again["error"]) == (502, answer["error"])
    assert len(provider.calls) == 1


async def test_a_stream_is_resumed_on_the_other_instance_after_its_last_event_id(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider)
    tid = await a.new_thread()
    async with a.open_stream(tid, {"content": "resume me", "provider": "scripted"}) as on_a:
        call = await provider.next_call()
        call.send("a ", "b ", "c ")
        data = await within(on_a.content.readuntil(b"id: 3\n"), what="three deltas on A")
        assert b"stream_id" in data
        stream_id = data.split(b'"stream_id":"')[1].split(b'"')[0].decode()
        async with b.session.get(f"{b.url}/api/streams/{stream_id}",
                                 headers=b.h(**{"Last-Event-ID": "2"})) as on_b:
            assert on_b.status == 200
            call.send("d ", "e")
            call.finish()
            events = await collect(on_b)
    deltas = [(e.id, e.json()["text"]) for e in events if e.event == "delta"]
    assert deltas == [(3, "c "), (4, "d "), (5, "e")]
    assert events[-1].event == "done" and events[-1].json()["message"]["content"] == "a b c d e"
    assert text_of(events) == "c d e"


async def test_a_leader_shutting_down_tells_the_listeners_on_other_instances(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider)
    tid = await a.new_thread()
    body = {"content": "cut short", "provider": "scripted"}
    async with a.open_stream(tid, body):
        call = await provider.next_call()
        call.send("some ")
        async with b.open_stream(tid, body) as on_b:
            await within(on_b.content.readuntil(b"some"), what="B to see the first delta")
            started = time.perf_counter()
            await within(a.runner.cleanup(), 10, "A to shut down")
            events = await collect(on_b)
    assert events[-1].event == "error" and events[-1].json()["error"]["type"] == "shutting_down"
    assert time.perf_counter() - started < a.settings.redis_lease_s  # told at once, not after the lease
    messages = (await b.thread(tid))["messages"]
    assert [(m["status"], m["content"]) for m in messages][1] == ("interrupted", "some ")


async def test_a_v1_answer_no_request_may_take_is_not_kept_on_redis(pair: Pair, redis_server: RedisServer) -> None:
    """A /v1 answer the result-cache policy leaves out (temperature 1) reaches its listeners on
    both instances; then, as in one process, nothing answers from it: its lead is gone, its
    log and keys expire within the lease (not the result TTL), and its stream id is unknown
    on either instance. A deterministic one (temperature 0) is kept and answers from Redis."""
    provider = ScriptedProvider()
    a, b = await pair(provider, result_ttl_s=60.0)
    hub = a.hub
    assert isinstance(hub, RedisHub)

    async def ask(gw: Gateway, temperature: float) -> tuple[str, str, str]:
        body = {"model": "scripted/scripted", "messages": [{"role": "user", "content": "a fresh sample"}],
                "temperature": temperature}
        async with gw.session.post(f"{gw.url}/v1/chat/completions", json=body, headers=gw.h()) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            return resp.headers["x-dac-coalesce"], answer["id"], answer["choices"][0]["message"]["content"]

    for temperature, kept in ((1.0, False), (0.0, True)):
        leading = asyncio.ensure_future(ask(a, temperature))
        call = await provider.next_call()
        following = asyncio.ensure_future(ask(b, temperature))
        await wait_until(lambda: sum(f.listeners for f in b.hub._streams.values()) == 1, "the follower on B")
        call.send("heads")
        call.finish()
        answers = await within(asyncio.gather(leading, following), what="both answers")
        assert [(role, text) for role, _, text in answers] == [("leader", "heads"), ("follower", "heads")]
        stream_id = "msg_" + answers[0][1].removeprefix("chatcmpl-")
        keys = [k.decode() for k in await redis_server.keys(hub.prefix) if stream_id in k.decode()
                or k.decode().endswith(":lead")]
        client = aioredis.Redis.from_url(redis_server.url, protocol=2)
        try:
            ttls = {k.removeprefix(hub.prefix): await client.pttl(k) for k in keys}
        finally:
            await client.aclose()
        found = []
        for gw in (a, b):
            async with gw.session.get(f"{gw.url}/api/streams/{stream_id}", headers=gw.h()) as resp:
                found.append(resp.status)
        if kept:
            assert any(k.endswith(":lead") for k in ttls) and max(ttls.values()) > hub.lease_ms, ttls
            assert found == [200, 200]
            assert (await ask(b, temperature))[0] == "cache"
            assert len(provider.calls) == 2
        else:
            assert not any(k.endswith(":lead") for k in ttls), ttls  # no request can take it
            assert ttls and all(0 < ttl <= hub.lease_ms for ttl in ttls.values()), ttls  # for the mirrors only
            assert found == [404, 404]


async def test_the_holders_hash_expires_from_its_first_field_on(pair: Pair, redis_server: RedisServer) -> None:
    """An instance that starts holding a flight, or says it stopped, writes the flight's holders
    hash: the hash expires even when the leader never renews it (it died first, or the hash had
    lapsed and is written again)."""
    provider = ScriptedProvider()
    a, b = await pair(provider, redis_lease_s=30.0)  # no renewal within the test
    tid = await a.new_thread()
    body = {"content": "who holds it", "provider": "scripted"}
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    try:
        async with a.open_stream(tid, body) as on_a:
            call = await provider.next_call()
            call.send("first ")
            holders = a.hub._led[call_stream(a)].base + ":holders"
            async with b.open_stream(tid, body) as on_b:
                await within(on_b.content.readuntil(b"first"), what="B to see the first delta")
                assert await client.hget(holders, b.hub.instance) == b"1"
                assert await client.pttl(holders) > 0  # written as B joined
                await client.delete(holders)  # as when it lapsed
            (mirror,) = b.hub._streams.values()
            await wait_until(lambda: not mirror.held and mirror.reporting is None, "B to say it let go")
            assert await client.hget(holders, b.hub.instance) == b"0"
            assert await client.pttl(holders) > 0
            call.finish()
            await within(collect(on_a), what="A's stream to end")
    finally:
        await client.aclose()


async def test_a_stale_leaders_last_write_is_refused_and_counted(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider, redis_lease_s=0.4)
    tid = await a.new_thread()
    body = {"content": "a leader that pauses", "provider": "scripted"}
    async with a.open_stream(tid, body) as on_a:
        call = await provider.next_call()
        call.send("kept ")
        async with b.open_stream(tid, body) as on_b:
            await within(on_b.content.readuntil(b"kept"), what="B to see the first delta")
            led = a.hub._led[call_stream(a)]
            led.renewing.cancel()  # A pauses: it renews nothing and learns nothing ...
            await a.hub.redis.delete(led.lead)  # ... while its lease lapses
            on_b_events = await within(collect(on_b), 5, "B to give up on the leader")
        assert on_b_events[-1].json()["error"]["type"] == "leader_lost"
        row = await b.store.get_message("org_a", led.flight.stream_id)
        assert (row["status"], row["content"]) == ("interrupted", "kept ")  # B's word, with the log's text
        # A wakes up, goes on and ends: its append finds the lease gone, its final write is refused
        call.send("late ")
        call.finish()
        on_a_events = await within(collect(on_a), 5, "A's stream to end")
    assert on_a_events[-1].event == "error" and on_a_events[-1].json()["error"]["type"] == "leader_lost"
    messages = (await b.thread(tid))["messages"]
    assert [(m["status"], m["content"]) for m in messages][1] == ("interrupted", "kept ")
    assert a.metrics.refused_writes.labels("finish")._value.get() == 1
    assert b.metrics.refused_writes.labels("finish")._value.get() == 0


async def test_the_sweep_takes_only_rows_whose_owner_stayed_gone(redis_server: RedisServer,
                                                                 postgres: PostgresServer) -> None:
    store = PostgresStore(postgres.new_url(), recover=False)
    await within(store.open())
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    prefix = redis_server.new_prefix()
    sweeper = Sweeper(redis=client, store=store, metrics=Metrics(), prefix=prefix, instance="me", interval_s=1)
    try:
        t = await store.create_thread("org_a", "t")
        rows = {}
        for owner in ("me", "live", "gone", None):
            user, rows[owner] = draft_turn(thread_id=t["thread_id"], content="q", provider="mock", model="mock",
                                           meta={})
            await store.begin_turn(org_id="org_a", user=user, assistant=rows[owner], owner=owner)
        await store.checkpoint(message_id=rows["gone"]["message_id"], content="checkpointed", deltas=1, owner="gone")
        await client.set(f"{prefix}inst:live", "1")
        assert await within(sweeper.sweep()) == []  # this instance's own heartbeat is missing: nobody is judged
        await client.set(f"{prefix}inst:me", "1")
        assert await within(sweeper.sweep()) == []  # missing once: perhaps Redis lost its keys a moment ago
        swept = await within(sweeper.sweep())  # missing at two sweeps in a row: gone
        assert sorted(swept) == sorted([rows["gone"]["message_id"], rows[None]["message_id"]])
        status = {o: (await store.get_message("org_a", m["message_id"]))["status"] for o, m in rows.items()}
        assert status == {"me": "streaming", "live": "streaming", "gone": "interrupted", None: "interrupted"}
        gone = await store.get_message("org_a", rows["gone"]["message_id"])
        assert gone["content"] == "checkpointed"  # its log had expired: the row keeps its last checkpoint
        assert await within(sweeper.sweep()) == []
        assert sweeper.metrics.swept._value.get() == 2
    finally:
        await client.aclose()
        await store.close()


async def test_a_stop_for_a_client_promised_on_the_other_instance_is_handed_over(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider, cancel_grace_s=30.0, attach_timeout_s=30.0)  # only the Stop can explain an abort
    tid = await a.new_thread()
    async with a.session.post(f"{a.url}/api/threads/{tid}/messages", headers=a.h(Accept="application/json"),
                              json={"content": "stop me elsewhere", "provider": "scripted", "stream": True}) as resp:
        assert resp.status == 202, await resp.text()
        stream_url = (await resp.json())["stream_url"]
    call = await provider.next_call()
    call.send("started ")
    async with b.session.delete(f"{b.url}{stream_url}", headers=b.h()) as resp:  # it reaches B, not A
        assert resp.status == 204, await resp.text()
    await within(call.closed.wait(), 5, "the upstream to close")
    messages = await within(_saved(b, tid), 5, "the answer to be saved")
    assert messages[1]["status"] == "cancelled"


async def test_a_stop_with_the_orgs_key_ends_the_listeners_of_every_instance(pair: Pair) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider, cancel_grace_s=30.0, attach_timeout_s=30.0)  # only the Stop can explain an abort
    tid = await a.new_thread()
    body = {"content": "stop it everywhere", "provider": "scripted"}
    async with a.open_stream(tid, body) as on_a, b.open_stream(tid, body) as on_b:
        await within(on_a.content.readuntil(b"event: meta"), what="A's meta event")
        await within(on_b.content.readuntil(b"event: meta"), what="B's meta event")
        call = await provider.next_call()
        call.send("started ")
        await within(on_b.content.readuntil(b"started"), what="B to see the first delta")
        stream_id = call_stream(a)
        async with b.session.delete(f"{b.url}/api/streams/{stream_id}", headers=b.h()) as resp:
            assert resp.status == 204, await resp.text()
        await within(call.closed.wait(), 5, "the upstream to close")
        for stream in (on_a, on_b):
            rest = await within(collect(stream), 5, "each instance's stream to end")
            assert not [e for e in rest if e.event in ("done", "error")]
    messages = await within(_saved(b, tid), 5, "the answer to be saved")
    assert (messages[1]["status"], messages[1]["content"]) == ("cancelled", "started ")
    assert len(provider.calls) == 1


async def test_workers_on_one_sqlite_file_send_the_whole_conversation_whoever_wrote_it(
        pair: Pair, tmp_path: Path) -> None:
    provider = ScriptedProvider()
    a, b = await pair(provider, database_url=None, db_path=str(tmp_path / "shared.db"))
    tid = await a.new_thread()  # made on A
    turn = asyncio.ensure_future(b.post(tid, {"content": "my name is Ada", "provider": "scripted"}))
    call = await provider.next_call()
    call.send("hi Ada")
    call.finish()
    assert (await within(turn))[0] == 200
    second = asyncio.ensure_future(a.post(tid, {"content": "what is my name?", "provider": "scripted"}))
    call = await provider.next_call()
    # A sends the turn B wrote: no process keeps a conversation the other could have changed
    assert [(m["role"], m["content"]) for m in call.request.messages] == [
        ("user", "my name is Ada"), ("assistant", "hi Ada"), ("user", "what is my name?")]
    call.send("Ada")
    call.finish()
    assert (await within(second))[0] == 200


async def _saved(gw: Gateway, tid: str) -> list[dict[str, Any]]:
    while True:
        messages = (await gw.thread(tid))["messages"]
        if len(messages) == 2 and messages[1]["status"] != "streaming":
            return list(messages)
        await asyncio.sleep(0.01)


async def test_a_leader_takes_its_slot_with_the_lead_and_a_follower_gives_its_back(
        pair: Pair, redis_server: RedisServer) -> None:
    provider = ScriptedProvider(max_concurrency=1)
    a, b = await pair(provider)
    hub = a.hub
    assert isinstance(hub, RedisHub)
    slots = hub.prefix + "{slots:scripted}"
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    try:
        tid = await a.new_thread()
        body = {"content": "one slot", "provider": "scripted"}
        first = asyncio.ensure_future(a.post(tid, body))
        call = await provider.next_call()
        assert await client.zcard(slots) == 1
        follower = asyncio.ensure_future(b.post(tid, body))  # asks for a slot too, and gives it back
        await wait_until(lambda: sum(f.listeners for f in b.hub._streams.values()) == 1, "the follower on B")
        b_pacer = b.app[PACER]
        assert isinstance(b_pacer, RedisPacer)
        await within(asyncio.gather(*b_pacer._returning), what="the follower's slot given back")
        assert await client.zcard(slots) == 1
        call.send("done")
        call.finish()
        answers = await within(asyncio.gather(first, follower), what="both answers")
        assert [body["message"]["content"] for _, body in answers] == ["done", "done"]
        await wait_until(lambda: hub.pacer.snapshot()["scripted"]["running"] == 0, "the slot given back")
        assert await client.zcard(slots) == 0
        # the limit of 1 still holds for a slot taken with the lead: a second distinct
        # request waits for the first one's slot
        first = asyncio.ensure_future(a.post(tid, {"content": "first", "provider": "scripted"}))
        call = await provider.next_call()
        second = asyncio.ensure_future(b.post(tid, {"content": "second", "provider": "scripted"}))
        await wait_until(lambda: b_pacer.snapshot()["scripted"]["waiting"] == 1, "the second to wait for a slot")
        assert provider.open_calls == 1
        call.send("1")
        call.finish()
        call = await provider.next_call()
        call.send("2")
        call.finish()
        answers = await within(asyncio.gather(first, second), what="both answers")
        assert [body["message"]["content"] for _, body in answers] == ["1", "2"]
    finally:
        await client.aclose()


async def test_scripts_lost_by_redis_are_loaded_again(pair: Pair, redis_server: RedisServer) -> None:
    provider = ScriptedProvider()
    a, _ = await pair(provider)
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    try:
        await client.script_flush()  # as after a restart of Redis
    finally:
        await client.aclose()
    tid = await a.new_thread()
    answer = asyncio.ensure_future(a.post(tid, {"content": "after a flush", "provider": "scripted"}))
    call = await provider.next_call()
    call.send("still here")
    call.finish()
    status, body = await within(answer, what="the answer")
    assert (status, body["coalesce"], body["message"]["content"]) == (200, "leader", "still here")


async def test_a_slot_given_back_here_goes_to_the_waiter_here_at_once(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_pacer, "POLL_S", 3600.0)  # no second ask but on a wake-up
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    pacer = RedisPacer(client, prefix=redis_server.new_prefix(), lease_s=2.0, queue_timeout_s=30)
    try:
        held, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with pacer.slot("p", 1):
                held.set()
                await release.wait()

        holder = asyncio.ensure_future(first())
        await within(held.wait(), what="the first slot")

        async def second() -> float:
            async with pacer.slot("p", 1) as waited:
                return waited

        waiter = asyncio.ensure_future(second())
        await wait_until(lambda: pacer.snapshot()["p"]["waiting"] == 1, "the second to wait")
        release.set()
        await within(holder, what="the first to give its slot back")
        await within(waiter, what="the waiter to take the freed slot without polling")
        # a slot taken ahead while a call came to wait here goes back to the queue, which hands it
        # to the waiter (a slot taken ahead never overtakes a waiter)
        ahead = pacer.ahead("p", 1)
        assert ahead is not None
        took = await client.execute_command(*ahead.command)
        waiter = asyncio.ensure_future(second())
        await wait_until(lambda: pacer.snapshot()["p"]["waiting"] == 1, "a waiter behind the slot taken ahead")
        pacer.taken(ahead, took, use=True)
        await within(waiter, what="the waiter to take the slot taken ahead")
        assert await client.zcard(pacer.key("p")) == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize("cache_max_bytes", [100, 4200])
async def test_an_answer_too_large_for_the_cache_is_not_kept_on_redis(pair: Pair, cache_max_bytes: int) -> None:
    """As in one process, an answer larger than DAC_CACHE_MAX_BYTES is not kept: the same
    deterministic request on the other instance asks the upstream again. The limit is on
    what a kept answer holds (its compacted log and the flight around it, :meth:`Flight.keep`),
    not on its message's JSON alone: at 4,200 bytes the JSON fits, the answer kept does not."""
    provider = ScriptedProvider()
    a, b = await pair(provider, cache_max_bytes=cache_max_bytes)
    body = {"model": "scripted/scripted", "messages": [{"role": "user", "content": "a long one"}], "temperature": 0}
    roles = []
    for gw in (a, b):
        asking = asyncio.ensure_future(gw.session.post(f"{gw.url}/v1/chat/completions", json=body, headers=gw.h()))
        call = await provider.next_call()
        call.send("x" * 300)
        call.finish()
        async with await within(asking, what="the answer") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["message"]["content"] == "x" * 300
            roles.append(resp.headers["x-dac-coalesce"])
    assert roles == ["leader", "leader"] and len(provider.calls) == 2


async def test_an_answer_that_could_not_be_saved_is_not_replayed_by_another_instance(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in one process, a failure to save answers nobody: the same question asked again on
    the other instance within the error TTL goes to the upstream afresh."""
    provider = ScriptedProvider()
    a, b = await pair(provider, error_ttl_s=60.0)
    tid = await a.new_thread()

    async def broken(**_: object) -> bool:
        raise OSError("disk full")

    monkeypatch.setattr(a.store, "finish_turn", broken)
    body = {"content": "save me", "provider": "scripted", "model": "scripted"}
    statuses = []
    for gw in (a, b):
        asking = asyncio.ensure_future(gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=body,
                                                       headers=gw.h()))
        call = await provider.next_call()
        call.send("kept?")
        call.finish()
        async with await within(asking, what="the answer") as resp:
            statuses.append((resp.status, (await resp.json()).get("error", {}).get("type")))
    assert statuses == [(503, "store_error"), (200, None)] and len(provider.calls) == 2


async def test_a_mirror_streaming_here_keeps_the_heap_as_it_is_until_it_ends(pair: Pair) -> None:
    """A flight led elsewhere runs here as its reader: no trim while it streams, one once it ended."""
    provider = ScriptedProvider()
    a, b = await pair(provider, trim_idle_s=3600)  # ticks by hand
    heap = b.app[HEAP_TRIM]
    started = heap.check()  # the start-up
    assert started is not None
    await within(started, 10, "the start-up trim")
    async with mirrored(a, b, provider, "mirrored") as (call, on_a, on_b):
        assert b.hub.running == 1  # the mirror's reader
        assert heap.check() is None  # it came
        assert heap.check() is None  # it streams
        call.send("second")
        call.finish()
        events = await collect(on_b)
        assert events[-1].event == "done" and events[-1].json()["message"]["content"] == "first second"
        await collect(on_a)
    await wait_until(lambda: b.hub.running == 0, "the mirror's reader to end")
    ended = heap.check()
    assert ended is not None
    await within(ended, 10, "the trim once the mirror ended")
