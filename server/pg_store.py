"""The shared :class:`~server.store.Store`: PostgreSQL through asyncpg.

Several gateway instances can keep their threads in one database. The
semantics are SQLiteStore's, query for query:

- Every query is scoped by ``org_id``: another org's thread is
  indistinguishable from a missing one.
- A turn's two rows are written in one transaction that first locks the
  thread's row (``FOR UPDATE``): a thread that is not the org's (or is being
  deleted) gets ``LookupError`` and nothing is written, and turns on one thread
  are written one after the other, so a turn's rows stay side by side in the
  insertion order (``seq``) that every read sorts by.
- :meth:`PostgresStore.finish_turn` is one ``UPDATE`` (fenced by the row's owner
  when the caller names it: one statement that also tells a refused write from a
  deleted row).
- :meth:`PostgresStore.open` marks rows left ``streaming`` as ``interrupted``
  when it is the database's only writer (``recover``); instances that share it
  through Redis sweep by owner instead (:mod:`server.redis_sweep`).

The URL is ``DAC_DATABASE_URL``: ``postgresql://user:password@host:port/db``
(``postgres://`` too) with libpq's parameters as asyncpg reads them, plus two of
this module's own, removed before the driver sees the URL:

- ``schema=NAME``: keep the tables in that schema (created if missing) instead
  of the connection's default (``public``);
- ``connect_timeout=SECONDS``: give up on a server that does not answer (5).

The schema is versioned: :data:`MIGRATIONS` is applied in order at start, the
pending steps in one transaction, each recorded in ``schema_migrations(version,
applied_at)``. A transaction-scoped advisory lock, one per schema, makes
instances that start together take turns: the first applies, the others find
the versions recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from .config import DATABASE_SCHEMES, redact_url
from .states import MessageStatus
from .store import (
    MESSAGE_COLUMNS,
    ApiKey,
    ChatMessage,
    Message,
    StoreClosed,
    StoredAnswer,
    StoreOpenError,
    Thread,
    conversation,
    iso_time,
    message_from_row,
    new_id,
    now_iso,
)

__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_POOL_SIZE", "MIGRATIONS", "PostgresStore", "Target", "parse_url"]

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 10
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: how long close() waits for the queries in progress
CLOSE_TIMEOUT_S = 10.0
#: the setting the URL comes from, named in every failure to open
SETTING = "DAC_DATABASE_URL"

#: The schema, one step per version (version = position + 1). A released step is
#: never edited: a change is a new step at the end.
MIGRATIONS: tuple[str, ...] = (
    # 1: threads and messages. ``seq`` is the insertion order; ``usage`` and
    # ``meta`` are ``json`` (not ``jsonb``) so a message reads back exactly as written.
    """
    CREATE TABLE threads (
        thread_id  text PRIMARY KEY,
        seq        bigint GENERATED ALWAYS AS IDENTITY,
        org_id     text NOT NULL,
        title      text NOT NULL,
        created_at timestamptz NOT NULL
    );
    CREATE INDEX threads_by_org ON threads (org_id, created_at DESC, seq DESC);
    CREATE TABLE messages (
        seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id text NOT NULL UNIQUE,
        thread_id  text NOT NULL REFERENCES threads (thread_id) ON DELETE CASCADE,
        org_id     text NOT NULL,
        role       text NOT NULL CHECK (role IN ('user', 'assistant')),
        content    text NOT NULL,
        status     text NOT NULL CHECK (status IN
                       ('complete', 'streaming', 'cancelled', 'error', 'interrupted')),
        provider   text,
        model      text,
        created_at timestamptz NOT NULL,
        usage      json,
        meta       json NOT NULL DEFAULT '{}',
        deltas     integer NOT NULL DEFAULT 0  -- stream events the answer took (the done event's id - 1)
    );
    CREATE INDEX messages_by_thread ON messages (thread_id, seq);
    CREATE INDEX messages_streaming ON messages (seq) WHERE status = 'streaming';
    """,
    # 2: API keys, one org each; only the key's hash (hex sha256) is stored.
    """
    CREATE TABLE api_keys (
        key_id     text PRIMARY KEY,
        seq        bigint GENERATED ALWAYS AS IDENTITY,
        key_hash   text NOT NULL UNIQUE,
        org_id     text NOT NULL,
        name       text NOT NULL,
        created_at timestamptz NOT NULL,
        revoked_at timestamptz
    );
    CREATE INDEX api_keys_by_org ON api_keys (org_id, seq);
    """,
    # 3: the instance streaming an answer (its owner), so instances sharing the database
    # sweep only the rows of instances that are gone; NULL: a single writer's row.
    """
    ALTER TABLE messages ADD COLUMN owner text;
    CREATE INDEX messages_streaming_owner ON messages (owner) WHERE status = 'streaming';
    """,
)

#: the failures that say the database cannot take writes now (rather than that the data is wrong)
_UNWRITABLE = (asyncpg.exceptions.DiskFullError, asyncpg.exceptions.ReadOnlySQLTransactionError,
               asyncpg.exceptions.InsufficientPrivilegeError, asyncpg.exceptions.InsufficientResourcesError)

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed ``DAC_DATABASE_URL``."""

    #: the URL the driver gets: this module's parameters removed
    dsn: str
    #: the schema holding the tables; None: the connection's default
    schema: str | None
    connect_timeout_s: float
    #: the URL without its password, for messages
    shown: str


def parse_url(url: str) -> Target:
    """Split this module's parameters off ``url``; ``ValueError`` says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in DATABASE_SCHEMES:
        raise ValueError("the URL must start with postgresql:// or postgres://")
    params = parse_qsl(parts.query, keep_blank_values=True)
    schema: str | None = None
    timeout = DEFAULT_CONNECT_TIMEOUT_S
    rest: list[tuple[str, str]] = []
    for name, value in params:
        if name == "schema":
            if not _SCHEMA_NAME.fullmatch(value):
                raise ValueError(f"schema must be letters, digits and _ (at most 63, not a digit first), "
                                 f"not {value!r}")
            schema = value
        elif name == "connect_timeout":
            try:
                timeout = float(value)
            except ValueError:
                raise ValueError(f"connect_timeout must be a number of seconds, not {value!r}") from None
            if not timeout > 0:
                raise ValueError(f"connect_timeout must be more than 0, not {value!r}")
        else:
            rest.append((name, value))
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))
    return Target(dsn=dsn, schema=schema, connect_timeout_s=timeout, shown=redact_url(url))


def _lock_key(schema: str | None) -> int:
    """The advisory lock that serialises migrations of one schema (a signed 64-bit key)."""
    digest = hashlib.sha256(f"dac-gateway schema_migrations {schema or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _text(value: str) -> str:
    """PostgreSQL's text cannot hold U+0000 (SQLite's can): it is kept as U+FFFD."""
    return value.replace("\x00", "\ufffd")


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


async def migrate(conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any], schema: str | None) -> list[int]:
    """Apply the pending :data:`MIGRATIONS` in one transaction; the versions applied.

    The advisory lock is held until the transaction ends, so an instance that
    waited for it sees the versions the first one recorded.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        if schema is not None and not await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA "{schema}"')  # a checked identifier: see _SCHEMA_NAME
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            await conn.execute("CREATE TABLE schema_migrations ("
                               " version integer PRIMARY KEY,"
                               " applied_at timestamptz NOT NULL DEFAULT now())")
        current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
        if current > len(MIGRATIONS):
            log.warning("the database schema is at version %d, newer than this code's %d",
                        current, len(MIGRATIONS))
        applied = []
        for version in range(current + 1, len(MIGRATIONS) + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    return applied


class PostgresStore:
    """Threads and messages in PostgreSQL, through a pool of at most ``pool_size`` connections."""

    def __init__(self, url: str, *, pool_size: int = DEFAULT_POOL_SIZE, recover: bool = True) -> None:
        self.url = url
        self.pool_size = pool_size
        #: mark rows left streaming as interrupted at open: the database's only writer (False: a
        #: tool beside running servers, or instances that sweep by owner through Redis)
        self.recover = recover
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._writable = True

    @property
    def engine(self) -> str:
        return "postgresql"

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        """Connect, migrate, then (with ``recover``) mark rows left ``streaming`` as ``interrupted``.

        Only the database's single writer recovers so: instances sharing it through
        Redis leave the rows other live instances stream alone, and sweep by owner.

        Fails with :class:`StoreOpenError` naming ``DAC_DATABASE_URL`` when the URL
        is wrong or the server does not answer within the connect timeout.
        """
        try:
            target = parse_url(self.url)
        except ValueError as exc:
            raise StoreOpenError(f"{SETTING}: {exc}") from None
        settings = {} if target.schema is None else {"search_path": f'"{target.schema}"'}
        try:
            pool = await asyncpg.create_pool(target.dsn, min_size=1, max_size=self.pool_size,
                                             timeout=target.connect_timeout_s, server_settings=settings)
        except TimeoutError:
            raise StoreOpenError(f"{SETTING}: PostgreSQL at {target.shown} did not answer within "
                                 f"{target.connect_timeout_s:g} s") from None
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreOpenError(f"{SETTING}: cannot connect to PostgreSQL at {target.shown}: {exc}") from None
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn, target.schema)
                if self.recover:
                    await conn.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
                raise StoreOpenError(f"{SETTING}: cannot prepare the schema at {target.shown}: {exc}") from exc
            raise
        if applied:
            log.info("PostgreSQL schema %s: applied migrations %s", target.schema or "(default)", applied)
        self._pool = pool

    async def close(self) -> None:
        """Wait for the queries in progress (at most :data:`CLOSE_TIMEOUT_S`), then disconnect."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await pool.close()
        except TimeoutError:
            log.warning("PostgreSQL queries still running after %g s at close: cut", CLOSE_TIMEOUT_S)
            pool.terminate()

    @property
    def _p(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreClosed("the store is not open")
        return self._pool

    # -- threads -------------------------------------------------------------

    async def create_thread(self, org_id: str, title: str) -> Thread:
        thread: Thread = {"thread_id": new_id("thr"), "title": _text(title), "created_at": now_iso()}
        await self._p.execute(
            "INSERT INTO threads (thread_id, org_id, title, created_at) VALUES ($1, $2, $3, $4)",
            thread["thread_id"], org_id, thread["title"], _time(thread["created_at"]),
        )
        return thread

    async def list_threads(self, org_id: str, *, limit: int = 200) -> list[Thread]:
        rows = await self._p.fetch(
            "SELECT thread_id, title, created_at FROM threads WHERE org_id = $1"
            " ORDER BY created_at DESC, seq DESC LIMIT $2",
            org_id, limit,
        )
        return [{"thread_id": r[0], "title": r[1], "created_at": iso_time(r[2])} for r in rows]

    async def get_thread(self, org_id: str, thread_id: str) -> Thread | None:
        row = await self._p.fetchrow(
            "SELECT thread_id, title, created_at FROM threads WHERE org_id = $1 AND thread_id = $2",
            org_id, thread_id,
        )
        if row is None:
            return None
        return {"thread_id": row[0], "title": row[1], "created_at": iso_time(row[2])}

    async def delete_thread(self, org_id: str, thread_id: str) -> bool:
        # one statement: the thread and (by ON DELETE CASCADE) its messages, atomically
        deleted = await self._p.fetchval(
            "DELETE FROM threads WHERE org_id = $1 AND thread_id = $2 RETURNING 1", org_id, thread_id)
        return deleted is not None

    # -- messages ------------------------------------------------------------

    async def messages(self, org_id: str, thread_id: str) -> list[Message]:
        rows = await self._p.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE org_id = $1 AND thread_id = $2 ORDER BY seq",
            org_id, thread_id,
        )
        return [message_from_row(row) for row in rows]

    async def history(self, org_id: str, thread_id: str) -> list[ChatMessage]:
        return conversation(await self.messages(org_id, thread_id))

    async def get_message(self, org_id: str, message_id: str) -> Message | None:
        row = await self._p.fetchrow(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE org_id = $1 AND message_id = $2",
            org_id, message_id,
        )
        return None if row is None else message_from_row(row)

    async def get_answer(self, org_id: str, message_id: str) -> StoredAnswer | None:
        row = await self._p.fetchrow(
            f"SELECT {MESSAGE_COLUMNS}, deltas, (SELECT u.message_id FROM messages u"
            " WHERE u.thread_id = m.thread_id AND u.seq < m.seq AND u.role = 'user'"
            " ORDER BY u.seq DESC LIMIT 1) FROM messages m"
            " WHERE m.org_id = $1 AND m.message_id = $2 AND m.role = 'assistant'",
            org_id, message_id,
        )
        if row is None:
            return None
        return StoredAnswer(message_from_row(row), row[11], int(row[10]))

    async def begin_turn(self, *, org_id: str, user: Message, assistant: Message,
                         owner: str | None = None) -> None:
        thread_id = user["thread_id"]
        rows = [
            (m["message_id"], thread_id, org_id, m["role"], _text(m["content"]), str(m["status"]),
             m["provider"] and _text(m["provider"]), m["model"] and _text(m["model"]), _time(m["created_at"]), _json(m["meta"]),
             by)
            for m, by in ((user, None), (assistant, owner))
        ]
        async with self._p.acquire() as conn, conn.transaction():
            # The lock keeps a concurrent delete out and the thread's turns in order.
            owned = await conn.fetchval(
                "SELECT 1 FROM threads WHERE thread_id = $1 AND org_id = $2 FOR UPDATE", thread_id, org_id)
            if owned is None:  # the thread is not this org's (or is gone): write nothing
                raise LookupError(thread_id)
            await conn.executemany(
                "INSERT INTO messages (message_id, thread_id, org_id, role, content, status, provider,"
                " model, created_at, usage, meta, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10, $11)",
                rows,
            )

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
        args = (str(status), _text(content), None if usage is None else _json(usage), _json(meta), deltas, message_id)
        async with self._writing():
            if owner is None:
                await self._p.execute(
                    "UPDATE messages SET status = $1, content = $2, usage = $3, meta = $4, deltas = $5"
                    " WHERE message_id = $6", *args)
                return True
            return bool(await self._p.fetchval(_fenced(
                "UPDATE messages SET status = $1, content = $2, usage = $3, meta = $4, deltas = $5"
                " WHERE message_id = $6 AND status = 'streaming' AND owner = $7", "$6"), *args, owner))

    async def checkpoint(self, *, message_id: str, content: str, deltas: int, owner: str | None = None) -> bool:
        async with self._writing():
            if owner is None:
                await self._p.execute(
                    "UPDATE messages SET content = $1, deltas = $2 WHERE message_id = $3 AND status = 'streaming'",
                    _text(content), deltas, message_id)
                return True
            return bool(await self._p.fetchval(_fenced(
                "UPDATE messages SET content = $1, deltas = $2"
                " WHERE message_id = $3 AND status = 'streaming' AND owner = $4", "$3"),
                _text(content), deltas, message_id, owner))

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Note whether a write failed for want of room or rights (see :attr:`writable`)."""
        try:
            yield
        except _UNWRITABLE:
            self._writable = False
            raise
        self._writable = True

    @property
    def writable(self) -> bool:
        return self._writable

    async def check_writable(self) -> bool:
        """The server accepts writes (not a standby, not out of disk for a small write)."""
        try:
            async with self._writing(), self._p.acquire() as conn, conn.transaction():
                await conn.execute("CREATE TEMPORARY TABLE IF NOT EXISTS write_probe (at timestamptz)"
                                   " ON COMMIT DELETE ROWS")
                await conn.execute("INSERT INTO write_probe VALUES (now())")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return False
        return self._writable

    async def messages_before(self, org_id: str, thread_id: str, *, limit: int,
                              before: str | None = None) -> list[Message] | None:
        bound = 2**62
        if before is not None:
            seq = await self._p.fetchval(
                "SELECT seq FROM messages WHERE org_id = $1 AND thread_id = $2 AND message_id = $3",
                org_id, thread_id, before)
            if seq is None:
                return None
            bound = int(seq)
        rows = await self._p.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE org_id = $1 AND thread_id = $2 AND seq < $3"
            " ORDER BY seq DESC LIMIT $4",
            org_id, thread_id, bound, limit)
        return [message_from_row(row) for row in rows]

    async def count_threads(self, org_id: str) -> int:
        return int(await self._p.fetchval("SELECT COUNT(*) FROM threads WHERE org_id = $1", org_id))

    async def interrupt_turn(self, *, message_id: str, content: str | None, deltas: int = 0) -> bool:
        if content is None:  # keep the text of the last checkpoint
            done = await self._p.execute(
                "UPDATE messages SET status = 'interrupted' WHERE message_id = $1 AND status = 'streaming'",
                message_id)
        else:
            done = await self._p.execute(
                "UPDATE messages SET status = 'interrupted', content = $1, deltas = $2"
                " WHERE message_id = $3 AND status = 'streaming'", _text(content), deltas, message_id)
        return done.endswith(" 1")

    async def streaming_owners(self) -> list[str | None]:
        rows = await self._p.fetch("SELECT DISTINCT owner FROM messages WHERE status = 'streaming'")
        return [r[0] for r in rows]

    async def streaming_answers(self, owners: list[str | None]) -> list[str]:
        named = [o for o in owners if o is not None]
        rows = await self._p.fetch(
            "SELECT message_id FROM messages WHERE status = 'streaming'"
            " AND (owner = ANY($1::text[]) OR ($2 AND owner IS NULL)) ORDER BY seq",
            named, None in owners)
        return [r[0] for r in rows]

    def forget_thread(self, org_id: str, thread_id: str) -> None:
        """Nothing of a thread is kept in memory here."""

    async def count_messages(self, org_id: str, thread_id: str) -> int:
        count = await self._p.fetchval(
            "SELECT COUNT(*) FROM messages WHERE org_id = $1 AND thread_id = $2", org_id, thread_id)
        return int(count)

    # -- API keys ------------------------------------------------------------

    async def create_api_key(self, *, org_id: str, name: str, key_hash: str) -> ApiKey:
        key: ApiKey = {"key_id": new_id("key"), "org_id": org_id, "name": _text(name), "created_at": now_iso(),
                       "revoked_at": None}
        await self._p.execute(
            "INSERT INTO api_keys (key_id, key_hash, org_id, name, created_at) VALUES ($1, $2, $3, $4, $5)",
            key["key_id"], key_hash, org_id, key["name"], _time(key["created_at"]),
        )
        return key

    async def list_api_keys(self, org_id: str | None = None) -> list[ApiKey]:
        if org_id is None:
            rows = await self._p.fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY seq")
        else:
            rows = await self._p.fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE org_id = $1 ORDER BY seq", org_id)
        return [_api_key(row) for row in rows]

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        row = await self._p.fetchrow(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash)
        return None if row is None else _api_key(row)

    async def revoke_api_key(self, *, key_id: str, key_hash: str) -> ApiKey | None:
        row = await self._p.fetchrow(
            f"UPDATE api_keys SET revoked_at = now() WHERE revoked_at IS NULL AND (key_id = $1 OR key_hash = $2)"
            f" RETURNING {_KEY_COLUMNS}", key_id, key_hash)
        return None if row is None else _api_key(row)


_KEY_COLUMNS = "key_id, org_id, name, created_at, revoked_at"


def _fenced(update: str, message_id: str) -> str:
    """One statement around a fenced ``update`` whose row is ``message_id`` (a parameter):
    true when it applied or the row is gone (a deleted thread), false when the row is
    there but no longer the writer's."""
    return (f"WITH u AS ({update} RETURNING 1) SELECT EXISTS (SELECT 1 FROM u)"
            f" OR NOT EXISTS (SELECT 1 FROM messages WHERE message_id = {message_id})")


def _api_key(row: asyncpg.Record) -> ApiKey:
    key_id, org_id, name, created_at, revoked_at = row
    return {"key_id": key_id, "org_id": org_id, "name": name, "created_at": iso_time(created_at),
            "revoked_at": None if revoked_at is None else iso_time(revoked_at)}
