"""Operations: liveness, readiness, Prometheus metrics and the performance summary.

``setup`` also puts :func:`count_errors` outermost in the middleware chain,
around the one that turns exceptions into JSON errors, so every error answer
is counted in ``dac_errors_total`` by the type its body names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from ..app import METRICS, STORE
from ..errors import BadRequest
from .api import json_response

__all__ = ["DEFAULT_LAST_N", "MAX_LAST_N", "count_errors", "setup"]

DEFAULT_LAST_N = 100
MAX_LAST_N = 100_000
#: the type counted for an error answer whose body names none (aiohttp's own 500)
UNKNOWN_ERROR_TYPE = "internal_error"


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    store = request.app.get(STORE)
    if store is None or not store.is_open:
        return json_response({"status": "starting"}, status=503)
    return json_response({"status": "ready"})


async def prometheus(request: web.Request) -> web.Response:
    """The registry in the format the scraper asks for (OpenMetrics or the classic text)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def performance(request: web.Request) -> web.Response:
    raw = request.query.get("last_n", str(DEFAULT_LAST_N))
    try:
        last_n = int(raw)
    except ValueError:
        raise BadRequest("last_n must be a whole number", param="last_n") from None
    if not 1 <= last_n <= MAX_LAST_N:
        raise BadRequest(f"last_n must be between 1 and {MAX_LAST_N}", param="last_n")
    return json_response(request.app[METRICS].performance(last_n))


def _error_type(response: web.StreamResponse) -> str:
    body = getattr(response, "body", None)
    if isinstance(body, bytes):
        try:
            kind = orjson.loads(body)["error"]["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return UNKNOWN_ERROR_TYPE
        if isinstance(kind, str):
            return kind
    return UNKNOWN_ERROR_TYPE


@web.middleware
async def count_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count each error answer once; a chat request's own record may have counted it already."""
    metrics = request.app[METRICS]
    with metrics.request_scope() as scope:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects and the like pass through untouched
            if exc.status >= 400:
                metrics.count_error(UNKNOWN_ERROR_TYPE, scope)
            raise
        except Exception:  # aiohttp answers 500 for it
            metrics.count_error(UNKNOWN_ERROR_TYPE, scope)
            raise
        if response.status >= 400:
            metrics.count_error(_error_type(response), scope)
        return response


def setup(app: web.Application) -> None:
    app.middlewares.insert(0, count_errors)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", prometheus)
    r.add_get("/api/metrics/performance", performance)
