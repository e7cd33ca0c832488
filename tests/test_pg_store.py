"""What only the PostgreSQL store has: the versioned schema, the pool, and failing fast at start.

The behaviour it shares with SQLite is checked by the suite in test_store.py.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from server import pg_store
from server.pg_store import MIGRATIONS, PostgresStore
from server.store import StoreOpenError

from . import helpers
from .engines import PostgresServer
from .helpers import within


@pytest.fixture
async def admin(postgres: PostgresServer) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A connection of the test's own, to look at what the store did."""
    conn = await within(asyncpg.connect(postgres.url, timeout=5), what="an admin connection")
    yield conn
    await within(conn.close())


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    return helpers.closed_port()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A local port that accepts connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


async def migrations(admin: asyncpg.Connection[Any], schema: str) -> list[tuple[int, Any]]:
    rows = await admin.fetch(f'SELECT version, applied_at FROM "{schema}".schema_migrations ORDER BY version')
    return [(r["version"], r["applied_at"]) for r in rows]


async def test_the_schema_is_created_versioned_and_migrated_once(
        postgres: PostgresServer, admin: asyncpg.Connection[Any]) -> None:
    schema = postgres.new_schema()
    first = PostgresStore(postgres.url_for(schema))
    await within(first.open())
    await first.close()
    applied = await migrations(admin, schema)
    assert [v for v, _ in applied] == list(range(1, len(MIGRATIONS) + 1))
    assert all(at is not None for _, at in applied)
    tables = {r[0] for r in await admin.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)}
    assert tables == {"schema_migrations", "threads", "messages", "api_keys"}
    again = PostgresStore(postgres.url_for(schema))
    await within(again.open())
    await again.close()
    assert await migrations(admin, schema) == applied  # nothing applied twice


