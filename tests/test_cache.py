"""The finished-result cache: identical requests within the result TTL are answered
from the finished flight (``coalesce: "cache"``, no provider call, no new rows),
bounded in entries and bytes (LRU), skipped by ``Cache-Control: no-cache``, never
for requests with tools or attachments; ``Idempotency-Key`` is the key."""

from __future__ import annotations

import asyncio
from typing import Any

from server.errors import UpstreamError
from tools.sse import sse_events

from .conftest import GatewayFactory
from .helpers import Gateway, ManualClock, ScriptedProvider, collect, registry, text_of, within
from .workload import scrape


def ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"content": content, "provider": "scripted", **extra}


async def answered(gw: Gateway, provider: ScriptedProvider, thread_id: str, content: str,
                   answer: str = "an answer", **post: Any) -> dict[str, Any]:
    """One JSON request that calls upstream; the provider streams ``answer``."""
    pending = asyncio.ensure_future(gw.post(thread_id, ask(content), **post))
    call = await provider.next_call()
    call.send(answer)
    call.finish()
    status, body = await within(pending)
    assert status == 200 and body["coalesce"] == "leader", body
    return body


async def from_cache(gw: Gateway, thread_id: str, content: str, **post: Any) -> dict[str, Any]:
    status, body = await gw.post(thread_id, ask(content), **post)
    assert status == 200, body
    return body


