"""One behavioural suite over the three provider paths: the mock, OpenAI-compatible, Anthropic.

Each test runs a real gateway whose providers come from the settings (as in
production); ``openai`` and ``anthropic`` point at the fake upstream, which
speaks their wire formats over a real socket on 127.0.0.1. The fake's
default answer is the mock's, so one expected text serves all three paths.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from server.appkeys import PROVIDERS
from server.providers import MockProvider
from server.providers.mock import mock_answer

from .fake_upstream import FakeUpstream, Script, wait_until
from .helpers import Gateway, collect, text_of, within
from .test_hub import Stream, wait_status

PROMPT = "What does the gateway do?"
N = 8


@dataclass
class Backend:
    """A gateway whose provider ``name`` is the mock, or one of the adapters on the fake."""

    name: str
    gw: Gateway
    fake: FakeUpstream

    def model(self, behaviour: str, *, n: int = N, at: int = 3) -> str:
        """A model that behaves as asked: ok, fail, cut (after ``at`` tokens), idle, stall (after ``at``)."""
        if self.name == "mock":
            return {
                "ok": f"mock:ttft=0,itl=0,n={n}",
                "fail": "mock:ttft=0,fail=1",
                "cut": f"mock:ttft=0,itl=0,n={n},failat={at}",
                "idle": "mock:ttft=600000",
                "stall": f"mock:ttft=0,itl=60000,n={at + 1}",
            }[behaviour]
        script = {
            "ok": Script(n=n),
            "fail": Script(status=500),
            "cut": Script(n=n, cut_after=at),
            "idle": Script(n=n, hold_first=True),
            "stall": Script(n=n, hold_after=at),
        }[behaviour]
        model = f"{self.name}-{behaviour}-{n}-{at}"
        self.fake.script(script, model=model)
        return model

    def body(self, behaviour: str = "ok", content: str = PROMPT, **kw: Any) -> dict[str, Any]:
        return {"content": content, "provider": self.name, "model": self.model(behaviour, **kw)}

    @property
    def calls(self) -> int:
        if self.name == "mock":
            mock = self.gw.app[PROVIDERS].get("mock")
            assert isinstance(mock, MockProvider)
            return mock.calls
        return len(self.fake.calls)

    async def listeners(self, n: int) -> None:
        """Wait until the gateway counts ``n`` listeners."""
        await wait_until(lambda: self.gw.metrics.registry.get_sample_value("dac_active_listeners") == n,
                         f"{n} listeners")

    async def stream(self, body: dict[str, Any]) -> Stream:
        resp = await within(self.gw.open_stream(self.tid, body).__aenter__(), what="the stream to open")
        assert resp.status == 200, await resp.text()
        return Stream(resp)

    tid: str = ""


async def _backend(kind: str, gateway_factory: Any) -> AsyncIterator[Backend]:
    async with FakeUpstream.start() as fake:
        gw = await gateway_factory(env=fake.env())
        b = Backend(kind, gw, fake)
        b.tid = await gw.new_thread()
        yield b


@pytest.fixture(params=["mock", "openai", "anthropic"])
async def backend(request: pytest.FixtureRequest, gateway_factory: Any) -> AsyncIterator[Backend]:
    async for b in _backend(request.param, gateway_factory):
        yield b


@pytest.fixture(params=["openai", "anthropic"])
async def http_backend(request: pytest.FixtureRequest, gateway_factory: Any) -> AsyncIterator[Backend]:
    async for b in _backend(request.param, gateway_factory):
        yield b


EXPECTED = "".join(mock_answer(PROMPT, N))


async def test_streamed_text_is_the_stored_text(backend: Backend) -> None:
    gw = backend.gw
    async with gw.open_stream(backend.tid, backend.body()) as resp:
        assert resp.status == 200
        events = await collect(resp)
    assert [e.event for e in events] == ["meta", *["delta"] * N, "done"]
    assert text_of(events) == EXPECTED
    stored = (await gw.thread(backend.tid))["messages"]
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "complete")]
    assert stored[1]["content"] == EXPECTED
    assert events[-1].json()["message"] == stored[1]
    assert stored[1]["usage"]["completion_tokens"] == N
    # a non-stream request gives the same answer for the same prompt elsewhere
    other = await gw.new_thread()
    status, answer = await gw.post(other, backend.body())
    assert status == 200 and answer["message"]["content"] == EXPECTED
    assert backend.calls == 2


async def test_upstream_failure_is_an_error_event_and_a_stored_error(backend: Backend) -> None:
    gw = backend.gw
    async with gw.open_stream(backend.tid, backend.body("fail")) as resp:
        events = await collect(resp)
    assert [e.event for e in events] == ["meta", "error"]
    error = events[-1].json()["error"]
    assert error["type"] == "upstream_error" and error["retryable"] is True
    stored = (await gw.thread(backend.tid))["messages"][-1]
    assert stored["status"] == "error" and stored["content"] == ""
    assert stored["meta"]["error"]["type"] == "upstream_error"
    other = await gw.new_thread()
    status, answer = await gw.post(other, backend.body("fail"))
    assert status == 502 and answer["error"]["type"] == "upstream_error"


async def test_a_cut_stream_ends_in_error_and_keeps_the_partial_text(backend: Backend) -> None:
    gw = backend.gw
    async with gw.open_stream(backend.tid, backend.body("cut", at=3)) as resp:
        events = await collect(resp)
    partial = "".join(mock_answer(PROMPT, N)[:3])
    assert [e.event for e in events] == ["meta", "delta", "delta", "delta", "error"]
    assert text_of(events) == partial
    assert events[-1].json()["error"]["type"] == "upstream_error"
    stored = (await gw.thread(backend.tid))["messages"][-1]
    assert (stored["status"], stored["content"]) == ("error", partial)
    # the failed answer is not part of the conversation sent next time
    status, answer = await gw.post(backend.tid, backend.body(content="again"))
    assert status == 200 and answer["message"]["status"] == "complete"
    if backend.name != "mock":
        assert backend.fake.calls[-1].messages[-1] == {"role": "user", "content": "again"}
        assert all(m["content"] != partial for m in backend.fake.calls[-1].messages)


async def test_fifty_identical_requests_make_one_upstream_call(backend: Backend) -> None:
    gw = backend.gw
    body = backend.body("idle")  # the fakes hold the first token until everyone has joined
    if backend.name == "mock":
        body = backend.body("ok")
    streams = [await backend.stream(body) for _ in range(25)]
    posts = [asyncio.create_task(gw.post(backend.tid, body)) for _ in range(25)]
    if backend.name != "mock":
        call = await backend.fake.next_call()
        await backend.listeners(50)
        call.release()
    results = await within(asyncio.gather(*posts), 20, "25 JSON answers")
    for s in streams:
        await s.finish()
    assert backend.calls == 1
    assert {s.text for s in streams} == {EXPECTED}
    assert {r["message"]["content"] for _, r in results} == {EXPECTED}
    roles = [s.events[0].json()["coalesce"] for s in streams] + [r["coalesce"] for _, r in results]
    assert roles.count("leader") == 1
    if backend.name != "mock":
        assert roles.count("follower") == 49  # all joined the running flight, none came late
    messages = (await gw.thread(backend.tid))["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]


@pytest.mark.parametrize("phase", ["idle", "mid_stream"])
async def test_last_listener_leaving_aborts_the_upstream_call(
    backend: Backend, phase: str, record_property: Any
) -> None:
    gw = backend.gw
    first_token = mock_answer(PROMPT, 1)[0]
    body = backend.body("idle" if phase == "idle" else "stall", at=1)
    a, b = await backend.stream(body), await backend.stream(body)
    await backend.listeners(2)
    call = await backend.fake.next_call() if backend.name != "mock" else None
    if phase == "mid_stream":
        await b.until(lambda evs: text_of(evs) == first_token, "the first delta")
    a.leave()
    await backend.listeners(1)
    left = time.perf_counter()
    b.leave()
    if call is None:
        mock = gw.app[PROVIDERS].get("mock")
        assert isinstance(mock, MockProvider)
        await wait_until(lambda: mock.open_streams == 0, "the mock's stream to close")
    else:
        await within(call.connection.closed.wait(), 5, "the fake to see its connection close")
        assert call.connection.closed_at is not None
        elapsed = call.connection.closed_at - left
        record_property("upstream_close_ms", round(elapsed * 1000, 1))
        print(f"{backend.name} {phase}: upstream connection closed {elapsed * 1000:.1f} ms after the last "
              "listener left")
        assert elapsed < 1.0, f"the upstream connection closed {elapsed * 1000:.0f} ms after the last listener left"
        await within(call.ended.wait(), 5, "the fake's handler to end")
        assert call.outcome == "client_closed"
    stored = await wait_status(gw, backend.tid, "cancelled")
    assert stored["content"] == ("" if phase == "idle" else first_token)
    assert backend.calls == 1


async def test_leaving_before_the_response_headers_closes_the_connection(
    http_backend: Backend, record_property: Any
) -> None:
    b = http_backend
    model = f"{b.name}-no-headers"
    b.fake.script(Script(hold_headers=True), model=model)
    s = await b.stream({"content": PROMPT, "provider": b.name, "model": model})
    call = await b.fake.next_call()
    await within(call.paused.wait(), 5, "the fake to hold its headers")
    left = time.perf_counter()
    s.leave()
    await within(call.connection.closed.wait(), 5, "the fake to see its connection close")
    assert call.connection.closed_at is not None
    elapsed = call.connection.closed_at - left
    record_property("upstream_close_ms", round(elapsed * 1000, 1))
    print(f"{b.name} before headers: upstream connection closed {elapsed * 1000:.1f} ms after the listener left")
    assert elapsed < 1.0, f"closed {elapsed * 1000:.0f} ms after the listener left"
    await wait_status(b.gw, b.tid, "cancelled")


async def test_upstream_keeps_streaming_while_one_of_three_listeners_remains(http_backend: Backend) -> None:
    b = http_backend
    body = b.body("stall", at=2)
    streams = [await b.stream(body) for _ in range(3)]
    call = await b.fake.next_call()
    await b.listeners(3)
    for s in streams:
        await s.until(lambda evs: sum(e.event == "delta" for e in evs) == 2, "two deltas")
    streams[0].leave()
    streams[1].leave()
    await b.listeners(1)
    # Three cancel graces later nothing may have been aborted; the stream below must then
    # also end complete, which a late abort would break.
    await asyncio.sleep(b.gw.settings.cancel_grace_s * 3)
    assert not call.ended.is_set() and call.connection.closed_at is None
    call.release()
    events = await streams[2].finish()
    assert text_of(events) == EXPECTED and events[-1].event == "done"
    assert call.outcome == "complete"
    stored = (await b.gw.thread(b.tid))["messages"][-1]
    assert (stored["status"], stored["content"]) == ("complete", EXPECTED)


async def test_the_thread_history_is_sent_upstream(http_backend: Backend) -> None:
    b = http_backend
    gw = b.gw
    status, first = await gw.post(b.tid, b.body(content="first question"))
    assert status == 200
    status, _ = await gw.post(b.tid, b.body("fail", content="this one fails"))
    assert status == 502
    status, _ = await gw.post(b.tid, b.body(content="second question"))
    assert status == 200
    assert b.fake.calls[-1].messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first["message"]["content"]},
        {"role": "user", "content": "second question"},
    ]


@pytest.mark.parametrize(("status", "gateway_status", "kind"), [
    (400, 400, "invalid_request"), (404, 404, "model_not_found"), (413, 413, "payload_too_large"),
    (422, 400, "invalid_request"),
])
async def test_a_request_the_upstream_refuses_keeps_its_meaning(
    http_backend: Backend, status: int, gateway_status: int, kind: str
) -> None:
    b = http_backend
    model = f"{b.name}-refused-{status}"
    b.fake.script(Script(status=status, message="no such model, or a bad field"), model=model)
    body = {"content": PROMPT, "provider": b.name, "model": model}
    async with b.gw.session.post(f"{b.gw.url}/api/threads/{b.tid}/messages", headers=b.gw.h(), json=body) as resp:
        assert resp.status == gateway_status
        assert resp.headers.get("x-should-retry") == "false"  # the official SDKs then do not retry
        answer = await within(resp.json())
    assert answer["error"]["type"] == kind and answer["error"]["retryable"] is False
    assert "no such model, or a bad field" in answer["error"]["message"]
    async with b.gw.open_stream(await b.gw.new_thread(), body) as resp:
        events = await collect(resp)
    assert [e.event for e in events] == ["meta", "error"]
    assert (events[-1].json()["error"]["type"], events[-1].json()["error"]["retryable"]) == (kind, False)
    stored = (await b.gw.thread(b.tid))["messages"][-1]
    assert stored["status"] == "error" and stored["meta"]["error"]["type"] == kind
