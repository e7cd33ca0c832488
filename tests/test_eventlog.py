"""The replay ring: absolute sequence numbers, encoded once, snapshots for laggards."""

from __future__ import annotations

import asyncio

import pytest

from server import eventlog
from server.eventlog import EventLog, encode_event
from tools.sse import EventDecoder

from .helpers import within


def parse(frames: list[bytes]) -> list[tuple[str, int | None, dict]]:
    return [(ev.event, ev.id, ev.json()) for ev in EventDecoder().feed(b"".join(frames))]


def test_encode_event_is_sse() -> None:
    assert encode_event("delta", {"text": "a\nb"}, 3) == b'id: 3\nevent: delta\ndata: {"text":"a\\nb"}\n\n'
    assert encode_event("error", {"x": 1}) == b'event: error\ndata: {"x":1}\n\n'


def test_replay_from_first_and_resume_after_n() -> None:
    log = EventLog(capacity=8)
    for t in ["a", "b", "c"]:
        log.append(t)
    frames, cursor, finished = log.read(1)
    assert [(e, i, d["text"]) for e, i, d in parse(frames)] == [("delta", 1, "a"), ("delta", 2, "b"), ("delta", 3, "c")]
    assert (cursor, finished) == (4, False)
    frames, cursor, _ = log.read(3)  # Last-Event-ID: 2
    assert [i for _, i, _ in parse(frames)] == [3]


def test_each_event_is_encoded_once_and_shared() -> None:
    log = EventLog(capacity=4)
    log.append("x")
    a, _, _ = log.read(1)
    b, _, _ = log.read(1)
    assert a[0] is b[0]  # the same bytes object for every subscriber


def test_a_reader_of_deltas_costs_no_sse_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1 frames deltas its own way: neither a delta's frame nor the final one is encoded
    unless a reader of frames asks, and then each once."""
    encoded: list[str | None] = []
    real = eventlog.encode_event

    def counting(event: str | None, data: object, id: int | None = None) -> bytes:
        encoded.append(event)
        return real(event, data, id)

    monkeypatch.setattr(eventlog, "encode_event", counting)
    log = EventLog(capacity=4)
    for t in "abc":
        log.append(t, {"reasoning": "r"} if t == "b" else None)
    log.close(lambda: counting("done", {"message": {}}, 4))
    deltas, _, finished = log.deltas(1)
    assert [d.text for d in deltas] == ["a", "b", "c"] and finished
    assert encoded == []
    frames, _, _ = log.read(2)
    assert parse(frames) == [("delta", 2, {"text": "b", "reasoning": "r"}), ("delta", 3, {"text": "c"}),
                             ("done", 4, {"message": {}})]
    again, _, _ = log.read(2)
    assert all(a is b for a, b in zip(again, frames, strict=True))
    assert encoded == ["delta", "delta", "done"]


def test_laggard_gets_snapshot_then_continues() -> None:
    log = EventLog(capacity=3)
    for t in "abcdef":
        log.append(t)
    assert log.first_seq == 4
    frames, cursor, _ = log.read(2)
    assert parse(frames) == [("snapshot", 6, {"text": "abcdef"})]
    assert cursor == 7
    log.append("g")
    frames, cursor, _ = log.read(cursor)
    assert parse(frames) == [("delta", 7, {"text": "g"})]


def test_close_ends_every_reader_and_refuses_appends() -> None:
    log = EventLog(capacity=4)
    log.append("a")
    log.close(encode_event("done", {"message": {}}, 2))
    frames, _, finished = log.read(1)
    assert finished and [e for e, _, _ in parse(frames)] == ["delta", "done"]
    frames, _, finished = log.read(5)  # resuming after done still gets done
    assert finished and [e for e, _, _ in parse(frames)] == ["done"]
    with pytest.raises(RuntimeError):
        log.append("late")


async def test_wait_wakes_every_waiter_on_append() -> None:
    log = EventLog(capacity=4)
    woke = 0

    async def waiter() -> None:
        nonlocal woke
        await log.wait(1)
        woke += 1

    tasks = [asyncio.create_task(waiter()) for _ in range(5)]
    await asyncio.sleep(0)
    assert woke == 0
    log.append("a")
    await within(asyncio.gather(*tasks), 2, "waiters to wake")
    assert woke == 5


async def test_cancelled_waiter_does_not_break_others() -> None:
    log = EventLog(capacity=4)
    doomed = asyncio.create_task(log.wait(1))
    other = asyncio.create_task(log.wait(1))
    await asyncio.sleep(0)
    doomed.cancel()
    log.append("a")
    await within(other, 2, "the surviving waiter")
    assert doomed.cancelled()


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventLog(capacity=0)


def test_texts_reads_every_delta_even_past_the_ring() -> None:
    log = EventLog(capacity=2)
    for t in "abcd":
        log.append(t)
    assert log.texts(1) == (["a", "b", "c", "d"], 5, False)  # no snapshot: all texts are kept
    assert log.texts(4) == (["d"], 5, False)
    assert log.texts(5) == ([], 5, False)
    log.close(encode_event("done", {}, 5))
    assert log.texts(5) == ([], 5, True)


def test_ring_grows_only_as_deltas_arrive_and_wraps_at_capacity() -> None:
    log = EventLog(capacity=4096)
    log.append("a")
    assert len(log._slots) == 1  # a short kept answer does not hold 4096 slots
    small = EventLog(capacity=3)
    for t in "abcde":
        small.append(t)
    assert len(small._slots) == 3
    frames, _, _ = small.read(3)
    assert [e[2]["text"] for e in parse(frames)] == ["c", "d", "e"]


def test_deltas_carry_reasoning_refusal_and_tool_calls_only_when_present() -> None:
    log = EventLog(capacity=8)
    log.append("", {"reasoning": "think", "refusal": "", "tool_calls": []})
    log.append("Hi")
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}
    log.append("", {"tool_calls": [call]})
    log.append("", {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}], "refusal": "no"})
    frames, _, _ = log.read(1)
    assert [d for _, _, d in parse(frames)] == [
        {"text": "", "reasoning": "think"},
        {"text": "Hi"},  # backward compatible: a plain delta is {"text"} alone
        {"text": "", "tool_calls": [call]},
        {"text": "", "tool_calls": [{"index": 0, "function": {"arguments": "}"}}], "refusal": "no"},
    ]
    deltas, cursor, finished = log.deltas(2)
    assert [(d.text, d.extra) for d in deltas] == [
        ("Hi", None), ("", {"tool_calls": [call]}),
        ("", {"refusal": "no", "tool_calls": [{"index": 0, "function": {"arguments": "}"}}]})]
    assert (cursor, finished) == (5, False)
    assert log.text() == "Hi"  # the answer text alone


def test_a_snapshot_covers_the_text_and_carries_everything_beside_it() -> None:
    log = EventLog(capacity=2)
    log.append("", {"reasoning": "a "})
    log.append("", {"reasoning": "b"})
    log.append("x", {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]})
    log.append("y", {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    log.append("z")
    frames, cursor, _ = log.read(1)
    assert parse(frames) == [("snapshot", 5, {
        "text": "xyz", "reasoning": "a b",
        "tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}},
                       {"index": 0, "function": {"arguments": "{}"}}]})]
    assert cursor == 6
    # /v1 readers never get a snapshot: every delta is kept with its extra
    assert [d.text for d in log.deltas(1)[0]] == ["", "", "x", "y", "z"]
