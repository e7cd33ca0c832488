"""Frames pushed from the log to subscribers at the live edge, and the fall-back to a cursor."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from server import eventlog
from server.eventlog import PASS_STEP, PING, EventLog, encode_event
from server.routes import _http

from .helpers import ScriptedProvider, collect, registry, slow_reader, text_of, within


class FakeSink:
    """A transport that takes everything until the test pauses it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.pushes = 0
        self.paused = False

    def push(self, data: bytes) -> bool:
        if self.paused:
            return False
        self.data += data
        self.pushes += 1
        return True

    def events(self) -> list[tuple[str, int | None, str]]:
        """(event, id, data) of every frame written, pings as ("ping", None, "")."""
        out = []
        for block in bytes(self.data).split(b"\n\n")[:-1]:
            if block == PING.rstrip(b"\n"):
                out.append(("ping", None, ""))
                continue
            fields = dict(line.split(": ", 1) for line in block.decode().split("\n"))
            out.append((fields["event"], int(fields["id"]) if "id" in fields else None, fields["data"]))
        return out


def delta(seq: int, text: str) -> tuple[str, int, str]:
    return ("delta", seq, f'{{"text":"{text}"}}')


async def test_a_pushed_subscriber_gets_every_frame_once_in_order_batched_per_loop_turn() -> None:
    log = EventLog(capacity=8)
    sink = FakeSink()
    ended = log.subscribe(sink, 1)
    log.append("a")
    log.append("b")  # same loop turn: one write
    await asyncio.sleep(0)
    assert sink.pushes == 1 and sink.events() == [delta(1, "a"), delta(2, "b")]
    log.append("c")
    await asyncio.sleep(0)
    log.close(encode_event("done", {}, 4))
    assert await within(ended, 1, "the subscription to end") is None
    assert sink.events() == [delta(1, "a"), delta(2, "b"), delta(3, "c"), ("done", 4, "{}")]


async def test_a_paused_sink_falls_back_to_its_cursor_and_the_log_keeps_nothing_for_it() -> None:
    log = EventLog(capacity=8)
    sink = FakeSink()
    ended = log.subscribe(sink, 1)
    log.append("a")
    await asyncio.sleep(0)
    sink.paused = True
    log.append("b")
    log.append("c")
    await asyncio.sleep(0)
    assert await within(ended, 1, "the fall-back") == 2  # b was not written: replay from 2
    assert sink.events() == [delta(1, "a")]
    assert not log._pushed  # no queue of frames kept for it
    # the subscriber catches up by cursor, then is pushed to again
    sink.paused = False
    frames, cursor, finished = log.read(2)
    assert sink.push(b"".join(frames)) and (cursor, finished) == (4, False)
    ended = log.subscribe(sink, cursor)
    log.append("d")
    await asyncio.sleep(0)
    log.close(encode_event("done", {}, 5))
    assert await within(ended, 1, "the end") is None
    assert sink.events() == [delta(1, "a"), delta(2, "b"), delta(3, "c"), delta(4, "d"), ("done", 5, "{}")]


async def test_a_subscriber_joining_before_a_flush_is_not_written_what_it_read_itself() -> None:
    log = EventLog(capacity=8)
    first, second = FakeSink(), FakeSink()
    log.subscribe(first, 1)
    log.append("a")
    log.append("b")
    frames, cursor, _ = log.read(1)  # the newcomer replays a and b itself ...
    second.push(b"".join(frames))
    log.subscribe(second, cursor)  # ... and joins before the pending flush
    log.append("c")
    await asyncio.sleep(0)
    assert first.events() == second.events() == [delta(1, "a"), delta(2, "b"), delta(3, "c")]


async def test_a_sink_the_ring_left_behind_gets_a_snapshot() -> None:
    log = EventLog(capacity=2)
    sink = FakeSink()
    log.subscribe(sink, 1)
    for text in "abcd":  # four deltas in one loop turn: 1 and 2 leave the ring before the flush
        log.append(text)
    await asyncio.sleep(0)
    assert sink.events() == [("snapshot", 4, '{"text":"abcd"}')]


