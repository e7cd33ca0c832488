"""What every HTTP surface shares: reading bodies, naming the org, opening SSE, errors.

- :func:`read_json` and :func:`json_response`: JSON in and out.
- :func:`require_org`: the org policy, the same on ``/api`` and ``/v1``: with
  ``DAC_AUTH=keys`` the bearer key names the org (missing, unknown or revoked:
  ``401`` with ``WWW-Authenticate: Bearer``; an ``x-org-id`` that disagrees:
  ``403``); with ``header`` the ``x-org-id`` does (missing or malformed: ``401``).
- :func:`stream_caller`: the org of a stream request, from its signed
  ``?token=`` (anything but a good token for that stream: ``404``) or else as
  :func:`require_org` says.
- :func:`open_sse` and :func:`send`: an SSE response with keep-alive pings
  (:class:`PingedSSE`), and writes that drop a client which takes nothing for
  the send timeout (``DAC_SEND_TIMEOUT_S``).
- :func:`open_event_stream`: an SSE response the flight's log can also push
  to straight from its append (:class:`SSEStream`); the log sends its pings.
- :func:`error_middleware`: one factory, with a renderer per surface; every
  error answer is counted once, where it is rendered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Middleware

from ..appkeys import AUTH, CLOSE_AFTER, METRICS, SETTINGS
from ..auth import AuthMode
from ..config import Settings
from ..errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from ..metrics import Metrics
from ._input import MAX_DEPTH, check_depth, read_body

__all__ = [
    "ORG_RE",
    "error_middleware",
    "json_response",
    "last_event_id",
    "open_event_stream",
    "PingedSSE",
    "Preflight",
    "open_sse",
    "read_json",
    "require_org",
    "send",
    "stream_caller",
]

log = logging.getLogger("server")

ORG_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
#: a pushed subscriber whose unsent bytes pass this falls back to replay (aiohttp drains at it too)
HIGH_WATER_BYTES = 64 * 1024
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "Connection": "keep-alive", "X-Accel-Buffering": "no"}
#: what aiohttp may add to a write of ours, at most: the chunk framing, and the status line
#: and headers that leave with the first one
WRITE_OVERHEAD = 4096
#: a keep-alive comment (clients skip lines that start with ':')
PING = b": ping\n\n"
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Released(Protocol):
    """Told how a handed-over stream ended (a listener's lease, :meth:`SSEStream.then`)."""

    def release(self, exc: BaseException | None) -> None: ...


#: the app's keys (``request.app``, or ``request.config_dict``): a handler that reads several passes it on
Config = Mapping[Any, Any]


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type="application/json")


async def read_json(request: web.Request, settings: Settings | None = None) -> dict[str, Any]:
    """The request body as a JSON object (``{}`` when empty), or a 4xx saying what is wrong.

    A body that is not ``application/json`` (or ``application/...+json``) is a 415:
    a browser sends no other type from another site without asking first (CORS).
    """
    raw = await read_body(request, settings)
    if not raw or raw.isspace():
        return {}
    mime = request.content_type
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise UnsupportedMediaType(f"request bodies must be application/json, not {mime}", param="Content-Type")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    # every level of nesting opens with a bracket: a body with no more of them than the limit
    # (most bodies) cannot nest deeper, and is not walked
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        check_depth(body)
    return body


async def require_org(request: web.Request, *, allow_query: bool = False, default: str | None = None,
                      env_keys: bool = False, cfg: Config | None = None) -> str:
    """The org of the caller, as ``DAC_AUTH`` says (see the module's docstring).

    In ``header`` mode: ``x-org-id`` (or ``?org=`` with ``allow_query``), else
    ``default``; with ``env_keys``, a ``DAC_API_KEYS`` key instead when any is
    set (``/v1``'s rule). In ``keys`` mode a key is always required.
    """
    auth = (cfg or request.config_dict)[AUTH]
    if auth.mode is AuthMode.KEYS:
        org = await auth.keys.org_for(_bearer(request))
        if org is None:
            raise Unauthorized("unknown or revoked API key", type="invalid_api_key")
        claimed = request.headers.get("x-org-id")
        if claimed is not None and claimed != org:
            raise Forbidden("x-org-id names another org than the API key's", param="x-org-id")
        return org
    if env_keys and auth.keys.has_env_keys:
        org = auth.keys.env_org(_bearer(request))
        if org is None:
            raise Unauthorized("incorrect API key", type="invalid_api_key")
        return org
    return _header_org(request, allow_query=allow_query, default=default)


def _bearer(request: web.Request) -> str:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", type="invalid_api_key")
    return key


