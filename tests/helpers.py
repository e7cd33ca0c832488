"""Shared test parts: a server on a real socket, a scripted provider, SSE collection.

Everything here talks to 127.0.0.1 only, and every wait has a timeout whose
failure says what arrived.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from server import serving
from server.app import make_app
from server.appkeys import METRICS, REGISTRY, STORE
from server.config import Settings
from server.errors import GatewayError
from server.providers import Chunk, MockProvider, Provider, ProviderRegistry, ProviderRequest
from tools.client import GatewayClient
from tools.sse import SseEvent, sse_events

DEFAULT_TIMEOUT = 10.0


async def within(awaitable: Any, timeout: float = DEFAULT_TIMEOUT, what: str = "") -> Any:
    """Await with a timeout whose failure names what was awaited."""
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what or awaitable!r}") from None


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManualClock:
    """A monotonic clock that moves only when the test says: TTLs pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- a provider the test drives step by step ---------------------------------


@dataclass(eq=False)
class ScriptedCall:
    request: ProviderRequest
    items: asyncio.Queue[str | BaseException | None] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    closed_at: float | None = None
    yielded: int = 0

    def send(self, *texts: str) -> None:
        for text in texts:
            self.items.put_nowait(text)

    def finish(self) -> None:
        self.items.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self.items.put_nowait(error)


class ScriptedProvider(Provider):
    """Each upstream call waits for the test to send it tokens, a finish or an error."""

    kind = "mock"

    def __init__(self, name: str = "scripted", *, max_concurrency: int = 16) -> None:
        self.name = name
        self.default_model = "scripted"
        self.max_concurrency = max_concurrency
        self.calls: list[ScriptedCall] = []
        self._new: asyncio.Queue[ScriptedCall] = asyncio.Queue()

    async def next_call(self, timeout: float = DEFAULT_TIMEOUT) -> ScriptedCall:
        return await within(self._new.get(), timeout, f"an upstream call to {self.name}")

    @property
    def open_calls(self) -> int:
        return sum(1 for c in self.calls if not c.closed.is_set())

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Chunk, None]:
        call = ScriptedCall(request)
        self.calls.append(call)
        self._new.put_nowait(call)
        try:
            while True:
                item = await call.items.get()
                if item is None:
                    yield Chunk(finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": call.yielded})
                    return
                if isinstance(item, BaseException):
                    raise item
                call.yielded += 1
                yield Chunk(text=item)
        finally:
            call.closed_at = time.perf_counter()
            call.closed.set()


async def stream_chunks(provider: Provider, request: ProviderRequest) -> list[Chunk]:
    """Every chunk a provider streams for ``request``."""
    async def go() -> list[Chunk]:
        return [chunk async for chunk in provider.stream(request)]
    return await within(go(), what="the adapter's stream")


async def stream_failure(provider: Provider, request: ProviderRequest) -> tuple[GatewayError, str]:
    """The error a provider's stream ends with, and the text that came before it."""
    text = ""

    async def go() -> None:
        nonlocal text
        async for chunk in provider.stream(request):
            text += chunk.text

    try:
        await within(go(), what="the adapter's stream to fail")
    except GatewayError as exc:
        return exc, text
    raise AssertionError(f"the stream ended without an error after {text!r}")


# -- SSE (read with tools.sse) -----------------------------------------------


async def collect(resp: aiohttp.ClientResponse, timeout: float = DEFAULT_TIMEOUT) -> list[SseEvent]:
    """Every event of a stream until it ends."""
    events: list[SseEvent] = []

    async def run() -> None:
        async for ev in sse_events(resp):
            events.append(ev)

    try:
        async with asyncio.timeout(timeout):
            await run()
    except TimeoutError:
        raise AssertionError(f"stream did not end within {timeout}s; got {events!r}") from None
    return events


def text_of(events: list[SseEvent]) -> str:
    """The answer as a client would rebuild it: deltas appended, snapshots replacing."""
    text = ""
    for ev in events:
        if ev.event == "delta":
            text += ev.json()["text"]
        elif ev.event == "snapshot":
            text = ev.json()["text"]
    return text


# -- a gateway on a real socket ---------------------------------------------------


class Gateway(GatewayClient):
    """A gateway in this process on a real socket: the shared client (org ``org_a`` unless a
    call names another), and the app's hub, store and metrics for the tests to look into."""

    def __init__(self, url: str, app: web.Application, runner: web.AppRunner, session: aiohttp.ClientSession,
                 settings: Settings) -> None:
        super().__init__(session, url, org="org_a")
        self.app = app
        self.runner = runner
        self.settings = settings

    h = GatewayClient.headers

    @property
    def hub(self):  # noqa: ANN201
        return self.app[REGISTRY]

    @property
    def store(self):  # noqa: ANN201
        return self.app[STORE]

    @property
    def metrics(self):  # noqa: ANN201
        return self.app[METRICS]

    async def post(self, thread_id: str, body: dict[str, Any], *, org: str | None = None,
                   headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """A non-stream message, within the default timeout; returns (status, JSON body)."""
        return await within(super().post(thread_id, body, org=org, headers=headers), what="POST messages")

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


async def start_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """Serve ``app`` on a free port of 127.0.0.1 as ``serve()`` does, connection limits included."""
    return await serving.start(app, settings, host="127.0.0.1", port=0, shutdown_timeout=2)


def registry(*providers: Provider, default: str = "mock") -> ProviderRegistry:
    names = {p.name for p in providers}
    extra = [] if "mock" in names else [MockProvider()]
    return ProviderRegistry([*extra, *providers], default=default)


async def start_gateway(settings: Settings, providers: ProviderRegistry | None = None,
                        *, connections: int = 100, clock: ManualClock | None = None) -> Gateway:
    app = make_app(settings, providers=providers) if clock is None else make_app(
        settings, providers=providers, clock=clock)
    runner = await start_runner(app, settings)
    host, port = runner.addresses[0][:2]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                    timeout=aiohttp.ClientTimeout(total=60))
    return Gateway(f"http://{host}:{port}", app, runner, session, settings)


async def slow_reader(gw: Gateway, request: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client of ``gw`` with a small receive buffer (4 KiB), which sends ``request`` (raw
    HTTP) and then reads only when the test says: its socket stops taking bytes soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(tuple(gw.runner.addresses[0][:2]))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request.encode())
    return reader, writer
