"""The embedded :class:`~server.store.Store`: SQLite, one writer thread, group commit.

WAL mode, ``synchronous=NORMAL``. Reads go through one aiosqlite connection.
Writes go through one ``sqlite3`` connection on a thread of its own, with
**group commit**: every write asked for while the previous transaction was
committing joins the next one, so many turns' rows share one transaction and
one thread hop (the batch goes to the thread on a queue, and its outcome comes
back to the loop in one call). A write that fails (a foreign thread) undoes only its own rows and fails
only its own caller: a write of one statement is undone by SQLite itself (a
statement is atomic), a write of several runs inside its own savepoint. A
commit that fails fails every caller of that transaction, and nothing of it is
kept. A caller is answered once its transaction has committed: durable against
a crash of the process; with ``synchronous=NORMAL`` in WAL mode a power loss
may lose the last transactions, never corrupt the file.

With ``cache`` (for a process that is the only writer of its file, as the
single-instance default is), two caches kept coherent by the store's own
writes: the threads seen (``get_thread``) and the conversation of recent
threads (``history``; a thread made here starts with an empty one), so a
turn reads nothing from disk before its upstream call. Without it every read goes to the file, so several processes may share it. Every query is scoped by ``org_id``: another org's thread is
indistinguishable from a missing one.

A turn is written in one transaction: the user message and the assistant
message (status ``streaming``) together; the assistant row is then updated
once, when the flight ends. At start any row still ``streaming`` (the process
died mid-flight) becomes ``interrupted`` (``recover``: the file's only writer;
processes that share one file through Redis sweep by owner instead, see
:mod:`server.redis_sweep`).

The schema has no version table: tables and indexes are created if missing, and
a column added since (``messages.owner``) is added to an older file at open.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import aiosqlite
import orjson

from .states import MessageStatus
from .store import (
    MESSAGE_COLUMNS,
    ApiKey,
    ChatMessage,
    Message,
    StoreClosed,
    StoredAnswer,
    StoreOpenError,
    StoreUnwritable,
    Thread,
    message_from_row,
    new_id,
    now_iso,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")
#: threads remembered as existing (thread_id -> its org and row)
THREAD_CACHE_SIZE = 8192
#: threads whose conversation is kept in memory, least recently used dropped first (a thread
#: made here starts with an empty one). 8,192 kept about 2.5 MB more after 10,000 distinct
#: turns on fresh threads than 1,024 (``python -m tools.bench --sections 6``), past the
#: memory target, for turns that come back to a thread seconds later anyway
HISTORY_CACHE_THREADS = 1024
#: ... and at most this many characters of them in all
HISTORY_CACHE_CHARS = 1_000_000
#: what a readiness probe writes (and deletes) while the store is marked unwritable
PROBE_BYTES = 1024 * 1024

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
    -- (written out rather than as IN (...), which SQLite evaluates by building a temporary
    -- table for every row written; a file made before keeps its IN: the same rule)
    status     TEXT NOT NULL CHECK (status = 'complete' OR status = 'streaming' OR status = 'cancelled'
                                    OR status = 'error' OR status = 'interrupted'),
    provider   TEXT,
    model      TEXT,
    created_at TEXT NOT NULL,
    usage      TEXT,
    meta       TEXT NOT NULL DEFAULT '{}',
    deltas     INTEGER NOT NULL DEFAULT 0,  -- stream events the answer took (the done event's id - 1)
    owner      TEXT  -- the instance streaming the answer (NULL: a single writer's row)
);
CREATE INDEX IF NOT EXISTS messages_by_thread ON messages (thread_id, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,
    key_hash   TEXT NOT NULL UNIQUE,  -- hex sha256 of the key; the key itself is never stored
    org_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
"""

#: what an older file gains at open (a column added since, then what depends on it)
UPGRADE = (
    ("owner", "ALTER TABLE messages ADD COLUMN owner TEXT"),
)
AFTER_UPGRADE = "CREATE INDEX IF NOT EXISTS messages_streaming_owner ON messages (owner) WHERE status = 'streaming'"


