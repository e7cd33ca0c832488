"""The store engines the tests run on: SQLite in a temporary folder, PostgreSQL in a schema of its own.

PostgreSQL is the server at ``DAC_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Every test that asks for it gets
a fresh schema named after the run (``dac_test_<random>_<n>``); the run drops
them all at its end. Where the server does not answer, those tests skip and say
how to start it, except under CI (``CI`` set), where they fail.

``@on_every_engine`` runs a test that uses ``gateway`` or ``gateway_factory``
once with each engine behind the gateway.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import asyncpg
import pytest

__all__ = ["ENGINES", "PostgresServer", "on_every_engine", "postgres", "require_service", "run_apart"]

T = TypeVar("T")

ENGINES = ("sqlite", "postgresql")
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
START_COMMAND = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"

#: run the test once per engine behind its gateway (the ``engine`` fixture of conftest.py)
on_every_engine = pytest.mark.parametrize("engine", ENGINES, indirect=True)


def run_apart(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on an event loop of its own in another thread: usable in or out of a running loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class PostgresServer:
    """The test server, handing out a schema per test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"dac_test_{secrets.token_hex(4)}"
        self._numbers = itertools.count(1)

    def new_schema(self) -> str:
        return f"{self.prefix}_{next(self._numbers)}"

    def url_for(self, schema: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"schema": schema, **params}.items())
        return f"{self.url}{'&' if '?' in self.url else '?'}{query}"

    def new_url(self, **params: str) -> str:
        """The server's URL with a schema no test has used (the store creates it)."""
        return self.url_for(self.new_schema(), **params)

    async def drop_all(self) -> list[str]:
        """Drop every schema of this run; their names."""
        conn = await asyncpg.connect(self.url, timeout=5)
        try:
            names = [r[0] for r in await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", self.prefix + "_")]
            for name in names:
                await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
        finally:
            await conn.close()
        return names


async def _probe(url: str) -> str | None:
    """None when the server answers a query, else why not."""
    try:
        conn = await asyncpg.connect(url, timeout=3)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
    except Exception as exc:  # anything that keeps the tests from using it
        return f"{exc.__class__.__name__}: {exc}"
    return None


def require_service(name: str, url: str, why: str | None, start: str) -> None:
    """Skip the test, saying how to start the service, when it does not answer (``why``);
    under CI (``CI`` set) fail instead: there the services must run."""
    if why is None:
        return
    message = f"{name} does not answer at {url} ({why}); start it with: {start}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The test PostgreSQL; skips (fails under CI) when it does not answer."""
    url = os.environ.get("DAC_TEST_DATABASE_URL") or DEFAULT_URL
    require_service("PostgreSQL", url, run_apart(_probe(url)), START_COMMAND)
    server = PostgresServer(url)
    yield server
    run_apart(server.drop_all())
