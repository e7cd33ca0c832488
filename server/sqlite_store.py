"""The embedded :class:`~server.store.Store`: SQLite through aiosqlite.

WAL mode; one writer connection guarded by a lock, so every write
transaction runs alone; one reader connection. Every query is scoped by
``org_id``: another org's thread is indistinguishable from a missing one.

A turn is written in one transaction: the user message and the assistant
message (status ``streaming``) together; the assistant row is then updated
once, when the flight ends. At start any row still ``streaming`` (the process
died mid-flight) becomes ``interrupted``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite
import orjson

from .states import MessageStatus
from .store import (
    MESSAGE_COLUMNS,
    ChatMessage,
    Message,
    StoredAnswer,
    StoreOpenError,
    Thread,
    conversation,
    message_from_row,
    new_id,
    now_iso,
)

__all__ = ["SQLiteStore"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS threads (
    thread_id  TEXT PRIMARY KEY,
    org_id     TEXT NOT NULL,
    title      TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS threads_by_org ON threads (org_id, created_at);
CREATE TABLE IF NOT EXISTS messages (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    thread_id  TEXT NOT NULL REFERENCES threads (thread_id) ON DELETE CASCADE,
    org_id     TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content    TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN
                   ('complete', 'streaming', 'cancelled', 'error', 'interrupted')),
    provider   TEXT,
    model      TEXT,
    created_at TEXT NOT NULL,
    usage      TEXT,
    meta       TEXT NOT NULL DEFAULT '{}',
    deltas     INTEGER NOT NULL DEFAULT 0  -- stream events the answer took (the done event's id - 1)
);
CREATE INDEX IF NOT EXISTS messages_by_thread ON messages (thread_id, seq);
"""

class SQLiteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Guards the writer connection: one write transaction at a time.
        self._write_lock = asyncio.Lock()

    @property
    def engine(self) -> str:
        return "sqlite"

    async def open(self) -> None:
        try:
            await self._open()
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StoreOpenError(f"DAC_DB: cannot use the SQLite file {self.path}: {exc}") from exc

    async def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._writer = await aiosqlite.connect(self.path, isolation_level=None)
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._writer.execute("PRAGMA synchronous=NORMAL")
        await self._writer.execute("PRAGMA foreign_keys=ON")
        await self._writer.execute("PRAGMA busy_timeout=5000")
        await self._writer.executescript(SCHEMA)
        await self._writer.execute(
            "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'"
        )
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=5000")

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RuntimeError("store is not open")
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The writer inside one transaction, alone: committed on exit, rolled back on any error."""
        async with self._write_lock:
            db = self._w
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    # -- threads -------------------------------------------------------------

    async def create_thread(self, org_id: str, title: str) -> Thread:
        thread: Thread = {"thread_id": new_id("thr"), "title": title, "created_at": now_iso()}
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO threads (thread_id, org_id, title, created_at) VALUES (?, ?, ?, ?)",
                (thread["thread_id"], org_id, title, thread["created_at"]),
            )
        return thread

    async def list_threads(self, org_id: str, *, limit: int = 200) -> list[Thread]:
        async with self._r.execute(
            "SELECT thread_id, title, created_at FROM threads WHERE org_id = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (org_id, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [{"thread_id": t, "title": title, "created_at": c} for t, title, c in rows]

    async def get_thread(self, org_id: str, thread_id: str) -> Thread | None:
        async with self._r.execute(
            "SELECT thread_id, title, created_at FROM threads WHERE org_id = ? AND thread_id = ?",
            (org_id, thread_id),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return {"thread_id": row[0], "title": row[1], "created_at": row[2]}

    async def delete_thread(self, org_id: str, thread_id: str) -> bool:
        async with self._transaction() as db:
            await db.execute("DELETE FROM messages WHERE org_id = ? AND thread_id = ?", (org_id, thread_id))
            cur = await db.execute("DELETE FROM threads WHERE org_id = ? AND thread_id = ?", (org_id, thread_id))
            return cur.rowcount > 0

    # -- messages ------------------------------------------------------------

    async def messages(self, org_id: str, thread_id: str) -> list[Message]:
        async with self._r.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE org_id = ? AND thread_id = ? ORDER BY seq",
            (org_id, thread_id),
        ) as cur:
            rows = await cur.fetchall()
        return [message_from_row(row) for row in rows]

    async def history(self, org_id: str, thread_id: str) -> list[ChatMessage]:
        return conversation(await self.messages(org_id, thread_id))

    async def get_message(self, org_id: str, message_id: str) -> Message | None:
        async with self._r.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE org_id = ? AND message_id = ?",
            (org_id, message_id),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else message_from_row(row)

    async def get_answer(self, org_id: str, message_id: str) -> StoredAnswer | None:
        """An assistant message, the id of the user message it answers, and its delta count."""
        async with self._r.execute(
            f"SELECT {MESSAGE_COLUMNS}, deltas, (SELECT u.message_id FROM messages u"
            " WHERE u.thread_id = m.thread_id AND u.seq < m.seq AND u.role = 'user'"
            " ORDER BY u.seq DESC LIMIT 1) FROM messages m"
            " WHERE m.org_id = ? AND m.message_id = ? AND m.role = 'assistant'",
            (org_id, message_id),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return StoredAnswer(message_from_row(row), row[11], int(row[10]))

    async def begin_turn(self, *, org_id: str, user: Message, assistant: Message) -> None:
        """Insert the user message and the ``streaming`` assistant message together."""
        thread_id = user["thread_id"]
        insert = (
            "INSERT INTO messages (message_id, thread_id, org_id, role, content, status, provider,"
            " model, created_at, usage, meta) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?"
            " WHERE EXISTS (SELECT 1 FROM threads WHERE thread_id = ? AND org_id = ?)"
        )
        rows = [
            (m["message_id"], thread_id, org_id, m["role"], m["content"], str(m["status"]), m["provider"],
             m["model"], m["created_at"], orjson.dumps(m["meta"]).decode(), thread_id, org_id)
            for m in (user, assistant)
        ]
        async with self._transaction() as db:
            inserted = 0
            for args in rows:
                cur = await db.execute(insert, args)
                inserted += cur.rowcount
            if inserted != 2:  # the thread is not this org's (or is gone): write nothing
                raise LookupError(thread_id)

    async def finish_turn(
        self,
        *,
        message_id: str,
        status: MessageStatus,
        content: str,
        usage: dict[str, Any] | None,
        meta: dict[str, Any],
        deltas: int = 0,
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE messages SET status = ?, content = ?, usage = ?, meta = ?, deltas = ? WHERE message_id = ?",
                (str(status), content, None if usage is None else orjson.dumps(usage).decode(),
                 orjson.dumps(meta).decode(), deltas, message_id),
            )

    async def count_messages(self, org_id: str, thread_id: str) -> int:
        async with self._r.execute(
            "SELECT COUNT(*) FROM messages WHERE org_id = ? AND thread_id = ?", (org_id, thread_id)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
