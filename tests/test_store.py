"""The Store's promises, checked on every engine: SQLite and PostgreSQL.

Each test runs once per engine (the ``engine`` fixture below), on a database of
its own: a temporary SQLite file, or a fresh PostgreSQL schema. The checks that
only make sense for one engine follow the suite (WAL here, migrations and the
pool in test_pg_store.py).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from server import sqlite_store
from server.app import build_store
from server.config import Settings
from server.sqlite_store import SCHEMA, SQLiteStore
from server.states import MessageStatus
from server.store import Message, Store, StoreClosed, StoreOpenError, conversation, draft_turn

from .engines import ENGINES
from .helpers import within

NewStore = Callable[[], Store]


async def begin(store: Store, *, org_id: str, thread_id: str, content: str = "x",
                meta: dict[str, Any] | None = None, owner: str | None = None) -> tuple[Message, Message]:
    """Draft a turn and write its two rows, as a flight does."""
    user, assistant = draft_turn(thread_id=thread_id, content=content, provider="mock", model="mock",
                                 meta=meta or {})
    await within(store.begin_turn(org_id=org_id, user=user, assistant=assistant, owner=owner), what="begin_turn")
    return user, assistant


async def finish(store: Store, assistant: Message, status: MessageStatus, content: str = "answer", *,
                 usage: dict[str, Any] | None = None, meta: dict[str, Any] | None = None, deltas: int = 0) -> None:
    await within(store.finish_turn(message_id=assistant["message_id"], status=status, content=content,
                                   usage=usage, meta=meta or {}, deltas=deltas), what="finish_turn")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_store(tmp_path: Path, database_url: str | None) -> NewStore:
    """Stores on the test's database, as the settings pick them, not yet opened:
    each one is what another process (or a restart) would see."""
    settings = Settings.from_env({}).with_(db_path=str(tmp_path / "sub" / "dac.db"), database_url=database_url)
    return lambda: build_store(settings)


@pytest.fixture
async def store(new_store: NewStore) -> AsyncIterator[Store]:
    s = new_store()
    await within(s.open(), what="the store to open")
    yield s
    await within(s.close(), what="the store to close")


async def test_each_engine_names_itself(store: Store, engine: str) -> None:
    assert store.engine == engine and store.is_open


async def test_turn_rows_are_written_together_and_scoped_by_org(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    user, assistant = await begin(store, org_id="org_a", thread_id=t["thread_id"], content="hi",
                                  meta={"reason": "r"})
    assert (user["role"], assistant["status"]) == ("user", "streaming")
    assert [m["status"] for m in await store.messages("org_a", t["thread_id"])] == ["complete", "streaming"]
    await finish(store, assistant, MessageStatus.COMPLETE, "hello", usage={"total_tokens": 3},
                 meta={"reason": "r", "citations": ["u"]})
    messages = await store.messages("org_a", t["thread_id"])
    assert [(m["role"], m["status"], m["content"]) for m in messages] == [
        ("user", "complete", "hi"), ("assistant", "complete", "hello")]
    assert messages[0] == user
    assert messages[1]["usage"] == {"total_tokens": 3}
    assert messages[1]["meta"]["citations"] == ["u"]
    assert await store.get_message("org_a", assistant["message_id"]) == messages[1]
    assert await store.messages("org_b", t["thread_id"]) == []
    assert await store.history("org_b", t["thread_id"]) == []
    assert await store.get_thread("org_b", t["thread_id"]) is None
    assert await store.get_message("org_b", assistant["message_id"]) is None
    assert await store.get_answer("org_b", assistant["message_id"]) is None
    assert await store.count_messages("org_b", t["thread_id"]) == 0


async def test_a_turn_on_a_foreign_or_missing_thread_writes_nothing(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    for org, thread in (("org_b", t["thread_id"]), ("org_a", "thr_missing")):
        user, assistant = draft_turn(thread_id=thread, content="x", provider="mock", model="mock", meta={})
        with pytest.raises(LookupError):
            await within(store.begin_turn(org_id=org, user=user, assistant=assistant))
        for reader in ("org_a", "org_b"):
            assert await store.get_message(reader, user["message_id"]) is None
            assert await store.get_message(reader, assistant["message_id"]) is None
            assert await store.count_messages(reader, thread) == 0


async def test_threads_are_listed_newest_first_per_org(store: Store) -> None:
    made = [await store.create_thread("org_a", f"t{i}") for i in range(5)]  # several share a millisecond
    await store.create_thread("org_b", "theirs")
    listed = await store.list_threads("org_a")
    assert listed == made[::-1]
    assert await store.list_threads("org_a", limit=2) == [made[4], made[3]]
    assert await store.get_thread("org_a", made[0]["thread_id"]) == made[0]
    assert [t["title"] for t in await store.list_threads("org_b")] == ["theirs"]
    assert await store.list_threads("org_c") == []


async def test_messages_come_oldest_first_and_history_keeps_only_completed_turns(store: Store) -> None:
    t = (await store.create_thread("org_a", "t"))["thread_id"]
    outcomes = [MessageStatus.COMPLETE, MessageStatus.ERROR, MessageStatus.CANCELLED, MessageStatus.INTERRUPTED,
                MessageStatus.COMPLETE]
    for i, status in enumerate(outcomes):
        _, assistant = await begin(store, org_id="org_a", thread_id=t, content=f"q{i}")
        await finish(store, assistant, status, f"a{i}")
    await begin(store, org_id="org_a", thread_id=t, content="q5")  # still streaming
    messages = await store.messages("org_a", t)
    assert [m["content"] for m in messages] == [x for i in range(5) for x in (f"q{i}", f"a{i}")] + ["q5", ""]
    assert await store.count_messages("org_a", t) == 12
    assert await store.history("org_a", t) == [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"}]


async def test_an_answer_names_its_question_and_its_stream_length(store: Store) -> None:
    t = (await store.create_thread("org_a", "t"))["thread_id"]
    first_user, first = await begin(store, org_id="org_a", thread_id=t, content="one")
    second_user, second = await begin(store, org_id="org_a", thread_id=t, content="two")
    await finish(store, first, MessageStatus.COMPLETE, "1", deltas=7)
    found = await store.get_answer("org_a", first["message_id"])
    assert found is not None
    assert (found.user_message_id, found.deltas, found.message["content"]) == (first_user["message_id"], 7, "1")
    found = await store.get_answer("org_a", second["message_id"])
    assert found is not None and found.user_message_id == second_user["message_id"]
    assert found.message["status"] == "streaming" and found.deltas == 0
    assert await store.get_answer("org_a", first_user["message_id"]) is None  # a question is not an answer


async def test_turns_written_at_once_on_one_thread_keep_their_rows_side_by_side(store: Store) -> None:
    t = (await store.create_thread("org_a", "t"))["thread_id"]
    turns = await within(asyncio.gather(*[begin(store, org_id="org_a", thread_id=t, content=f"q{i}")
                                          for i in range(20)]), what="20 turns at once")
    messages = await store.messages("org_a", t)
    pairs = [(messages[i]["message_id"], messages[i + 1]["message_id"]) for i in range(0, len(messages), 2)]
    assert sorted(pairs) == sorted((u["message_id"], a["message_id"]) for u, a in turns)
    for _, assistant in turns:
        found = await store.get_answer("org_a", assistant["message_id"])
        assert found is not None and found.message["content"] == ""


async def test_text_and_json_read_back_as_written(store: Store) -> None:
    t = await store.create_thread("org_a", "Ünïcødé ✓ 日本語")
    content = "emoji 🦜, quotes ' \" \\, newline\n" + "x" * 200_000
    meta = {"z": 1, "a": [1.5, None, True], "nested": {"k": "v"}, "reason": "r", "big": 2**53, "nul": "\u0000"}
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    _, assistant = await begin(store, org_id="org_a", thread_id=t["thread_id"], content=content, meta=meta)
    await finish(store, assistant, MessageStatus.COMPLETE, content[::-1], usage=usage, meta=meta, deltas=3)
    user, answer = await store.messages("org_a", t["thread_id"])
    assert (await store.get_thread("org_a", t["thread_id"])) == t
    assert user["content"] == content and answer["content"] == content[::-1]
    assert answer["meta"] == meta and list(answer["meta"]) == list(meta)  # key order too
    assert answer["usage"] == usage
    assert answer["created_at"] == assistant["created_at"]


async def test_a_nul_character_does_not_stop_a_turn(store: Store) -> None:
    t = (await store.create_thread("org_a", "t"))["thread_id"]
    _, assistant = await begin(store, org_id="org_a", thread_id=t, content="a\x00b")
    await finish(store, assistant, MessageStatus.COMPLETE, "c\x00d")
    user, answer = await store.messages("org_a", t)
    # SQLite keeps U+0000; PostgreSQL's text cannot, and keeps U+FFFD in its place
    assert user["content"] in ("a\x00b", "a\ufffdb")
    assert (answer["status"], answer["content"]) in (("complete", "c\x00d"), ("complete", "c\ufffdd"))


async def test_an_answer_whose_leader_vanished_is_interrupted_once_with_its_text(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    _, assistant = await begin(store, org_id="org_a", thread_id=t["thread_id"])
    marks = [store.interrupt_turn(message_id=assistant["message_id"], content="partial text", deltas=2)
             for _ in range(3)]  # every instance that saw the leader go tries at once
    assert sorted(await within(asyncio.gather(*marks), what="interrupt_turn")) == [False, False, True]
    message = await store.get_message("org_a", assistant["message_id"])
    assert message is not None and (message["status"], message["content"]) == ("interrupted", "partial text")
    _, finished = await begin(store, org_id="org_a", thread_id=t["thread_id"])
    await finish(store, finished, MessageStatus.COMPLETE, "whole answer")
    assert not await within(store.interrupt_turn(message_id=finished["message_id"], content="late"))
    message = await store.get_message("org_a", finished["message_id"])
    assert message is not None and (message["status"], message["content"]) == ("complete", "whole answer")


async def test_a_fenced_write_lands_only_on_its_owners_streaming_row(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    _, assistant = await begin(store, org_id="org_a", thread_id=t["thread_id"], owner="inst_a")
    message_id = assistant["message_id"]
    assert await within(store.checkpoint(message_id=message_id, content="so far", deltas=2, owner="inst_a"))
    # another instance's writes never land on it
    assert not await within(store.checkpoint(message_id=message_id, content="other", deltas=9, owner="inst_b"))
    assert not await within(store.finish_turn(message_id=message_id, status=MessageStatus.COMPLETE,
                                              content="other", usage=None, meta={}, owner="inst_b"))
    message = await store.get_message("org_a", message_id)
    assert message is not None and (message["status"], message["content"]) == ("streaming", "so far")
    # its owner was judged gone: the row is interrupted, and the stale owner's writes are refused
    assert await within(store.interrupt_turn(message_id=message_id, content=None))
    assert not await within(store.checkpoint(message_id=message_id, content="late", deltas=3, owner="inst_a"))
    assert not await within(store.finish_turn(message_id=message_id, status=MessageStatus.COMPLETE,
                                              content="so far and the end", usage=None, meta={}, owner="inst_a"))
    message = await store.get_message("org_a", message_id)
    assert message is not None and (message["status"], message["content"]) == ("interrupted", "so far")
    answer = await store.get_answer("org_a", message_id)
    assert answer is not None and answer.deltas == 2
    # its owner's own final write lands while the row is its streaming row
    _, other = await begin(store, org_id="org_a", thread_id=t["thread_id"], owner="inst_a")
    assert await within(store.finish_turn(message_id=other["message_id"], status=MessageStatus.COMPLETE,
                                          content="whole", usage=None, meta={}, owner="inst_a"))
    message = await store.get_message("org_a", other["message_id"])
    assert message is not None and (message["status"], message["content"]) == ("complete", "whole")
    # a deleted thread's row takes nothing, and that is no refusal
    _, gone = await begin(store, org_id="org_a", thread_id=t["thread_id"], owner="inst_a")
    assert await store.delete_thread("org_a", t["thread_id"])
    assert await within(store.checkpoint(message_id=gone["message_id"], content="x", deltas=1, owner="inst_a"))
    assert await within(store.finish_turn(message_id=gone["message_id"], status=MessageStatus.COMPLETE,
                                          content="x", usage=None, meta={}, owner="inst_a"))


async def test_streaming_rows_are_found_by_their_owner(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    u = await store.create_thread("org_b", "u")
    _, on_a = await begin(store, org_id="org_a", thread_id=t["thread_id"], owner="inst_a")
    _, on_b = await begin(store, org_id="org_b", thread_id=u["thread_id"], owner="inst_b")
    _, on_b2 = await begin(store, org_id="org_a", thread_id=t["thread_id"], owner="inst_b")
    _, single = await begin(store, org_id="org_a", thread_id=t["thread_id"])
    assert set(await store.streaming_owners()) == {"inst_a", "inst_b", None}
    assert await store.streaming_answers(["inst_b"]) == [on_b["message_id"], on_b2["message_id"]]
    assert await store.streaming_answers([None, "inst_a"]) == [on_a["message_id"], single["message_id"]]
    assert await store.streaming_answers(["inst_c"]) == []
    await finish(store, on_a, MessageStatus.COMPLETE)
    for row in (on_b, on_b2, single):
        await within(store.interrupt_turn(message_id=row["message_id"], content="cut", deltas=1))
    assert await store.streaming_owners() == []


async def test_restart_leaves_no_message_streaming(new_store: NewStore) -> None:
    first = new_store()
    await within(first.open())
    t = await first.create_thread("org_a", "t")
    _, done = await begin(first, org_id="org_a", thread_id=t["thread_id"])
    await finish(first, done, MessageStatus.COMPLETE)
    _, assistant = await begin(first, org_id="org_a", thread_id=t["thread_id"])
    await first.close()  # the process died mid-flight
    assert not first.is_open
    second = new_store()
    await within(second.open())
    try:
        statuses = [m["status"] for m in await second.messages("org_a", t["thread_id"])]
        assert statuses == ["complete", "complete", "complete", "interrupted"]
        message = await second.get_message("org_a", assistant["message_id"])
        assert message is not None and message["status"] == "interrupted"
    finally:
        await second.close()


async def test_two_stores_on_one_database_see_each_others_writes(
        store: Store, new_store: NewStore, tmp_path: Path, engine: str) -> None:
    if engine == "sqlite":  # several processes on one file: the store without its caches
        await store.close()
        store, other = SQLiteStore(str(tmp_path / "shared.db")), SQLiteStore(str(tmp_path / "shared.db"))
        await within(store.open())
    else:
        other = new_store()
    await within(other.open())
    try:
        t = await store.create_thread("org_a", "t")
        assert await other.list_threads("org_a") == [t]
        _, assistant = await begin(other, org_id="org_a", thread_id=t["thread_id"])
        await finish(store, assistant, MessageStatus.COMPLETE, "from the first")
        assert (await other.messages("org_a", t["thread_id"]))[1]["content"] == "from the first"
        assert await other.delete_thread("org_a", t["thread_id"])
        assert await store.get_thread("org_a", t["thread_id"]) is None
    finally:
        await other.close()
        if engine == "sqlite":
            await store.close()


async def test_the_single_instance_sqlite_store_answers_history_from_memory(tmp_path: Path) -> None:
    """The store a single instance builds keeps each thread's conversation in memory,
    coherent with its own writes: completed turns in the order they were written,
    whatever order they finished in; failed turns left out; a deleted thread forgotten.
    A thread made here is known to be empty: its first turn reads nothing from disk."""
    settings = Settings.from_env({}).with_(db_path=str(tmp_path / "one.db"))
    store = build_store(settings)
    assert isinstance(store, SQLiteStore) and store.cache
    await within(store.open())
    reads = 0
    read = store._completed_pairs

    async def counted(org_id: str, thread_id: str) -> list[tuple[int, str, str]]:
        nonlocal reads
        reads += 1
        return await read(org_id, thread_id)

    store._completed_pairs = counted  # type: ignore[method-assign]
    try:
        t = (await store.create_thread("org_a", "t"))["thread_id"]
        assert await store.history("org_a", t) == [] and reads == 0
        _, first = await begin(store, org_id="org_a", thread_id=t, content="q1")
        _, second = await begin(store, org_id="org_a", thread_id=t, content="q2")
        _, third = await begin(store, org_id="org_a", thread_id=t, content="q3")
        await finish(store, second, MessageStatus.COMPLETE, "a2")
        await finish(store, third, MessageStatus.ERROR, "half")
        await finish(store, first, MessageStatus.COMPLETE, "a1")
        expected = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
        assert await store.history("org_a", t) == expected
        assert reads == 0
        assert conversation(await store.messages("org_a", t)) == expected  # the rule both engines share
        assert await store.delete_thread("org_a", t)
        assert await store.history("org_a", t) == [] and reads == 1
        assert await store.get_thread("org_a", t) is None
    finally:
        await store.close()


def _per_thread_entries(store: SQLiteStore) -> list[tuple[str, tuple[str, str]]]:
    """Every entry the store holds per conversation: the keys (org, thread) of its maps."""
    return [(name, key) for name, value in vars(store).items() if isinstance(value, dict)
            for key in value if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)]


@pytest.mark.parametrize("cache", [True, False])
async def test_the_store_keeps_per_thread_state_only_as_long_as_the_history_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: bool) -> None:
    """What the store keeps per conversation is bounded like the history cache, however many
    threads have had turns, and a deleted thread leaves nothing behind."""
    monkeypatch.setattr(sqlite_store, "HISTORY_CACHE_THREADS", 4)
    store = SQLiteStore(str(tmp_path / "bounded.db"), cache=cache)
    await within(store.open())
    try:
        threads = [(await store.create_thread("org_a", f"t{i}"))["thread_id"] for i in range(12)]
        for i, thread in enumerate(threads):
            _, assistant = await begin(store, org_id="org_a", thread_id=thread, content=f"q{i}")
            await finish(store, assistant, MessageStatus.COMPLETE, f"a{i}")
            assert len(await store.history("org_a", thread)) == 2
            by_map: dict[str, int] = {}
            for name, _ in _per_thread_entries(store):
                by_map[name] = by_map.get(name, 0) + 1
            assert all(n <= 4 for n in by_map.values()), by_map
        for thread in threads:
            assert await store.delete_thread("org_a", thread)
            store.forget_thread("org_a", thread)  # as a deletion announced by another process is
        assert _per_thread_entries(store) == []
    finally:
        await store.close()


@asynccontextmanager
async def caching_store_and_another_writer(path: str) -> AsyncIterator[tuple[SQLiteStore, SQLiteStore, str]]:
    """A store that caches histories, another writer on its file, and a thread the second made
    (so it is not in the first's cache)."""
    store, other = SQLiteStore(path, cache=True), SQLiteStore(path, recover=False)
    await within(store.open())
    await within(other.open())
    try:
        yield store, other, (await other.create_thread("org_a", "made elsewhere"))["thread_id"]
    finally:
        await other.close()
        await store.close()


async def test_a_turn_that_ends_during_a_cold_history_read_is_not_missed(tmp_path: Path) -> None:
    """A history read from disk that a turn's end overtakes is not kept: the next read has the turn."""
    async with caching_store_and_another_writer(str(tmp_path / "cold.db")) as (store, _, thread):
        read, release = asyncio.Event(), asyncio.Event()
        real = store._completed_pairs

        async def overtaken(org_id: str, thread_id: str) -> list[tuple[int, str, str]]:
            pairs = await real(org_id, thread_id)
            read.set()
            await release.wait()
            return pairs

        store._completed_pairs = overtaken  # type: ignore[method-assign]
        reading = asyncio.ensure_future(store.history("org_a", thread))
        await within(read.wait(), what="the cold read")
        store._completed_pairs = real  # type: ignore[method-assign]
        _, assistant = await begin(store, org_id="org_a", thread_id=thread, content="q")
        await finish(store, assistant, MessageStatus.COMPLETE, "a")
        release.set()
        assert await within(reading, what="the overtaken read") == []  # read before the turn
        expected = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        assert await store.history("org_a", thread) == expected
        assert await store.history("org_a", thread) == expected


async def test_cold_history_reads_of_one_thread_at_once_count_its_characters_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests on a thread not in the cache read its history at once: it is kept once, and
    counted once against the cache's characters, so it stays cached."""
    async with caching_store_and_another_writer(str(tmp_path / "twice.db")) as (store, other, thread):
        _, assistant = await begin(other, org_id="org_a", thread_id=thread, content="q" * 100)
        await finish(other, assistant, MessageStatus.COMPLETE, "a" * 100)
        monkeypatch.setattr(sqlite_store, "HISTORY_CACHE_CHARS", 300)  # room for it once, not twice
        reads, both = 0, asyncio.Event()
        real = store._completed_pairs

        async def together(org_id: str, thread_id: str) -> list[tuple[int, str, str]]:
            nonlocal reads
            reads += 1
            if reads == 2:
                both.set()
            await both.wait()
            return await real(org_id, thread_id)

        store._completed_pairs = together  # type: ignore[method-assign]
        first, second = await within(asyncio.gather(store.history("org_a", thread),
                                                     store.history("org_a", thread)), what="both reads")
        assert first == second and len(first) == 2
        assert await store.history("org_a", thread) == first
        assert reads == 2  # the third came from the cache


async def test_deleting_a_thread_removes_its_messages(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    _, assistant = await begin(store, org_id="org_a", thread_id=t["thread_id"])
    assert not await store.delete_thread("org_b", t["thread_id"])
    assert await store.count_messages("org_a", t["thread_id"]) == 2
    assert await store.delete_thread("org_a", t["thread_id"])
    assert await store.count_messages("org_a", t["thread_id"]) == 0
    assert await store.get_message("org_a", assistant["message_id"]) is None
    assert await store.list_threads("org_a") == []
    assert not await store.delete_thread("org_a", t["thread_id"])
    with pytest.raises(LookupError):  # a turn on the deleted thread
        await begin(store, org_id="org_a", thread_id=t["thread_id"])


async def test_api_keys_are_found_by_hash_listed_per_org_and_revoked(store: Store, new_store: NewStore) -> None:
    one = await within(store.create_api_key(org_id="org_a", name="laptop", key_hash="a" * 64))
    two = await within(store.create_api_key(org_id="org_b", name="", key_hash="b" * 64))
    assert one["key_id"] != two["key_id"] and one["revoked_at"] is None
    assert await store.find_api_key("a" * 64) == one
    assert await store.find_api_key("c" * 64) is None
    assert await store.list_api_keys() == [one, two]
    assert await store.list_api_keys("org_b") == [two]
    assert await store.list_api_keys("org_c") == []
    # revoked by id or by hash; a revoked key is listed but never found again
    revoked = await within(store.revoke_api_key(key_id=one["key_id"], key_hash=""))
    assert revoked is not None and revoked["key_id"] == one["key_id"] and revoked["revoked_at"] is not None
    assert await store.find_api_key("a" * 64) is None
    assert await store.revoke_api_key(key_id=one["key_id"], key_hash="") is None
    assert await store.revoke_api_key(key_id="", key_hash="b" * 64) is not None
    assert await store.find_api_key("b" * 64) is None
    # another process (or a restart) sees the same keys
    other = new_store()
    await within(other.open())
    try:
        assert [k["revoked_at"] is not None for k in await other.list_api_keys()] == [True, True]
    finally:
        await within(other.close())


# -- SQLite only --------------------------------------------------------------


async def test_an_older_sqlite_file_gains_the_owner_column_at_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_schema = re.sub(r"\n    owner [^\n]*", "", SCHEMA).replace("DEFAULT 0,  --", "DEFAULT 0  --")
    assert "owner" not in old_schema
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO threads VALUES ('thr_1', 'org_a', 't', '2026-01-01T00:00:00.000Z')")
        db.execute("INSERT INTO messages (message_id, thread_id, org_id, role, content, status, created_at)"
                   " VALUES ('msg_1', 'thr_1', 'org_a', 'assistant', 'part', 'streaming', '2026-01-01T00:00:00.000Z')")
    store = SQLiteStore(str(path), recover=False)  # as a process sharing the file through Redis
    await within(store.open())
    try:
        assert await store.streaming_owners() == [None]
        assert await store.streaming_answers([None]) == ["msg_1"]
        _, assistant = await begin(store, org_id="org_a", thread_id="thr_1", owner="inst_a")
        assert await store.streaming_answers(["inst_a"]) == [assistant["message_id"]]
    finally:
        await store.close()


async def test_workers_opening_an_older_file_together_each_open_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    old_schema = re.sub(r"\n    owner [^\n]*", "", SCHEMA).replace("DEFAULT 0,  --", "DEFAULT 0  --")
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
    upgrade = sqlite_store.UPGRADE

    class AnotherWorkerFirst:
        """The other worker adds the column between this one's look and its ALTER."""

        def __iter__(self) -> Iterator[tuple[str, str]]:
            with sqlite3.connect(path) as other:
                for _, add in upgrade:
                    other.execute(add)
            return iter(upgrade)

    monkeypatch.setattr(sqlite_store, "UPGRADE", AnotherWorkerFirst())
    store = SQLiteStore(str(path), recover=False)
    await within(store.open())  # "duplicate column name: owner" was a failed start
    try:
        thread = await store.create_thread("org_a", "t")
        _, assistant = await begin(store, org_id="org_a", thread_id=thread["thread_id"], owner="inst_a")
        assert await store.streaming_answers(["inst_a"]) == [assistant["message_id"]]
    finally:
        await store.close()


async def test_sqlite_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "sub" / "dac.db"))
    await within(store.open())
    try:
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


