"""The SQLite store: WAL, turns in one transaction, org scoping, restart recovery."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from server.sqlite_store import SQLiteStore as Store
from server.states import MessageStatus
from server.store import Message, draft_turn


async def begin(store: Store, *, org_id: str, thread_id: str, content: str = "x",
                meta: dict[str, Any] | None = None) -> tuple[Message, Message]:
    """Draft a turn and write its two rows, as a flight does."""
    user, assistant = draft_turn(thread_id=thread_id, content=content, provider="mock", model="mock",
                                 meta=meta or {})
    await store.begin_turn(org_id=org_id, user=user, assistant=assistant)
    return user, assistant


@pytest.fixture
async def store(tmp_path: Path):
    s = Store(str(tmp_path / "sub" / "dac.db"))
    await s.open()
    yield s
    await s.close()


async def test_creates_its_folder_and_uses_wal(store: Store) -> None:
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_turn_rows_are_written_together_and_scoped_by_org(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    user, assistant = await begin(store, org_id="org_a", thread_id=t["thread_id"], content="hi",
                                  meta={"reason": "r"})
    assert (user["role"], assistant["status"]) == ("user", "streaming")
    await store.finish_turn(message_id=assistant["message_id"], status=MessageStatus.COMPLETE, content="hello",
                            usage={"total_tokens": 3}, meta={"reason": "r", "citations": ["u"]})
    messages = await store.messages("org_a", t["thread_id"])
    assert [(m["role"], m["status"], m["content"]) for m in messages] == [
        ("user", "complete", "hi"), ("assistant", "complete", "hello")]
    assert messages[1]["usage"] == {"total_tokens": 3}
    assert messages[1]["meta"]["citations"] == ["u"]
    assert await store.messages("org_b", t["thread_id"]) == []
    assert await store.get_thread("org_b", t["thread_id"]) is None
    assert await store.get_message("org_b", assistant["message_id"]) is None


async def test_a_turn_on_a_foreign_or_missing_thread_writes_nothing(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    for org, thread in (("org_b", t["thread_id"]), ("org_a", "thr_missing")):
        with pytest.raises(LookupError):
            await begin(store, org_id=org, thread_id=thread)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


async def test_restart_leaves_no_message_streaming(tmp_path: Path) -> None:
    path = str(tmp_path / "dac.db")
    first = Store(path)
    await first.open()
    t = await first.create_thread("org_a", "t")
    _, assistant = await begin(first, org_id="org_a", thread_id=t["thread_id"])
    await first.close()  # the process died mid-flight
    second = Store(path)
    await second.open()
    try:
        message = await second.get_message("org_a", assistant["message_id"])
        assert message is not None and message["status"] == "interrupted"
    finally:
        await second.close()


async def test_deleting_a_thread_removes_its_messages(store: Store) -> None:
    t = await store.create_thread("org_a", "t")
    await begin(store, org_id="org_a", thread_id=t["thread_id"])
    assert not await store.delete_thread("org_b", t["thread_id"])
    assert await store.delete_thread("org_a", t["thread_id"])
    assert await store.count_messages("org_a", t["thread_id"]) == 0
