"""The Stop call: ``DELETE /api/streams/{id}?token=``, with no grace for the last listener."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from tools.sse import sse_events

from .helpers import ScriptedProvider, collect, registry, text_of, within

#: long enough that only the Stop call, not the grace or the attach timeout, can explain an abort
SLOW = {"cancel_grace_s": 30.0, "attach_timeout_s": 30.0}


def body(content: str = "stop me", **extra: Any) -> dict[str, Any]:
    return {"content": content, "provider": "scripted", "model": "scripted", **extra}


async def accepted(gw: Any, tid: str, content: str = "stop me") -> dict[str, Any]:
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", json=body(content, stream=True),
                               headers={**gw.h(), "Accept": "application/json"}) as resp:
        assert resp.status == 202, await resp.text()
        return await resp.json()


async def meta_of(resp: Any) -> dict[str, Any]:
    events = sse_events(resp)
    first = await within(events.__anext__(), 5, "the meta event")
    assert first.event == "meta"
    return first.json()


async def final_message(gw: Any, tid: str) -> dict[str, Any]:
    """The thread's answer once its flight has saved it (bounded poll)."""
    async def poll() -> dict[str, Any]:
        while True:  # the rows are written beside the upstream call: they may not exist yet
            messages = (await gw.thread(tid))["messages"]
            if messages and messages[-1]["status"] != "streaming":
                return messages[-1]
            await asyncio.sleep(0.01)

    return await within(poll(), 5, "the answer to be saved")


async def delete(gw: Any, url: str, org: str = "org_a") -> int:
    async with gw.session.delete(gw.url + url, headers=gw.h(org)) as resp:
        return resp.status


async def test_stop_of_the_last_listener_aborts_the_upstream_at_once(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), **SLOW)
    tid = await gw.new_thread()
    accept = await accepted(gw, tid)
    async with gw.session.get(gw.url + accept["stream_url"]) as stream:
        events = sse_events(stream)
        meta = (await within(events.__anext__(), 5, "the meta event")).json()
        call = await scripted.next_call()
        call.send("partial")
        assert (await within(events.__anext__(), 5, "the delta")).event == "delta"
        assert meta["stop_url"].startswith(f"/api/streams/{accept['stream_id']}?")
        assert await delete(gw, meta["stop_url"]) == 204
        await within(call.closed.wait(), 2, "the upstream to close (the grace is 30 s)")
        rest = await collect(stream)  # the stream ends where it is
    assert not [e for e in rest if e.event in ("done", "error")]
    message = await final_message(gw, tid)
    assert (message["status"], message["content"]) == ("cancelled", "partial")
    assert gw.metrics.registry.get_sample_value(
        "dac_cancels_total", {"provider": "scripted", "reason": "client_stop"}) == 1.0


async def test_stop_of_one_listener_only_detaches_it(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), **SLOW)
    tid = await gw.new_thread()
    async with gw.open_stream(tid, body()) as first, gw.open_stream(tid, body()) as second:
        stop_url = (await meta_of(first))["stop_url"]
        await meta_of(second)
        call = await scripted.next_call()
        assert await delete(gw, stop_url) == 204
        assert await delete(gw, stop_url) == 204  # saying it twice changes nothing
        await within(collect(first), 5, "the stopped stream to end")
        call.send("still ", "going")
        call.finish()
        events = await collect(second)
    assert text_of(events) == "still going" and events[-1].event == "done"
    assert len(scripted.calls) == 1
    assert (await final_message(gw, tid))["status"] == "complete"


async def test_stop_before_attaching_drops_the_promise_and_aborts(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), **SLOW)
    tid = await gw.new_thread()
    accept = await accepted(gw, tid)
    call = await scripted.next_call()
    assert await delete(gw, accept["stream_url"]) == 204
    await within(call.closed.wait(), 2, "the upstream to close (the attach timeout is 30 s)")
    assert (await final_message(gw, tid))["status"] == "cancelled"


