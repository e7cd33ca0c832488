"""Coalescing, fan-out with replay, and listener-counted cancellation, over real sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from server.appkeys import PROVIDERS
from server.errors import UpstreamError
from server.providers import MockProvider
from server.providers.mock import mock_answer
from tools.sse import SseEvent, sse_events

from .engines import on_every_engine
from .helpers import ManualClock, ScriptedProvider, collect, registry, text_of, within


def body(content: str = "What is DAC?", **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, "provider": "scripted", "model": "scripted",
            "reason": "test", "scope": "private", **extra}


class Stream:
    """One SSE client: reads events in the background, can leave at any time."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.events: list[SseEvent] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for ev in sse_events(self.resp):
            self.events.append(ev)
            self.changed.set()

    async def until(self, predicate: Any, what: str, timeout: float = 10) -> None:
        async def wait() -> None:
            while not predicate(self.events):
                self.changed.clear()
                await self.changed.wait()
        try:
            await within(wait(), timeout, what)
        except AssertionError:
            raise AssertionError(f"{what}; events so far: {self.events!r}") from None

    async def finish(self) -> list[SseEvent]:
        await within(self.task, 10, "the stream to end")
        return self.events

    def leave(self) -> None:
        self.task.cancel()
        self.resp.close()

    @property
    def text(self) -> str:
        return text_of(self.events)


async def open_streams(gw: Any, thread_id: str, n: int, content: str = "What is DAC?",
                       **extra: Any) -> list[Stream]:
    async def one() -> Stream:
        resp = await gw.open_stream(thread_id, body(content, **extra)).__aenter__()
        assert resp.status == 200, await resp.text()
        s = Stream(resp)
        await s.until(lambda evs: evs and evs[0].event == "meta", "the meta event")
        return s
    return list(await within(asyncio.gather(*[one() for _ in range(n)]), 15, f"{n} streams to open"))


async def wait_status(gw: Any, thread_id: str, status: str, org: str = "org_a") -> dict[str, Any]:
    """Poll the thread until its assistant message reaches ``status`` (bounded)."""
    async def poll() -> dict[str, Any]:
        while True:
            messages = (await gw.thread(thread_id, org=org))["messages"]
            if messages and messages[-1]["status"] == status:
                return messages[-1]
            await asyncio.sleep(0.02)
    return await within(poll(), 5, f"assistant message to become {status!r}")


