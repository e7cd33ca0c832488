"""The SSE reader the tests and the tools share (tools/sse.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from tools.sse import EventDecoder, SseEvent, sse_events

from .helpers import within

WIRE = (b": ping\n\n"
        b"event: meta\ndata: {\"stream_id\": \"m1\"}\n\n"
        b"id: 1\r\nevent: delta\r\ndata: {\"text\": \"a\"}\r\n\r\n"
        b"id: 2\nevent: delta\ndata: line one\ndata: line two\nretry: 10\n\n"
        b"data:no-space\n\n"
        b"id: 3\nevent: done\ndata: [DONE]\n\n")
EXPECTED = [("meta", b'{"stream_id": "m1"}', None), ("delta", b'{"text": "a"}', 1),
            ("delta", b"line one\nline two", 2), ("message", b"no-space", None), ("done", b"[DONE]", 3)]


def triples(events: list[SseEvent]) -> list[tuple[str, bytes, int | None]]:
    return [(ev.event, ev.data, ev.id) for ev in events]


def test_fields_ids_comments_and_line_ends() -> None:
    events = EventDecoder().feed(WIRE, 12.5)
    assert triples(events) == EXPECTED
    assert {ev.at for ev in events} == {12.5}
    assert events[1].json() == {"text": "a"}


def test_events_split_across_chunks_at_any_byte() -> None:
    decoder = EventDecoder()
    events = [ev for i in range(len(WIRE)) for ev in decoder.feed(WIRE[i:i + 1])]
    assert triples(events) == EXPECTED


def test_an_unfinished_event_waits_for_its_blank_line() -> None:
    decoder = EventDecoder()
    assert decoder.feed(b"id: 7\nevent: delta\ndata: x\n") == []
    assert triples(decoder.feed(b"\n")) == [("delta", b"x", 7)]


async def test_events_are_read_as_they_arrive_and_stamped() -> None:
    """The second event is only sent once the reader has yielded the first."""
    first_read = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"id: 1\nevent: delta\ndata: {\"text\": \"a\"}\n\n")
        await within(first_read.wait(), what="the reader to take the first event")
        await resp.write(b"id: 2\nevent: done\ndata: {}\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/") as resp:
            events = sse_events(resp)
            before = time.monotonic()
            first = await within(anext(events), what="the first event")
            assert (first.event, first.id) == ("delta", 1) and before <= first.at <= time.monotonic()
            first_read.set()
            rest = await within(_all(events), what="the rest of the stream")
        assert [(ev.event, ev.id) for ev in rest] == [("done", 2)] and rest[0].at >= first.at
    finally:
        await runner.cleanup()


async def _all(events: AsyncIterator[SseEvent]) -> list[SseEvent]:
    return [ev async for ev in events]