async def test_workers_opening_a_new_file_together_each_open_it(tmp_path: Path) -> None:
    """Another process is mid-write on a file still in rollback-journal mode (as a worker
    creating the schema while its sibling starts): asking for WAL then fails at once with
    "database is locked", past the busy timeout. The open waits for the other and goes on."""
    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE other_worker (x)")
    other.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, other.execute, "COMMIT")
    store = SQLiteStore(str(path), recover=False)
    try:
        await within(store.open(), what="the open behind the other worker")
        thread = await within(store.create_thread("org_a", "t"))
        assert [t["thread_id"] for t in await within(store.list_threads("org_a"))] == [thread["thread_id"]]
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()
        other.close()


async def test_a_sqlite_file_locked_past_the_wait_names_dac_db(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "held.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE other_worker (x)")
    other.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(sqlite_store, "WAL_SWITCH_WAIT_S", 0.2)
    store = SQLiteStore(str(path), recover=False)
    try:
        with pytest.raises(StoreOpenError, match="DAC_DB: .*database is locked"):
            await within(store.open())
        assert not store.is_open
    finally:
        other.close()


async def test_sqlite_file_that_cannot_be_opened_names_dac_db(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the folder should be")
    store = SQLiteStore(str(tmp_path / "taken" / "dac.db"))
    with pytest.raises(StoreOpenError, match="DAC_DB"):
        await within(store.open())
    assert not store.is_open


async def test_group_commit_answers_each_caller_with_its_own_rows(tmp_path: Path) -> None:
    """Turns asked for at once share transactions, yet a turn on a foreign thread fails
    alone: its caller gets LookupError and its rows are not written; the others' are."""
    store = SQLiteStore(str(tmp_path / "group.db"), cache=True)
    await within(store.open())
    transactions = 0
    run = store._transaction

    def counted(ops: list[Any]) -> list[tuple[bool, Any]]:
        nonlocal transactions
        transactions += 1
        return run(ops)

    store._transaction = counted  # type: ignore[method-assign]
    try:
        mine = (await store.create_thread("org_a", "mine"))["thread_id"]
        theirs = (await store.create_thread("org_b", "theirs"))["thread_id"]
        transactions = 0
        turns = [draft_turn(thread_id=theirs if i % 5 == 0 else mine, content=f"q{i}", provider="mock",
                            model="mock", meta={}) for i in range(40)]
        results = await within(asyncio.gather(*[store.begin_turn(org_id="org_a", user=u, assistant=a)
                                                for u, a in turns], return_exceptions=True))
        assert transactions < len(turns) / 4  # grouped
        failed = [i for i, r in enumerate(results) if isinstance(r, LookupError)]
        assert failed == list(range(0, 40, 5)) and all(r is None for i, r in enumerate(results) if i % 5)
        stored = {m["content"] for m in await store.messages("org_a", mine) if m["role"] == "user"}
        assert stored == {f"q{i}" for i in range(40) if i % 5}
        assert await store.messages("org_b", theirs) == []
    finally:
        await store.close()


async def test_group_commit_a_turn_refused_at_its_second_row_keeps_neither_and_fails_alone(tmp_path: Path) -> None:
    """A turn's two rows are one statement: when its assistant row is refused (a trigger,
    as a constraint or a full page would), its user row is not kept either, though the
    turns beside it in the same transaction are; its caller alone gets the error."""
    store = SQLiteStore(str(tmp_path / "refused.db"), cache=True)
    await within(store.open())
    try:
        thread = (await store.create_thread("org_a", "t"))["thread_id"]
        with sqlite3.connect(store.path) as conn:
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.role = 'assistant'"
                         " AND NEW.meta LIKE '%refuse%' BEGIN SELECT RAISE(ABORT, 'refused'); END")
        turns = [draft_turn(thread_id=thread, content=f"q{i}", provider="mock", model="mock",
                            meta={"refuse": True} if i % 3 == 1 else {}) for i in range(9)]
        batches: list[int] = []
        run = store._transaction

        def counted(ops: list[Any]) -> list[tuple[bool, Any]]:
            batches.append(len(ops))
            return run(ops)

        store._transaction = counted  # type: ignore[method-assign]
        results = await within(asyncio.gather(*[store.begin_turn(org_id="org_a", user=u, assistant=a)
                                                for u, a in turns], return_exceptions=True))
        assert batches == [9]  # one transaction for them all
        refused = [i for i, r in enumerate(results) if isinstance(r, sqlite3.Error) and "refused" in str(r)]
        assert refused == [1, 4, 7] and all(r is None for i, r in enumerate(results) if i % 3 != 1), results
        stored = [(m["role"], m["content"]) for m in await store.messages("org_a", thread)]
        assert stored == [(role, text) for i in range(9) if i % 3 != 1
                          for role, text in (("user", f"q{i}"), ("assistant", ""))]
        for i, (_, assistant) in enumerate(turns):  # each kept turn is finished through its own row
            if i % 3 != 1:
                await finish(store, assistant, MessageStatus.COMPLETE, f"a{i}")
        assert await store.history("org_a", thread) == [
            {"role": role, "content": f"{p}{i}"} for i in range(9) if i % 3 != 1
            for role, p in (("user", "q"), ("assistant", "a"))]
    finally:
        await store.close()