@on_every_engine
async def test_burst_of_50_identical_posts_makes_one_call_and_two_messages(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    tid = await gw.new_thread()
    payload = {"role": "user", "content": "Test", "provider": "mock", "model": "mock:ttft=100,itl=10,n=12",
               "reason": "test", "scope": "private"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10)) as ten:
        async def send() -> tuple[int, dict[str, Any]]:
            async with ten.post(f"{gw.url}/api/threads/{tid}/messages", json=payload,
                                headers=gw.h()) as resp:
                return resp.status, await resp.json()
        results = await within(asyncio.gather(*[send() for _ in range(50)]), 30, "50 answers")
    assert [s for s, _ in results] == [200] * 50
    texts = {r["message"]["content"] for _, r in results}
    assert texts == {"".join(mock_answer("Test", 12))}
    assert mock.calls == 1
    assert len({r["message"]["message_id"] for _, r in results}) == 1
    roles = [r["coalesce"] for _, r in results]
    assert roles.count("leader") == 1
    messages = (await gw.thread(tid))["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert messages[0]["meta"] == {"reason": "test", "scope": "private"}
    perf = await gw.performance(100)
    assert perf["coalesce"]["leaders"] == 1
    assert perf["coalesce"]["followers"] + perf["coalesce"]["cache_hits"] == 49
    assert perf["requests"] == 50 and perf["error_rate"] == 0


async def test_twenty_streams_joining_mid_stream_all_get_the_full_text(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    first = await open_streams(gw, tid, 10)
    call = await scripted.next_call()
    call.send("The ", "DAC ", "gateway ")
    await first[0].until(lambda evs: len([e for e in evs if e.event == "delta"]) == 3, "3 deltas")
    late = await open_streams(gw, tid, 10)  # join mid-stream: replay from the first token
    call.send("merges ", "requests.")
    call.finish()
    streams = first + late
    for s in streams:
        await s.finish()
    expected = "The DAC gateway merges requests."
    for s in streams:
        deltas = [e for e in s.events if e.event == "delta"]
        assert [e.id for e in deltas] == [1, 2, 3, 4, 5]
        assert s.text == expected
        assert s.events[-1].event == "done"
        assert s.events[-1].json()["message"]["content"] == expected
    assert [s.events[0].json()["coalesce"] for s in streams].count("leader") == 1
    assert len(scripted.calls) == 1
    messages = (await gw.thread(tid))["messages"]
    assert len(messages) == 2 and messages[1]["content"] == expected


async def test_non_stream_request_joins_a_streaming_flight(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    [stream] = await open_streams(gw, tid, 1)
    call = await scripted.next_call()
    call.send("partial ")
    await stream.until(lambda evs: any(e.event == "delta" for e in evs), "the first delta")
    waiter = asyncio.create_task(gw.post(tid, body()))
    await asyncio.sleep(0)  # let the POST reach the server before the answer ends
    await within(_listeners(gw, 2), 5, "the POST to join")
    call.send("answer")
    call.finish()
    status, answer = await within(waiter, 10, "the non-stream answer")
    await stream.finish()
    assert status == 200
    assert answer["coalesce"] == "follower"
    assert answer["message"]["content"] == "partial answer" == stream.text
    assert len(scripted.calls) == 1


async def _listeners(gw: Any, n: int) -> None:
    """Wait until the only running flight has ``n`` listeners."""
    while True:
        flights = list(gw.hub._live.values())
        if flights and flights[0].listeners == n:
            return
        await asyncio.sleep(0.01)


async def test_upstream_keeps_going_while_one_listener_remains_then_closes(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    a, b, c = await open_streams(gw, tid, 3)
    call = await scripted.next_call()
    call.send("one ")
    await c.until(lambda evs: len(evs) >= 2, "the first delta at the last listener")
    a.leave()
    b.leave()
    await within(_listeners(gw, 1), 5, "two listeners to leave")
    call.send("two ")
    await c.until(lambda evs: text_of(evs) == "one two ", "tokens after the others left")
    assert not call.closed.is_set(), "the upstream was closed while a listener remained"
    left = time.perf_counter()
    c.leave()
    await within(call.closed.wait(), 5, "the upstream stream to close")
    elapsed = call.closed_at - left
    assert elapsed < 1.0, f"upstream closed {elapsed * 1000:.0f} ms after the last listener left"
    message = await wait_status(gw, tid, "cancelled")
    assert message["content"] == "one two "
    hist = gw.metrics.cancel_latency.labels("scripted")
    assert hist._sum.get() > 0  # cancel latency was recorded


async def test_last_listener_leaving_before_first_token_closes_upstream(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    a, b = await open_streams(gw, tid, 2)
    call = await scripted.next_call()
    left = time.perf_counter()
    a.leave()
    b.leave()
    await within(call.closed.wait(), 5, "the idle upstream stream to close")
    assert call.closed_at - left < 1.0
    message = await wait_status(gw, tid, "cancelled")
    assert message["content"] == ""
    # the next identical request starts afresh instead of joining the cancelled flight
    [again] = await open_streams(gw, tid, 1)
    second = await scripted.next_call()
    second.send("fresh")
    second.finish()
    await again.finish()
    assert again.text == "fresh"


async def test_non_stream_client_disconnect_cancels_upstream(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    task = asyncio.create_task(gw.post(tid, body()))
    call = await scripted.next_call()
    task.cancel()  # closes the client connection
    await within(call.closed.wait(), 5, "the upstream to close after the client left")
    await wait_status(gw, tid, "cancelled")


@on_every_engine
async def test_resume_with_last_event_id_and_finished_stream_from_store(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), result_ttl_s=0.0)
    tid = await gw.new_thread()
    [s] = await open_streams(gw, tid, 1)
    call = await scripted.next_call()
    call.send("a", "b", "c", "d")
    await s.until(lambda evs: len(evs) >= 5, "four deltas")
    stream_id = s.events[0].json()["stream_id"]
    url = f"{gw.url}/api/streams/{stream_id}"
    # a second client resumes after event 2 while the flight runs
    async with gw.session.get(url, headers={**gw.h(), "Last-Event-ID": "2"}) as resp:
        assert resp.status == 200
        resumed = Stream(resp)
        await resumed.until(lambda evs: len(evs) >= 3, "the replayed tail")
        call.send("e")
        call.finish()
        events = await resumed.finish()
    assert [(e.event, e.id) for e in events] == [("meta", None), ("delta", 3), ("delta", 4), ("delta", 5), ("done", 6)]
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == "cde"
    await s.finish()
    # ?last_event_id= works the same for clients that cannot set headers; once the
    # flight is gone, the stream is answered from the store
    async with gw.session.get(f"{url}?org=org_a&last_event_id=5") as resp:
        events = await collect(resp)
    assert [(e.event, e.id) for e in events] == [("meta", None), ("done", 6)]  # done keeps its id
    assert events[0].json()["user_message_id"] == s.events[0].json()["user_message_id"]
    assert events[-1].json()["message"]["content"] == "abcde"
    assert events[-1].json()["message"]["status"] == "complete"


async def test_unknown_or_foreign_stream_is_404_json(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    async with gw.session.get(f"{gw.url}/api/streams/msg_nope?org=org_a") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found"
    tid = await gw.new_thread()
    [s] = await open_streams(gw, tid, 1)
    stream_id = s.events[0].json()["stream_id"]
    async with gw.session.get(f"{gw.url}/api/streams/{stream_id}?org=org_b") as resp:
        assert resp.status == 404
    call = await scripted.next_call()
    call.finish()
    await s.finish()
    async with gw.session.get(f"{gw.url}/api/streams/{stream_id}", headers={"x-org-id": "org_b"}) as resp:
        assert resp.status == 404


async def test_failed_flight_shares_its_error_for_the_error_ttl(gateway_factory) -> None:
    scripted = ScriptedProvider()
    clock = ManualClock()
    gw = await gateway_factory(providers=registry(scripted), error_ttl_s=1.5, clock=clock)
    tid = await gw.new_thread()
    posts = [asyncio.create_task(gw.post(tid, body())) for _ in range(3)]
    call = await scripted.next_call()
    await within(_listeners(gw, 3), 5, "three joiners")
    call.send("half an ")
    call.fail(UpstreamError("upstream exploded"))
    answers = await within(asyncio.gather(*posts), 10, "three error answers")
    assert [s for s, _ in answers] == [502] * 3
    assert {a["error"]["message"] for _, a in answers} == {"upstream exploded"}
    assert {a["error"]["type"] for _, a in answers} == {"upstream_error"}
    # within the error TTL: the same error, no provider call
    status, again = await gw.post(tid, body())
    assert (status, again["error"]["message"]) == (502, "upstream exploded")
    assert len(scripted.calls) == 1
    messages = (await gw.thread(tid))["messages"]
    assert [(m["role"], m["status"], m["content"]) for m in messages] == [
        ("user", "complete", "What is DAC?"), ("assistant", "error", "half an ")]
    clock.advance(1.6)  # past the error TTL
    retry = asyncio.create_task(gw.post(tid, body()))
    second = await scripted.next_call()
    second.send("ok")
    second.finish()
    status, answer = await within(retry, 10, "the retried answer")
    assert (status, answer["message"]["content"], answer["coalesce"]) == (200, "ok", "leader")
    assert len(scripted.calls) == 2


async def test_stream_gets_error_event_and_partial_text_is_kept(gateway_factory) -> None:
    gw = await gateway_factory()
    tid = await gw.new_thread()
    async with gw.open_stream(tid, {"content": "cut", "model": "mock:ttft=0,itl=0,n=10,failat=4"}) as resp:
        events = await collect(resp)
    assert [e.event for e in events] == ["meta", "delta", "delta", "delta", "delta", "error"]
    assert events[-1].json()["error"]["type"] == "upstream_error"
    assert events[-1].json()["error"]["retryable"] is True
    message = (await gw.thread(tid))["messages"][-1]
    assert message["status"] == "error"
    assert message["content"] == "".join(mock_answer("cut", 10)[:4])


async def test_coalesce_disabled_gives_each_request_its_own_call(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock), coalesce_enabled=False)
    tid = await gw.new_thread()
    payload = {"content": "same", "model": "mock:ttft=50,itl=1,n=3"}
    results = await within(asyncio.gather(*[gw.post(tid, payload) for _ in range(5)]), 15)
    assert [s for s, _ in results] == [200] * 5
    assert {r["coalesce"] for _, r in results} == {"leader"}
    assert mock.calls == 5
    assert len((await gw.thread(tid))["messages"]) == 10


async def test_fanout_disabled_gives_each_stream_its_own_call(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock), stream_fanout_enabled=False)
    tid = await gw.new_thread()
    payload = {"content": "same", "model": "mock:ttft=50,itl=1,n=3"}

    async def stream() -> list[SseEvent]:
        async with gw.open_stream(tid, payload) as resp:
            return await collect(resp)

    results = await within(asyncio.gather(*[stream() for _ in range(4)]), 15)
    assert all(r[-1].event == "done" for r in results)
    assert mock.calls == 4
    # non-stream requests still coalesce with the flag off
    results2 = await within(asyncio.gather(*[gw.post(tid, {**payload, "content": "json"}) for _ in range(4)]))
    assert mock.calls == 5 and {s for s, _ in results2} == {200}


@on_every_engine
async def test_stream_mode_3_accepted_then_event_source(gateway_factory) -> None:
    gw = await gateway_factory()
    tid = await gw.new_thread()
    payload = {"content": "hello", "model": "mock:ttft=20,itl=1,n=6", "stream": True}
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=payload,
                               headers={**gw.h(), "Accept": "application/json"}) as resp:
        assert resp.status == 202
        accepted = await resp.json()
    assert accepted["coalesce"] == "leader" and accepted["user_message"]["content"] == "hello"
    assert accepted["stream_url"].startswith(f"/api/streams/{accepted['stream_id']}?token=")
    async with gw.session.get(gw.url + accepted["stream_url"]) as resp:  # no header, like EventSource
        events = await collect(resp)
    assert events[0].json()["stream_id"] == accepted["stream_id"]
    assert text_of(events) == "".join(mock_answer("hello", 6))
    assert events[-1].event == "done"


async def test_mode_3_flight_nobody_attaches_to_is_cancelled(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), attach_timeout_s=0.2)
    tid = await gw.new_thread()
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=body(stream=True),
                               headers={**gw.h(), "Accept": "application/json"}) as resp:
        assert resp.status == 202
    call = await scripted.next_call()
    call.send("never heard")
    await within(call.closed.wait(), 5, "the unattended flight to be cancelled")
    message = await wait_status(gw, tid, "cancelled")
    assert message["content"] == "never heard"


async def test_a_listener_joining_during_the_grace_keeps_the_flight(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), cancel_grace_s=0.3)
    tid = await gw.new_thread()
    [a] = await open_streams(gw, tid, 1)
    call = await scripted.next_call()
    a.leave()
    await within(_listeners(gw, 0), 5, "the first listener to leave")
    [b] = await open_streams(gw, tid, 1)  # within the grace
    assert b.events[0].json()["coalesce"] == "follower"
    await asyncio.sleep(0.4)  # past the grace: the flight must still run
    assert not call.closed.is_set()
    call.send("kept")
    call.finish()
    await b.finish()
    assert b.text == "kept"
    assert len(scripted.calls) == 1


