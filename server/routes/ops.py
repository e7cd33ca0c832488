"""Operations: liveness, readiness, Prometheus metrics and the performance summary."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from ..appkeys import METRICS, REGISTRY, STORE
from ..errors import BadRequest
from ._http import json_response, require_org

__all__ = ["DEFAULT_LAST_N", "MAX_LAST_N", "setup"]

DEFAULT_LAST_N = 100
MAX_LAST_N = 100_000


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    store = request.app.get(STORE)
    if store is None or not store.is_open:
        return json_response({"status": "starting"}, status=503)
    if not store.writable and not await store.check_writable():
        return json_response({"status": "store_unwritable", "store": store.engine}, status=503)
    registry = request.app.get(REGISTRY)
    return json_response({"status": "ready", "store": store.engine,
                          "registry": registry.engine if registry is not None else "inprocess"})


async def prometheus(request: web.Request) -> web.Response:
    """The registry in the format the scraper asks for (OpenMetrics or the classic text)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def performance(request: web.Request) -> web.Response:
    # a key's org sees its own requests; in header mode x-org-id picks one org, and its
    # absence shows every org's (header mode trusts its clients: see DAC_AUTH)
    org = await require_org(request, default="")
    raw = request.query.get("last_n", str(DEFAULT_LAST_N))
    try:
        last_n = int(raw)
    except ValueError:
        raise BadRequest("last_n must be a whole number", param="last_n") from None
    if not 1 <= last_n <= MAX_LAST_N:
        raise BadRequest(f"last_n must be between 1 and {MAX_LAST_N}", param="last_n")
    return json_response(request.app[METRICS].performance(last_n, org or None))


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", prometheus)
    r.add_get("/api/metrics/performance", performance)