def _hold_transactions(store: SQLiteStore) -> tuple[asyncio.Event, threading.Event]:
    """Make the store's writer thread wait, at the start of each transaction, until the
    returned gate opens; the event is set (on the loop) once a transaction waits there."""
    loop = asyncio.get_running_loop()
    entered, gate = asyncio.Event(), threading.Event()
    run = store._transaction

    def held(ops: list[Any]) -> list[tuple[bool, Any]]:
        loop.call_soon_threadsafe(entered.set)
        gate.wait(10)
        return run(ops)

    store._transaction = held  # type: ignore[method-assign]
    return entered, gate


async def test_writes_asked_for_before_close_are_kept_and_later_ones_refused(tmp_path: Path) -> None:
    """close() waits for the writes asked for before it began: they commit and stay. A
    write asked for once it has begun fails at once with StoreClosed."""
    path = str(tmp_path / "closing.db")
    store = SQLiteStore(path, cache=True)
    await within(store.open())
    entered, gate = _hold_transactions(store)
    first = asyncio.ensure_future(store.create_thread("org_a", "on the writer thread"))
    await within(entered.wait(), what="the first write on the writer thread")
    queued = asyncio.ensure_future(store.create_thread("org_a", "queued behind it"))
    await asyncio.sleep(0)  # asked for: it waits for the next transaction
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)  # the close has begun: it waits for those two
    with pytest.raises(StoreClosed):
        await within(store.create_thread("org_a", "too late"))
    gate.set()
    kept = await within(asyncio.gather(first, queued), what="the writes asked for before the close")
    await within(closing, what="the close")
    assert not store.is_open
    again = SQLiteStore(path)
    await within(again.open())
    try:
        assert sorted(t["thread_id"] for t in await again.list_threads("org_a")) == sorted(
            t["thread_id"] for t in kept)
    finally:
        await again.close()