async def test_subscriber_behind_the_ring_gets_a_snapshot_then_tails(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), ring_size=3)
    tid = await gw.new_thread()
    [first] = await open_streams(gw, tid, 1)
    call = await scripted.next_call()
    call.send(*[f"t{i} " for i in range(1, 7)])
    await first.until(lambda evs: text_of(evs) == "t1 t2 t3 t4 t5 t6 ", "six deltas")
    [late] = await open_streams(gw, tid, 1)  # deltas 1-3 are gone from the ring
    await late.until(lambda evs: len(evs) >= 2, "the snapshot")
    assert (late.events[1].event, late.events[1].id) == ("snapshot", 6)
    assert late.events[1].json()["text"] == "t1 t2 t3 t4 t5 t6 "
    call.send("t7")
    call.finish()
    await late.finish()
    await first.finish()
    assert [(e.event, e.id) for e in late.events[2:]] == [("delta", 7), ("done", 8)]
    assert late.text == first.text == "t1 t2 t3 t4 t5 t6 t7"


async def test_evicted_results_are_not_kept_alive_by_their_timers(gateway_factory) -> None:
    import gc
    import weakref

    gw = await gateway_factory(cache_max_entries=2)
    tid = await gw.new_thread()
    for i in range(5):
        status, _ = await gw.post(tid, {"content": f"q{i}", "model": "mock:ttft=0,itl=0,n=2"})
        assert status == 200
    assert len(gw.hub._cache) == 2 and len(gw.hub._streams) == 2
    refs = [weakref.ref(f) for f in gw.hub._cache]
    _, _ = await gw.post(tid, {"content": "q5", "model": "mock:ttft=0,itl=0,n=2"})
    _, _ = await gw.post(tid, {"content": "q6", "model": "mock:ttft=0,itl=0,n=2"})
    gc.collect()
    assert [r() for r in refs] == [None, None]  # evicted flights are freed at once, not after the TTL


