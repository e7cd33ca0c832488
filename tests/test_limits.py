"""Limits per org (429 with Retry-After and the limit's name) and fair provider slots."""

from __future__ import annotations

import asyncio
from typing import Any

from server.errors import QueueFull
from server.pacer import Pacer

from .fake_upstream import wait_until
from .helpers import ScriptedProvider, registry, within

SLOW = "mock:ttft=3000,itl=0,n=2"


def assert_limited(status: int, headers: Any, body: dict[str, Any], limit: str) -> None:
    assert status == 429, body
    assert int(headers["Retry-After"]) >= 1, headers
    assert body["error"]["limit"] == limit, body
    assert body["error"]["type"] in ("rate_limited", "rate_limit_error"), body


async def test_requests_per_minute_answer_429_with_retry_after_on_both_surfaces(gateway_factory) -> None:
    gw = await gateway_factory(org_rpm=3)
    tid = await gw.new_thread(org="org_a")  # 1
    for i in range(2):  # 2, 3
        status, body = await gw.post(tid, {"content": f"q{i}", "model": "mock:ttft=0,itl=0,n=2"})
        assert status == 200, body
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json={"content": "one more"},
                               headers=gw.h("org_a")) as resp:
        assert_limited(resp.status, resp.headers, await resp.json(), "org_rpm")
        assert int(resp.headers["Retry-After"]) <= 60
    async with gw.session.post(f"{gw.url}/v1/chat/completions", headers=gw.h("org_a"),
                               json={"model": "mock/mock", "messages": [{"role": "user", "content": "x"}]}) as resp:
        assert_limited(resp.status, resp.headers, await resp.json(), "org_rpm")
    async with gw.session.post(f"{gw.url}/api/threads/", json={}, headers=gw.h("org_a")) as resp:
        assert_limited(resp.status, resp.headers, await resp.json(), "org_rpm")
    # another org has its own minute; the refused requests wrote nothing
    assert (await gw.new_thread(org="org_b")).startswith("thr_")
    assert len((await gw.thread(tid))["messages"]) == 4


async def test_concurrent_flights_answer_429_and_joining_a_running_one_is_free(gateway_factory) -> None:
    gw = await gateway_factory(org_max_flights=2, attach_timeout_s=30)
    tid = await gw.new_thread()
    for i in range(2):
        status, body = await gw.post(tid, {"content": f"long {i}", "model": SLOW, "stream": True})
        assert status == 202, body
    # the same question joins its running flight: no new flight, no refusal
    status, body = await gw.post(tid, {"content": "long 0", "model": SLOW, "stream": True})
    assert status == 202 and body["coalesce"] == "follower", body
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", headers=gw.h(),
                               json={"content": "a third", "model": SLOW, "stream": True}) as resp:
        assert_limited(resp.status, resp.headers, await resp.json(), "org_max_flights")
    async with gw.session.post(f"{gw.url}/v1/chat/completions", headers=gw.h(),
                               json={"model": f"mock/{SLOW}", "messages": [{"role": "user", "content": "y"}]}) as resp:
        assert_limited(resp.status, resp.headers, await resp.json(), "org_max_flights")
    other = await gw.new_thread(org="org_b")
    status, body = await gw.post(other, {"content": "mine", "model": "mock:ttft=0,itl=0,n=2"}, org="org_b")
    assert status == 200, body
    assert len((await gw.thread(tid))["messages"]) == 4  # the two accepted turns only


async def test_threads_per_org_answer_429(gateway_factory) -> None:
    gw = await gateway_factory(org_max_threads=2)
    await gw.new_thread()
    await gw.new_thread()
    async with gw.session.post(f"{gw.url}/api/threads/", json={}, headers=gw.h()) as resp:
        assert_limited(resp.status, resp.headers, await resp.json(), "org_max_threads")
        assert "delete" in (await resp.json())["error"]["message"]
    async with gw.session.get(f"{gw.url}/api/threads/", headers=gw.h()) as resp:
        threads = (await resp.json())["threads"]
    assert len(threads) == 2
    async with gw.session.delete(f"{gw.url}/api/threads/{threads[0]['thread_id']}", headers=gw.h()) as resp:
        assert resp.status == 204
    await gw.new_thread()  # room again
    await gw.new_thread(org="org_b")