#: how long an open waits for another process switching the same new file to WAL
WAL_SWITCH_WAIT_S = 5.0


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, waiting while another process switches the same file.

    SQLite answers "database is locked" at once, without its busy handler, to a connection
    that asks for WAL while another one is converting the file: workers that start together
    on a new file meet it. The others' switch is done within milliseconds, so try again."""
    deadline = time.monotonic() + WAL_SWITCH_WAIT_S
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class _History:
    """The completed turns of one thread, ordered by the user message's ``seq``."""

    __slots__ = ("chars", "pairs")

    def __init__(self, pairs: list[tuple[int, str, str]]) -> None:
        self.pairs = pairs  # (user seq, question, answer)
        self.chars = sum(len(q) + len(a) for _, q, a in pairs)

    def add(self, seq: int, question: str, answer: str) -> None:
        """Add a completed turn; one the cache has already (read from disk after its
        commit) is not added twice."""
        i = bisect.bisect_left(self.pairs, (seq,))
        if i < len(self.pairs) and self.pairs[i][0] == seq:
            return
        bisect.insort(self.pairs, (seq, question, answer))
        self.chars += len(question) + len(answer)

    def conversation(self) -> list[ChatMessage]:
        convo: list[ChatMessage] = []
        for _, question, answer in self.pairs:
            convo.append({"role": "user", "content": question})
            convo.append({"role": "assistant", "content": answer})
        return convo


#: a write: what it does on the writer's connection, whether that is one statement (atomic by
#: itself: no savepoint needed), and the future its caller awaits
_Write = tuple[Callable[[sqlite3.Connection], Any], bool, "asyncio.Future[Any]"]
#: what the writer thread hands back: (True, the result) or (False, the exception)
_Outcome = tuple[bool, Any]


