"""``/api``: threads, messages in three answer modes, and streams.

Every request names its org in ``x-org-id`` (EventSource, which cannot send
headers, uses ``?org=`` on ``/api/streams``). Validation happens before
anything is written or sent upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..app import HUB, METRICS, PROVIDERS, SETTINGS, STORE, STREAM_STARTED
from ..errors import BadRequest, GatewayError, NotFound, Unauthorized
from ..eventlog import encode_event
from ..hub import Flight, TurnRequest
from ..metrics import RequestRecord

__all__ = ["coalesce_key", "read_json", "require_org", "setup", "stream_flight"]

ORG_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
MAX_CONTENT_CHARS = 200_000
MAX_TITLE_CHARS = 200
DEFAULT_THREAD_LIMIT = 200
MAX_THREAD_LIMIT = 1000
#: a write that a client does not take within this long ends its stream
SEND_TIMEOUT_S = EventSourceResponse.DEFAULT_SEND_TIMEOUT or 120.0


def json_response(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def require_org(request: web.Request, *, allow_query: bool = False) -> str:
    org = request.headers.get("x-org-id")
    if org is None and allow_query:
        org = request.query.get("org")
    if not org:
        where = "header x-org-id (or ?org= on streams)" if allow_query else "header x-org-id"
        raise Unauthorized(f"missing {where}: every /api request names its org")
    if not ORG_RE.match(org):
        raise Unauthorized("x-org-id must be 1-128 letters, digits or _.:@-")
    return org


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _optional_str(body: dict[str, Any], name: str, *, limit: int = 256) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name!r} must be a string", param=name)
    if len(value) > limit:
        raise BadRequest(f"{name!r} is longer than {limit} characters", param=name)
    return value


def coalesce_key(*parts: str) -> str:
    """sha1 over the parts, separated so that no two part lists collide."""
    digest = hashlib.sha1()
    for part in parts:
        encoded = part.encode()
        digest.update(b"%d:" % len(encoded))
        digest.update(encoded)
    return digest.hexdigest()


# -- threads --------------------------------------------------------------


async def create_thread(request: web.Request) -> web.Response:
    org = require_org(request)
    body = await read_json(request)
    title = _optional_str(body, "title", limit=MAX_TITLE_CHARS)
    thread = await request.app[STORE].create_thread(org, (title or "").strip() or "New thread")
    return json_response(thread, status=201)


async def list_threads(request: web.Request) -> web.Response:
    """The org's threads, newest first; ``?limit=N`` (1-1000, default 200)."""
    org = require_org(request)
    raw = request.query.get("limit", str(DEFAULT_THREAD_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_THREAD_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_THREAD_LIMIT}", param="limit")
    return json_response({"threads": await request.app[STORE].list_threads(org, limit=int(raw))})


async def get_thread(request: web.Request) -> web.Response:
    org = require_org(request)
    store = request.app[STORE]
    thread = await store.get_thread(org, request.match_info["thread_id"])
    if thread is None:
        raise NotFound("thread not found")
    thread["messages"] = await store.messages(org, thread["thread_id"])
    return json_response(thread)


async def delete_thread(request: web.Request) -> web.Response:
    org = require_org(request)
    thread_id = request.match_info["thread_id"]
    if not await request.app[STORE].delete_thread(org, thread_id):
        raise NotFound("thread not found")
    request.app[HUB].forget_thread(thread_id)
    return web.Response(status=204)


# -- messages ---------------------------------------------------------------


async def post_message(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    app = request.app
    settings = app[SETTINGS]
    org = require_org(request)
    thread_id = request.match_info["thread_id"]
    body = await read_json(request)

    role = body.get("role", "user")
    if role != "user":
        raise BadRequest("'role' must be 'user': only user messages can be sent", param="role")
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise BadRequest("'content' is required: a non-empty string", param="content")
    if len(content) > MAX_CONTENT_CHARS:
        raise BadRequest(f"'content' is longer than {MAX_CONTENT_CHARS} characters", param="content")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    provider = app[PROVIDERS].get(_optional_str(body, "provider") or settings.default_provider)
    model = _optional_str(body, "model") or settings.default_model or provider.default_model
    if not model:
        raise BadRequest(f"'model' is required for provider {provider.name!r}", param="model")
    provider.validate_model(model)
    meta = {k: v for k in ("reason", "scope") if (v := _optional_str(body, k)) is not None}
    idempotent = not body.get("tools") and not body.get("attachments")

    if await app[STORE].get_thread(org, thread_id) is None:
        raise NotFound("thread not found")

    sse = "text/event-stream" in request.headers.get("Accept", "")
    streaming = sse or bool(stream)
    key = None
    if idempotent and settings.coalesce_enabled and (settings.stream_fanout_enabled or not streaming):
        idem = request.headers.get("Idempotency-Key")
        key = coalesce_key("idem", org, idem) if idem else coalesce_key(
            "turn", org, thread_id, provider.name, model, content)
    turn = TurnRequest(
        org_id=org, thread_id=thread_id, content=content, provider=provider, model=model,
        meta=meta, key=key,
        no_cache=not idempotent or "no-cache" in request.headers.get("Cache-Control", "").lower(),
    )
    metrics = app[METRICS]
    error: str | None = None
    left = False  # the client went away before its answer

    if sse:
        flight, coalesce = app[HUB].submit(turn, listen=True)
        return await stream_flight(request, flight, coalesce=coalesce, started=started,
                                   route="messages", listening=True)

    if stream:
        # 202 at once: the stream is named before its flight gets a provider slot, and a
        # failure after this point reaches the client as the stream's ``error`` event.
        flight, coalesce, attach = app[HUB].accept(turn)
        known = None if flight.running else flight.error  # a failure the server already knows
        metrics.record(RequestRecord(route="messages", mode="accepted", coalesce=coalesce,
                                     latency_s=time.perf_counter() - started,
                                     error=known.type if known else None))
        if known is not None:
            raise known
        stream_url = f"/api/streams/{flight.stream_id}?org={org}" + (f"&attach={attach}" if attach else "")
        return json_response(
            {
                "stream_id": flight.stream_id,
                "stream_url": stream_url,
                "thread_id": thread_id,
                "user_message": flight.user_message,
                "coalesce": coalesce,
            },
            status=202,
        )

    flight, coalesce = app[HUB].submit(turn, listen=True)
    try:
        message = await flight.result()
    except GatewayError as exc:
        error = exc.type
        raise
    except asyncio.CancelledError:  # the client left before the answer was complete
        left = True
        raise
    finally:
        flight.remove_listener()
        metrics.record(RequestRecord(route="messages", mode="json", coalesce=coalesce,
                                     latency_s=time.perf_counter() - started, error=error, client_left=left,
                                     queue_wait_s=flight.queue_wait_s if coalesce == "leader" else None))
    return json_response(
        {"thread_id": thread_id, "user_message": flight.user_message, "message": message,
         "coalesce": coalesce}
    )


# -- streams ----------------------------------------------------------------


async def stream_flight(
    request: web.Request,
    flight: Flight,
    *,
    coalesce: str,
    started: float,
    route: str,
    listening: bool,
    cursor: int = 1,
) -> web.StreamResponse:
    """Answer with the flight's SSE stream from delta ``cursor``; the caller is a listener.

    With ``listening`` the caller was already counted (``Hub.submit``);
    otherwise it is counted here. Either way it is uncounted when the stream
    ends or the client leaves (the handler is cancelled then, idle or not).
    """
    if not listening:
        flight.add_listener(attach=request.query.get("attach"))
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    ttft: float | None = None
    error: str | None = None
    left = False
    try:
        # A POST holds its status line while the turn is not yet written (a provider
        # slot is awaited first), for at most one keep-alive interval: a failure within
        # it (503 queue full, 404 deleted thread) still leaves with its own status. A
        # stream_url always answers as a stream: its failure is the ``error`` event.
        if route == "messages":
            try:
                async with asyncio.timeout(settings.ping_interval_s):
                    await flight.ready.wait()
            except TimeoutError:
                pass
        if route == "messages" and flight.ready.is_set() and flight.message is None:
            assert flight.error is not None
            error = flight.error.type
            raise flight.error
        resp = EventSourceResponse(
            sep="\n", allow_all_methods=True, ping_interval=settings.ping_interval_s,
        )
        await resp.prepare(request)
        request[STREAM_STARTED] = True
        async with resp:  # stops the keep-alive pings however the stream ends
            await send(resp, encode_event("meta", {
                "stream_id": flight.stream_id,
                "thread_id": flight.turn.thread_id,
                "user_message_id": flight.user_message["message_id"],
                "coalesce": coalesce,
                "provider": flight.turn.provider.name,
                "model": flight.turn.model,
            }))
            async for frames in flight.frames(cursor):
                if ttft is None and (b"event: delta" in frames or b"event: snapshot" in frames):
                    ttft = time.perf_counter() - started
                await send(resp, frames)
        if flight.error is not None:
            error = flight.error.type
        return resp
    except (asyncio.CancelledError, ConnectionResetError, TimeoutError):
        # the client left (its handler is cancelled, idle or not; or a write found the
        # connection gone), or took nothing for SEND_TIMEOUT_S and was dropped
        left = True
        raise
    finally:
        flight.remove_listener()
        metrics.record(RequestRecord(
            route=route, mode="sse", coalesce=coalesce if route == "messages" else None,
            latency_s=time.perf_counter() - started, ttft_s=ttft, error=error, client_left=left,
            queue_wait_s=flight.queue_wait_s if coalesce == "leader" and route == "messages" else None,
        ))


async def send(resp: EventSourceResponse, frames: bytes) -> None:
    """Write pre-encoded SSE bytes; a client that takes none for SEND_TIMEOUT_S is dropped."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await resp.write(frames)
    except TimeoutError:
        resp.stop_streaming()
        raise


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("Last-Event-ID must be a whole number") from None
    if value < 0:
        raise BadRequest("Last-Event-ID must not be negative")
    return value


async def get_stream(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    org = require_org(request, allow_query=True)
    stream_id = request.match_info["stream_id"]
    after = _last_event_id(request)
    flight = request.app[HUB].stream(stream_id)
    if flight is not None and flight.turn.org_id == org:
        coalesce = "cache" if not flight.running else ("leader" if flight.listeners == 0 else "follower")
        return await stream_flight(request, flight, coalesce=coalesce, started=started,
                                   route="streams", listening=False, cursor=after + 1)
    found = await request.app[STORE].get_answer(org, stream_id)
    if found is None:
        raise NotFound("stream not found")
    message, user_message_id, last_seq = found
    resp = EventSourceResponse(sep="\n", allow_all_methods=True,
                               ping_interval=request.app[SETTINGS].ping_interval_s)
    await resp.prepare(request)
    request[STREAM_STARTED] = True
    async with resp:
        await send(resp, encode_event("meta", {
            "stream_id": stream_id, "thread_id": message["thread_id"], "user_message_id": user_message_id,
            "coalesce": "cache", "provider": message["provider"], "model": message["model"],
        }))
        if message["status"] == "complete":
            await send(resp, encode_event("done", {"message": message}, last_seq + 1))
        else:
            stored = message["meta"].get("error") if isinstance(message["meta"], dict) else None
            status = message["status"]
            error = stored or {
                "type": "cancelled" if status == "cancelled" else "interrupted",
                "message": f"this answer ended {status}"
                + (" (the server restarted)" if status != "cancelled" else ""),
                "retryable": True,
            }
            await send(resp, encode_event("error", {"error": error}))
    return resp


def setup(app: web.Application) -> None:
    r = app.router
    for path in ("/api/threads", "/api/threads/"):
        r.add_post(path, create_thread)
        r.add_get(path, list_threads)
    r.add_get("/api/threads/{thread_id}", get_thread)
    r.add_delete("/api/threads/{thread_id}", delete_thread)
    r.add_post("/api/threads/{thread_id}/messages", post_message)
    r.add_get("/api/streams/{stream_id}", get_stream)
