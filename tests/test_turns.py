"""One turn service under both surfaces: the same org policy, status-line hold and coalesce key."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from server.providers.mock import mock_answer

from .fake_upstream import Script
from .helpers import ScriptedProvider, collect, registry, text_of, within

QUESTION = "What is DAC?"


def api_body(content: str = QUESTION) -> dict[str, Any]:
    return {"content": content, "provider": "scripted", "model": "scripted"}


def v1_body(content: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"model": "scripted/scripted", "messages": [{"role": "user", "content": content}], **extra}


async def until_listeners(gw: Any, n: int) -> None:
    async def poll() -> None:
        while (gw.metrics.registry.get_sample_value("dac_active_listeners") or 0) < n:
            await asyncio.sleep(0.01)

    await within(poll(), 5, f"{n} listeners")


@pytest.mark.parametrize("org", ["bad org!", "x" * 129, "ünïcode"])
async def test_a_malformed_org_is_401_on_both_surfaces(gateway, org: str) -> None:
    tid = await gateway.new_thread()
    headers = {"x-org-id": org}
    requests = [
        ("POST", "/api/threads/", {"title": "t"}),
        ("POST", f"/api/threads/{tid}/messages", {"content": "hi", "model": "mock:ttft=0,itl=0,n=2"}),
        ("POST", "/v1/chat/completions", {"model": "mock/mock", "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for method, path, body in requests:
        async with gateway.session.request(method, gateway.url + path, json=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 401, (path, answer)
            assert "x-org-id" in answer["error"]["message"], (path, answer)
    assert (await gateway.thread(tid))["messages"] == []


async def test_a_missing_org_is_401_on_api_and_the_default_org_on_v1(gateway) -> None:
    async with gateway.session.get(gateway.url + "/api/threads/") as resp:
        assert resp.status == 401
    async with gateway.session.post(gateway.url + "/v1/chat/completions",
                                    json={"model": "mock/mock:ttft=0,itl=0,n=2",
                                          "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 200


async def _first_line(resp: aiohttp.ClientResponse, want: bytes) -> None:
    seen = b""
    while want not in seen:
        line = await resp.content.readline()
        assert line, f"the stream ended before {want!r}; got {seen!r}"
        seen += line


async def test_both_surfaces_start_a_queued_stream_after_one_keepalive_interval(gateway_factory) -> None:
    """While every provider slot is taken, neither surface holds the status line for longer
    than one keep-alive interval: both answer 200 and ping while the request waits."""
    scripted = ScriptedProvider(max_concurrency=1)
    gw = await gateway_factory(providers=registry(scripted), ping_interval_s=0.2)
    tid = await gw.new_thread()
    busy = asyncio.create_task(gw.post(tid, api_body("hold the slot")))
    first = await scripted.next_call()
    sse = {**gw.h(), "Accept": "text/event-stream"}
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=api_body("queued"),
                               headers=sse) as api, \
            gw.session.post(f"{gw.url}/v1/chat/completions", json=v1_body("queued too", stream=True),
                            headers=gw.h()) as v1:
        assert (api.status, v1.status) == (200, 200)
        await within(_first_line(api, b": ping"), 5, "a ping on /api while queued")
        await within(_first_line(v1, b": ping"), 5, "a ping on /v1 while queued")
        assert len(scripted.calls) == 1
        first.finish()
        for _ in range(2):
            call = await scripted.next_call()
            call.send("late")
            call.finish()
        assert text_of(await collect(api)) == "late"
        rest = (await within(v1.read(), 5, "the /v1 stream to end")).decode()
        assert '"content":"late"' in rest and rest.endswith("data: [DONE]\n\n")
    await within(busy)


async def test_both_surfaces_answer_a_failure_within_the_hold_with_its_status(gateway_factory) -> None:
    """A request turned away while the status line is held (the provider queue is full)
    gets the failure's own status and Retry-After on both surfaces, and writes nothing."""
    scripted = ScriptedProvider(max_concurrency=1)
    gw = await gateway_factory(providers=registry(scripted), ping_interval_s=5, queue_timeout_s=0.05)
    tid = await gw.new_thread()
    busy = asyncio.create_task(gw.post(tid, api_body("hold the slot")))
    first = await scripted.next_call()
    sse = {**gw.h(), "Accept": "text/event-stream"}
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=api_body("turned away"),
                               headers=sse) as api:
        assert api.status == 503
        error = (await api.json())["error"]
        assert error["type"] == "queue_full" and api.headers["Retry-After"] == str(max(1, round(error["retry_after"])))
    async with gw.session.post(f"{gw.url}/v1/chat/completions", json=v1_body("turned away", stream=True),
                               headers=gw.h()) as v1:
        assert v1.status == 503
        error = (await v1.json())["error"]
        assert error["code"] == "queue_full" and v1.headers["Retry-After"] == str(max(1, round(error["retry_after"])))
    first.finish()
    await within(busy)
    assert [m["content"] for m in (await gw.thread(tid))["messages"]] == ["hold the slot", ""]