async def test_two_closes_at_once_both_return_once_the_writes_are_kept(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "closing.db"), cache=True)
    await within(store.open())
    entered, gate = _hold_transactions(store)
    first = asyncio.ensure_future(store.create_thread("org_a", "on the writer thread"))
    await within(entered.wait(), what="the write on the writer thread")
    closes = [asyncio.ensure_future(store.close()) for _ in range(2)]
    await asyncio.sleep(0)  # both wait for the write
    gate.set()
    await within(first, what="the write asked for before the closes")
    await within(asyncio.gather(*closes), what="both closes")  # the first one used to wait for good
    assert not store.is_open


async def test_a_write_asked_for_while_the_connections_close_fails_with_store_closed(tmp_path: Path) -> None:
    """A write asked for after the drain, while the connections are being closed, fails with
    StoreClosed: it never runs on the writer thread against a connection already let go."""
    store = SQLiteStore(str(tmp_path / "closing.db"), cache=True)
    await within(store.open())
    entered, gate = _hold_transactions(store)
    reader = store._r
    close_reader = reader.close
    late: list[asyncio.Future[Any]] = []

    async def closed_with_a_write_asked_for_meanwhile() -> None:
        late.append(asyncio.ensure_future(store.create_thread("org_a", "late")))
        reached = asyncio.ensure_future(entered.wait())
        await within(asyncio.wait([late[0], reached], return_when=asyncio.FIRST_COMPLETED),
                     what="the late write to be refused or to reach the writer thread")
        reached.cancel()
        await close_reader()
        asyncio.get_running_loop().call_soon(gate.set)  # once close() let go of the writer's connection

    reader.close = closed_with_a_write_asked_for_meanwhile  # type: ignore[method-assign]
    await within(store.close(), what="the close")
    with pytest.raises(StoreClosed):
        await within(late[0], what="the late write")
    assert not store.is_open


