"""A thin client for the gateway's thread API (API.md), shared by the tests and the tools.

Every call names the caller: with a ``key``, as ``Authorization: Bearer`` (the
``keys`` mode of ``DAC_AUTH``, where the key decides the org); without one, with
``x-org-id`` (the ``header`` mode): the client's own org, or the ``org`` given
to the call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from tools._common import DEFAULT_ORG, Samples, prometheus_samples

__all__ = ["GatewayClient"]


class GatewayClient:
    """The calls of API.md that the tests and the tools make, over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, url: str, *, org: str = DEFAULT_ORG,
                 key: str | None = None) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.org = org
        self.key = key

    def headers(self, org: str | None = None, **extra: str) -> dict[str, str]:
        if self.key and org is None:
            return {"Authorization": f"Bearer {self.key}", **extra}
        return {"x-org-id": org or self.org, **extra}

    async def new_thread(self, title: str = "test", *, org: str | None = None) -> str:
        async with self.session.post(f"{self.url}/api/threads/", json={"title": title},
                                     headers=self.headers(org)) as resp:
            if resp.status != 201:
                raise RuntimeError(f"creating a thread: HTTP {resp.status} {await resp.text()}")
            return str((await resp.json())["thread_id"])

    async def thread(self, thread_id: str, *, org: str | None = None) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/api/threads/{thread_id}", headers=self.headers(org)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"reading thread {thread_id}: HTTP {resp.status} {await resp.text()}")
            return dict(await resp.json())

    async def post(self, thread_id: str, body: dict[str, Any], *, org: str | None = None,
                   headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """A non-stream message (or a mode-3 acceptance): (status, JSON body)."""
        async with self.session.post(f"{self.url}/api/threads/{thread_id}/messages", json=body,
                                     headers={**self.headers(org), **(headers or {})}) as resp:
            return resp.status, await resp.json(content_type=None)

    def open_stream(self, thread_id: str, body: dict[str, Any], *, org: str | None = None,
                    headers: Mapping[str, str] | None = None) -> Any:
        """A streaming POST (mode 2: the response is the SSE stream); use as ``async with``."""
        return self.session.post(f"{self.url}/api/threads/{thread_id}/messages", json=body,
                                 headers={**self.headers(org, Accept="text/event-stream"), **(headers or {})})

    async def performance(self, last_n: int = 1000) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/api/metrics/performance", headers=self.headers(),
                                    params={"last_n": str(max(1, last_n))}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"/api/metrics/performance: HTTP {resp.status} {await resp.text()}")
            return dict(await resp.json())

    async def prometheus(self) -> Samples:
        """``/metrics`` as {(sample name, sorted labels): value}; empty if the server has none."""
        async with self.session.get(f"{self.url}/metrics") as resp:
            if resp.status != 200:
                return {}
            return prometheus_samples(await resp.text())