async def test_stop_right_after_the_connection_closed_skips_the_grace(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), **SLOW)
    tid = await gw.new_thread()
    async with gw.open_stream(tid, body()) as stream:
        stop_url = (await meta_of(stream))["stop_url"]
        call = await scripted.next_call()
    # the client closed first (as a page closing its EventSource may); the Stop still counts
    async def gone() -> None:
        while (gw.metrics.registry.get_sample_value("dac_active_listeners") or 0) > 0:
            await asyncio.sleep(0.01)

    await within(gone(), 5, "the listener to leave")
    assert await delete(gw, stop_url) == 204
    await within(call.closed.wait(), 2, "the upstream to close (the grace is 30 s)")


async def test_a_stop_call_needs_a_token_of_that_stream_and_org(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), **SLOW)
    tid = await gw.new_thread()
    accept = await accepted(gw, tid)
    call = await scripted.next_call()
    stream_id = accept["stream_id"]
    assert await delete(gw, f"/api/streams/{stream_id}", org="org_b") == 404  # another org's key: not its answer
    assert await delete(gw, f"/api/streams/{stream_id}?org=org_a&token=guessed") == 404
    token = accept["stream_url"].partition("?token=")[2]
    org_b = base64.urlsafe_b64encode(b"org_b").rstrip(b"=").decode()
    moved = token.replace(base64.urlsafe_b64encode(b"org_a").rstrip(b"=").decode(), org_b)
    assert moved != token and await delete(gw, f"/api/streams/{stream_id}?token={moved}", org="org_b") == 404
    assert await delete(gw, f"/api/streams/msg_unknown?token={token}") == 404
    assert not call.closed.is_set()
    call.send("fine")
    call.finish()
    async with gw.session.get(gw.url + accept["stream_url"]) as stream:
        assert text_of(await collect(stream)) == "fine"


async def test_a_stop_with_the_orgs_key_and_no_token_ends_every_listener_and_aborts(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), **SLOW)
    tid = await gw.new_thread()
    accept = await accepted(gw, tid)  # a client promised the stream, not attached yet
    async with gw.open_stream(tid, body()) as first, gw.open_stream(tid, body()) as second:
        await meta_of(first)
        await meta_of(second)
        call = await scripted.next_call()
        call.send("partial")
        stream_id = accept["stream_id"]
        assert await delete(gw, f"/api/streams/{stream_id}", org="org_b") == 404
        assert await delete(gw, "/api/streams/msg_unknown") == 404
        assert not call.closed.is_set()
        assert await delete(gw, f"/api/streams/{stream_id}") == 204
        await within(call.closed.wait(), 2, "the upstream to close (the grace and attach timeout are 30 s)")
        for stream in (first, second):
            rest = await within(collect(stream), 5, "each stream to end")
            assert not [e for e in rest if e.event in ("done", "error")]
    assert len(scripted.calls) == 1
    message = await final_message(gw, tid)
    assert (message["status"], message["content"]) == ("cancelled", "partial")
    assert await delete(gw, f"/api/streams/{stream_id}") == 204  # stopped already: nothing changes


async def test_a_stop_with_the_orgs_key_of_an_answer_in_its_grace_aborts_at_once(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), **SLOW)
    tid = await gw.new_thread()
    async with gw.open_stream(tid, body()) as stream:
        stream_id = (await meta_of(stream))["stream_id"]
        call = await scripted.next_call()

    async def gone() -> None:  # the last listener closed: the answer waits out its 30 s grace
        while (gw.metrics.registry.get_sample_value("dac_active_listeners") or 0) > 0:
            await asyncio.sleep(0.01)

    await within(gone(), 5, "the listener to leave")
    assert not call.closed.is_set()
    assert await delete(gw, f"/api/streams/{stream_id}") == 204
    await within(call.closed.wait(), 2, "the upstream to close (the grace is 30 s)")
    assert (await final_message(gw, tid))["status"] == "cancelled"
