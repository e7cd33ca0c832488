"""Connections: what aiohttp's server lacks to face a network.

aiohttp gives an idle keep-alive timeout (``keepalive_timeout``, here
``DAC_KEEPALIVE_TIMEOUT_S``) and bounded request lines and headers; this module
adds the rest, in a request handler (aiohttp's protocol class) of its own:

- **Header timeout** (``DAC_HEADER_TIMEOUT_S``): a request line and its headers
  must arrive within this from their first byte, and a new connection must send
  its first request's headers within this of opening. A connection that dribbles
  (slowloris) is answered ``408`` and closed. (The body has its own timeout, where
  it is read: ``routes/_input.read_body``.)
- **Connection cap** (``DAC_MAX_CONNECTIONS``, and never more than the file
  descriptors allow, less a reserve): a connection beyond it is read up to its
  headers, answered ``503`` with ``Retry-After`` and closed; ``/healthz`` and
  ``/readyz`` are still answered on it, so probes work under that load.
- :func:`raise_fd_limit`: the soft limit of open files raised to the hard limit.

:func:`start` sets up the runner and the site with all of it; ``serve()`` and
the tests use it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from .config import Settings

__all__ = ["FD_RESERVE", "GuardedAppRunner", "connection_cap", "raise_fd_limit", "start"]

log = logging.getLogger("server")

#: file descriptors kept for what is not a client connection (the store, upstream calls, logs)
FD_RESERVE = 128
#: paths answered even beyond the connection cap
PROBES = frozenset({"/healthz", "/readyz"})

_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                   b"Content-Length: %d\r\n\r\n%b")


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_cap(settings: Settings) -> int:
    """``DAC_MAX_CONNECTIONS``, lowered so that the connections never use up the file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else settings.max_connections
    return max(1, min(settings.max_connections, room))


class _Guard:
    """What every connection of one server shares."""

    def __init__(self, settings: Settings) -> None:
        self.header_timeout_s = settings.header_timeout_s
        self.cap = connection_cap(settings)
        self.open = 0
        self.refused = 0
        self.timed_out = 0


class _Messages(list[Any]):
    """The requests parsed on a connection and not handled yet: what aiohttp keeps in a
    deque, which takes 760 bytes even when empty (its first block), on every connection
    for as long as it lasts. There is rarely more than one (pipelining is bounded)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class _Handler(RequestHandler):
    """aiohttp's protocol, with the header timeout and the connection cap."""

    __slots__ = ("_counted", "_guard", "_header_timer")  # one per connection: no dict

    def __init__(self, manager: web.Server, *, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._messages = _Messages()  # type: ignore[assignment]  # a list costs 56 bytes, a deque 760
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        guard.open += 1
        self._counted = True
        if guard.open > guard.cap:
            guard.refused += 1
            self._request_handler = self._refuse(self._request_handler)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if any(isinstance(message, _ErrInfo) for message, _ in self._messages):
            self._fail_open_bodies()
        if self._awaiting_headers():
            if self._header_timer is None:
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def _fail_open_bodies(self) -> None:
        """The parser failed inside a body (one that cannot be decoded, say): the request
        that body belongs to was parsed already, and would wait for the rest of it until
        the body timeout. Fail its read now (it answers 400)."""
        open_bodies = [payload for message, payload in self._messages if not isinstance(message, _ErrInfo)]
        if self._current_request is not None:
            open_bodies.append(self._current_request.content)
        for payload in open_bodies:
            if not payload.is_eof() and payload.exception() is None:
                payload.set_exception(RequestPayloadError("the request body could not be parsed"))

    def _awaiting_headers(self) -> bool:
        """Idle between requests with no whole request line and headers parsed yet."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self._loop.call_later(self._guard.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or not self._awaiting_headers():
            return
        self._guard.timed_out += 1
        body = orjson.dumps({"error": {
            "type": "request_timeout", "retryable": True,
            "message": f"the request line and headers did not arrive within {self._guard.header_timeout_s:g}s "
                       "(DAC_HEADER_TIMEOUT_S)"}})
        transport.write(_TIMEOUT_ANSWER % (len(body), body))
        self.force_close()
        transport.close()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (a bad request line, headers too
        long, a body that cannot be decoded), as JSON like every other error; the
        connection is closed."""
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            log.debug("refused a malformed request from %s: %s", request.remote, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed")
        kind = "internal_error" if status >= 500 else "invalid_request"
        text = "internal server error" if status >= 500 else f"malformed request: {message or exc or status}"
        response = web.Response(status=status, body=orjson.dumps({"error": {"type": kind, "message": text,
                                                                            "retryable": False}}),
                                content_type="application/json")
        response.force_close()
        return response

    def _refuse(self, handler: Any) -> Any:
        """Answer every request of this connection ``503``, probes aside, then close it."""
        cap = self._guard.cap

        async def refuse(request: BaseRequest) -> web.StreamResponse:
            if request.path in PROBES:
                response: web.StreamResponse = await handler(request)
            else:
                response = web.json_response(
                    {"error": {"type": "too_many_connections", "retryable": True,
                               "message": f"the server holds {cap} connections, its limit "
                                          "(DAC_MAX_CONNECTIONS); try again shortly"}},
                    status=503, headers={"Retry-After": "1"}, dumps=lambda v: orjson.dumps(v).decode())
            response.force_close()
            return response

        return refuse


class _Server(web.Server):
    def __init__(self, *args: Any, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections have the header timeout and the connection cap."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=settings.keepalive_timeout_s, **kwargs)
        self.guard = _Guard(settings)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _Server(plain.request_handler, request_factory=plain.request_factory,
                       handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                       guard=self.guard, **plain._kwargs)


async def start(app: web.Application, settings: Settings, *, host: str, port: int,
                access_log: logging.Logger | None = None, shutdown_timeout: float = 5.0) -> GuardedAppRunner:
    """Set up ``app`` and listen on ``host:port`` with every connection limit."""
    runner = GuardedAppRunner(
        app, settings,
        handler_cancellation=True,  # a client that leaves cancels its handler, idle or not
        access_log=access_log,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=settings.reuse_port or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