async def test_a_body_over_the_limit_is_413_naming_it(gateway_factory) -> None:
    gw = await gateway_factory(max_body_bytes=2048)
    tid = await gw.new_thread()
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", headers=gw.h(),
                               json={"content": "x" * 5000}) as resp:
        body = await resp.json()
        assert resp.status == 413, body
        assert body["error"]["limit"] == "max_body_bytes"
    assert (await gw.thread(tid))["messages"] == []


async def test_a_victims_first_request_is_served_while_a_hog_has_100_queued(gateway_factory) -> None:
    """Four slots; the hog org fills them and queues 100 more. The victim's request takes a slot
    at its org's turn (the first or second to free, round-robin), not a place behind the backlog."""
    provider = ScriptedProvider(max_concurrency=4)
    gw = await gateway_factory(providers=registry(provider), attach_timeout_s=60, queue_timeout_s=60,
                               org_max_flights=1000)
    hog = await gw.new_thread(org="org_hog")
    victim = await gw.new_thread(org="org_victim")
    accepted = await within(asyncio.gather(*(
        gw.post(hog, {"content": f"hog {i}", "provider": "scripted", "stream": True}, org="org_hog")
        for i in range(104))), 30, "the hog's requests to be accepted")
    assert all(status == 202 for status, _ in accepted)
    running = [await provider.next_call() for _ in range(4)]
    lane = gw.hub.pacer.lane("scripted", 4)
    await wait_until(lambda: lane.waiting == 100, "the hog's backlog to queue")
    served = asyncio.ensure_future(gw.post(victim, {"content": "my turn", "provider": "scripted"}, org="org_victim"))
    await wait_until(lambda: lane.waiting == 101, "the victim's request to queue behind the backlog")
    # Orgs take turns at the slots that free: the hog's turn may come first, then the victim's.
    running[0].finish()
    call = await provider.next_call()
    if call.request.messages[-1]["content"] != "my turn":
        running.append(call)
        running[1].finish()
        call = await provider.next_call()
    assert call.request.messages[-1]["content"] == "my turn"
    assert lane.waiting >= 99  # the hog's backlog is still queued (one of it served at most)
    call.send("yours")
    call.finish()
    status, body = await within(served, what="the victim's answer")
    assert status == 200 and body["message"]["content"] == "yours", body
    for held in running[1:]:
        held.finish()  # the rest of the backlog ends with the test's gateway


async def test_queue_full_retry_after_estimates_the_wait_of_that_org() -> None:
    pacer = Pacer(queue_timeout_s=0.05)
    lane = pacer.lane("p", 2)
    lane.mean_hold_s = 1.0
    gate = asyncio.Event()

    async def hold(org: str) -> None:
        async with pacer.slot("p", 2, org=org):
            await gate.wait()

    pacer.queue_timeout_s = 30
    tasks = [asyncio.create_task(hold("hog")) for _ in range(22)]  # 2 running, 20 queued
    await wait_until(lambda: lane.waiting == 20, "the hog's backlog to queue")
    pacer.queue_timeout_s = 0.05
    estimates = {}
    for org in ("hog", "victim"):
        try:
            async with pacer.slot("p", 2, org=org):
                raise AssertionError("no slot should be free")
        except QueueFull as exc:
            assert exc.retry_after is not None
            estimates[org] = exc.retry_after
    # the hog waits behind its 20 (10 rounds of 2 slots); the victim is next in turn
    assert estimates["hog"] >= 10 and estimates["victim"] <= 1.0 + 1e-9, estimates
    gate.set()
    await within(asyncio.gather(*tasks), 5, "the hog's calls to end")
    assert pacer.snapshot()["p"] == {"limit": 2, "running": 0, "waiting": 0}
