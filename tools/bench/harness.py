"""The client side of sections 1-4 and 6: the columns compared, one client for them all, and
the formatting of their figures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tools._common import ServerProcess, metric_sum, percentile, prometheus_samples
from tools.client import GatewayClient
from tools.sse import sse_events

FAKE_MODEL = "fake-model"
FAKE_KEY = "bench-key"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_read=60)
#: how often the servers' memory is read while a section runs
RSS_SAMPLE_S = 0.05


@dataclass(slots=True, kw_only=True)
class Target:
    """One column: a way of reaching the fake upstream."""

    name: str  # "direct", "v1", "api", FLOOR, "litellm"
    #: "openai": POST {base}/chat/completions to an OpenAI-compatible server; "v1": POST
    #: {base}/v1/chat/completions, the gateway's stateless surface; "dac": the gateway's thread API at {base}
    kind: str
    base: str
    #: the column's heading in the tables
    label: str = ""
    proc: ServerProcess | None = None
    #: for "v1" and "dac": the provider and model to name; model None means the mock mirroring the fake
    provider: str = "openai"
    model: str | None = FAKE_MODEL
    #: for "openai": the bearer token the column wants
    api_key: str = FAKE_KEY
    rss_idle: int | None = None
    rss_peak: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def via_fake(self) -> bool:
        return self.kind == "openai" or self.model is not None

    @property
    def openai_wire(self) -> bool:
        """Answers in OpenAI's chat.completions format (``data:`` chunks, ``[DONE]``)."""
        return self.kind in ("openai", "v1")

    @property
    def gateway(self) -> bool:
        return self.kind in ("v1", "dac")


@dataclass(slots=True, kw_only=True)
class Stream:
    ok: bool
    #: time.monotonic() when the request was sent
    started: float
    ttft_s: float | None
    total_s: float
    text: str
    error: str | None = None


@dataclass(slots=True, kw_only=True)
class UpstreamTiming:
    ttft_ms: float
    itl_ms: float
    tokens: int

    def mock_model(self) -> str:
        return f"mock:ttft={self.ttft_ms:g},itl={self.itl_ms:g},n={self.tokens}"


def openai_text(chunk: dict[str, Any]) -> str | None:
    """The text of a ``chat.completion.chunk``, if it carries any."""
    return (chunk["choices"][0].get("delta") or {}).get("content") if chunk.get("choices") else None


