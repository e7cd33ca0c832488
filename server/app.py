"""The aiohttp application: long-lived resources, middleware and routes.

Resources live in one ``cleanup_ctx`` generator under typed ``web.AppKey``s:
the store opens before the first request and closes after the last flight
has been saved; ``on_shutdown`` tells listeners and cancels flights first.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from .config import Settings
from .errors import GatewayError, PayloadTooLarge
from .hub import Hub
from .metrics import Metrics
from .pacer import Pacer
from .providers import ProviderRegistry, build_registry
from .store import Store

__all__ = ["HUB", "METRICS", "PROVIDERS", "SETTINGS", "STORE", "make_app", "serve"]

log = logging.getLogger("server")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
PACER = web.AppKey("pacer", Pacer)
PROVIDERS = web.AppKey("providers", ProviderRegistry)
HUB = web.AppKey("hub", Hub)

#: set on a request once its streaming response has been prepared
STREAM_STARTED = web.RequestKey("stream_started", bool)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def error_response(error: GatewayError) -> web.Response:
    body: dict[str, object] = {"error": {"type": error.type, "message": error.message}}
    if error.retryable:
        body["error"]["retryable"] = True  # type: ignore[index]
    return web.json_response(body, status=error.status, headers=error.headers())


def to_gateway_error(request: web.Request, exc: Exception) -> GatewayError | None:
    """The error an exception stands for, or None when it must propagate as it is
    (a redirect; a failure after a stream's status line went out)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.config_dict[SETTINGS].max_body_bytes
        return PayloadTooLarge(f"request body too large (limit {limit} bytes)")
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = exc.reason if exc.status != 404 else f"no route for {request.method} {request.path}"
        return GatewayError(message, type=kind, status=exc.status)
    if request.get(STREAM_STARTED):
        return None  # the status line is gone: aiohttp closes the connection
    log.exception("unexpected error on %s %s", request.method, request.path)
    return GatewayError("internal server error; the failure was logged")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_middleware(render: Callable[[GatewayError], web.Response], *, count: bool = False) -> Middleware:
    """A middleware answering every error with ``render(error)`` and its status.

    With ``count`` it also counts the error by type in the metrics (a surface
    whose body type differs from the gateway's counts its own).
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            error = to_gateway_error(request, exc)
            if error is None:
                raise
            if count:
                request.config_dict[METRICS].count_error(error.type)
            response = render(error)
            if isinstance(exc, web.HTTPException) and exc.status == 405 and "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response

    return middleware


#: every error leaves as JSON ``{"error": {"type", "message"}}`` with its status
errors_middleware = error_middleware(error_response)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if PROVIDERS not in app:  # first: a bad providers setting stops the start before the store opens
        app[PROVIDERS] = await build_registry(settings)
    store = Store(settings.db_path)
    await store.open()
    app[STORE] = store
    app[PACER] = Pacer(queue_timeout_s=settings.queue_timeout_s)
    app[HUB] = Hub(settings=settings, store=store, pacer=app[PACER], metrics=app[METRICS])
    try:
        yield
    finally:
        await app[HUB].shutdown()
        await app[PROVIDERS].aclose()
        await store.close()


async def _on_shutdown(app: web.Application) -> None:
    if HUB in app:
        await app[HUB].shutdown()


def make_app(settings: Settings | None = None, *, providers: ProviderRegistry | None = None) -> web.Application:
    """Build the app. ``providers`` replaces the configured registry (tests use it)."""
    from .routes import api, openai_compat, ops

    settings = settings or Settings.from_env()
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[errors_middleware])
    app[SETTINGS] = settings
    app[METRICS] = Metrics(window=settings.perf_window)
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
        app.router.add_static("/static/", STATIC_DIR)
    return app


async def serve(settings: Settings, *, announce: bool = True) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = make_app(settings)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that leaves cancels its handler, idle or not
        access_log=log if settings.env.get("DAC_ACCESS_LOG") == "1" else None,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    if announce:
        for address in runner.addresses:
            host, port = address[0], address[1]
            print(f"DAC gateway listening on http://{host}:{port} (db {settings.db_path})", flush=True)
    try:
        await stop.wait()
    finally:
        print("shutting down: telling listeners, saving turns", flush=True)
        await runner.cleanup()
