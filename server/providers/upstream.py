"""What the HTTP adapters share: timeouts, an SSE decoder, and the mapping of upstream failures.

Every way an upstream call can fail ends in one of :mod:`server.errors`'
classes, with a message that names the provider and never its key:

=====================================  ==========================================
upstream                               gateway error
=====================================  ==========================================
400, 422 (bad params)                  ``UpstreamBadRequest`` (400 ``invalid_request``)
404 (unknown model)                    ``UpstreamNotFound`` (404 ``model_not_found``)
413                                    ``UpstreamPayloadTooLarge`` (413)
401, 403                               ``ProviderAuthError`` (502 ``provider_auth``)
429                                    ``RateLimited``, ``retry_after`` from ``Retry-After``
408, 409, 5xx, 529 (overloaded)        ``UpstreamError`` (retryable)
other 4xx                              ``UpstreamError`` (not retryable)
no connection, reset, cut stream       ``UpstreamError`` (retryable)
a deadline passed                      ``UpstreamTimeout`` (``upstream_timeout``, retryable)
a body that is not the wire format     ``UpstreamProtocolError``
=====================================  ==========================================

A refused request keeps its meaning (a client's bad parameter is its own
400, not the gateway's 502), quotes the upstream's words with keys scrubbed,
and is never retryable.

Four deadlines bound a call (:class:`Timeouts`): connecting, the first
token (from the request to the first piece of output: text, reasoning, a
tool call or a refusal), the silence between two reads once output flows,
and the whole call.
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
import orjson
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from ..errors import (
    BadRequest,
    ProviderAuthError,
    RateLimited,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamNotFound,
    UpstreamPayloadTooLarge,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .base import DEFAULT_MAX_CONCURRENCY, Chunk, Provider, ProviderRequest

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_FIRST_TOKEN_TIMEOUT_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_TOTAL_TIMEOUT_S",
    "Deadlines",
    "HTTPProvider",
    "SSEDecoder",
    "StreamParser",
    "Timeouts",
    "client_error",
    "object_of",
    "parse_retry_after",
    "read_error_body",
    "scrub",
    "status_error",
]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: reasoning models may think for a while before their first token
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 120.0
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_TOTAL_TIMEOUT_S = 600.0
#: an error body is read up to this many bytes; the rest is dropped
MAX_ERROR_BODY_BYTES = 64 * 1024
#: upstream messages quoted in our errors are cut to this length
MAX_QUOTED_CHARS = 300
#: an SSE line longer than this is not the wire format we speak
MAX_SSE_LINE_BYTES = 8 * 1024 * 1024
REDACTED = "[redacted]"
#: after the end marker, the rest of the body is awaited this long before the socket is dropped
DRAIN_TIMEOUT_S = 0.5
#: how long a local server has to answer the probe at start
PROBE_TIMEOUT_S = 2.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds; each must be positive."""

    connect: float = DEFAULT_CONNECT_TIMEOUT_S
    first_token: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S
    idle: float = DEFAULT_IDLE_TIMEOUT_S
    total: float = DEFAULT_TOTAL_TIMEOUT_S

    def client_timeout(self) -> aiohttp.ClientTimeout:
        """aiohttp enforces the connect deadline; :class:`Deadlines` the others."""
        return aiohttp.ClientTimeout(total=None, connect=self.connect, sock_connect=self.connect)