def _header_org(request: web.Request, *, allow_query: bool, default: str | None) -> str:
    org = request.headers.get("x-org-id")
    if org is None and allow_query:
        org = request.query.get("org")
    if not org:
        if default is not None:
            return default
        where = "header x-org-id (or ?org= on streams)" if allow_query else "header x-org-id"
        raise Unauthorized(f"missing {where}: every request names its org")
    if not ORG_RE.match(org):
        raise Unauthorized("x-org-id must be 1-128 letters, digits or _.:@-", param="x-org-id")
    return org


async def stream_caller(request: web.Request, stream_id: str) -> tuple[str, str | None]:
    """``(org, listener)`` of a request for ``stream_id``: what its ``?token=`` was
    signed for (a bad, expired or another stream's token: 404, as if the stream did
    not exist), or else the caller's org and no listener."""
    token = request.query.get("token")
    if token is not None:
        found = request.config_dict[AUTH].tokens.verify(token, stream_id)
        if found is None:
            raise NotFound("stream not found")
        return found
    return await require_org(request, allow_query=True), None


def last_event_id(request: web.Request) -> int:
    """The resume point: ``Last-Event-ID`` or ``?last_event_id=``; 0 when absent."""
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


class _HeldHeaders(web.StreamResponse):
    """A streamed response whose status line and headers leave with its first bytes (one
    packet, one write) rather than on their own when it is prepared."""

    _send_headers_immediately = False


class PingedSSE:
    """An SSE response that pings while idle (``: ping`` every keep-alive interval), for a
    surface that writes its own frames (``/v1``); use as ``async with``, which stops the pings.

    Its status line leaves with the first frames. Once a stream has lived one interval the
    kernel is also told to drop its connection when sent bytes stay unacknowledged for the
    send timeout (``TCP_USER_TIMEOUT``): a hung peer is found even when nothing fills the
    buffers. A short stream never needs it, and saves the system calls.
    """

    __slots__ = ("_armed", "_chunked", "_dropped", "_due", "_interval", "_pinging", "_request", "_saved_user_timeout",
                 "_socket", "_timeout", "response")

    def __init__(self, request: web.Request, response: web.StreamResponse, *, ping_interval: float,
                 send_timeout: float) -> None:
        self.response = response
        self._request = request
        self._chunked = request.version >= HttpVersion11
        self._interval = ping_interval
        self._timeout = send_timeout
        self._socket: Any = None
        self._saved_user_timeout: int | None = None
        # a timer until the first ping is due, armed once the first frames are written (they
        # go first): most streams end before it, and need no task
        self._pinging: asyncio.Future[None] | None = None
        self._due: asyncio.TimerHandle | None = None
        self._armed = False
        #: the client took nothing for the send timeout: its connection is aborted at the end
        self._dropped = False

    def _start(self) -> None:
        self._due = None
        self._pinging = asyncio.ensure_future(self._ping())

    async def write(self, frames: bytes) -> None:
        """Write pre-encoded frames, bounded by the send timeout (see :func:`send`).

        Bytes that stay below the transport's high-water mark cannot make the write wait
        (only a paused transport does), so they go without arming the timeout's timer.
        """
        transport = self._request.transport
        if transport is not None and (transport.get_write_buffer_size() + len(frames) + WRITE_OVERHEAD
                                      < transport.get_write_buffer_limits()[1]):
            await self.response.write(frames)
        else:
            try:
                await send(self.response, frames, self._timeout)
            except TimeoutError:
                self._dropped = True  # its connection is aborted on the way out (``__aexit__``)
                raise
        if not self._armed:
            self._armed = True
            self._due = asyncio.get_running_loop().call_later(self._interval, self._start)

    def push(self, data: bytes) -> bool:
        """Write ``data`` straight to the transport, framed as an HTTP/1.1 chunk, without
        waiting (the log's push, see :class:`SSEStream`): False, having written nothing,
        when more than ``HIGH_WATER_BYTES`` are unsent or the connection is gone. Only
        after a first :meth:`write`, which sent the status line. The log's keep-alive
        comments are left out: this stream pings on its own timer."""
        if not data or data == PING:
            return True
        transport = self._request.transport
        if transport is None or transport.get_write_buffer_size() > HIGH_WATER_BYTES or transport.is_closing():
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        return True

    async def _ping(self) -> None:
        self._set_user_timeout()
        while True:
            try:
                await send(self.response, PING, self._timeout)
            except TimeoutError:
                if (transport := self._request.transport) is not None:
                    transport.abort()  # a stalled peer never drains: a graceful close would hang
                return
            except (ConnectionResetError, RuntimeError):  # gone, or written after the end
                return
            await asyncio.sleep(self._interval)

    def _set_user_timeout(self) -> None:
        transport = self._request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if _TCP_USER_TIMEOUT is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            saved = sock.getsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(self._timeout * 1000))
        except OSError:  # the connection is gone already: its handler is being cancelled
            return
        self._socket, self._saved_user_timeout = sock, saved

    async def __aenter__(self) -> PingedSSE:
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
        try:
            await self._stop_pinging()
        finally:
            if self._dropped and (transport := self._request.transport) is not None:
                # a stalled peer never drains: a graceful close would keep the connection open
                # for good. Aborted only now, as the stream's end (its TimeoutError) goes out
                # with no step between for the connection's loss to cancel the handler.
                transport.abort()

    async def _stop_pinging(self) -> None:
        if self._pinging is None:
            return
        self._pinging.cancel()
        try:
            await self._pinging
        except asyncio.CancelledError:
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise
        finally:
            # the connection may serve more requests: give it back its own setting
            if self._saved_user_timeout is not None and self._socket.fileno() >= 0:
                with contextlib.suppress(OSError):
                    self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, self._saved_user_timeout)