async def test_an_idle_log_pings_its_pushed_subscribers() -> None:
    log = EventLog(capacity=8, ping_interval_s=0.02)
    sink = FakeSink()
    log.subscribe(sink, 1)

    async def pinged() -> None:
        while ("ping", None, "") not in sink.events():
            await asyncio.sleep(0.01)

    await within(pinged(), 2, "a ping")
    log.close(encode_event("done", {}, 1))
    assert log._ping_handle is None  # no timer outlives the log


async def test_stop_ends_a_subscription_with_minus_one() -> None:
    log = EventLog(capacity=8)
    sink = FakeSink()
    ended = log.subscribe(sink, 1)
    assert log.stop(sink) and not log.stop(sink)
    assert await within(ended, 1, "the stop") == -1


async def test_a_long_pass_yields_and_its_later_sinks_get_what_was_appended_meanwhile() -> None:
    """A pass over more sinks than one step lets the loop run between steps: a delta
    appended meanwhile goes to the rest of the pass in the same write as the one before,
    and to the sinks already written by a pass that follows at once. Each sink gets every
    frame once, in order, whatever write carried it."""
    log = EventLog(capacity=8)
    sinks = [FakeSink() for _ in range(2 * PASS_STEP + 10)]
    ended = [log.subscribe(sink, 1) for sink in sinks]
    log.append("a")
    await asyncio.sleep(0)  # the first step of the pass: PASS_STEP sinks
    assert [bool(sink.pushes) for sink in sinks] == [True] * PASS_STEP + [False] * (PASS_STEP + 10)
    log.append("b")  # between two steps of the pass
    for _ in range(6):
        await asyncio.sleep(0)
    for sink in sinks:
        assert sink.events() == [delta(1, "a"), delta(2, "b")]
    assert [sink.pushes for sink in sinks] == [2] * PASS_STEP + [1] * (PASS_STEP + 10)
    log.close(encode_event("done", {}, 3))  # its pass's first step is written at once
    assert [sink.events()[-1][0] for sink in sinks] == ["done"] * PASS_STEP + ["delta"] * (PASS_STEP + 10)
    assert not any(end.done() for end in ended)  # no handler wakes up before the pass is over
    assert await within(asyncio.gather(*ended), 1, "every subscription to end") == [None] * len(sinks)
    for sink in sinks:
        assert sink.events() == [delta(1, "a"), delta(2, "b"), ("done", 3, "{}")]
    assert not log._pushed and not log._order


async def test_during_a_long_pass_a_paused_sink_falls_back_and_a_sink_that_left_is_written_nothing() -> None:
    log = EventLog(capacity=8)
    sinks = [FakeSink() for _ in range(PASS_STEP + 20)]
    ended = [log.subscribe(sink, 1) for sink in sinks]
    late, gone = sinks[PASS_STEP + 5], sinks[PASS_STEP + 6]
    log.append("a")
    await asyncio.sleep(0)  # the first step
    late.paused = True
    log.unsubscribe(gone)
    newcomer = FakeSink()
    joined = log.subscribe(newcomer, 1)  # joins the end of the pass under way
    log.append("b")
    log.close(encode_event("done", {}, 3))  # during the pass: it goes on, and one more follows
    assert await within(ended[PASS_STEP + 5], 1, "the paused sink's fall-back") == 1
    assert await within(joined, 1, "the newcomer's end") is None
    assert late.events() == [] and gone.events() == []
    assert newcomer.events() == [delta(1, "a"), delta(2, "b"), ("done", 3, "{}")]
    for i, sink in enumerate(sinks):
        if sink not in (late, gone):
            assert await within(ended[i], 1, "the end") is None
            assert sink.events() == [delta(1, "a"), delta(2, "b"), ("done", 3, "{}")]
    await within(_until(lambda: log._pass_next is None), 1, "the pass to end")
    assert not log._pushed and not log._order