async def test_checkpoints_pages_and_thread_counts(store: Store) -> None:
    """A checkpoint keeps the text of a streaming row and never touches an ended one;
    messages page newest first before a message; threads are counted per org."""
    thread = await store.create_thread("org_a", "t")
    await store.create_thread("org_b", "other")
    assert await store.count_threads("org_a") == 1 and await store.count_threads("org_c") == 0
    _, assistant = await begin(store, org_id="org_a", thread_id=thread["thread_id"], content="q0")
    await within(store.checkpoint(message_id=assistant["message_id"], content="par", deltas=3), what="checkpoint")
    found = await store.get_answer("org_a", assistant["message_id"])
    assert found is not None and found.message["content"] == "par" and found.deltas == 3
    assert found.message["status"] == MessageStatus.STREAMING
    await finish(store, assistant, MessageStatus.COMPLETE, "partial and whole", deltas=5)
    await within(store.checkpoint(message_id=assistant["message_id"], content="late", deltas=4), what="checkpoint")
    found = await store.get_answer("org_a", assistant["message_id"])
    assert found is not None and found.message["content"] == "partial and whole"
    assert store.writable and await store.check_writable()
    for i in range(1, 3):
        _, later = await begin(store, org_id="org_a", thread_id=thread["thread_id"], content=f"q{i}")
        await finish(store, later, MessageStatus.COMPLETE)
    everything = await store.messages("org_a", thread["thread_id"])
    page = await store.messages_before("org_a", thread["thread_id"], limit=4)
    assert page == everything[::-1][:4]
    older = await store.messages_before("org_a", thread["thread_id"], limit=4, before=page[-1]["message_id"])
    assert older == everything[::-1][4:]
    assert await store.messages_before("org_b", thread["thread_id"], limit=4) == []
    assert await store.messages_before("org_a", thread["thread_id"], limit=4, before="msg_nope") is None