async def open_sse(request: web.Request, *, headers: Mapping[str, str] | None = None) -> PingedSSE:
    """Start an SSE response that pings while idle (:class:`PingedSSE`); its status line
    leaves with the first write.

    From here on an error can no longer change the status: the error
    middleware lets it through and aiohttp closes the connection.
    """
    settings = request.app[SETTINGS]
    response = _HeldHeaders(headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    request.app[METRICS].response_started()
    return PingedSSE(request, response, ping_interval=settings.ping_interval_s,
                     send_timeout=settings.send_timeout_s)


async def send(resp: web.StreamResponse, frames: bytes, timeout: float) -> None:
    """Write pre-encoded SSE bytes; a client that takes none for ``timeout`` seconds is
    dropped (``TimeoutError``; its connection is closed once the handler has let go of it:
    see :meth:`PingedSSE.__aexit__`)."""
    try:
        async with asyncio.timeout(timeout):
            await resp.write(frames)
    except TimeoutError:
        resp.force_close()
        raise


class SSEStream:
    """An SSE response written two ways (the ``EventStream`` of :mod:`server.turns`).

    :meth:`write` is aiohttp's awaited write, bounded by the send timeout.
    :meth:`push` writes straight to the transport, framed as an HTTP/1.1 chunk,
    and never waits: with more than ``HIGH_WATER_BYTES`` unsent, or the
    connection gone, it writes nothing and says so. The first write must be an
    awaited one: it carries the status line and headers.
    """

    __slots__ = ("_chunked", "_ending", "_rest", "_timeout", "_transport", "_writer", "response")

    #: the last payload framed, and its framing: a flush pushes one payload to every sink
    _memo: tuple[bytes, bytes] = (b"", b"")

    def __init__(self, request: web.Request, response: web.StreamResponse, writer: AbstractStreamWriter) -> None:
        self.response = response
        self._writer = writer
        self._transport = request.transport
        self._chunked = request.version >= HttpVersion11
        self._timeout = request.config_dict[SETTINGS].send_timeout_s
        #: what :meth:`then` handed to the response: the rest of the stream, and who is told its end
        self._rest: Coroutine[Any, Any, None] | None = None
        self._ending: Released | None = None

    async def write(self, data: bytes) -> None:
        """Write in slices of at most ``HIGH_WATER_BYTES``, each time waiting while the
        transport is over its high-water mark (pushed bytes, which aiohttp's own
        accounting does not see, count too): at most twice the mark is ever buffered."""
        view = memoryview(data)
        try:
            async with asyncio.timeout(self._timeout):
                for start in range(0, len(view), HIGH_WATER_BYTES):
                    await self.response.write(view[start:start + HIGH_WATER_BYTES])
                    await self._writer.drain()
        except TimeoutError:
            self.response.force_close()
            if self._transport is not None:
                self._transport.abort()  # a stalled peer never drains: a graceful close would hang
            raise

    def push(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.get_write_buffer_size() > HIGH_WATER_BYTES or transport.is_closing():
            return False
        if self._chunked:
            payload, framed = SSEStream._memo
            if payload is not data:
                framed = b"%x\r\n%b\r\n" % (len(data), data)
                SSEStream._memo = (data, framed)
            data = framed
        transport.write(data)
        return True

    def then(self, rest: Coroutine[Any, Any, None], ending: Released) -> web.StreamResponse:
        """The response, for its handler to return at once, with the rest of the stream
        handed to it: aiohttp awaits ``rest`` where it ends the response, after the handler
        and its middlewares have returned, so none of their coroutines stays in memory
        while the stream lasts; then ``ending.release`` is called with how ``rest`` ended
        (None: it returned). Call it as the handler returns: nothing may fail between."""
        response = self.response
        assert isinstance(response, _EventStreamResponse)
        self._rest, self._ending = rest, ending
        response.stream = self
        return response


class _EventStreamResponse(web.StreamResponse):
    """An SSE response whose status line and headers go out with its first frame, in one
    write (as aiohttp's ``Response`` sends them with its body); what its handler handed
    it (:meth:`SSEStream.then`) runs before its end is written."""

    _send_headers_immediately = False
    #: the stream whose rest was handed over (:meth:`SSEStream.then`)
    stream: SSEStream | None = None

    async def write_eof(self, data: bytes = b"") -> None:
        if (stream := self.stream) is not None:  # run here, not in a coroutine of its own: one frame less
            rest, ending = stream._rest, stream._ending
            stream._rest = stream._ending = self.stream = None
            del stream
            assert rest is not None and ending is not None
            try:
                await rest
            except BaseException as exc:
                ending.release(exc)
                if isinstance(exc, TimeoutError):
                    # a client that took nothing for the send timeout was dropped (its connection
                    # is closed): for aiohttp a client that left, as from a handler
                    raise ConnectionResetError("the client took nothing for the send timeout") from exc
                raise
            ending.release(None)
        await super().write_eof(data)


async def open_event_stream(request: web.Request) -> SSEStream:
    """Start an SSE response the log can push to (see :class:`SSEStream`); its status line
    goes with the first (awaited) write.

    As with :func:`open_sse`, an error after this can no longer change the status.
    A stream may last long and there may be thousands: what it no longer needs once
    its headers are serialized is dropped.
    """
    response = _EventStreamResponse(headers=SSE_HEADERS)
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()
    writer = await response.prepare(request)
    assert writer is not None
    request.app[METRICS].response_started()
    response.headers.clear()  # serialized already; nothing reads them again
    # aiohttp's idle keep-alive timer only reschedules itself while a response is under way:
    # drop it for the stream (it is armed again when the response ends), one timer less a stream
    request.protocol.keep_alive(True)
    return SSEStream(request, response, writer)


def _to_gateway_error(request: web.Request, exc: Exception, *, started: bool) -> GatewayError | None:
    """The error an exception stands for, or None when it must propagate as it is
    (a redirect; a failure after a stream's status line went out)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.config_dict[SETTINGS].max_body_bytes
        return PayloadTooLarge(f"request body too large (limit {limit} bytes)", limit="max_body_bytes")
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = exc.reason if exc.status != 404 else f"no route for {request.method} {request.path}"
        return GatewayError(message, type=kind, status=exc.status)
    if started:
        return None  # the status line is gone: aiohttp closes the connection
    log.exception("unexpected error on %s %s", request.method, request.path)
    return GatewayError("internal server error; the failure was logged")


Render = Callable[[GatewayError], web.Response]
#: the answer to a request that is a CORS preflight, None for any other request
Preflight = Callable[[web.Request], web.StreamResponse | None]


def error_middleware(render: Render, *, metrics: Metrics, under: Mapping[str, Render] | None = None,
                     preflight: Preflight | None = None) -> Middleware:
    """The app's one middleware (each layer costs every request a call): it answers every
    error with ``render(error)``, its status and headers; ``under`` maps a path prefix
    (``/v1``) to the renderer of the paths below it. An ``OPTIONS`` request is first put to
    ``preflight`` (CORS), whose answer, if any, is the response, outside the error handling.

    It counts the error in ``dac_errors_total`` by the gateway's type, once per
    request: a chat request whose record already counted its error is skipped.
    """
    prefixes = tuple((prefix, prefix + "/", renderer) for prefix, renderer in (under or {}).items())

    def renderer_for(path: str) -> Render:
        for prefix, below, renderer in prefixes:
            if path.startswith(below) or path == prefix:
                return renderer
        return render

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if preflight is not None and request.method == "OPTIONS" and (answer := preflight(request)) is not None:
            return answer
        with metrics.request_scope() as scope:
            try:
                return await handler(request)
            except Exception as exc:
                error = _to_gateway_error(request, exc, started=scope.started)
                if error is None:
                    raise
                metrics.count_error(error.type)
                response = renderer_for(request.path)(error)
                response.headers.update(error.headers())
                if request.get(CLOSE_AFTER):
                    response.force_close()
                if isinstance(exc, web.HTTPException) and exc.status == 405 and "Allow" in exc.headers:
                    response.headers["Allow"] = exc.headers["Allow"]
                return response

    return middleware