async def test_a_mode_3_follower_keeps_the_flight_until_it_attaches(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), attach_timeout_s=5)
    tid = await gw.new_thread()
    [sse] = await open_streams(gw, tid, 1)
    call = await scripted.next_call()
    call.send("one ")
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=body(stream=True),
                               headers={**gw.h(), "Accept": "application/json"}) as resp:
        assert resp.status == 202
        accepted = await resp.json()
    assert accepted["coalesce"] == "follower"
    sse.leave()  # the only listener leaves before the 202'd client opens its stream
    await within(_listeners(gw, 0), 5, "the SSE client to leave")
    await asyncio.sleep(0.2)  # well past the 50 ms grace
    assert not call.closed.is_set(), "cancelled although a client was told its stream_url"
    async with gw.session.get(gw.url + accepted["stream_url"]) as resp:
        late = Stream(resp)
        await late.until(lambda evs: text_of(evs) == "one ", "the replay")
        call.send("two")
        call.finish()
        await late.finish()
    assert late.text == "one two" and late.events[-1].event == "done"


async def test_stream_and_stream_url_while_waiting_for_a_provider_slot(gateway_factory) -> None:
    scripted = ScriptedProvider(max_concurrency=1)
    gw = await gateway_factory(providers=registry(scripted), ping_interval_s=0.1)
    tid = await gw.new_thread()
    first = asyncio.create_task(gw.post(tid, body("first")))
    busy = await scripted.next_call()
    # mode 3 is accepted at once, with a stream that can be opened while queued
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=body("second", stream=True),
                               headers={**gw.h(), "Accept": "application/json"}) as resp:
        assert resp.status == 202
        accepted = await resp.json()
    # mode 2 starts its stream after one keep-alive interval and pings while queued
    async with gw.open_stream(tid, body("third")) as queued, \
            gw.session.get(gw.url + accepted["stream_url"]) as attached:
        assert queued.status == 200 and attached.status == 200
        seen = b""
        while b": ping" not in seen:
            seen += await within(queued.content.readline(), 5, "a ping while queued")
        assert len(scripted.calls) == 1
        busy.finish()
        second = await scripted.next_call()
        second.send("two")
        second.finish()
        events = await collect(attached)
        third = await scripted.next_call()
        third.send("three")
        third.finish()
        rest = await collect(queued)
    assert text_of(events) == "two" and events[0].json()["stream_id"] == accepted["stream_id"]
    assert text_of(rest) == "three"
    await within(first)