class SQLiteStore:
    def __init__(self, path: str, *, cache: bool = False, recover: bool = True) -> None:
        self.path = path
        self.cache = cache
        #: mark rows left streaming as interrupted at open: the file's only writer (False: a tool
        #: beside a running server, or processes that sweep by owner through Redis)
        self.recover = recover
        self._reader: aiosqlite.Connection | None = None
        self._conn: sqlite3.Connection | None = None  # the writer: used on its thread only
        #: the writer thread and what it is handed: (what to run there, what to call on the
        #: loop with its outcome), or None to stop
        self._writer: threading.Thread | None = None
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[_Outcome], None]] | None] = (
            queue.SimpleQueue())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[_Write] = []  # the writes asked for since the batch with the thread
        self._busy = False  # a batch is with the writer thread
        self._drained: asyncio.Future[None] | None = None  # for close(): resolved once no batch is left
        self._close_task: asyncio.Future[None] | None = None  # close() began: no write is taken any more
        self._threads: OrderedDict[str, tuple[str, Thread]] = OrderedDict()
        self._histories: OrderedDict[tuple[str, str], _History] = OrderedDict()
        self._history_chars = 0  # characters held by ``_histories``
        #: the cold history reads under way, per thread: [how many, the writes to its history since
        #: the first began]; a read that a write overtook keeps nothing (it may have missed it)
        self._reading: dict[tuple[str, str], list[int]] = {}
        self._pending: dict[str, tuple[str, str, int, str]] = {}  # assistant id -> org, thread, user seq, question
        self._writable = True

    @property
    def engine(self) -> str:
        return "sqlite"

    async def open(self) -> None:
        try:
            await self._open()
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            if _unwritable(exc):
                raise StoreUnwritable(f"DAC_DB: cannot write the SQLite file {self.path}: {exc}") from exc
            raise StoreOpenError(f"DAC_DB: cannot use the SQLite file {self.path}: {exc}") from exc

    async def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._writer = threading.Thread(target=self._run_writer, name="dac-sqlite-writer", daemon=True)
        self._writer.start()
        self._conn = await self._call(self._connect)
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=5000")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            _switch_to_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            for column, add in UPGRADE:
                if column not in columns:
                    try:
                        conn.execute(add)
                    except sqlite3.OperationalError as exc:  # workers starting together: one adds it
                        if "duplicate column" not in str(exc):
                            raise
            conn.execute(AFTER_UPGRADE)
            if self.recover:
                conn.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Wait for the writes asked for so far, then close; a write asked for once this began
        fails with :class:`StoreClosed`. A closed store cannot be opened again. Callers that
        close it at the same time all return once it is closed."""
        if self._close_task is None:  # set by this call, not by the task's first step
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        if self._busy:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._reader is not None:
            await self._reader.close()
        conn, self._reader, self._conn = self._conn, None, None
        if conn is not None:
            await self._call(conn.close)
        if self._writer is not None:
            self._inbox.put(None)
            self._writer = None

    def _run_writer(self) -> None:
        """The writer thread: run what it is handed, one at a time, and hand each outcome back
        to the loop (one wake-up of the loop per batch)."""
        loop = self._loop
        assert loop is not None
        while (job := self._inbox.get()) is not None:
            run, then = job
            try:
                outcome: _Outcome = (True, run())
            except BaseException as exc:
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(then, outcome)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    async def _call(self, run: Callable[[], T]) -> T:
        """``run()`` on the writer thread, outside any batch's transaction."""
        if self._writer is None:
            raise StoreClosed("the store is not open")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def then(outcome: _Outcome) -> None:
            if done.cancelled():
                return
            ok, value = outcome
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)

        self._inbox.put((run, then))
        return await done

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreClosed("the store is not open")
        return self._reader

    # -- group commit ---------------------------------------------------------

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, one_statement: bool = False) -> T:
        """Run ``op`` on the writer thread inside the next transaction; its result once committed.

        ``one_statement``: ``op`` changes the database with one statement at most, and
        raises only before it or when it changed nothing; SQLite undoes a failed statement
        by itself, so it needs no savepoint of its own.
        A caller that leaves does not undo its write: the write is in the batch already,
        and only its answer is dropped. Once :meth:`close` began, :class:`StoreClosed`: the
        close waits only for the writes asked for before it.
        """
        if self._close_task is not None:
            raise StoreClosed("the store is closing")
        if self._conn is None or self._loop is None:
            raise StoreClosed("the store is not open")
        done: asyncio.Future[T] = self._loop.create_future()
        self._queue.append((op, one_statement, done))
        if not self._busy:
            self._busy = True
            self._loop.call_soon(self._hand_over)  # after this pass of the loop: what it adds joins
        return await done

    def _hand_over(self) -> None:
        """Give the writes asked for so far to the writer thread, as one transaction."""
        batch, self._queue = self._queue, []
        ops = [(op, single) for op, single, _ in batch]
        self._inbox.put((lambda: self._transaction(ops), lambda outcome: self._committed(batch, outcome)))

    def _committed(self, batch: list[_Write], outcome: _Outcome) -> None:
        """On the loop: answer each caller of a batch, then hand over the next one."""
        ok, value = outcome
        # the commit itself failed: nothing of the batch is kept, every caller fails
        results: list[_Outcome] = value if ok else [(False, value)] * len(batch)
        failures = [exc for done, exc in results if not done]
        if any(_unwritable(exc) for exc in failures):
            self._writable = False
        elif not failures:
            self._writable = True
        for (_, _, done), (written, result) in zip(batch, results, strict=True):
            if done.cancelled():
                continue
            if written:
                done.set_result(result)
            else:
                done.set_exception(result)
        if self._queue:
            self._hand_over()
            return
        self._busy = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _transaction(self, ops: list[tuple[Callable[[sqlite3.Connection], Any], bool]]) -> list[tuple[bool, Any]]:
        """On the writer thread: every op in one transaction; an op of several statements in
        its own savepoint (one of one statement is undone by SQLite when it fails)."""
        conn = self._conn
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op, one_statement in ops:
                if one_statement:
                    try:
                        results.append((True, op(conn)))
                    except Exception as exc:
                        if not conn.in_transaction:
                            raise  # SQLite undid the whole transaction (a full disk, say): every op failed
                        results.append((False, exc))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite undid the whole transaction (a full disk, say): every op of it failed
                    conn.execute("ROLLBACK TO op")
                    results.append((False, exc))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    @property
    def writable(self) -> bool:
        return self._writable

    async def check_writable(self) -> bool:
        """Write :data:`PROBE_BYTES` (room for an answer) and take them back, in the next
        group commit; the store is writable again when that commits."""
        def probe(db: sqlite3.Connection) -> None:
            db.execute("CREATE TABLE IF NOT EXISTS write_probe (data BLOB)")
            db.execute("INSERT INTO write_probe VALUES (zeroblob(?))", (PROBE_BYTES,))
            db.execute("DELETE FROM write_probe")

        try:
            await self._write(probe)
        except (sqlite3.Error, OSError, RuntimeError):
            return False
        self._writable = True
        return True

    # -- threads -------------------------------------------------------------

    async def create_thread(self, org_id: str, title: str) -> Thread:
        thread: Thread = {"thread_id": new_id("thr"), "title": title, "created_at": now_iso()}

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO threads (thread_id, org_id, title, created_at) VALUES (?, ?, ?, ?)",
                       (thread["thread_id"], org_id, title, thread["created_at"]))

        await self._write(insert, one_statement=True)
        self._remember(org_id, thread)
        if self.cache:  # a new thread has no conversation: its first turn reads nothing from disk
            self._histories[(org_id, thread["thread_id"])] = _History([])
            self._trim_histories()
        return thread

    def _remember(self, org_id: str, thread: Thread) -> None:
        if not self.cache:
            return
        self._threads[thread["thread_id"]] = (org_id, thread)
        self._threads.move_to_end(thread["thread_id"])
        while len(self._threads) > THREAD_CACHE_SIZE:
            self._threads.popitem(last=False)

    async def list_threads(self, org_id: str, *, limit: int = 200) -> list[Thread]:
        async with self._r.execute(
            "SELECT thread_id, title, created_at FROM threads WHERE org_id = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (org_id, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [{"thread_id": t, "title": title, "created_at": c} for t, title, c in rows]

    async def get_thread(self, org_id: str, thread_id: str) -> Thread | None:
        known = self._threads.get(thread_id)
        if known is not None:
            return known[1].copy() if known[0] == org_id else None
        async with self._r.execute(
            "SELECT thread_id, title, created_at FROM threads WHERE org_id = ? AND thread_id = ?",
            (org_id, thread_id),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        thread: Thread = {"thread_id": row[0], "title": row[1], "created_at": row[2]}
        self._remember(org_id, thread)
        return thread.copy()

    async def delete_thread(self, org_id: str, thread_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM messages WHERE org_id = ? AND thread_id = ?", (org_id, thread_id))
            cur = db.execute("DELETE FROM threads WHERE org_id = ? AND thread_id = ?", (org_id, thread_id))
            return cur.rowcount > 0

        deleted = await self._write(delete)
        if deleted:
            self._threads.pop(thread_id, None)
            self._forget_history((org_id, thread_id))
            self._bump((org_id, thread_id))
        return deleted

    # -- messages ------------------------------------------------------------

    async def messages(self, org_id: str, thread_id: str) -> list[Message]:
        async with self._r.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE org_id = ? AND thread_id = ? ORDER BY seq",
            (org_id, thread_id),
        ) as cur:
            rows = await cur.fetchall()
        return [message_from_row(row) for row in rows]

    async def messages_before(self, org_id: str, thread_id: str, *, limit: int,
                              before: str | None = None) -> list[Message] | None:
        bound = 2**62
        if before is not None:
            async with self._r.execute(
                "SELECT seq FROM messages WHERE org_id = ? AND thread_id = ? AND message_id = ?",
                (org_id, thread_id, before),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            bound = int(row[0])
        async with self._r.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE org_id = ? AND thread_id = ? AND seq < ?"
            " ORDER BY seq DESC LIMIT ?",
            (org_id, thread_id, bound, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [message_from_row(row) for row in rows]

    async def count_threads(self, org_id: str) -> int:
        async with self._r.execute("SELECT COUNT(*) FROM threads WHERE org_id = ?", (org_id,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def history(self, org_id: str, thread_id: str) -> list[ChatMessage]:
        """The conversation to send upstream, oldest first: each completed answer and the
        question it answers. Served from memory for recent threads."""
        key = (org_id, thread_id)
        cached = self._histories.get(key)
        if cached is None:
            if not self.cache:
                return _History(await self._completed_pairs(org_id, thread_id)).conversation()
            reading = self._reading.setdefault(key, [0, 0])
            reading[0] += 1
            written = reading[1]
            try:
                cached = _History(await self._completed_pairs(org_id, thread_id))
            finally:
                reading[0] -= 1
                if not reading[0]:
                    del self._reading[key]
            # a write landed meanwhile (this read may have missed it), or another read kept the
            # thread already (kept and counted once)
            if reading[1] != written or key in self._histories:
                return cached.conversation()
            self._histories[key] = cached
            self._history_chars += cached.chars
        self._histories.move_to_end(key)
        self._trim_histories()
        return cached.conversation()

    async def _completed_pairs(self, org_id: str, thread_id: str) -> list[tuple[int, str, str]]:
        async with self._r.execute(
            "SELECT seq, role, content, status FROM messages WHERE org_id = ? AND thread_id = ? ORDER BY seq",
            (org_id, thread_id),
        ) as cur:
            rows = list(await cur.fetchall())
        pairs = []
        for (seq, role, question, _), after in zip(rows, rows[1:], strict=False):
            if role == "user" and after[1] == "assistant" and after[3] == MessageStatus.COMPLETE:
                pairs.append((int(seq), str(question), str(after[2])))
        return pairs

    def _trim_histories(self) -> None:
        """Drop the least recently used conversations past the cache's bounds."""
        while self._histories and (len(self._histories) > HISTORY_CACHE_THREADS
                                   or self._history_chars > HISTORY_CACHE_CHARS):
            _, dropped = self._histories.popitem(last=False)
            self._history_chars -= dropped.chars

    def _forget_history(self, key: tuple[str, str]) -> None:
        dropped = self._histories.pop(key, None)
        if dropped is not None:
            self._history_chars -= dropped.chars

    def _bump(self, key: tuple[str, str]) -> None:
        """A write changed the thread's history: the cold reads under way may have missed it."""
        reading = self._reading.get(key)
        if reading is not None:
            reading[1] += 1

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

    async def begin_turn(self, *, org_id: str, user: Message, assistant: Message,
                         owner: str | None = None) -> None:
        """Insert the user message and the ``streaming`` assistant message together: one
        statement, so both rows or neither."""
        thread_id = user["thread_id"]
        assert thread_id is not None
        args = (thread_id, org_id,
                user["message_id"], user["content"], str(user["status"]), user["provider"], user["model"],
                user["created_at"], orjson.dumps(user["meta"]).decode(),
                assistant["message_id"], assistant["content"], str(assistant["status"]), assistant["provider"],
                assistant["model"], assistant["created_at"], orjson.dumps(assistant["meta"]).decode(), owner)

        def insert(db: sqlite3.Connection) -> int:
            cur = db.execute(_INSERT_TURN, args)
            if cur.rowcount != 2:  # the thread is not this org's (or is gone): nothing was written
                raise LookupError(thread_id)
            return int(cur.lastrowid or 0) - 1  # the user row's seq: the rows go in in their order

        seq = await self._write(insert, one_statement=True)
        if self.cache:
            self._pending[assistant["message_id"]] = (org_id, thread_id, seq, user["content"])

    async def finish_turn(
        self,
        *,
        message_id: str,
        status: MessageStatus,
        content: str,
        usage: dict[str, Any] | None,
        meta: dict[str, Any],
        deltas: int = 0,
        owner: str | None = None,
    ) -> bool:
        args = (str(status), content, None if usage is None else orjson.dumps(usage).decode(),
                orjson.dumps(meta).decode(), deltas, message_id)

        def update(db: sqlite3.Connection) -> bool:
            if owner is None:
                db.execute("UPDATE messages SET status = ?, content = ?, usage = ?, meta = ?, deltas = ?"
                           " WHERE message_id = ?", args)
                return True
            cur = db.execute("UPDATE messages SET status = ?, content = ?, usage = ?, meta = ?, deltas = ?"
                             " WHERE message_id = ? AND status = 'streaming' AND owner = ?", (*args, owner))
            return _applied_or_gone(db, cur, message_id)

        pending = self._pending.pop(message_id, None)
        if not await self._write(update, one_statement=True):  # one change at most: a SELECT may follow
            return False
        if pending is not None and status is MessageStatus.COMPLETE:
            org_id, thread_id, seq, question = pending
            key = (org_id, thread_id)
            self._bump(key)
            history = self._histories.get(key)
            if history is not None:
                history.add(seq, question, content)
                self._history_chars += len(question) + len(content)
                self._trim_histories()
        return True

    async def checkpoint(self, *, message_id: str, content: str, deltas: int, owner: str | None = None) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            if owner is None:
                db.execute("UPDATE messages SET content = ?, deltas = ? WHERE message_id = ? AND status = 'streaming'",
                           (content, deltas, message_id))
                return True
            cur = db.execute("UPDATE messages SET content = ?, deltas = ?"
                             " WHERE message_id = ? AND status = 'streaming' AND owner = ?",
                             (content, deltas, message_id, owner))
            return _applied_or_gone(db, cur, message_id)

        return await self._write(update, one_statement=True)

    async def interrupt_turn(self, *, message_id: str, content: str | None, deltas: int = 0) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            if content is None:  # keep the text of the last checkpoint
                cur = db.execute("UPDATE messages SET status = 'interrupted' WHERE message_id = ?"
                                 " AND status = 'streaming'", (message_id,))
            else:
                cur = db.execute("UPDATE messages SET status = 'interrupted', content = ?, deltas = ?"
                                 " WHERE message_id = ? AND status = 'streaming'", (content, deltas, message_id))
            return cur.rowcount == 1

        self._pending.pop(message_id, None)
        return await self._write(update, one_statement=True)

    async def streaming_owners(self) -> list[str | None]:
        async with self._r.execute("SELECT DISTINCT owner FROM messages WHERE status = 'streaming'") as cur:
            return [row[0] for row in await cur.fetchall()]

    async def streaming_answers(self, owners: list[str | None]) -> list[str]:
        named = [o for o in owners if o is not None]
        marks = ", ".join("?" * len(named))
        async with self._r.execute(
            f"SELECT message_id FROM messages WHERE status = 'streaming' AND (owner IN ({marks})"
            f" OR (? AND owner IS NULL)) ORDER BY seq", (*named, None in owners),
        ) as cur:
            return [row[0] for row in await cur.fetchall()]

    def forget_thread(self, org_id: str, thread_id: str) -> None:
        """Another process deleted the thread (one file shared through Redis): drop its caches."""
        self._threads.pop(thread_id, None)
        self._forget_history((org_id, thread_id))
        self._bump((org_id, thread_id))

    async def count_messages(self, org_id: str, thread_id: str) -> int:
        async with self._r.execute(
            "SELECT COUNT(*) FROM messages WHERE org_id = ? AND thread_id = ?", (org_id, thread_id)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- API keys ------------------------------------------------------------

    async def create_api_key(self, *, org_id: str, name: str, key_hash: str) -> ApiKey:
        key: ApiKey = {"key_id": new_id("key"), "org_id": org_id, "name": name, "created_at": now_iso(),
                       "revoked_at": None}

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO api_keys (key_id, key_hash, org_id, name, created_at) VALUES (?, ?, ?, ?, ?)",
                       (key["key_id"], key_hash, org_id, name, key["created_at"]))

        await self._write(insert, one_statement=True)
        return key

    async def list_api_keys(self, org_id: str | None = None) -> list[ApiKey]:
        where, args = ("WHERE org_id = ?", (org_id,)) if org_id is not None else ("", ())
        async with self._r.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys {where} ORDER BY created_at, rowid",
                                   args) as cur:
            rows = await cur.fetchall()
        return [_api_key(row) for row in rows]

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        async with self._r.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                                   (key_hash,)) as cur:
            row = await cur.fetchone()
        return None if row is None else _api_key(row)

    async def revoke_api_key(self, *, key_id: str, key_hash: str) -> ApiKey | None:
        revoked_at = now_iso()

        def revoke(db: sqlite3.Connection) -> ApiKey | None:
            row = db.execute(f"UPDATE api_keys SET revoked_at = ? WHERE revoked_at IS NULL"
                             f" AND (key_id = ? OR key_hash = ?) RETURNING {_KEY_COLUMNS}",
                             (revoked_at, key_id, key_hash)).fetchone()
            return None if row is None else _api_key(row)

        return await self._write(revoke, one_statement=True)


_KEY_COLUMNS = "key_id, org_id, name, created_at, revoked_at"


def _api_key(row: Any) -> ApiKey:
    key_id, org_id, name, created_at, revoked_at = row
    return {"key_id": key_id, "org_id": org_id, "name": name, "created_at": created_at, "revoked_at": revoked_at}


def _unwritable(exc: BaseException) -> bool:
    """A failure for want of room or rights (full, read-only, I/O), not of the data."""
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # extended: the primary code is its low byte
    return (isinstance(code, int) and code & 0xFF in _UNWRITABLE_CODES) or any(
        w in str(exc) for w in ("readonly", "disk is full", "disk I/O"))


#: SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_PERM (primary codes)
_UNWRITABLE_CODES = frozenset({8, 10, 13, 14, 3})


def _applied_or_gone(db: sqlite3.Connection, cur: sqlite3.Cursor, message_id: str) -> bool:
    """A fenced update's answer: it applied, or its row is gone (a deleted thread); False
    when the row is there but no longer the writer's."""
    if cur.rowcount == 1:
        return True
    return db.execute("SELECT 1 FROM messages WHERE message_id = ?", (message_id,)).fetchone() is None


#: a turn's two rows in one statement, both only if the thread is the org's: ?1 thread, ?2 org,
#: then the user row's id, content, status, provider, model, created_at and meta (?3-?9),
#: then the assistant row's (?10-?16) and its owner (?17); the rows go in in this order (the
#: user's seq first)
_INSERT_TURN = (
    "INSERT INTO messages (message_id, thread_id, org_id, role, content, status, provider,"
    " model, created_at, usage, meta, owner)"
    " SELECT column1, ?1, ?2, column2, column3, column4, column5, column6, column7, NULL, column8, column9"
    " FROM (VALUES (?3, 'user', ?4, ?5, ?6, ?7, ?8, ?9, NULL),"
    " (?10, 'assistant', ?11, ?12, ?13, ?14, ?15, ?16, ?17))"
    " WHERE EXISTS (SELECT 1 FROM threads WHERE thread_id = ?1 AND org_id = ?2)"
)
