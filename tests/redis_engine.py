"""The Redis the tests share: a key prefix per test, everything under it deleted at the end of the run.

The server is the one at ``DAC_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``).
Where it does not answer, the tests that need it skip and say how to start it,
except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from .engines import require_service, run_apart

__all__ = ["RedisServer", "redis_server"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
START_COMMAND = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
                 "--dir /var/lib/redis --logfile /var/log/redis/ci.log")


class RedisServer:
    """The test Redis, handing out a key prefix per test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.run = f"dac_test_{secrets.token_hex(4)}"
        self._numbers = itertools.count(1)

    def new_prefix(self) -> str:
        return f"{self.run}_{next(self._numbers)}:"

    async def keys(self, prefix: str) -> list[bytes]:
        client = aioredis.Redis.from_url(self.url, protocol=2)
        try:
            return [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        finally:
            await client.aclose()

    async def drop_all(self) -> int:
        """Delete every key of this run; how many."""
        client = aioredis.Redis.from_url(self.url, protocol=2)
        try:
            names = [k async for k in client.scan_iter(match=self.run + "_*", count=1000)]
            for i in range(0, len(names), 500):
                await client.delete(*names[i:i + 500])
        finally:
            await client.aclose()
        return len(names)


async def _probe(url: str) -> str | None:
    """None when the server answers PING, else why not."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        await client.ping()
    except Exception as exc:  # anything that keeps the tests from using it
        return f"{exc.__class__.__name__}: {exc}"
    finally:
        await client.aclose()
    return None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The test Redis; skips (fails under CI) when it does not answer."""
    url = os.environ.get("DAC_TEST_REDIS_URL") or DEFAULT_URL
    require_service("Redis", url, run_apart(_probe(url)), START_COMMAND)
    server = RedisServer(url)
    yield server
    run_apart(server.drop_all())
