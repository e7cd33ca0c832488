"""The /api surface: threads, validation, org isolation, answer modes, cache and keys."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.appkeys import METRICS, SETTINGS
from server.config import Settings
from server.metrics import Metrics
from server.providers import MockProvider
from server.routes import api
from server.routes._http import error_middleware, open_event_stream

from .engines import on_every_engine
from .helpers import ManualClock, ScriptedProvider, collect, registry, within

FAST = "mock:ttft=0,itl=0,n=4"


@on_every_engine
async def test_thread_lifecycle_and_listing_newest_first(gateway) -> None:
    a = await gateway.new_thread(title="first")
    b = await gateway.new_thread(title="second")
    async with gateway.session.get(f"{gateway.url}/api/threads", headers=gateway.h()) as resp:
        listed = (await resp.json())["threads"]
    assert [t["thread_id"] for t in listed] == [b, a]
    assert listed[0]["title"] == "second"
    async with gateway.session.get(f"{gateway.url}/api/threads?limit=1", headers=gateway.h()) as resp:
        assert [t["thread_id"] for t in (await resp.json())["threads"]] == [b]
    for bad in ("0", "1001", "x"):
        async with gateway.session.get(f"{gateway.url}/api/threads?limit={bad}", headers=gateway.h()) as resp:
            assert resp.status == 400 and "limit" in (await resp.json())["error"]["message"]
    thread = await gateway.thread(a)
    assert thread["messages"] == [] and thread["title"] == "first"
    async with gateway.session.delete(f"{gateway.url}/api/threads/{a}", headers=gateway.h()) as resp:
        assert resp.status == 204
    async with gateway.session.get(f"{gateway.url}/api/threads/{a}", headers=gateway.h()) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found"
    async with gateway.session.delete(f"{gateway.url}/api/threads/{a}", headers=gateway.h()) as resp:
        assert resp.status == 404


async def test_thread_title_defaults_and_is_validated(gateway) -> None:
    async with gateway.session.post(f"{gateway.url}/api/threads", headers=gateway.h()) as resp:
        assert resp.status == 201
        assert (await resp.json())["title"] == "New thread"
    async with gateway.session.post(f"{gateway.url}/api/threads/", json={"title": 5},
                                    headers=gateway.h()) as resp:
        assert resp.status == 400
        assert "title" in (await resp.json())["error"]["message"]


@on_every_engine
async def test_orgs_see_only_their_own_threads(gateway) -> None:
    mine = await gateway.new_thread(org="org_a")
    async with gateway.session.get(f"{gateway.url}/api/threads/", headers=gateway.h("org_b")) as resp:
        assert (await resp.json())["threads"] == []
    for method in ("get", "delete"):
        async with gateway.session.request(method, f"{gateway.url}/api/threads/{mine}",
                                           headers=gateway.h("org_b")) as resp:
            assert resp.status == 404
    status, answer = await gateway.post(mine, {"content": "hi", "model": FAST}, org="org_b")
    assert status == 404 and answer["error"]["type"] == "not_found"
    assert (await gateway.thread(mine))["messages"] == []  # still there, untouched


async def _bad(gw: Any, tid: str, *, data: bytes | None = None, json: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    hdrs = gw.h() if headers is None else headers
    if data is not None and "Content-Type" not in hdrs:
        hdrs = {**hdrs, "Content-Type": "application/json"}
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", data=data, json=json,
                               headers=hdrs) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_bad_input_is_refused_before_the_provider_and_writes_nothing(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock), max_body_bytes=4096)
    tid = await gw.new_thread()
    cases = [
        ({"data": b"{not json"}, 400, "invalid_request", "not valid JSON"),
        ({"data": b"[1, 2]"}, 400, "invalid_request", "JSON object"),
        ({"json": {"role": "user"}}, 400, "invalid_request", "'content' is required"),
        ({"json": {"content": "   "}}, 400, "invalid_request", "'content' is required"),
        ({"json": {"content": 7}}, 400, "invalid_request", "'content' is required"),
        ({"json": {"content": "x", "role": "assistant"}}, 400, "invalid_request", "'role'"),
        ({"json": {"content": "x", "stream": "yes"}}, 400, "invalid_request", "'stream'"),
        ({"json": {"content": "x", "provider": "nope"}}, 400, "invalid_request", "unknown provider 'nope'"),
        ({"json": {"content": "x", "model": "mock:ttft=abc"}}, 400, "invalid_request", "bad mock option"),
        ({"json": {"content": "x", "model": "mock:speed=1"}}, 400, "invalid_request", "unknown mock option"),
        ({"json": {"content": "x"}, "headers": {}}, 401, "unauthorized", "x-org-id"),
        ({"json": {"content": "x"}, "headers": {"x-org-id": "bad org!"}}, 401, "unauthorized", "x-org-id"),
        ({"data": b'{"content": "' + b"x" * 5000 + b'"}'}, 413, "payload_too_large", "too large"),
        ({"data": b'{"content": "x"}', "headers": {"x-org-id": "org_a", "Content-Type": "text/plain"}}, 415,
         "unsupported_media_type", "application/json"),
    ]
    for kwargs, status, kind, text in cases:
        got_status, got = await _bad(gw, tid, **kwargs)
        assert (got_status, got["error"]["type"]) == (status, kind), (kwargs, got)
        assert text in got["error"]["message"], (text, got)
    got_status, got = await _bad(gw, "thr_missing", json={"content": "x", "model": FAST})
    assert got_status == 404
    assert mock.calls == 0
    assert await gw.store.count_messages("org_a", tid) == 0


async def test_unknown_route_and_method_answer_json(gateway) -> None:
    async with gateway.session.get(f"{gateway.url}/api/nothing-here") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"
    async with gateway.session.put(f"{gateway.url}/api/threads/", headers=gateway.h()) as resp:
        assert resp.status == 405 and (await resp.json())["error"]["type"] == "method_not_allowed"


@on_every_engine
async def test_same_prompt_twice_is_served_from_cache(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    tid = await gw.new_thread()
    payload = {"content": "What is DAC?", "model": FAST}
    s1, first = await gw.post(tid, payload)
    s2, second = await gw.post(tid, payload)
    assert (s1, s2) == (200, 200)
    assert (first["coalesce"], second["coalesce"]) == ("leader", "cache")
    assert second["message"] == first["message"]
    assert mock.calls == 1
    assert len((await gw.thread(tid))["messages"]) == 2
    # Cache-Control: no-cache asks again, and the thread gains the new turn
    s3, third = await gw.post(tid, payload, headers={"Cache-Control": "no-cache"})
    assert (s3, third["coalesce"], mock.calls) == (200, "leader", 2)
    assert len((await gw.thread(tid))["messages"]) == 4


async def test_cache_expires_after_the_result_ttl(gateway_factory) -> None:
    mock = MockProvider()
    clock = ManualClock()
    gw = await gateway_factory(providers=registry(mock), result_ttl_s=60, clock=clock)
    tid = await gw.new_thread()
    payload = {"content": "ttl", "model": FAST}
    await gw.post(tid, payload)
    clock.advance(59)
    _, within_ttl = await gw.post(tid, payload)
    assert within_ttl["coalesce"] == "cache"
    clock.advance(2)
    _, again = await gw.post(tid, payload)
    assert again["coalesce"] == "leader" and mock.calls == 2


async def test_tools_or_attachments_are_never_coalesced_nor_cached(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    tid = await gw.new_thread()
    for extra in ({"tools": [{"name": "x"}]}, {"attachments": [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}):
        payload = {"content": "side effects", "model": "mock:ttft=30,itl=0,n=2", **extra}
        results = await within(asyncio.gather(gw.post(tid, payload), gw.post(tid, payload)))
        assert [r["coalesce"] for _, r in results] == ["leader", "leader"]
    assert mock.calls == 4


async def test_idempotency_key_is_the_coalesce_key(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    tid = await gw.new_thread()
    key = {"Idempotency-Key": "retry-42"}
    _, first = await gw.post(tid, {"content": "one wording", "model": FAST}, headers=key)
    _, second = await gw.post(tid, {"content": "one wording", "model": FAST},
                              headers={**key, "Cache-Control": "no-cache"})
    assert second["coalesce"] == "leader"  # the key is the coalesce key: no-cache skips its finished result
    _, third = await gw.post(tid, {"content": "one wording", "model": FAST}, headers=key)
    assert third["coalesce"] == "cache" and third["message"] == second["message"] != first["message"]
    # the same key with another body or on another thread is another request: 422, nothing written
    for where, body in ((tid, {"content": "another wording", "model": FAST}),
                        (tid, {"content": "one wording", "model": FAST, "reason": "other"}),
                        (await gw.new_thread(), {"content": "one wording", "model": FAST})):
        status, refused = await gw.post(where, body, headers=key)
        assert status == 422 and refused["error"]["type"] == "idempotency_key_reused", refused
    assert len((await gw.thread(tid))["messages"]) == 4
    _, other_org = await gw.post(await gw.new_thread(org="org_b"), {"content": "one wording", "model": FAST},
                                 org="org_b", headers=key)
    assert other_org["coalesce"] == "leader"  # keys are per org
    assert mock.calls == 3


@on_every_engine
async def test_history_is_sent_upstream_without_failed_answers(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    payload = {"provider": "scripted", "model": "scripted"}
    first = asyncio.create_task(gw.post(tid, {**payload, "content": "first"}))
    call = await scripted.next_call()
    call.send("one")
    call.finish()
    await within(first)
    failing = asyncio.create_task(gw.post(tid, {**payload, "content": "second"}))
    call = await scripted.next_call()
    call.fail(RuntimeError("adapter bug"))
    status, answer = await within(failing)
    assert status == 502 and answer["error"]["type"] == "upstream_error"
    third = asyncio.create_task(gw.post(tid, {**payload, "content": "third"}))
    call = await scripted.next_call()
    assert call.request.messages == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "third"}]
    call.finish()
    await within(third)


async def test_group_commit_answers_each_caller_with_its_own_turn(gateway_factory, tmp_path) -> None:
    """Thirteen turns on three threads have their rows written in one transaction; one of
    them is refused by the database. Every other caller gets the answer to its own question
    with the ids of its own rows, which hold that question and that answer; the refused one
    gets the store's error and left no row, and its neighbours' rows are kept."""
    scripted = ScriptedProvider()
    db = str(tmp_path / "group.db")
    gw = await gateway_factory(providers=registry(scripted), db_path=db)
    threads = [await gw.new_thread() for _ in range(3)]
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.content = 'refuse me'"
                     " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    store = gw.store
    batches: list[int] = []
    run = store._transaction

    def counted(ops: list[Any]) -> list[tuple[bool, Any]]:
        batches.append(len(ops))
        return run(ops)

    store._transaction = counted
    gate = threading.Event()
    holding = asyncio.ensure_future(store._write(lambda _: gate.wait(5)))  # the writer is busy meanwhile
    questions = [(threads[i % 3], f"question {i}") for i in range(12)] + [(threads[1], "refuse me")]
    posts = [asyncio.create_task(gw.post(t, {"content": q, "provider": "scripted", "model": "scripted"}))
             for t, q in questions]
    calls = [await scripted.next_call() for _ in questions]  # every upstream call runs before its rows exist
    gate.set()
    await within(holding)
    for call in calls:
        call.send(f"answer to {call.request.messages[-1]['content']}")
        call.finish()
    answers = [await within(post) for post in posts]
    assert 13 in batches, batches  # the thirteen turns' rows: one transaction
    refused_status, refused = answers.pop()
    assert refused_status == 503 and refused["error"]["type"] == "store_error", refused
    for (thread, question), (status, body) in zip(questions, answers, strict=False):
        assert status == 200, body
        assert body["thread_id"] == thread and body["user_message"]["content"] == question
        assert body["message"]["content"] == f"answer to {question}"
    for thread in threads:
        stored = {(m["message_id"], m["role"], m["content"]) for m in (await gw.thread(thread))["messages"]}
        expected = set()
        for (t, _), (_, body) in zip(questions, answers, strict=False):
            if t == thread:
                user, answer = body["user_message"], body["message"]
                expected |= {(user["message_id"], "user", user["content"]),
                             (answer["message_id"], "assistant", answer["content"])}
        assert stored == expected


async def test_stream_error_before_rows_is_plain_json(gateway) -> None:
    tid = await gateway.new_thread()
    async with gateway.session.delete(f"{gateway.url}/api/threads/{tid}", headers=gateway.h()):
        pass
    async with gateway.open_stream(tid, {"content": "x", "model": FAST}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found"


async def test_health_and_readiness(gateway) -> None:
    for path in ("/healthz", "/readyz"):
        async with gateway.session.get(gateway.url + path) as resp:
            assert resp.status == 200


@on_every_engine
async def test_sse_stream_done_matches_stored_message(gateway) -> None:
    tid = await gateway.new_thread()
    async with gateway.open_stream(tid, {"content": "store me", "model": FAST}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await collect(resp)
    stored = (await gateway.thread(tid))["messages"][-1]
    assert events[-1].json()["message"] == stored
    assert events[0].json()["user_message_id"] == (await gateway.thread(tid))["messages"][0]["message_id"]


async def test_idle_stream_gets_keepalive_comments(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), ping_interval_s=0.05)
    tid = await gw.new_thread()
    async with gw.open_stream(tid, {"content": "slow", "provider": "scripted", "model": "scripted"}) as resp:
        call = await scripted.next_call()
        seen = b""
        while b": ping" not in seen:
            seen += await within(resp.content.readline(), 5, "a keep-alive comment")
        call.finish()
        rest = await within(resp.content.read(), 5, "the end of the stream")
    assert b"event: done" in rest


async def test_an_unexpected_failure_is_a_json_500(gateway, monkeypatch) -> None:
    async def broken(*_: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gateway.store, "list_threads", broken)
    async with gateway.session.get(f"{gateway.url}/api/threads/", headers=gateway.h()) as resp:
        assert resp.status == 500
        body = await resp.json()
    assert body["error"]["type"] == "internal_error"
    assert "disk on fire" not in body["error"]["message"]  # internals stay in the log


async def test_an_error_before_a_stream_starts_is_a_json_500_and_one_after_closes_the_stream(
        aiohttp_client: Any) -> None:
    """The error middleware renders what fails before a streamed response has started; once
    it has, the failure goes through to aiohttp, which closes the connection mid-stream."""
    async def before(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("before the stream")

    async def after(request: web.Request) -> web.StreamResponse:
        out = await open_event_stream(request)
        await out.write(b"data: 1\n\n")
        raise RuntimeError("after the stream started")

    metrics = Metrics()
    app = web.Application(middlewares=[error_middleware(api.error_response, metrics=metrics)])
    app[SETTINGS] = Settings.from_env()
    app[METRICS] = metrics
    app.router.add_get("/before", before)
    app.router.add_get("/after", after)
    client = await aiohttp_client(app)
    resp = await within(client.get("/before"))
    assert resp.status == 500
    assert (await resp.json())["error"]["message"].startswith("internal server error")
    resp = await within(client.get("/after"))
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await within(resp.read())