async def test_a_deleted_threads_running_stream_is_not_kept_after_it_ends(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    [s] = await open_streams(gw, tid, 1)
    call = await scripted.next_call()
    async with gw.session.delete(f"{gw.url}/api/threads/{tid}", headers=gw.h()) as resp:
        assert resp.status == 204
    call.send("late")
    call.finish()
    await s.finish()
    assert s.text == "late"  # the listener still got its answer
    async with gw.session.get(f"{gw.url}/api/streams/{s.events[0].json()['stream_id']}?org=org_a") as resp:
        assert resp.status == 404


async def test_an_answer_larger_than_the_cache_is_freed_at_once(gateway_factory) -> None:
    import gc
    import weakref

    gw = await gateway_factory(cache_max_bytes=10)
    started: list[weakref.ref[Any]] = []
    start = gw.hub._start

    def spy(turn: Any) -> Any:
        flight = start(turn)
        started.append(weakref.ref(flight))
        return flight

    gw.hub._start = spy
    tid = await gw.new_thread()
    status, answer = await gw.post(tid, {"content": "big", "model": "mock:ttft=0,itl=0,n=20"})
    assert status == 200 and len(answer["message"]["content"]) > 10
    assert not gw.hub._cache and not gw.hub._streams
    gc.collect()
    assert len(started) == 1 and started[0]() is None  # no timer keeps it for the result TTL
    _, again = await gw.post(tid, {"content": "big", "model": "mock:ttft=0,itl=0,n=20"})
    assert again["coalesce"] == "leader"  # not served from a cache it did not fit in


async def accept(gw: Any, tid: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json={**payload, "stream": True},
                               headers={**gw.h(), "Accept": "application/json"}) as resp:
        assert resp.status == 202, await resp.text()
        return await resp.json()


async def test_a_reconnect_does_not_use_up_another_clients_promise(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), attach_timeout_s=5)
    tid = await gw.new_thread()
    a = await accept(gw, tid, body())
    resp = await gw.session.get(gw.url + a["stream_url"]).__aenter__()
    first = Stream(resp)
    call = await scripted.next_call()
    call.send("one ")
    await first.until(lambda evs: text_of(evs) == "one ", "the first delta")
    b = await accept(gw, tid, body())
    assert b["coalesce"] == "follower" and b["stream_url"] != a["stream_url"]
    # A's EventSource reconnects on the same URL, then A stops: B's promise must hold
    resp2 = await gw.session.get(gw.url + a["stream_url"], headers={"Last-Event-ID": "1"}).__aenter__()
    again = Stream(resp2)
    await within(_listeners(gw, 2), 5, "the reconnect")
    first.leave()
    again.leave()
    await within(_listeners(gw, 0), 5, "A to leave")
    await asyncio.sleep(0.2)  # well past the grace
    assert not call.closed.is_set(), "cancelled while B still held its stream_url"
    async with gw.session.get(gw.url + b["stream_url"]) as resp3:
        late = Stream(resp3)
        await late.until(lambda evs: text_of(evs) == "one ", "B's replay")
        call.send("two")
        call.finish()
        await late.finish()
    assert late.text == "one two"


