"""The aiohttp application: the composition of every layer.

This module picks the implementations behind the seams (the store: PostgreSQL
when ``DAC_DATABASE_URL`` is set, else SQLite; the flight registry and the
provider slots: on Redis when ``DAC_REDIS_URL`` is set, else the in-process hub
and pacer) and mounts the routes; nothing imports it but ``__main__``.
Resources live in one ``cleanup_ctx`` generator under typed ``web.AppKey``s:
the store opens before the first request and closes after the last flight
has been saved; ``on_shutdown`` tells listeners and cancels flights first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from . import serving
from .appkeys import AUTH, HEAP_TRIM, LIMITS, METRICS, PACER, PROVIDERS, REGISTRY, SETTINGS, STORE, TURNS
from .auth import Auth, load_secret
from .config import Settings
from .flight import Clock
from .hub import Hub
from .limits import OrgLimits
from .memory import HeapTrim
from .metrics import Metrics
from .pacer import Pacer, Slots
from .providers import ProviderRegistry, build_registry
from .routes import api, cors, openai_compat, ops
from .routes._http import error_middleware
from .serving import raise_fd_limit
from .sqlite_store import SQLiteStore
from .store import Store
from .turns import TurnService

__all__ = ["build_store", "make_app", "open_registry", "serve"]

log = logging.getLogger("server")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: the clock of the flight registry's TTLs, replaceable in tests
CLOCK: web.AppKey[Clock] = web.AppKey("clock")


def build_store(settings: Settings, *, server: bool = True) -> Store:
    """PostgreSQL when ``DAC_DATABASE_URL`` is set, else SQLite at ``DAC_DB``; not opened yet.

    A single instance is the only writer of its SQLite file, so that store keeps
    its caches (no read from disk before an upstream call). ``server`` False: a
    command beside a running server (``keys``), which keeps no cache and leaves
    the rows it streams alone. With ``DAC_REDIS_URL`` several instances may share
    the database: the store leaves the rows left ``streaming`` to the sweep by
    owner (:mod:`server.redis_sweep`) instead of marking them all at open.
    """
    recover = server and not settings.redis_url
    if settings.database_url:
        from .pg_store import PostgresStore  # asyncpg is loaded only where it is used

        return PostgresStore(settings.database_url, pool_size=settings.database_pool_size, recover=recover)
    # the caches know only this process's writes: with several workers on one file (Redis
    # shares their flights) another worker's turn would be missing from them, so none is kept
    return SQLiteStore(settings.db_path, cache=server and not settings.redis_url, recover=recover)


async def open_registry(settings: Settings, *, store: Store, metrics: Metrics, providers: ProviderRegistry,
                        clock: Clock, limits: OrgLimits | None = None) -> tuple[Hub, Slots]:
    """The flight registry and the provider slots: on Redis when ``DAC_REDIS_URL`` is set
    (raises :class:`~server.registry.RegistryOpenError` naming the setting when it does not answer), else in-process."""
    if not settings.redis_url:
        pacer = Pacer(queue_timeout_s=settings.queue_timeout_s)
        return Hub(settings=settings, store=store, pacer=pacer, metrics=metrics, clock=clock, limits=limits), pacer
    from .redis_hub import RedisHub, connect  # redis is loaded only where it is used
    from .redis_pacer import RedisPacer

    redis = connect(settings)
    slots = RedisPacer(redis, prefix=settings.redis_prefix, lease_s=settings.redis_lease_s,
                       queue_timeout_s=settings.queue_timeout_s)
    hub = RedisHub(settings=settings, store=store, pacer=slots, metrics=metrics, providers=providers.get,
                   redis=redis, clock=clock, limits=limits)
    await hub.open()
    return hub, slots


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    secret = load_secret(settings)  # first: nothing is open yet when it cannot be had
    if PROVIDERS not in app:  # first: a bad providers setting stops the start before the store opens
        app[PROVIDERS] = await build_registry(settings)
    store = build_store(settings)
    try:
        await store.open()
    except BaseException:
        await app[PROVIDERS].aclose()
        raise
    try:
        hub, app[PACER] = await open_registry(settings, store=store, metrics=app[METRICS],
                                              providers=app[PROVIDERS], clock=app[CLOCK], limits=app[LIMITS])
    except BaseException:
        await app[PROVIDERS].aclose()
        await store.close()
        raise
    app[STORE] = store
    app[AUTH] = Auth.build(settings, store, secret=secret, clock=app[CLOCK])
    app[REGISTRY] = hub
    app[TURNS] = TurnService(settings=settings, registry=hub, store=store, metrics=app[METRICS],
                             clock=app[CLOCK])
    probing = asyncio.ensure_future(app[PROVIDERS].probe_local())
    trim = app[HEAP_TRIM] = HeapTrim(every_s=settings.trim_idle_s, registered=lambda: hub.registered,
                                     running=lambda: hub.running, held=lambda: hub.held)
    trim.start()
    try:
        yield
    finally:
        trim.stop()
        probing.cancel()
        await hub.shutdown()
        await hub.close()
        await app[PROVIDERS].aclose()
        await store.close()


async def _on_shutdown(app: web.Application) -> None:
    if HEAP_TRIM in app:
        app[HEAP_TRIM].stop()  # what the ending flights free goes with the process
    if REGISTRY in app:
        await app[REGISTRY].shutdown()


def make_app(settings: Settings | None = None, *, providers: ProviderRegistry | None = None,
             clock: Clock = time.monotonic) -> web.Application:
    """Build the app. ``providers`` replaces the configured registry and ``clock`` the
    monotonic clock of result and error TTLs (tests use both)."""
    settings = settings or Settings.from_env()
    app = web.Application(client_max_size=settings.max_body_bytes)
    metrics = app[METRICS] = Metrics(window=settings.perf_window)
    # every error leaves as JSON with its status: ``{"error": {"type", "message", ...}}``, and in
    # OpenAI's shape under /v1; CORS preflights are answered in the same (one) middleware
    app.middlewares.append(error_middleware(
        api.error_response, metrics=metrics, under={openai_compat.PREFIX: openai_compat.error_response},
        preflight=cors.setup(app, settings.cors_origins)))
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[LIMITS] = OrgLimits(settings)
    if providers is not None:
        app[PROVIDERS] = providers
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_on_shutdown)
    api.setup(app)
    ops.setup(app)
    openai_compat.setup(app)
    if STATIC_DIR.is_dir():
        index = STATIC_DIR / "index.html"

        async def page(_: web.Request) -> web.StreamResponse:
            if not index.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

        app.router.add_get("/", page)
        app.router.add_get("/static/{path:.+}", static_file)
    return app


async def static_file(request: web.Request) -> web.StreamResponse:
    """A file under ``static/``; any name that is not one (too long, ``..``, a NUL) is 404."""
    try:
        path = (STATIC_DIR / request.match_info["path"]).resolve()
        found = path.is_relative_to(STATIC_DIR) and path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


async def serve(settings: Settings, *, announce: bool = True,
                greet: Callable[[web.Application, str], Awaitable[None]] | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly. ``greet(app, url)`` runs
    once the first address listens (``python -m server`` offers a first API key)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fds = raise_fd_limit()
    app = make_app(settings)
    runner = await serving.start(app, settings, host=settings.host, port=settings.port,
                                 access_log=log if settings.env.get("DAC_ACCESS_LOG") == "1" else None)
    log.debug("open files: %d; connections: at most %d", fds, runner.guard.cap)
    if announce:
        for address in runner.addresses:
            host, port = address[0], address[1]
            # one write with its newline: workers share the output, and print() writes the end apart
            sys.stdout.write(f"DAC gateway listening on http://{host}:{port} (db {settings.database})\n")
            sys.stdout.flush()
    if greet is not None and runner.addresses:
        host, port = runner.addresses[0][:2]
        await greet(app, f"http://{f'[{host}]' if ':' in host else host}:{port}")
    try:
        await stop.wait()
    finally:
        print("shutting down: telling listeners, saving turns", flush=True)
        await runner.cleanup()