def test_a_turn_the_history_cache_read_from_disk_is_not_added_again() -> None:
    """A cold history read that lands after a turn's commit, but before the store notes that
    turn in the cache, must not make the turn appear twice in what goes upstream."""
    from server.sqlite_store import _History

    history = _History([(1, "q1", "a1")])  # read from disk, the turn already committed
    history.add(1, "q1", "a1")  # then the turn's own note arrives
    history.add(3, "q2", "a2")
    assert history.conversation() == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


def test_ids_and_tokens_from_the_random_pool_differ_in_a_forked_worker() -> None:
    """Ids and tokens come from a pool of random bytes read 4 KiB at a time; a worker forked
    after the pool was read (``DAC_WORKERS``) must not hand out the parent's next bytes."""
    import os

    from server.store import new_id, random_bytes, random_token

    random_bytes(1)  # the parent has a pool now
    token = random_token(9)
    assert re.fullmatch(r"[A-Za-z0-9_-]{12}", token)
    assert re.fullmatch(r"msg_[0-9a-f]{32}", new_id("msg"))
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only writes and leaves
        os.write(write, random_bytes(64))
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(child, 0)
    theirs = os.read(read, 64)
    os.close(read)
    assert status == 0 and len(theirs) == 64
    assert theirs != random_bytes(64)
    assert len({random_token(9) for _ in range(1000)}) == 1000


def test_epoch_seconds_reads_any_stored_time_and_this_second_without_parsing() -> None:
    from datetime import datetime

    from server.store import epoch_seconds, iso_time, now_iso

    now = now_iso()
    assert epoch_seconds(now) == int(datetime.fromisoformat(now).timestamp())
    older = iso_time(datetime(2024, 2, 29, 23, 59, 59, 999_000).astimezone())
    assert epoch_seconds(older) == int(datetime.fromisoformat(older).timestamp())