async def test_same_prompt_twice_is_a_cache_hit_in_both_endpoints(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    first = await answered(gw, provider, thread, "Same prompt", "the first answer")
    second = await from_cache(gw, thread, "Same prompt")

    assert second["coalesce"] == "cache"
    assert second["message"] == first["message"]
    assert second["user_message"] == first["user_message"]
    assert len(provider.calls) == 1
    messages = (await gw.thread(thread))["messages"]
    assert [m["message_id"] for m in messages] == [first["user_message"]["message_id"],
                                                   first["message"]["message_id"]]  # no new rows
    s = await scrape(gw)
    assert s.value("dac_coalesce_total", role="leader") == 1
    assert s.value("dac_coalesce_total", role="cache") == 1
    assert s.value("dac_upstream_calls_total") == 1
    assert s.value("dac_cache_entries") == 1
    # what the kept flight really holds: its text, offsets, final frame and objects
    assert s.value("dac_cache_bytes") == (await gw.hub.stream(first["message"]["message_id"])).held_bytes
    assert s.value("dac_cache_bytes") > len("the first answer")
    perf = await gw.performance()
    assert perf["requests"] == 2
    assert perf["coalesce"]["leaders"] == 1 and perf["coalesce"]["cache_hits"] == 1
    assert perf["coalesce"]["upstream_calls_saved"] == 1


async def test_a_cache_hit_streams_the_whole_answer_again(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    first = await answered(gw, provider, thread, "Stream it back", "one two three")

    async with gw.open_stream(thread, ask("Stream it back")) as resp:
        events = await collect(resp)
    assert events[0].event == "meta" and events[0].json()["coalesce"] == "cache"
    assert events[0].json()["stream_id"] == first["message"]["message_id"]
    assert text_of(events) == "one two three"
    assert events[-1].event == "done" and events[-1].json()["message"] == first["message"]

    # mode 3: the 202 names the finished stream, which answers at once
    async with gw.session.post(f"{gw.url}/api/threads/{thread}/messages",
                               json=ask("Stream it back", stream=True), headers=gw.h()) as resp:
        assert resp.status == 202
        accepted = await resp.json()
    assert accepted["coalesce"] == "cache"
    assert accepted["stream_id"] == first["message"]["message_id"]
    async with gw.session.get(gw.url + accepted["stream_url"]) as resp:
        assert text_of(await collect(resp)) == "one two three"
    assert len(provider.calls) == 1


async def test_no_cache_asks_again_but_still_joins_a_running_flight(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    first = await answered(gw, provider, thread, "Fresh please", "old")
    no_cache = {"Cache-Control": "no-cache"}

    leader = asyncio.ensure_future(gw.post(thread, ask("Fresh please"), headers=no_cache))
    call = await provider.next_call()
    async with gw.open_stream(thread, ask("Fresh please"), headers=no_cache) as resp:
        follower_meta = await within(anext(sse_events(resp)), what="the follower's meta")
        assert follower_meta.json()["coalesce"] == "follower"
        call.send("new")
        call.finish()
        await within(resp.read(), what="the follower's stream to end")
    status, body = await within(leader)
    assert status == 200 and body["coalesce"] == "leader"
    assert body["message"]["content"] == "new"
    assert body["message"]["message_id"] != first["message"]["message_id"]
    assert len(provider.calls) == 2
    assert len((await gw.thread(thread))["messages"]) == 4  # the new turn was kept

    # a plain request now gets the newest answer from the cache
    again = await from_cache(gw, thread, "Fresh please")
    assert again["coalesce"] == "cache" and again["message"]["content"] == "new"
    assert len(provider.calls) == 2


async def test_tools_and_attachments_are_never_cached(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    for i, extra in enumerate(({"tools": [{"type": "function", "function": {"name": "lookup"}}]},
                               {"attachments": [{"type": "image_url",
                                                 "image_url": {"url": "https://example.org/a.png"}}]})):
        for _ in range(2):  # the same key with the same body: still never served from the cache
            pending = asyncio.ensure_future(gw.post(thread, ask("Use a tool", **extra),
                                                    headers={"Idempotency-Key": f"k-tools-{i}"}))
            call = await provider.next_call()
            call.send("done")
            call.finish()
            status, body = await within(pending)
            assert status == 200 and body["coalesce"] == "leader", body
    assert len(provider.calls) == 4
    assert (await scrape(gw)).value("dac_coalesce_total", role="cache") == 0


async def test_lru_by_entries_keeps_the_recently_used(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider), cache_max_entries=2)
    thread = await gw.new_thread()
    await answered(gw, provider, thread, "A")
    await answered(gw, provider, thread, "B")
    assert (await from_cache(gw, thread, "A"))["coalesce"] == "cache"  # A is now the newest used
    await answered(gw, provider, thread, "C")  # over the bound: B, the least recently used, goes
    assert (await scrape(gw)).value("dac_cache_entries") == 2
    assert (await from_cache(gw, thread, "A"))["coalesce"] == "cache"
    assert (await from_cache(gw, thread, "C"))["coalesce"] == "cache"
    calls = len(provider.calls)
    await answered(gw, provider, thread, "B")  # asked upstream again
    assert len(provider.calls) == calls + 1


async def test_lru_by_bytes_counts_what_each_answer_holds(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    sizes = {}
    for name, text in (("first", "x" * 60), ("second", "y" * 30), ("third", "z" * 30), ("accents", "é" * 6000)):
        answer = await answered(gw, provider, thread, name, text)
        sizes[name] = (await gw.hub.stream(answer["message"]["message_id"])).held_bytes
    assert sizes["accents"] > sizes["first"] > sizes["second"]  # 12,000 UTF-8 bytes held, not 6,000
    assert sizes["first"] - sizes["second"] >= 30
    # room for the first and second answers, not for a third beside them
    gw.hub.settings = gw.hub.settings.with_(cache_max_bytes=sizes["first"] + sizes["second"] + 10)
    gw.hub._evict()
    thread = await gw.new_thread()
    await answered(gw, provider, thread, "first", "x" * 60)
    await answered(gw, provider, thread, "second", "y" * 30)
    s = await scrape(gw)
    assert s.value("dac_cache_entries") == 2 and s.value("dac_cache_bytes") == sizes["first"] + sizes["second"]
    await answered(gw, provider, thread, "third", "z" * 30)  # over the bound: the oldest goes
    s = await scrape(gw)
    assert s.value("dac_cache_entries") == 2
    assert (await from_cache(gw, thread, "second"))["coalesce"] == "cache"
    assert (await from_cache(gw, thread, "third"))["coalesce"] == "cache"
    await answered(gw, provider, thread, "accents", "é" * 6000)  # larger than the bound: not kept
    assert (await from_cache(gw, thread, "third"))["coalesce"] == "cache"
    await answered(gw, provider, thread, "first", "x" * 60)  # evicted: asked upstream again


async def test_the_result_ttl_bounds_a_cache_hit(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    clock = ManualClock()
    gw = await gateway_factory(providers=registry(provider), result_ttl_s=60, clock=clock)
    thread = await gw.new_thread()
    await answered(gw, provider, thread, "short-lived")
    clock.advance(61)  # past the TTL
    await answered(gw, provider, thread, "short-lived")
    assert len(provider.calls) == 2
    assert (await scrape(gw)).value("dac_cache_entries") == 1  # the expired entry was dropped

    off = await gateway_factory(providers=registry(provider2 := ScriptedProvider()), result_ttl_s=0)
    thread = await off.new_thread()
    await answered(off, provider2, thread, "never kept")
    await answered(off, provider2, thread, "never kept")
    assert (await scrape(off)).value("dac_cache_entries") == 0


async def test_failed_and_cancelled_answers_are_not_cached(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider), error_ttl_s=0)
    thread = await gw.new_thread()
    pending = asyncio.ensure_future(gw.post(thread, ask("flaky")))
    (await provider.next_call()).fail(UpstreamError("down"))
    assert (await within(pending))[0] == 502
    await answered(gw, provider, thread, "flaky", "recovered")  # asked again, not the error

    async with gw.open_stream(thread, ask("abandoned")) as resp:
        call = await provider.next_call()
        resp.close()
    await within(call.closed.wait(), what="the upstream call to close")
    await answered(gw, provider, thread, "abandoned", "asked again")
    assert len(provider.calls) == 4


async def test_cache_is_per_thread_and_forgotten_with_its_thread(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    one, two = await gw.new_thread(), await gw.new_thread()
    await answered(gw, provider, one, "Shared wording")
    await answered(gw, provider, two, "Shared wording")  # another thread: its own turn
    async with gw.session.delete(f"{gw.url}/api/threads/{one}", headers=gw.h()) as resp:
        assert resp.status == 204
    assert (await scrape(gw)).value("dac_cache_entries") == 1
    status, body = await gw.post(one, ask("Shared wording"))
    assert status == 404, body


async def test_idempotency_key_answers_a_retry_from_the_cache(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    key = {"Idempotency-Key": "order-7"}
    first = await answered(gw, provider, thread, "Book it", "booked", headers=key)
    retry = await from_cache(gw, thread, "Book it", headers=key)
    assert retry["coalesce"] == "cache" and retry["message"] == first["message"]
    # the key with another wording, or on another thread, is refused: it is not the same request
    for where, wording in ((thread, "Book it, again"), (await gw.new_thread(), "Book it")):
        status, body = await gw.post(where, ask(wording), headers=key)
        assert status == 422 and body["error"]["type"] == "idempotency_key_reused", body
    # without the key the new wording is a new request
    await answered(gw, provider, thread, "Book it, again", "booked twice")
    # another org's identical key is its own request
    other = await gw.new_thread(org="org_b")
    await answered(gw, provider, other, "Book it", "theirs", headers=key, org="org_b")
    assert len(provider.calls) == 3


async def test_coalescing_off_means_no_cache(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider), coalesce_enabled=False)
    thread = await gw.new_thread()
    await answered(gw, provider, thread, "again and again")
    await answered(gw, provider, thread, "again and again")
    assert len(provider.calls) == 2
