from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.config import Settings
from server.providers import ProviderRegistry, new_session

from .engines import postgres  # noqa: F401  (a fixture)
from .fake_upstream import FakeUpstream
from .helpers import Gateway, ManualClock, start_gateway
from .redis_engine import redis_server  # noqa: F401  (a fixture)

GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The store engine behind the test's gateways: ``sqlite``, or each one under ``@on_every_engine``."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database_url(engine: str, request: pytest.FixtureRequest) -> str | None:
    """None for SQLite; for PostgreSQL, a URL whose schema is the test's own."""
    if engine == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_url()


@pytest.fixture
async def gateway_factory(tmp_path: Path, database_url: str | None) -> AsyncIterator[GatewayFactory]:
    """Start gateways on 127.0.0.1 with a fresh SQLite file each (or, under
    ``@on_every_engine``, on PostgreSQL, sharing the test's schema); all closed at the end.

    ``await gateway_factory(providers=registry(...), coalesce_enabled=False, ...)``:
    keyword arguments other than ``providers``, ``db_path`` and ``clock`` (a
    :class:`ManualClock` for the TTLs) are Settings fields. The org comes from
    ``x-org-id`` (``auth="header"``) unless a test asks for ``auth="keys"``.
    """
    started: list[Gateway] = []

    async def make(providers: ProviderRegistry | None = None, db_path: str | None = None,
                   clock: ManualClock | None = None, **settings: Any) -> Gateway:
        base = Settings.from_env({})
        settings = {"database_url": database_url, "auth": "header", **settings}
        s = base.with_(db_path=db_path or str(tmp_path / f"dac{len(started)}.db"), **settings)
        gw = await start_gateway(s, providers, clock=clock)
        started.append(gw)
        return gw

    yield make
    for gw in reversed(started):
        await gw.close()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """A fake upstream on 127.0.0.1 speaking OpenAI's and Anthropic's wire formats."""
    async with FakeUpstream.start() as f:
        yield f


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session configured like the one the adapters share."""
    s = new_session()
    yield s
    await s.close()
