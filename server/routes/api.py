"""``/api``: threads, messages in three answer modes, and streams.

Every request names its org as ``DAC_AUTH`` says (:func:`._http.require_org`):
a bearer key, or a trusted ``x-org-id``. A stream URL carries its own signed
``?token=`` instead, for EventSource, which cannot send headers; the token also
names the listener for its Stop call. Validation happens before anything is
written or sent upstream; the turn itself is the turn service's.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from ..appkeys import AUTH, LIMITS, PROVIDERS, SETTINGS, STORE, TURNS
from ..errors import BadRequest, GatewayError, NotFound
from ..flight import TurnRequest
from ..providers import content_part
from ..turns import Lease, Surface, Until
from ._http import (
    json_response,
    last_event_id,
    open_event_stream,
    read_json,
    require_org,
    stream_caller,
)
from ._input import header_text, whole_number

__all__ = ["error_response", "setup"]

MAX_CONTENT_CHARS = 200_000
MAX_TITLE_CHARS = 200
DEFAULT_THREAD_LIMIT = 200
MAX_THREAD_LIMIT = 1000
DEFAULT_MESSAGE_LIMIT = 200
MAX_MESSAGE_LIMIT = 1000


def error_response(error: GatewayError) -> web.Response:
    """``{"error": {"type", "message", "retryable", ...}}`` with the error's status."""
    body = error.to_dict()
    if error.param is not None:
        body["param"] = error.param
    return json_response({"error": body}, status=error.status)


def _optional_str(body: dict[str, Any], name: str, *, limit: int = 256) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name!r} must be a string", param=name)
    if len(value) > limit:
        raise BadRequest(f"{name!r} is longer than {limit} characters", param=name)
    return value


# -- threads --------------------------------------------------------------


async def create_thread(request: web.Request) -> web.Response:
    org = await require_org(request)
    limits = request.app[LIMITS]
    limits.admit(org)
    body = await read_json(request)
    title = _optional_str(body, "title", limit=MAX_TITLE_CHARS)
    store = request.app[STORE]
    async with limits.new_thread(org, lambda: store.count_threads(org)):
        thread = await store.create_thread(org, (title or "").strip() or "New thread")
    return json_response(thread, status=201)


async def list_threads(request: web.Request) -> web.Response:
    """The org's threads, newest first; ``?limit=N`` (1-1000, default 200)."""
    org = await require_org(request)
    limit = whole_number(request, "limit", DEFAULT_THREAD_LIMIT, low=1, high=MAX_THREAD_LIMIT)
    return json_response({"threads": await request.app[STORE].list_threads(org, limit=limit)})


async def get_thread(request: web.Request) -> web.Response:
    """A thread and a page of its messages, oldest first: the newest ``?limit=N`` (1-1000,
    default 200) older than ``?before=MESSAGE_ID``; ``next_before`` while older ones remain."""
    org = await require_org(request)
    limit = whole_number(request, "limit", DEFAULT_MESSAGE_LIMIT, low=1, high=MAX_MESSAGE_LIMIT)
    before = request.query.get("before") or None
    store = request.app[STORE]
    thread = await store.get_thread(org, request.match_info["thread_id"])
    if thread is None:
        raise NotFound("thread not found")
    page = await store.messages_before(org, thread["thread_id"], limit=limit + 1, before=before)
    if page is None:
        raise BadRequest("before must name a message of this thread", param="before")
    messages: list[dict[str, Any]] = [dict(m) for m in page[:limit][::-1]]
    for m in messages:  # an answer being written: where a page (EventSource, no header) can follow it
        if m["role"] == "assistant" and m["status"] == "streaming":
            m["stream_url"] = _stream_path(request, org, m["message_id"], None)
    body: dict[str, Any] = {**thread, "messages": messages}
    if len(page) > limit:
        body["next_before"] = page[limit - 1]["message_id"]
    return json_response(body)


async def delete_thread(request: web.Request) -> web.Response:
    org = await require_org(request)
    if not await request.app[TURNS].delete_thread(org, request.match_info["thread_id"]):
        raise NotFound("thread not found")
    return web.Response(status=204)


# -- messages ---------------------------------------------------------------


