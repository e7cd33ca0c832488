#!/usr/bin/env python3
"""The floor: the least an aiohttp hop costs, for the benchmark's "aiohttp proxy" column.

    python -m tools.bare_proxy --port 9200 --upstream http://127.0.0.1:9100/v1

It passes ``POST /v1/chat/completions`` to the upstream as it came (body and
``Authorization``) and streams the answer back as it arrives, with aiohttp's
server and client on uvloop, as the gateway runs, and nothing else: no
parsing, no auth, no store, no coalescing, no metrics. What it adds over a
direct call is what any proxy built on these parts adds on this machine; what
the gateway adds over it is the gateway's own work. ``GET /v1/models`` answers
for the readiness probe. Only 127.0.0.1 is served.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

__all__ = ["make_app"]

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
#: headers passed on to the upstream
FORWARDED = ("Authorization", "Content-Type", "Accept")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
    async with request.app[SESSION].post(f"{request.app[UPSTREAM]}/chat/completions", data=body,
                                         headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status,
                                      headers={"Content-Type": upstream.headers.get("Content-Type", "")})
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bare_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, e.g. http://127.0.0.1:9100/v1")
    args = parser.parse_args(argv)
    if not args.upstream.startswith(("http://127.0.0.1", "http://localhost")):
        parser.error("--upstream must be on 127.0.0.1")
    import uvloop

    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None,
                loop=uvloop.new_event_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