class Deadlines:
    """The deadlines of one upstream call.

    ``await deadlines.run(aw)`` awaits ``aw`` until the nearest deadline: the
    first-token one until :meth:`got_output` is called, then the idle one
    (restarted by every read that returned), and always the total one.
    Output is anything the model produced: text, and also reasoning (a
    model may think for minutes before its first word), tool calls and
    refusals. :meth:`close` once the call has ended.

    One loop timer watches them all, where a timeout per await would arm and
    cancel a timer for every read of a stream: it is set for the nearest
    deadline and, when it fires, either finds that deadline moved on (reads
    came; it is set again) or cancels the awaiting task, as ``asyncio.timeout``
    does, which :meth:`run` turns into :class:`~server.errors.UpstreamTimeout`.
    A deadline counts only while :meth:`run` awaits.
    """

    __slots__ = ("_provider", "_timeouts", "_loop", "_total_at", "_first_at", "_last", "_text", "_timer",
                 "_timer_at", "_task", "_cancelling", "_expired")

    def __init__(self, *, provider: str, timeouts: Timeouts) -> None:
        self._provider = provider
        self._timeouts = timeouts
        self._loop = asyncio.get_running_loop()
        start = self._loop.time()
        self._total_at = start + timeouts.total
        self._first_at = start + timeouts.first_token
        self._last = start
        self._text = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        #: the task awaiting in :meth:`run` (None between runs), and its cancel count then
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        #: what passed, once the timer cancelled a run for it
        self._expired: str | None = None

    def got_output(self) -> None:
        self._text = True

    def _next(self) -> tuple[float, str]:
        """The nearest deadline and its kind: ``first``, ``idle`` or ``total``."""
        if not self._text and self._first_at < self._total_at:
            return self._first_at, "first"
        idle_at = self._last + self._timeouts.idle
        if self._text and idle_at < self._total_at:
            return idle_at, "idle"
        return self._total_at, "total"

    def _message(self, kind: str) -> str:
        t = self._timeouts
        what = {"first": f"no first token within {t.first_token:g}s",
                "idle": f"no data for {t.idle:g}s mid-stream"}.get(kind)
        return f"provider {self._provider!r}: {what or f'the answer took longer than {t.total:g}s in total'}"

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        when, kind = self._next()
        if when > self._loop.time():
            self._arm(when)  # reads came since it was set: the deadline moved on
        elif self._task is not None and self._expired is None:
            self._expired = kind
            self._task.cancel()
        # else nobody awaits: the next run finds the deadline passed

    def close(self) -> None:
        """The call ended: drop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    async def run(self, aw: Awaitable[T]) -> T:
        when, kind = self._next()
        if when <= self._loop.time():  # passed already: an answer that is here may still be taken
            return await self._run_late(aw, kind)
        if when < self._timer_at:
            self._arm(when)
        task = self._task = asyncio.current_task(self._loop)
        assert task is not None
        self._cancelling = task.cancelling()
        try:
            result = await aw
        except asyncio.CancelledError:
            expired, self._expired = self._expired, None
            if expired is not None and task.uncancel() <= self._cancelling:
                raise UpstreamTimeout(self._message(expired)) from None
            raise
        except TimeoutError as exc:
            if isinstance(exc, aiohttp.ClientError):  # aiohttp's connect timeout
                raise client_error(self._provider, exc, self._timeouts) from None
            raise
        except aiohttp.ClientError as exc:
            raise client_error(self._provider, exc, self._timeouts) from None
        finally:
            self._task = None
        if self._expired is not None:  # the timer fired as ``aw`` finished: its cancel is ours to take back
            self._expired = None
            task.uncancel()
        self._last = self._loop.time()
        return result

    async def _run_late(self, aw: Awaitable[T], kind: str) -> T:
        """:meth:`run` past the deadline: ``aw`` gets one loop turn, as under ``asyncio.timeout``."""
        try:
            async with asyncio.timeout(0) as scope:
                result = await aw
        except TimeoutError as exc:
            if scope.expired():
                raise UpstreamTimeout(self._message(kind)) from None
            if isinstance(exc, aiohttp.ClientError):
                raise client_error(self._provider, exc, self._timeouts) from None
            raise
        except aiohttp.ClientError as exc:
            raise client_error(self._provider, exc, self._timeouts) from None
        self._last = self._loop.time()
        return result


class SSEDecoder:
    """Incremental ``text/event-stream`` decoding: bytes in, ``(event, data)`` out.

    Follows the parts of the WHATWG rules that LLM APIs use: ``data:`` lines
    joined by newlines, ``event:`` names, comments and unknown fields ignored,
    an empty line dispatching, LF or CRLF line ends.
    """

    __slots__ = ("_buffer", "_event", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[tuple[str, bytes]] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append((self._event or "message", b"\n".join(self._data)))
                self._event, self._data = "", []
            elif line[0] != 0x3A:  # ':' starts a comment
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    self._data.append(value)
                elif name == b"event":
                    self._event = value.decode("utf-8", "replace")
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_SSE_LINE_BYTES:
            raise UpstreamProtocolError(f"an event-stream line longer than {MAX_SSE_LINE_BYTES} bytes")
        return events


def object_of(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (for optional nested fields)."""
    return value if isinstance(value, dict) else {}


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret replaced; upstream messages may echo what was sent."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or a date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def read_error_body(resp: aiohttp.ClientResponse) -> bytes:
    """At most MAX_ERROR_BODY_BYTES of an error answer; nothing if it will not come."""
    try:
        return await resp.content.read(MAX_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, TimeoutError):
        return b""