def _attachments(raw: Any) -> list[dict[str, Any]]:
    """``attachments``: content parts (images by ``image_url``...) sent upstream after the text."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("'attachments' must be an array of content parts", param="attachments")
    return [content_part(part, f"attachments[{i}]") for i, part in enumerate(raw)]


def _tool_params(body: dict[str, Any]) -> dict[str, Any]:
    """``tools`` (with ``tool_choice`` and ``parallel_tool_calls``), passed upstream as on /v1."""
    tools = body.get("tools")
    if tools is None:
        return {}
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRequest("'tools' must be an array of tools", param="tools")
    params: dict[str, Any] = {"tools": tools} if tools else {}
    for name in ("tool_choice", "parallel_tool_calls"):
        if params and body.get(name) is not None:
            params[name] = body[name]
    return params


async def _parse_message(request: web.Request, org: str, *, sse: bool) -> tuple[TurnRequest, bool]:
    """The body of ``POST .../messages`` as a turn and its ``stream`` flag, or a 400/404
    before anything is written."""
    app = request.app
    settings = app[SETTINGS]
    thread_id = request.match_info["thread_id"]
    body = await read_json(request)
    if body.get("role", "user") != "user":
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
    attachments = _attachments(body.get("attachments"))
    params = _tool_params(body)
    if await app[STORE].get_thread(org, thread_id) is None:
        raise NotFound("thread not found")
    turn = app[TURNS].turn(
        surface=Surface.API, org_id=org, thread_id=thread_id, content=content, provider=provider, model=model,
        streaming=sse or bool(stream), meta=meta, params=params, attachments=attachments,
        shareable=not params and not attachments,
        idempotency_key=header_text(request, "Idempotency-Key"),
        no_cache="no-cache" in request.headers.get("Cache-Control", "").lower(),
    )
    return turn, bool(stream)


async def post_message(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    org = await require_org(request)
    request.app[LIMITS].admit(org)
    sse = "text/event-stream" in request.headers.get("Accept", "")
    turn, stream = await _parse_message(request, org, sse=sse)
    turns = request.app[TURNS]
    if sse:  # mode 2: the response is the stream
        async with turns.lease(turn, route="messages", mode="sse", started=started) as lease:
            await lease.hold(Until.ACCEPTED)
            out = await open_event_stream(request)
            # no local holds the meta frame while the stream lasts: Lease.stream drops it once sent
            await lease.stream(out, meta=_meta(request, lease, org))
            return out.response
    if stream:  # mode 3: 202 at once, then the stream_url
        flight, role, attach = await turns.accept(turn)
        stream_url = _stream_path(request, org, flight.stream_id, attach)
        return json_response({"stream_id": flight.stream_id, "stream_url": stream_url,
                              "thread_id": turn.thread_id, "user_message": flight.user_message,
                              "coalesce": role}, status=202)
    async with turns.lease(turn, route="messages", mode="json", started=started) as lease:
        message = await lease.result()
        return json_response({"thread_id": turn.thread_id, "user_message": lease.flight.user_message,
                              "message": message, "coalesce": lease.role})


# -- streams ----------------------------------------------------------------


def _stream_path(request: web.Request, org: str, stream_id: str, listener: str | None) -> str:
    """The stream's path with a signed token: it opens the stream with no header, and
    names ``listener`` (its attach promise, its Stop call)."""
    token = request.config_dict[AUTH].tokens.sign(org, stream_id, listener)
    return f"/api/streams/{stream_id}?token={token}"


def _meta(request: web.Request, lease: Lease, org: str) -> bytes:
    """The ``meta`` event of an ``/api`` stream, with this listener's ``stop_url``.

    A stream is the flight as ``/api`` SSE: this, then deltas from its cursor, then
    done/error (:meth:`Lease.stream`). Its handler awaits that itself, with no helper
    coroutine between: each frame of the chain stays in memory while the stream lasts."""
    return lease.meta_frame(stop_url=_stream_path(request, org, lease.flight.stream_id, lease.token))


async def get_stream(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    stream_id = request.match_info["stream_id"]
    org, listener = await stream_caller(request, stream_id)
    after = last_event_id(request)
    turns = request.app[TURNS]
    async with turns.attach(org, stream_id, token=listener, started=started) as attached:
        if (lease := attached.lease) is not None:
            out = await open_event_stream(request)
            # the rest of the stream runs once this handler and its middlewares have returned
            return out.then(lease.stream(out, cursor=after + 1, meta=_meta(request, lease, org)),
                            attached.hand_over())
    frames = await turns.stored_frames(org, stream_id)
    if frames is None:
        raise NotFound("stream not found")
    out = await open_event_stream(request)
    await out.write(b"".join(frames))
    return out.response


async def stop_stream(request: web.Request) -> web.Response:
    """``DELETE /api/streams/{id}?token=``: the client stops on purpose (204).

    The token (the stream_url's, or the meta event's stop_url's) names the
    listener. Its stream ends; when it was the last listener the upstream is
    aborted at once, with no grace. Other listeners keep the flight. Without a
    token, the caller's org (its key) stops the answer itself: every listener's
    stream ends and the upstream is aborted at once.
    """
    stream_id = request.match_info["stream_id"]
    if "token" not in request.query:  # the org's key (or x-org-id): the org stops the whole answer
        org = await require_org(request, allow_query=True)
        if not await request.app[TURNS].stop_flight(org, stream_id):
            raise NotFound("stream not found")
        return web.Response(status=204)
    org, listener = await stream_caller(request, stream_id)
    if listener is None or not await request.app[TURNS].stop(org, stream_id, listener):
        raise NotFound("stream not found")
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    r = app.router
    for path in ("/api/threads", "/api/threads/"):
        r.add_post(path, create_thread)
        r.add_get(path, list_threads)
    r.add_get("/api/threads/{thread_id}", get_thread)
    r.add_delete("/api/threads/{thread_id}", delete_thread)
    r.add_post("/api/threads/{thread_id}/messages", post_message)
    r.add_get("/api/streams/{stream_id}", get_stream)
    r.add_delete("/api/streams/{stream_id}", stop_stream)