async def test_a_final_pass_over_many_sinks_ends_every_one_of_them() -> None:
    """Most of the sinks are done after the first step of the final pass: the rest still
    get the final frame (the pass keeps its place in the order of the sinks)."""
    log = EventLog(capacity=8)
    sinks = [FakeSink() for _ in range(PASS_STEP + PASS_STEP // 2)]
    ended = [log.subscribe(sink, 1) for sink in sinks]
    log.append("a")
    log.close(encode_event("done", {}, 2))
    assert await within(asyncio.gather(*ended), 1, "every subscription to end") == [None] * len(sinks)
    assert all(sink.events() == [delta(1, "a"), ("done", 2, "{}")] for sink in sinks)


async def test_a_close_during_a_pass_ends_the_sinks_it_reached_even_when_the_others_all_leave() -> None:
    """The final frame reaches the later sinks in the pass under way; the earlier ones leave
    before the pass that would write it to them: the later ones' handlers still wake up."""
    log = EventLog(capacity=8, ping_interval_s=None)
    sinks = [FakeSink() for _ in range(PASS_STEP + 44)]
    ended = [log.subscribe(sink, 1) for sink in sinks]
    log.append("a")
    await asyncio.sleep(0)  # the first step: the first PASS_STEP sinks are written delta 1
    log.close(encode_event("done", {}, 2))  # during the pass: the later sinks get it in this pass
    await asyncio.sleep(0)  # the second step: the later sinks are written delta 1 and the end
    for sink in sinks[:PASS_STEP]:  # the clients the end has not reached leave first
        log.unsubscribe(sink)
    later = await within(asyncio.gather(*ended[PASS_STEP:]), 1, "the later subscriptions to end")
    assert later == [None] * 44
    assert all(sink.events() == [delta(1, "a"), ("done", 2, "{}")] for sink in sinks[PASS_STEP:])


async def test_the_subscriptions_the_end_reached_end_a_pass_step_a_loop_turn_after_the_last_pass() -> None:
    """Every sink is written the end in the last pass; their subscriptions then end PASS_STEP
    a loop turn, in the pass's order, so their handlers finish a step at a time."""
    log = EventLog(capacity=8, ping_interval_s=None)
    sinks = [FakeSink() for _ in range(2 * PASS_STEP + 10)]
    ended = [log.subscribe(sink, 1) for sink in sinks]
    log.close(encode_event("done", {}, 1))  # one pass of three steps
    ended_by_turn: list[list[bool]] = []
    written = []
    while len(ended_by_turn) < 20 and not all(f.done() for f in ended):
        await asyncio.sleep(0)
        ended_by_turn.append([f.done() for f in ended])
        written.append(all(sink.events() == [("done", 1, "{}")] for sink in sinks))
    turns = [(turn, all_written) for turn, all_written in zip(ended_by_turn, written, strict=True) if any(turn)]
    assert [turn for turn, _ in turns] == [[True] * n + [False] * (len(sinks) - n)
                                           for n in (PASS_STEP, 2 * PASS_STEP, len(sinks))]
    assert all(all_written for _, all_written in turns)  # none ended before the last pass was over
    assert await within(asyncio.gather(*ended), 1, "every subscription to end") == [None] * len(sinks)


async def test_subscribers_that_come_and_go_while_nothing_is_appended_leave_nothing_behind() -> None:
    log = EventLog(capacity=8)
    staying = FakeSink()
    log.subscribe(staying, 1)
    for _ in range(1000):  # clients that attach and leave while the upstream thinks
        sink = FakeSink()
        log.subscribe(sink, 1)
        log.unsubscribe(sink)
    assert len(log._order) <= 2 * 64 + 1 and list(log._pushed) == [staying]
    log.append("a")
    await asyncio.sleep(0)
    assert staying.events() == [delta(1, "a")]


# -- over real sockets ------------------------------------------------------------


@dataclass
class _Pushes:
    """What the pushes to subscribers met: how many fell back to awaited writes, and the
    largest transport buffer one found."""

    fell_back: int = 0
    biggest: int = 0


def _watch_pushes(monkeypatch: pytest.MonkeyPatch) -> _Pushes:
    """Watch every push, each subscriber's socket given a small kernel send buffer at its first
    (the transport's own buffer then fills soon when its client stops reading)."""
    pushes, shrunk, push = _Pushes(), set(), _http.SSEStream.push

    def watched(self: _http.SSEStream, data: bytes) -> bool:
        transport = self._transport
        assert transport is not None
        if id(transport) not in shrunk:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            shrunk.add(id(transport))
        pushes.biggest = max(pushes.biggest, transport.get_write_buffer_size())
        ok = push(self, data)
        pushes.fell_back += not ok
        return ok

    monkeypatch.setattr(_http.SSEStream, "push", watched)
    return pushes


async def test_a_client_that_stops_reading_is_dropped_and_never_buffers_without_bound(
        gateway_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscriber whose socket stops taking bytes falls back from push to awaited writes
    (its transport buffer stays under twice the high-water mark), is dropped
    after the send timeout, and the others get every delta in order."""
    pushes = _watch_pushes(monkeypatch)
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), send_timeout_s=0.5)
    tid = await gw.new_thread()
    body = {"content": "flood", "provider": "scripted", "model": "scripted"}
    dropped = {"reason": "slow_client"}
    async with gw.open_stream(tid, body) as fast:
        call = await scripted.next_call()
        payload = json.dumps(body)
        _, writer = await slow_reader(gw, f"POST /api/threads/{tid}/messages HTTP/1.1\r\nHost: x\r\n"
                                          f"x-org-id: org_a\r\nAccept: text/event-stream\r\n"
                                          f"Content-Type: application/json\r\n"
                                          f"Content-Length: {len(payload)}\r\n\r\n{payload}")
        await within(_until(lambda: (gw.metrics.registry.get_sample_value("dac_active_listeners") or 0) >= 2),
                     5, "the slow client to join")
        chunk, sent = "x" * 2000, 0
        reading = asyncio.create_task(collect(fast, timeout=30))  # the fast client reads all along
        while not pushes.fell_back and sent < 2000:
            call.send(chunk)
            sent += 1
            await asyncio.sleep(0.001)
        await within(_until(lambda: gw.metrics.registry.get_sample_value("dac_listeners_dropped_total",
                                                                          dropped) == 1.0),
                     5, "the slow client to be dropped")
        call.send("end")
        call.finish()
        events = await within(reading, 30, "the fast client's stream")
        writer.close()
    assert 0 < sent < 2000 and pushes.fell_back >= 1
    assert text_of(events) == chunk * sent + "end"
    assert [e.id for e in events if e.event == "delta"] == list(range(1, sent + 2))
    assert events[-1].event == "done"
    assert pushes.biggest <= 2 * _http.HIGH_WATER_BYTES
    assert len(scripted.calls) == 1 and call.yielded == sent + 1


async def test_a_stream_url_subscriber_that_stops_reading_is_dropped_released_and_logs_no_error(
        gateway_factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The stream of ``GET /api/streams`` runs after its handler has returned (where aiohttp
    ends the response): a subscriber that takes nothing is still dropped after the send
    timeout, counted as a slow client, no longer a listener, and its connection closes as
    a client's that left, with no error logged; its connection is closed then, even though it
    still reads nothing (a graceful close would wait for a peer that never drains, and hold
    the connection, its buffer and its place under the cap for good)."""
    caplog.set_level(logging.WARNING)
    pushes = _watch_pushes(monkeypatch)
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), send_timeout_s=0.5)
    tid = await gw.new_thread()
    status, accept = await gw.post(tid, {"content": "flood", "provider": "scripted", "model": "scripted",
                                         "stream": True})
    assert status == 202
    call = await scripted.next_call()
    guard = gw.runner.guard
    before = guard.open
    reader, writer = await slow_reader(gw, f"GET {accept['stream_url']} HTTP/1.1\r\nHost: x\r\n\r\n")
    listeners = gw.metrics.registry.get_sample_value
    await within(_until(lambda: (listeners("dac_active_listeners") or 0) >= 1), 5, "the subscriber to join")
    assert guard.open == before + 1
    sent = 0
    while not pushes.fell_back and sent < 2000:
        call.send("x" * 2000)
        sent += 1
        await asyncio.sleep(0.001)
    await within(_until(lambda: listeners("dac_listeners_dropped_total", {"reason": "slow_client"}) == 1.0),
                 5, "the slow subscriber to be dropped")
    await within(_until(lambda: listeners("dac_active_listeners") == 0), 5, "its listener released")
    assert 0 < sent < 2000
    try:
        await within(_until(lambda: guard.open == before), 5, "the dropped subscriber's connection to close")
    finally:
        reader.feed_eof()  # what it never read is of no interest
        writer.close()
        call.finish()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_real_subscribers_written_in_passes_of_several_steps_get_every_delta_once_in_order(
        gateway_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes of two sinks a step over real connections: deltas arrive while passes are under
    way, some in one loop turn, some between steps, and every subscriber's stream is whole."""
    monkeypatch.setattr(eventlog, "PASS_STEP", 2)
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    body = {"content": "passes", "provider": "scripted", "model": "scripted"}
    texts = [f"t{i} " for i in range(60)]
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(gw.open_stream(tid, body))
        call = await scripted.next_call()
        rest = [await stack.enter_async_context(gw.open_stream(tid, body)) for _ in range(4)]
        await within(_until(lambda: (gw.metrics.registry.get_sample_value("dac_active_listeners") or 0) >= 5),
                     5, "every subscriber to join")
        readers = [asyncio.create_task(collect(resp, timeout=30)) for resp in (first, *rest)]
        for i, text in enumerate(texts):
            call.send(text)
            if i % 3 == 2:
                await asyncio.sleep(0)
        call.finish()
        streams = await within(asyncio.gather(*readers), 30, "every subscriber's stream")
    assert len(scripted.calls) == 1
    for events in streams:
        assert [e.id for e in events if e.event == "delta"] == list(range(1, len(texts) + 1))
        assert text_of(events) == "".join(texts) and events[-1].event == "done"


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_subscriber_whose_handler_was_cancelled_does_not_break_the_others() -> None:
    """A client that leaves has its handler cancelled (and so its subscription's future)
    before it can unsubscribe: flushes, pings and the end go on for everyone else."""
    log = EventLog(capacity=8, ping_interval_s=0.01)
    gone, staying = FakeSink(), FakeSink()
    gone_ended = log.subscribe(gone, 1)
    ended = log.subscribe(staying, 1)
    gone_ended.cancel()  # in the same loop pass as the appends and the end
    log.append("a")
    log.close(encode_event("done", {}, 2))
    assert await within(ended, 1, "the end") is None
    assert staying.events() == [delta(1, "a"), ("done", 2, "{}")]
    assert not log._pushed and log._ping_handle is None


async def test_a_subscriber_ahead_of_the_log_is_written_nothing_before_its_cursor() -> None:
    """A subscriber resuming past the newest delta (a mirror that lags) waits for its cursor."""
    log = EventLog(capacity=16)
    for text in "abcdef":
        log.append(text)
    sink = FakeSink()
    log.subscribe(sink, 9)
    for text in "ghijk":  # deltas 7 to 11
        log.append(text)
        await asyncio.sleep(0)
    assert [seq for _, seq, _ in sink.events()] == [9, 10, 11]


