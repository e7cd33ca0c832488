"""Known workloads whose counts the observability tests check, and a /metrics reader.

Each workload is driven through a :class:`ScriptedProvider`, so requests that
must overlap really do: the provider holds its first token until every client
has its ``meta`` event (it is attached to the flight).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from server.errors import UpstreamError
from tools.sse import SseEvent, sse_events

from .helpers import DEFAULT_TIMEOUT, Gateway, ScriptedProvider, within

#: the answer every coalesced workload streams
TOKENS = ("Coalesced", " answers", " arrive", " once.")
ANSWER = "".join(TOKENS)

Labels = frozenset[tuple[str, str]]


# -- reading /metrics ---------------------------------------------------------------


class Scrape:
    """One scrape of ``/metrics``: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
        wanted = set(labels.items())
        return sum(v for k, v in self.samples.get(name, {}).items() if wanted <= k)

    def has(self, name: str) -> bool:
        return name in self.samples

    def bucket(self, name: str, le: float, **labels: str) -> float:
        """The cumulative count of histogram ``name`` at bound ``le``."""
        wanted = set(labels.items())
        total = 0.0
        for key, value in self.samples.get(f"{name}_bucket", {}).items():
            d = dict(key)
            bound = math.inf if d["le"] == "+Inf" else float(d["le"])
            if wanted <= key and bound == le:
                total += value
        return total


async def scrape(gw: Gateway) -> Scrape:
    async def get() -> Scrape:
        async with gw.session.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return Scrape(await resp.text())

    return await within(get(), what="GET /metrics")


async def scrape_until(gw: Gateway, ready: Callable[[Scrape], bool], what: str,
                       timeout: float = DEFAULT_TIMEOUT) -> Scrape:
    """Scrape until ``ready`` holds: requests are recorded when their handler ends,
    which a client may see a moment after its last byte."""
    deadline = time.monotonic() + timeout
    while True:
        current = await scrape(gw)
        if ready(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed {what}; last scrape:\n{current.text}")
        await asyncio.sleep(0.02)


def roles_recorded(n: int) -> Callable[[Scrape], bool]:
    """At least ``n`` chat requests recorded with a coalesce role."""
    return lambda s: s.value("dac_coalesce_total") >= n


# -- workloads ---------------------------------------------------------------------


@dataclass
class StreamResult:
    meta: dict[str, Any]
    events: list[SseEvent]

    @property
    def role(self) -> str:
        return str(self.meta["coalesce"])


async def coalesced_streams(gw: Gateway, provider: ScriptedProvider, thread_id: str, content: str,
                            *, n: int = 10, hold_s: float = 0.0) -> list[StreamResult]:
    """``n`` identical SSE requests on one flight: every client is attached before the
    first token; the provider is held ``hold_s`` more, then streams :data:`TOKENS`."""
    attached: list[dict[str, Any]] = []
    all_attached = asyncio.Event()

    async def client() -> StreamResult:
        body = {"content": content, "provider": provider.name}
        async with gw.open_stream(thread_id, body) as resp:
            assert resp.status == 200, await resp.text()
            events = sse_events(resp)
            meta = await within(anext(events), what="the meta event")
            assert meta.event == "meta", meta
            attached.append(meta.json())
            if len(attached) == n:
                all_attached.set()
            rest = [ev async for ev in events]
            return StreamResult(meta.json(), rest)

    tasks = [asyncio.ensure_future(client()) for _ in range(n)]
    try:
        call = await provider.next_call()
        await within(all_attached.wait(), what=f"{n} clients attached (got {len(attached)})")
        if hold_s:
            await asyncio.sleep(hold_s)  # a known lower bound for every client's TTFT
        call.send(*TOKENS)
        call.finish()
        return list(await within(asyncio.gather(*tasks), what="every stream to end"))
    finally:
        for task in tasks:
            task.cancel()


async def failed_request(gw: Gateway, provider: ScriptedProvider, thread_id: str, content: str) -> None:
    """One JSON request whose upstream call fails before its first token."""
    pending = asyncio.ensure_future(gw.post(thread_id, {"content": content, "provider": provider.name}))
    call = await provider.next_call()
    call.fail(UpstreamError("the scripted upstream failed"))
    status, body = await within(pending)
    assert status == 502 and body["error"]["type"] == "upstream_error", (status, body)


async def abandoned_stream(gw: Gateway, provider: ScriptedProvider, thread_id: str, content: str) -> None:
    """One SSE client that leaves after the first token; returns once its flight has ended."""
    async with gw.open_stream(thread_id, {"content": content, "provider": provider.name}) as resp:
        assert resp.status == 200, await resp.text()
        events = sse_events(resp)
        meta = await within(anext(events), what="the meta event")
        flight = await gw.hub.stream(meta.json()["stream_id"])
        assert flight is not None
        call = await provider.next_call()
        call.send("partial")
        delta = await within(anext(events), what="the first delta")
        assert delta.event == "delta", delta
        resp.close()  # the client leaves: its connection closes
    await within(call.closed.wait(), what="the upstream call to close")
    await within(flight.finished.wait(), what="the flight to end")
    assert flight.state == "cancelled", flight.state


async def mixed_workload(gw: Gateway, provider: ScriptedProvider, thread_id: str, tag: str) -> int:
    """What a dashboard shows: 10 coalesced streams, a cache hit, an error, a cancel.
    Returns how many chat requests it made (each has a coalesce role)."""
    content = f"the coalesced question {tag}"
    results = await coalesced_streams(gw, provider, thread_id, content)
    assert sorted(r.role for r in results) == ["follower"] * 9 + ["leader"]
    status, body = await gw.post(thread_id, {"content": content, "provider": provider.name})
    assert status == 200 and body["coalesce"] == "cache", body
    await failed_request(gw, provider, thread_id, f"the failing question {tag}")
    await abandoned_stream(gw, provider, thread_id, f"the abandoned question {tag}")
    return len(results) + 3