def _quoted(body: bytes, secrets: Iterable[str | None]) -> str:
    """The upstream's own words: ``error.message`` of OpenAI's or Anthropic's body, else the text."""
    message = ""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        message = body.decode("utf-8", "replace")
    else:
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("type") or "")
        elif isinstance(error, str):
            message = error
        elif isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
            message = parsed["message"]  # vLLM's {"object": "error", "message": ...}
        elif isinstance(parsed, dict) and "detail" in parsed:
            message = _detail(parsed["detail"])  # FastAPI's 422 {"detail": [{"loc", "msg"}, ...]}
    message = " ".join(scrub(message, secrets).split())
    if len(message) > MAX_QUOTED_CHARS:
        message = message[: MAX_QUOTED_CHARS - 1] + "…"
    return message


def _detail(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    if not isinstance(detail, list):
        return ""
    said = []
    for item in detail:
        if isinstance(item, dict) and isinstance(item.get("msg"), str):
            loc = item.get("loc")
            where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
            said.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(said)


def status_error(
    *,
    provider: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    key_env: str | None,
    secrets: Iterable[str | None],
    label: str | None = None,
) -> UpstreamError:
    """The gateway error for an upstream answer with a non-2xx ``status``.

    ``label`` replaces ``HTTP {status}`` in the message, for errors that came
    inside a stream that had started well.
    """
    label = label or f"HTTP {status}"
    if status in (401, 403):
        # The upstream's words are left out: they may quote part of the key.
        where = f"; check {key_env}" if key_env else ""
        return ProviderAuthError(f"provider {provider!r} refused the credentials ({label}){where}")
    quoted = _quoted(body, secrets)
    said = f": {quoted}" if quoted else ""
    if status == 429:
        return RateLimited(f"provider {provider!r} is rate limiting ({label}){said}",
                           retry_after=parse_retry_after(headers))
    if status == 529:
        return UpstreamError(f"provider {provider!r} is overloaded ({label}){said}")
    if status >= 500 or status in (408, 409):
        return UpstreamError(f"provider {provider!r} failed ({label}){said}")
    refused = f"provider {provider!r} rejected the request ({label}){said}"
    if status in (400, 422):
        return UpstreamBadRequest(refused)
    if status == 404:
        return UpstreamNotFound(f"provider {provider!r} does not know the model or path ({label}){said}")
    if status == 413:
        return UpstreamPayloadTooLarge(f"provider {provider!r} refused the request's size ({label}){said}")
    return UpstreamError(refused, retryable=False)


def client_error(provider: str, exc: BaseException, timeouts: Timeouts) -> UpstreamError:
    """The gateway error for a transport failure (aiohttp's messages may carry URLs, never keys)."""
    if isinstance(exc, aiohttp.ServerTimeoutError):  # aiohttp raises it for the connect deadline
        return UpstreamTimeout(f"provider {provider!r}: could not connect within {timeouts.connect:g}s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(f"provider {provider!r}: cannot connect to {exc.host}:{exc.port}")
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return UpstreamError(f"provider {provider!r}: the connection closed before the answer was complete")
    return UpstreamError(f"provider {provider!r}: {exc.__class__.__name__} talking to the upstream")


class StreamParser(abc.ABC):
    """Turns one call's decoded events into chunks; one instance per call."""

    #: the upstream said the answer is complete (``[DONE]``, ``message_stop``)
    done: bool = False

    @abc.abstractmethod
    def feed(self, event: str, data: bytes) -> Chunk | None:
        """The chunk carried by one event, if any; raises UpstreamError for an in-band error."""

    @abc.abstractmethod
    def complete(self) -> bool:
        """Whether the answer may end here (asked at the end of the body)."""

    @staticmethod
    def json_object(provider: str, data: bytes) -> dict[str, Any]:
        """One event's data as a JSON object, or an ``upstream_protocol`` error."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(f"provider {provider!r} sent an event that is not JSON") from None
        if not isinstance(obj, dict):
            raise UpstreamProtocolError(f"provider {provider!r} sent an event that is not a JSON object")
        return obj


class HTTPProvider(Provider):
    """An upstream reached by one streaming POST over the shared ``ClientSession``.

    Subclasses say where to POST, what to send and how to read the events;
    this class owns the call: the deadlines, the status mapping, and the
    response's life. The response is closed in a ``finally`` unless the body
    was read to its end, so an aborted flight (its task cancelled, or its
    iterator closed) closes the upstream socket at once, idle or mid-stream.
    """

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        session: aiohttp.ClientSession,
        api_key: str | None = None,
        api_key_env: str | None = None,
        key_required: bool = True,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        timeouts: Timeouts = Timeouts(),
        default_model: str = "",
        models: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        unusable: str | None = None,
        max_temperature: float | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.max_concurrency = max_concurrency
        self.timeouts = timeouts
        self.default_model = default_model
        self._models = list(models)
        self._session = session
        self._api_key = api_key or None  # never logged, never in a message: see scrub()
        self.api_key_env = api_key_env
        self._key_required = key_required
        self.local = not key_required
        self._extra_headers = dict(headers or {})
        self._unusable = unusable
        #: a temperature above this is sent as this (servers that refuse OpenAI's 0-2 range)
        self.max_temperature = max_temperature
        self._client_timeout = timeouts.client_timeout()
        #: :attr:`url` and :meth:`headers` in the forms the client takes without converting
        #: them, made at the first call (the address and the credentials do not change)
        self._target: tuple[yarl.URL, CIMultiDictProxy[str]] | None = None
        #: ``timeouts`` and its form for a call that waits for the whole answer (see :meth:`_timeouts_for`)
        self._whole_timeouts: tuple[Timeouts, Timeouts] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.base_url}>"

    # -- configuration ----------------------------------------------------------

    def configured(self) -> bool:
        return self._unusable is None and (self._api_key is not None or not self._key_required)

    def not_configured_reason(self) -> str:
        if self._unusable is not None:
            return self._unusable
        return f"provider {self.name!r} has no API key: set {self.api_key_env}"

    def models(self) -> list[str]:
        listed = list(self._models)
        if self.default_model and self.default_model not in listed:
            listed.insert(0, self.default_model)
        return listed

    async def probe(self) -> bool:
        """``GET {base_url}/models``: a local server that answers it is there."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with self._session.get(f"{self.base_url}/models", headers=self.headers()) as resp:
                    there = resp.status < 300
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        if there:
            self.answered = True
        return there

    def validate_model(self, model: str) -> None:
        if not model.strip():
            raise BadRequest(f"'model' must name a model of provider {self.name!r}", param="model")

    def clamp_temperature(self, params: dict[str, Any], ceiling: float | None = None) -> None:
        """Lower ``params["temperature"]`` to the provider's ceiling (and ``ceiling``), in place."""
        value = params.get("temperature")
        limits = [c for c in (self.max_temperature, ceiling) if c is not None]
        if limits and isinstance(value, int | float) and not isinstance(value, bool) and value > min(limits):
            params["temperature"] = min(limits)

    # -- what subclasses say ------------------------------------------------------

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where the streaming POST goes."""

    @abc.abstractmethod
    def headers(self) -> dict[str, str]:
        """The request's headers, credentials included."""

    @abc.abstractmethod
    def body(self, request: ProviderRequest) -> dict[str, Any]:
        """The request's JSON body."""

    @abc.abstractmethod
    def parser(self) -> StreamParser:
        """A parser for one call's event stream."""

    def whole(self, answer: Any) -> Chunk:
        """The chunk for an upstream that answered JSON although a stream was asked for."""
        raise UpstreamProtocolError(f"provider {self.name!r} answered JSON instead of an event stream")

    # -- the call -------------------------------------------------------------------

    def _secrets(self) -> tuple[str | None, ...]:
        return (self._api_key,)

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Chunk, None]:
        deadlines = Deadlines(provider=self.name, timeouts=self._timeouts_for(request))
        resp: aiohttp.ClientResponse | None = None
        finished = False  # the body was read to its end: the connection may be reused
        try:
            payload = orjson.dumps(self.body(request))
            target = self._target
            if target is None:
                target = self._target = (yarl.URL(self.url), CIMultiDictProxy(CIMultiDict(self.headers())))
            resp = await deadlines.run(self._session.post(
                target[0], data=payload, headers=target[1], timeout=self._client_timeout))
            if resp.status >= 300:
                raise status_error(provider=self.name, status=resp.status,
                                   body=await deadlines.run(read_error_body(resp)), headers=resp.headers,
                                   key_env=self.api_key_env, secrets=self._secrets())
            if resp.content_type == "application/json":
                try:
                    answer = orjson.loads(await deadlines.run(resp.read()))
                except orjson.JSONDecodeError:
                    raise UpstreamProtocolError(f"provider {self.name!r} answered malformed JSON") from None
                finished = True
                resp.release()  # read whole: the connection goes back to the pool before the answer is used
                yield self.whole(answer)
                return
            if resp.content_type != "text/event-stream":
                raise UpstreamProtocolError(
                    f"provider {self.name!r} answered {resp.content_type or 'no content type'}, "
                    "not an event stream")
            decoder, parser = SSEDecoder(), self.parser()
            while not parser.done:
                data = await deadlines.run(resp.content.readany())
                if not data:
                    finished = True
                    break
                for event, payload_ in decoder.feed(data):
                    chunk = parser.feed(event, payload_)
                    if chunk is not None:
                        if chunk.has_output():
                            deadlines.got_output()
                        yield chunk
                    if parser.done:
                        break
            if not parser.complete():
                raise UpstreamError(
                    f"provider {self.name!r}: the stream ended before the answer was complete")
            if not finished:
                finished = await _drain(resp)
        finally:
            deadlines.close()
            if resp is not None:
                if finished:
                    resp.release()
                else:
                    resp.close()  # closes the socket: the upstream sees the call end now

    def _timeouts_for(self, request: ProviderRequest) -> Timeouts:
        """The call's timeouts: for one that waits for the whole answer, nothing arrives
        before it is all there, so only the total deadline holds."""
        timeouts = self.timeouts
        if request.stream:
            return timeouts
        whole = self._whole_timeouts
        if whole is None or whole[0] is not timeouts:
            whole = self._whole_timeouts = (timeouts, replace(timeouts, first_token=timeouts.total,
                                                                idle=timeouts.total))
        return whole[1]


async def _drain(resp: aiohttp.ClientResponse) -> bool:
    """Read what follows the end marker, briefly, so the connection can be reused."""
    if resp.content.at_eof():
        return True  # the body ended with the marker (the usual case): nothing to wait for
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while await resp.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError):
        return False
    return True