async def test_a_too_large_answer_does_not_empty_the_cache(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock), cache_max_bytes=10_000)
    tid = await gw.new_thread()
    small = {"content": "q0", "model": "mock:ttft=0,itl=0,n=2"}
    await gw.post(tid, small)
    await gw.post(tid, {"content": "big", "model": "mock:ttft=0,itl=0,n=2000"})
    _, again = await gw.post(tid, small)
    assert again["coalesce"] == "cache" and mock.calls == 2


async def test_a_stream_url_whose_flight_ended_before_its_rows_answers_its_error(gateway_factory) -> None:
    scripted = ScriptedProvider(max_concurrency=1)
    gw = await gateway_factory(providers=registry(scripted), attach_timeout_s=0.2)
    tid = await gw.new_thread()
    busy = asyncio.create_task(gw.post(tid, body("first")))
    call = await scripted.next_call()
    queued = await accept(gw, tid, body("queued"))
    flight = await gw.hub.stream(queued["stream_id"])
    await within(flight.finished.wait(), 5, "the unattended queued flight to be cancelled")
    async with gw.session.get(gw.url + queued["stream_url"]) as resp:
        assert resp.status == 200
        events = await collect(resp)
    assert [e.event for e in events] == ["meta", "error"]
    assert events[-1].json()["error"]["type"] == "cancelled"
    call.finish()
    await within(busy)
    assert [m["content"] for m in (await gw.thread(tid))["messages"]] == ["first", ""]  # nothing of it stored


async def test_mode_3_gets_a_known_failure_as_a_status_not_a_202(gateway_factory) -> None:
    gw = await gateway_factory()
    tid = await gw.new_thread()
    payload = {"content": "x", "model": "mock:ttft=0,fail=1"}
    status, _ = await gw.post(tid, payload)
    assert status == 502
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json={**payload, "stream": True},
                               headers={**gw.h(), "Accept": "application/json"}) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "upstream_error"


async def test_a_flight_cancelled_before_its_first_step_still_ends(gateway_factory) -> None:
    from server.flight import TurnRequest

    gw = await gateway_factory()
    provider = gw.app[PROVIDERS].get("mock")
    flight, role = gw.hub.join(TurnRequest(org_id="org_a", thread_id=None, content="x",
                                             provider=provider, model="mock"), listen=True)
    await within(gw.hub.shutdown(), 5, "the shutdown")  # in the same loop pass as the submit
    assert role == "leader" and flight.finished.is_set()
    await within(flight.accepted(), 1, "a status-line holder to be released")
    assert flight.error is not None and flight.error.type == "shutting_down"
    frames, _, finished = flight.log.read(1)
    assert finished and b"event: error" in frames[-1]
    flight.remove_listener()
