"""Cross-origin calls: the browsers of the origins in ``DAC_CORS_ORIGINS`` only (none by default).

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
from a listed origin is answered ``204`` with what may be sent; from any other
origin ``403`` with a JSON error and no ``Access-Control-Allow-*`` header, so
the browser sends nothing. Answers to a listed origin carry
``Access-Control-Allow-Origin`` (streams too: the header goes out as the
response is prepared). Keys travel in ``Authorization``, never in cookies, so
no credentials are allowed. A page of another site cannot send a simple
(unflighted) request that does anything either: bodies must be
``application/json`` (``415`` otherwise), which browsers only send after a
preflight.
"""

from __future__ import annotations

from aiohttp import web

from ._http import Preflight, json_response

__all__ = ["setup"]

ALLOW_METHODS = "GET, POST, DELETE"
ALLOW_HEADERS = ("Authorization, Content-Type, Idempotency-Key, Cache-Control, Last-Event-ID, "
                 "x-org-id, x-thread-id")
EXPOSE_HEADERS = "x-dac-coalesce, Retry-After, x-should-retry, WWW-Authenticate"
MAX_AGE_S = 600


def setup(app: web.Application, origins: tuple[str, ...]) -> Preflight:
    """Mark responses for ``origins``; returns what answers an ``OPTIONS`` request that is a
    preflight (None for any other), which the app's one middleware asks first, before its
    own handling (a function, not a middleware of its own: a middleware is one more
    coroutine on every request, held for as long as a stream lasts)."""
    allowed = frozenset(origins)

    def preflight(request: web.Request) -> web.StreamResponse | None:
        origin = request.headers.get("Origin")
        if origin is None or "Access-Control-Request-Method" not in request.headers:
            return None
        if origin not in allowed:
            return json_response({"error": {
                "type": "cors_refused", "retryable": False,
                "message": f"the origin {origin} may not call this API from a browser (DAC_CORS_ORIGINS)"}},
                status=403, headers={"Vary": "Origin"})
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_S),
            "Vary": "Origin",
        })

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin in allowed and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")

    if allowed:
        app.on_response_prepare.append(mark)
    return preflight