async def test_one_question_through_api_and_v1_on_one_thread_is_one_call_and_one_turn(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    async with gw.open_stream(tid, api_body()) as api:
        assert api.status == 200
        call = await scripted.next_call()
        v1 = asyncio.create_task(gw.session.post(f"{gw.url}/v1/chat/completions", json=v1_body(),
                                                 headers=gw.h(**{"x-thread-id": tid})))
        await until_listeners(gw, 2)
        call.send("one ", "answer")
        call.finish()
        events = await collect(api)
        resp = await within(v1, 5, "the /v1 answer")
        async with resp:
            assert resp.status == 200 and resp.headers["x-dac-coalesce"] == "follower"
            completion = await resp.json()
    assert text_of(events) == completion["choices"][0]["message"]["content"] == "one answer"
    assert len(scripted.calls) == 1
    messages = (await gw.thread(tid))["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", QUESTION), ("assistant", "one answer")]
    assert completion["id"] == "chatcmpl-" + messages[1]["message_id"].removeprefix("msg_")


async def test_a_turn_whose_rows_fail_after_the_upstream_call_started_is_an_error_with_nothing_written(
        gateway_factory, tmp_path) -> None:
    """The rows are written while the provider thinks; when that write fails (here a real
    SQLite error, from a trigger), the upstream call is cut and the client gets the store's
    error. The turn's transaction wrote nothing."""
    import sqlite3

    scripted = ScriptedProvider()
    db = str(tmp_path / "failing.db")
    gw = await gateway_factory(providers=registry(scripted), db_path=db)
    tid = await gw.new_thread()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER no_room BEFORE INSERT ON messages WHEN NEW.content LIKE 'boom%'"
                     " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    for i, headers in enumerate(({}, {"Accept": "text/event-stream"})):
        answer = asyncio.create_task(gw.post(tid, api_body(f"boom {i}"), headers=headers))
        call = await scripted.next_call()  # the upstream call started before the rows were written
        await within(call.closed.wait(), 5, "the upstream call to be cut")
        status, body = await within(answer, 5, "the answer")
        assert status == 503 and body["error"]["type"] == "store_error", body
        assert (await gw.thread(tid))["messages"] == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_leader_that_waits_for_the_whole_answer_asks_the_upstream_for_it_whole(
        gateway_factory, fake, provider: str) -> None:
    """A non-stream leader asks the upstream for one whole answer (cheaper than a stream
    of chunks); a streaming client joining that flight gets the text in one piece, then
    done. A streaming leader asks for a stream."""
    gw = await gateway_factory(env=fake.env())
    fake.script(Script(n=4, hold_first=True))
    tid = await gw.new_thread()
    body = {"content": "whole please", "provider": provider, "model": "m"}
    leader = asyncio.create_task(gw.post(tid, body))
    call = await fake.next_call()
    assert not call.body.get("stream")
    async with gw.open_stream(tid, body) as follower:
        await until_listeners(gw, 2)
        call.release()
        events = await collect(follower)
        status, answer = await within(leader, 5, "the leader's answer")
    words = "".join(mock_answer("whole please", 4))
    assert status == 200 and answer["message"]["content"] == words
    assert [e.event for e in events] == ["meta", "delta", "done"] and text_of(events) == words
    async with gw.open_stream(tid, {**body, "content": "stream please"}) as streaming:
        streamed = await fake.next_call()
        assert streamed.body.get("stream") is True
        streamed.release()
        assert text_of(await collect(streaming)) == "".join(mock_answer("stream please", 4))
    assert len(fake.calls) == 2


async def test_a_streamed_first_text_reaches_its_waiting_client_before_the_leader_reads_on() -> None:
    """The first text of a streamed answer wakes the clients waiting for it, and they run
    before the leader counts it or parses the rest of what it read (their time to first token)."""
    import time
    from collections.abc import AsyncGenerator

    from server.config import Settings
    from server.flight import Flight, TurnRequest
    from server.metrics import Metrics
    from server.pacer import Pacer
    from server.providers import Chunk, Provider, ProviderRequest

    order: list[str] = []

    class TwoAtOnce(Provider):  # both chunks in one read, as an upstream's buffer may hold them
        name, kind = "two", "mock"

        async def stream(self, request: ProviderRequest) -> AsyncGenerator[Chunk, None]:
            yield Chunk(text="a")
            order.append("the leader reads on")
            yield Chunk(text="b", finish_reason="stop")

    for streamed in (True, False):
        order.clear()
        turn = TurnRequest(org_id="o", thread_id=None, content="q", provider=TwoAtOnce(), model="m",
                           stream=streamed)
        flight = Flight(turn, settings=Settings.from_env({}), store=None, pacer=Pacer(),  # type: ignore[arg-type]
                        metrics=Metrics(), clock=time.monotonic, on_end=lambda _: None)

        async def client(log: Any = flight.log) -> None:
            await log.wait(1)
            order.append("the client has the first text")

        waiting = asyncio.ensure_future(client())
        await asyncio.sleep(0)
        flight.start()
        await within(flight.finished.wait(), what="the flight")
        await within(waiting, what="the client")
        # a flight that waits for the whole answer does not yield: its client waits for the end
        first = "the client has the first text" if streamed else "the leader reads on"
        assert order[0] == first, (streamed, order)