class Bench:
    """The client side of sections 1-4 and 6, over one aiohttp session."""

    def __init__(self, *, session: aiohttp.ClientSession, targets: list[Target], fake: ServerProcess,
                 run_id: str) -> None:
        self.session = session
        self.targets = targets
        self.fake = fake
        self.fake_url = fake.url
        self.run_id = run_id
        self.timing = UpstreamTiming(ttft_ms=0, itl_ms=0, tokens=1)
        self.section = "idle"

    async def set_upstream(self, *, ttft_ms: float, itl_ms: float, tokens: int) -> None:
        self.timing = UpstreamTiming(ttft_ms=ttft_ms, itl_ms=itl_ms, tokens=tokens)
        async with self.session.post(f"{self.fake_url}/config",
                                     json={"ttft_ms": ttft_ms, "itl_ms": itl_ms, "tokens": tokens}) as resp:
            resp.raise_for_status()

    async def sample_rss(self) -> None:
        """Each server's peak memory per phase (``self.section``: "idle" or "load"), until cancelled."""
        while True:
            for target in self.targets:
                if target.proc is not None:
                    rss = target.proc.rss_bytes()
                    target.rss_peak[self.section] = max(rss, target.rss_peak.get(self.section, 0))
            await asyncio.sleep(RSS_SAMPLE_S)

    async def fake_stats(self, last: int = 0) -> dict[str, Any]:
        params = {"last": str(last)} if last else {}
        async with self.session.get(f"{self.fake_url}/stats", params=params) as resp:
            return dict(await resp.json())

    async def upstream_calls(self, target: Target) -> int:
        """Calls that reached the upstream so far (the fake's count, or the gateway's for its mock)."""
        if target.via_fake:
            return int((await self.fake_stats(last=1))["calls"])
        async with self.session.get(f"{target.base}/metrics") as resp:
            text = await resp.text()
        return int(metric_sum(prometheus_samples(text), "dac_upstream_calls_total", provider="mock"))

    def gateway(self, target: Target) -> GatewayClient:
        """The thread API of a "dac" column."""
        return GatewayClient(self.session, target.base)

    async def new_thread(self, target: Target) -> str:
        return await self.gateway(target).new_thread("bench")

    async def thread_for(self, target: Target) -> str | None:
        """A fresh thread for a "dac" column (made before any clock starts); None for the others."""
        return await self.new_thread(target) if target.kind == "dac" else None

    def alternating(self, rounds: int, targets: list[Target] | None = None) -> Iterator[tuple[int, Target]]:
        """(round, column): every column (of ``targets``, default all) once a round, which of them
        goes first changing from round to round."""
        for r in range(rounds):
            for target in rotate(targets or self.targets, r):
                yield r, target

    def model_of(self, target: Target) -> str:
        """The model a column names: the fake's, or the gateway's ``provider/model`` on /v1."""
        model = target.model or self.timing.mock_model()
        return f"{target.provider}/{model}" if target.kind == "v1" else model

    def _request(self, target: Target, content: str, *,
                 stream: bool, thread: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
        accept = {"Accept": "text/event-stream"} if stream else {}
        if target.openai_wire:
            body: dict[str, Any] = {"model": self.model_of(target),
                                    "messages": [{"role": "user", "content": content}], "stream": stream}
            auth = ({"Authorization": f"Bearer {target.api_key}"} if target.kind == "openai"
                    else self.gateway(target).headers())
            path = "/v1/chat/completions" if target.kind == "v1" else "/chat/completions"
            return f"{target.base}{path}", body, {**auth, **accept}
        assert thread is not None
        gateway = self.gateway(target)
        body = {"content": content, "provider": target.provider, "model": target.model or self.timing.mock_model()}
        return f"{gateway.url}/api/threads/{thread}/messages", body, gateway.headers(**accept)

    def open(self, target: Target, content: str, *, thread: str | None = None) -> Any:
        """A streaming request; use as ``async with``."""
        url, body, headers = self._request(target, content, stream=True, thread=thread)
        return self.session.post(url, json=body, headers=headers)

    async def stream(self, target: Target, content: str, *, thread: str | None = None) -> Stream:
        started = time.monotonic()
        ttft, text, ok, error = None, "", False, None
        async with self.open(target, content, thread=thread) as resp:
            if resp.status != 200:
                return Stream(ok=False, started=started, ttft_s=None, total_s=time.monotonic() - started, text="",
                              error=f"HTTP {resp.status} {(await resp.text())[:200]}")
            async for ev in sse_events(resp):
                piece = None
                if target.openai_wire:
                    if ev.data == b"[DONE]":
                        ok = True
                    elif "error" in (chunk := ev.json()):
                        error = str(chunk["error"])
                    else:
                        piece = openai_text(chunk)
                elif ev.event == "delta":
                    piece = ev.json()["text"]
                elif ev.event == "done":
                    ok = True
                elif ev.event == "error":
                    error = str(ev.json()["error"])
                if piece:
                    text += piece
                    ttft = ev.at - started if ttft is None else ttft
        return Stream(ok=ok and error is None, started=started, ttft_s=ttft, total_s=time.monotonic() - started, text=text, error=error)

    async def complete(self, target: Target, content: str, *, thread: str | None = None) -> tuple[bool, float]:
        url, body, headers = self._request(target, content, stream=False, thread=thread)
        started = time.monotonic()
        async with self.session.post(url, json=body, headers=headers) as resp:
            data = await resp.read()
            ok = resp.status == 200 and len(data) > 0
        return ok, time.monotonic() - started


#: the column of tools/bare_proxy.py: what any aiohttp hop adds on this machine
FLOOR = "floor"

#: the columns whose failures are ours (a third-party column only reports)
OUR_COLUMNS = ("direct", "v1", "api")


def broken(cols: dict[str, dict[str, Any]], field_: str) -> bool:
    """Whether any of our columns counted a failure in ``field_`` (a number or a list)."""
    return any(cols.get(name, {}).get(field_) for name in OUR_COLUMNS)


def rotate(items: list[Target], r: int) -> list[Target]:
    """Alternate which system goes first from round to round."""
    k = r % len(items)
    return items[k:] + items[:k]


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 3)


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def median(values: list[float]) -> float | None:
    return percentile(values, 50)
