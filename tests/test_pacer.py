"""The pacer: at most ``max_concurrency`` upstream calls per provider, FIFO, 503 past the queue timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from server.appkeys import PACER
from server.errors import QueueFull
from server.pacer import Pacer
from server.providers.mock import mock_answer

from .fake_upstream import FakeUpstream, Script, wait_until
from .helpers import collect, within


async def hold(pacer: Pacer, name: str, limit: int, gate: asyncio.Event, log: list[str], tag: str,
               waits: dict[str, float]) -> None:
    async with pacer.slot(name, limit) as waited:
        log.append(tag)
        waits[tag] = waited
        await gate.wait()


async def test_at_most_limit_calls_and_the_rest_in_arrival_order() -> None:
    pacer = Pacer(queue_timeout_s=10)
    gates = {t: asyncio.Event() for t in "abcde"}
    log: list[str] = []
    waits: dict[str, float] = {}
    tasks = []
    lane = pacer.lane("p", 2)
    for tag in "abcde":
        tasks.append(asyncio.create_task(hold(pacer, "p", 2, gates[tag], log, tag, waits)))
        await wait_until(lambda: len(log) + lane.waiting == len(tasks), f"{tag} to queue")
    assert log == ["a", "b"]
    assert pacer.snapshot()["p"] == {"limit": 2, "running": 2, "waiting": 3}
    for done, then in (("b", "c"), ("a", "d"), ("c", "e")):
        gates[done].set()
        await wait_until(lambda then=then: then in log, f"{then} to get a slot")
    for gate in gates.values():
        gate.set()
    await within(asyncio.gather(*tasks))
    assert log == ["a", "b", "c", "d", "e"]
    assert lane.peak == 2
    assert max(waits["a"], waits["b"]) < min(waits["c"], waits["d"], waits["e"])  # queued ones waited
    assert pacer.snapshot()["p"] == {"limit": 2, "running": 0, "waiting": 0}


async def test_a_wait_past_the_queue_timeout_is_queue_full_with_retry_after() -> None:
    pacer = Pacer(queue_timeout_s=0.05)
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(pacer, "openai", 1, gate, [], "a", {}))
    await wait_until(lambda: pacer.lane("openai", 1).running == 1, "the slot to be taken")
    with pytest.raises(QueueFull) as caught:
        async with pacer.slot("openai", 1):
            raise AssertionError("got a slot that was taken")
    error = caught.value
    assert error.status == 503 and error.retryable
    assert "openai" in error.message
    assert error.retry_after is not None and error.retry_after >= 1
    assert int(error.headers()["Retry-After"]) >= 1
    assert pacer.snapshot()["openai"]["waiting"] == 0
    gate.set()
    await within(holder)
    async with pacer.slot("openai", 1) as waited:  # nothing leaked: the slot is free again
        assert waited < 0.05


async def test_a_cancelled_waiter_or_a_failed_call_leaks_no_slot() -> None:
    pacer = Pacer(queue_timeout_s=10)
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(pacer, "p", 1, gate, [], "a", {}))
    await wait_until(lambda: pacer.lane("p", 1).running == 1, "the slot to be taken")
    waiter = asyncio.create_task(hold(pacer, "p", 1, gate, [], "b", {}))
    await wait_until(lambda: pacer.snapshot()["p"]["waiting"] == 1, "the waiter to queue")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pacer.snapshot()["p"]["waiting"] == 0
    gate.set()
    await within(holder)
    with pytest.raises(RuntimeError):
        async with pacer.slot("p", 1):
            raise RuntimeError("the call failed")
    assert pacer.snapshot()["p"] == {"limit": 1, "running": 0, "waiting": 0}


async def test_providers_have_separate_lanes() -> None:
    pacer = Pacer(queue_timeout_s=0.05)
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(pacer, "busy", 1, gate, [], "a", {}))
    await wait_until(lambda: "busy" in pacer.snapshot(), "the busy lane")
    async with pacer.slot("idle", 1) as waited:
        assert waited < 0.05
    gate.set()
    await within(holder)


# -- through the gateway, against the fake upstream ---------------------------------------


def providers_file(tmp_path: Path, name: str, limit: int) -> str:
    path = tmp_path / "providers.toml"
    path.write_text(f'[[providers]]\nname = "{name}"\nmax_concurrency = {limit}\n')
    return str(path)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_two_slots_and_five_flights_never_run_more_than_two_calls(
    provider: str, fake: FakeUpstream, gateway_factory: Any, tmp_path: Path
) -> None:
    gw = await gateway_factory(env=fake.env(), providers_file=providers_file(tmp_path, provider, 2))
    fake.script(Script(n=3, hold_first=True))
    pacer = gw.app[PACER]
    tid = await gw.new_thread()
    prompts = [f"question {i}" for i in range(5)]
    posts = []
    for i, prompt in enumerate(prompts):
        body = {"content": prompt, "provider": provider, "model": "m"}
        posts.append(asyncio.create_task(gw.post(tid, body)))
        if i < 2:
            await wait_until(lambda i=i: len(fake.calls) == i + 1, f"call {i} to reach the fake")
        else:
            await wait_until(lambda i=i: pacer.snapshot()[provider]["waiting"] == i - 1, f"flight {i} to queue")
    assert fake.active == 2 and len(fake.calls) == 2
    assert pacer.snapshot()[provider] == {"limit": 2, "running": 2, "waiting": 3}
    # the queued flights wrote nothing yet: the thread holds the two running turns only
    assert len((await gw.thread(tid))["messages"]) == 4
    for i in range(5):
        fake.calls[i].release()
        if i + 2 < 5:
            await wait_until(lambda i=i: len(fake.calls) == i + 3, f"call {i + 2} to start")
            assert fake.active <= 2
    results = await within(asyncio.gather(*posts), 20, "five answers")
    assert [status for status, _ in results] == [200] * 5
    assert fake.peak == 2
    assert [c.prompt for c in fake.calls] == prompts  # first come, first served
    assert [r["message"]["content"] for _, r in results] == ["".join(mock_answer(p, 3)) for p in prompts]
    perf = await gw.performance()
    assert perf["queue_wait_ms"]["p95"] > 0
    registry = gw.metrics.registry
    assert registry.get_sample_value("dac_queue_wait_seconds_count", {"provider": provider}) == 5


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_full_queue_past_its_timeout_answers_503_and_writes_nothing(
    provider: str, fake: FakeUpstream, gateway_factory: Any, tmp_path: Path
) -> None:
    gw = await gateway_factory(env=fake.env(), providers_file=providers_file(tmp_path, provider, 1),
                               queue_timeout_s=0.2)
    fake.script(Script(n=2, hold_first=True))
    tid = await gw.new_thread()
    running = asyncio.create_task(gw.post(tid, {"content": "first", "provider": provider, "model": "m"}))
    call = await fake.next_call()

    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", headers=gw.h(),
                               json={"content": "second", "provider": provider, "model": "m"}) as resp:
        assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
        answer = await resp.json()
    assert answer["error"]["type"] == "queue_full" and answer["error"]["retryable"] is True
    assert provider in answer["error"]["message"]
    async with gw.open_stream(tid, {"content": "fourth", "provider": provider, "model": "m"}) as resp:
        assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"]["type"] == "queue_full"
    # mode 3 answers 202 at once; the full queue reaches its stream as a retryable error
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", headers=gw.h(), json={
            "content": "fifth", "provider": provider, "model": "m", "stream": True}) as resp:
        assert resp.status == 202
        accepted = await resp.json()
    async with gw.session.get(gw.url + accepted["stream_url"]) as resp:
        events = await collect(resp)
    assert [e.event for e in events] == ["meta", "error"]
    assert events[-1].json()["error"]["type"] == "queue_full" and events[-1].json()["error"]["retryable"]
    messages = (await gw.thread(tid))["messages"]
    assert [m["content"] for m in messages] == ["first", ""]  # only the running turn

    call.release()
    status, answer = await within(running)
    assert status == 200
    messages = (await gw.thread(tid))["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert len(fake.calls) == 1