async def test_a_database_of_the_first_version_gains_the_api_keys_step(
        postgres: PostgresServer, admin: asyncpg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    schema = postgres.new_schema()
    monkeypatch.setattr(pg_store, "MIGRATIONS", MIGRATIONS[:1])
    old = PostgresStore(postgres.url_for(schema))
    await within(old.open())
    thread = await old.create_thread("org_a", "kept")
    await old.close()
    monkeypatch.setattr(pg_store, "MIGRATIONS", MIGRATIONS)
    new = PostgresStore(postgres.url_for(schema))
    await within(new.open())
    try:
        assert [v for v, _ in await migrations(admin, schema)] == list(range(1, len(MIGRATIONS) + 1))
        assert await new.get_thread("org_a", thread["thread_id"]) == thread
        key = await new.create_api_key(org_id="org_a", name="n", key_hash="f" * 64)
        assert await new.find_api_key("f" * 64) == key
    finally:
        await new.close()


async def test_a_database_of_the_second_version_gains_owners_and_keeps_its_streaming_rows(
        postgres: PostgresServer, admin: asyncpg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    schema = postgres.new_schema()
    monkeypatch.setattr(pg_store, "MIGRATIONS", MIGRATIONS[:2])
    old = PostgresStore(postgres.url_for(schema))
    await within(old.open())
    thread = await old.create_thread("org_a", "kept")
    await old.close()
    await admin.execute(  # an answer streaming when the database was at version 2
        f'INSERT INTO "{schema}".messages (message_id, thread_id, org_id, role, content, status, created_at)'
        " VALUES ('msg_old', $1, 'org_a', 'assistant', 'part', 'streaming', now())", thread["thread_id"])
    monkeypatch.setattr(pg_store, "MIGRATIONS", MIGRATIONS)
    new = PostgresStore(postgres.url_for(schema), recover=False)  # as an instance sharing it through Redis
    await within(new.open())
    try:
        assert [v for v, _ in await migrations(admin, schema)] == [1, 2, 3]
        assert await new.streaming_owners() == [None]  # a row from before owners: it names none
        assert await new.streaming_answers([None]) == ["msg_old"]
        assert await new.streaming_answers(["inst_gone"]) == []
    finally:
        await new.close()


async def test_instances_starting_together_migrate_once(
        postgres: PostgresServer, admin: asyncpg.Connection[Any]) -> None:
    schema = postgres.new_schema()
    stores = [PostgresStore(postgres.url_for(schema), pool_size=2) for _ in range(5)]
    await within(asyncio.gather(*[s.open() for s in stores]), what="five stores opening at once")
    try:
        assert [v for v, _ in await migrations(admin, schema)] == list(range(1, len(MIGRATIONS) + 1))
        threads = [await s.create_thread("org_a", f"from {i}") for i, s in enumerate(stores)]
        assert await stores[0].list_threads("org_a") == threads[::-1]
    finally:
        await within(asyncio.gather(*[s.close() for s in stores]))


async def test_the_pool_holds_at_most_pool_size_connections(
        postgres: PostgresServer, admin: asyncpg.Connection[Any]) -> None:
    schema, name = postgres.new_schema(), f"dac_pool_{secrets.token_hex(4)}"
    store = PostgresStore(postgres.url_for(schema, application_name=name), pool_size=2)
    await within(store.open())
    watcher = await within(asyncpg.connect(postgres.url, timeout=5))
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    try:
        t = await store.create_thread("org_a", "t")
        async with admin.transaction():
            await admin.execute(f'LOCK TABLE "{schema}".threads IN ACCESS EXCLUSIVE MODE')
            reads = [asyncio.create_task(store.get_thread("org_a", t["thread_id"])) for _ in range(6)]

            async def two_blocked() -> None:
                while await watcher.fetchval(sessions + " AND wait_event_type = 'Lock'", name) < 2:
                    pass

            await within(two_blocked(), what="two of the store's sessions waiting on the lock")
            assert await watcher.fetchval(sessions, name) == 2
            assert not any(r.done() for r in reads)
        assert await within(asyncio.gather(*reads), what="the reads after the lock") == [t] * 6
    finally:
        await watcher.close()
        await store.close()


async def test_a_server_that_is_not_listening_stops_the_start_at_once(closed_port: int) -> None:
    store = PostgresStore(f"postgresql://postgres:s3cret@127.0.0.1:{closed_port}/test")
    started = time.perf_counter()
    with pytest.raises(StoreOpenError) as caught:
        await within(store.open(), 5)
    message = str(caught.value)
    assert message.startswith("DAC_DATABASE_URL: cannot connect to PostgreSQL at ")
    assert f"postgresql://postgres:***@127.0.0.1:{closed_port}/test" in message
    assert "s3cret" not in message  # the password never appears
    assert time.perf_counter() - started < 3 and not store.is_open


async def test_a_server_that_never_answers_stops_the_start_after_the_connect_timeout(silent_port: int) -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{silent_port}/test?connect_timeout=0.3")
    started = time.perf_counter()
    with pytest.raises(StoreOpenError, match=r"^DAC_DATABASE_URL: .* did not answer within 0.3 s"):
        await within(store.open(), 5)
    assert 0.25 < time.perf_counter() - started < 3


@pytest.mark.parametrize(("query", "message"), [
    ("schema=a-b", "schema must be letters, digits and _"),
    ("schema=1st", "schema must be letters, digits and _"),
    ("connect_timeout=soon", "connect_timeout must be a number of seconds"),
    ("connect_timeout=0", "connect_timeout must be more than 0"),
    ("no_such_setting=1", 'unrecognized configuration parameter "no_such_setting"'),
])
async def test_a_bad_url_parameter_names_the_setting(postgres: PostgresServer, query: str, message: str) -> None:
    store = PostgresStore(f"{postgres.url}?{query}")
    with pytest.raises(StoreOpenError, match="^DAC_DATABASE_URL: ") as caught:
        await within(store.open())
    assert message in str(caught.value)


async def test_a_missing_database_names_the_setting(postgres: PostgresServer) -> None:
    url = postgres.url.rsplit("/", 1)[0] + f"/dac_missing_{secrets.token_hex(4)}"
    with pytest.raises(StoreOpenError, match=r'^DAC_DATABASE_URL: .*database "dac_missing_\w+" does not exist'):
        await within(PostgresStore(url).open())
