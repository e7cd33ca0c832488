"""A fake LLM upstream on 127.0.0.1 that speaks the real OpenAI and Anthropic wire formats.

Tests script it, watch every call, and see when each client connection closed::

    async with FakeUpstream.start() as fake:
        fake.script(Script(n=5))                                   # every call from now on
        fake.script(Script(status=429, retry_after="7"), model="busy")   # calls naming one model
        env = fake.env()          # OPENAI_BASE_URL, OPENAI_API_KEY, ANTHROPIC_BASE_URL, ...
        ...                       # point a gateway (or an SDK) at it
        call = await fake.next_call()          # FakeCall: format, path, body, headers, prompt
        await within(call.paused.wait())       # held where the script said (hold_first, ...)
        call.release()                         # ... and let it go on
        await within(call.ended.wait())
        call.outcome                           # complete | client_closed | cut | error_status | ...
        call.connection.closed_at              # time.perf_counter() when the socket closed
        fake.calls, fake.active, fake.peak     # every call; calls running now; most at once

Endpoints:

- ``POST {url}/v1/chat/completions`` (any path ending in ``/chat/completions``): OpenAI.
  ``stream: true`` answers ``chat.completion.chunk`` events (a role chunk,
  reasoning deltas, one content delta per token, refusal deltas, tool-call
  deltas, a ``finish_reason`` chunk, a usage chunk when
  ``stream_options.include_usage``, ``data: [DONE]``); otherwise one
  ``chat.completion`` object. Script ``extras`` ride on every chunk at the top
  level, the way Perplexity sends ``citations`` and ``search_results``. In-band
  errors come in each compatible server's style (``error_style``).
- ``POST {url}/v1/messages``: Anthropic Messages. ``stream: true`` answers
  ``message_start``, ``ping``, then per content block (thinking, text,
  tool_use) ``content_block_start``, its deltas (``thinking_delta`` and
  ``signature_delta``, ``text_delta``, ``input_json_delta``) and
  ``content_block_stop``, then ``message_delta`` (stop reason, usage) and
  ``message_stop``; otherwise one ``message`` object. The request must be one
  the Messages API takes: it is checked against the official SDK's
  ``MessageCreateParams`` (no unknown fields, well-formed blocks), and
  ``anthropic-version`` is required.
- ``GET {url}/v1/models``: OpenAI's model list.

Every piece a script streams (reasoning, text, refusal, tool-call pieces)
counts as one token for ``hold_after``, ``cut_after`` and ``error_after``.

With an ``api_key`` (the default), calls without it get the format's 401.
Error statuses answer with each format's own error body. The answer's text,
unless scripted, is the built-in mock's for the last user message, so a test
can compare it with :func:`server.providers.mock.mock_answer`.

Standalone, for benchmarks (a fixed-timing stream for every call)::

    python -m tests.fake_upstream --port 9100 --ttft-ms 20 --itl-ms 5 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pydantic
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming, MessageCreateParamsStreaming
from multidict import CIMultiDict

from server.providers.mock import mock_answer

__all__ = ["DEFAULT_API_KEY", "TOOL_CALLS", "Connection", "FakeCall", "FakeToolCall", "FakeUpstream", "Script",
           "wait_until"]

DEFAULT_API_KEY = "sk-fake-upstream-0123456789abcdef"
DEFAULT_TOKENS = 8
DEFAULT_WAIT_S = 10.0

OPENAI, ANTHROPIC = "openai", "anthropic"
#: how often wait_until looks again
POLL_S = 0.005

_OPENAI_ERRORS = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied",
                  404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
                  500: "server_error", 503: "server_error"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
                     429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
#: the Messages API version the gateway speaks, and the sampling parameters it still takes
ANTHROPIC_VERSION = "2023-06-01"
_SAMPLING = {"temperature": (0.0, 1.0), "top_p": (0.0, 1.0), "top_k": (0, 1_000_000)}
#: OpenAI-compatible in-band error styles: OpenAI's and SGLang's ``{"error": ...}`` event, older vLLM's
#: bare ``{"object": "error"}`` event, OpenRouter's ``finish_reason: "error"`` with or without an error
ERROR_STYLES = ("event", "bare", "finish", "finish_only")


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEFAULT_WAIT_S) -> None:
    """Wait until ``predicate()`` holds (for state with no event to wait on, e.g. a gauge)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call the fake's model makes: its arguments' JSON text in the pieces it streams."""

    id: str
    name: str
    arguments: Sequence[str] = ("{}",)


#: tool calls for scripts: arguments in three pieces, and in one
TOOL_CALLS = (FakeToolCall("call_weather", "get_weather", ('{"city": ', '"Paris"', "}")),
              FakeToolCall("call_time", "get_time", ("{}",)))


@dataclass(frozen=True, kw_only=True)
class Script:
    """How the fake answers a call. Times are seconds; token counts are answer pieces."""

    #: the answer's pieces; None: the mock's answer for the last user message, ``n`` pieces
    tokens: Sequence[str] | None = None
    n: int = DEFAULT_TOKENS
    #: after the headers (and Anthropic's message_start), before the first token
    first_token_s: float = 0.0
    #: between tokens
    interval_s: float = 0.0
    #: not 200: answer this status with the format's error body
    status: int = 200
    #: the error body's message; ``{api_key}`` becomes the key the call carried
    message: str = "the fake upstream failed as scripted"
    #: Retry-After header on an error status
    retry_after: str | None = None
    #: wait for ``call.release()`` before sending the headers
    hold_headers: bool = False
    #: headers sent; wait for ``call.release()`` before the first token
    hold_first: bool = False
    #: wait for ``call.release()`` after this many tokens
    hold_after: int | None = None
    #: close the connection abruptly after this many tokens
    cut_after: int | None = None
    #: send the format's in-band error after this many tokens, then end the stream
    error_after: int | None = None
    #: Anthropic's error type for ``error_after`` (OpenAI's in-band error is a server_error)
    error_kind: str = "overloaded_error"
    #: top-level fields added to every OpenAI chunk (and the non-stream object)
    extras: dict[str, Any] = field(default_factory=dict)
    #: OpenAI: send the usage chunk when asked; Anthropic: send usage
    usage: bool = True
    #: OpenAI: end with ``data: [DONE]``
    done_marker: bool = True
    #: answer one JSON object even when a stream was asked for
    non_stream: bool = False
    #: reasoning pieces before the text (OpenAI: ``delta.<reasoning_field>``; Anthropic: a thinking block)
    reasoning: Sequence[str] = ()
    #: OpenAI: ``reasoning_content`` (vLLM, DeepSeek) or ``reasoning`` (OpenRouter, Ollama)
    reasoning_field: str = "reasoning_content"
    #: Anthropic: the thinking block's signature
    signature: str = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxfake"
    #: refusal pieces after the text (OpenAI: ``delta.refusal``; Anthropic: the ``refusal`` stop's explanation)
    refusal: Sequence[str] = ()
    #: tool calls after the text (OpenAI: ``delta.tool_calls``; Anthropic: ``tool_use`` blocks)
    tool_calls: Sequence[FakeToolCall] = ()
    #: the format's own word for the end (OpenAI ``finish_reason``, Anthropic ``stop_reason``);
    #: None: stop / end_turn, or tool_calls / tool_use when there are tool calls
    stop_reason: str | None = None
    #: OpenAI: how ``error_after`` (or a non-stream answer with ``error_after``) fails, see ERROR_STYLES
    error_style: str = "event"
    #: OpenAI: the in-band error's ``code``
    error_code: int | str | None = None
    #: send exactly these event payloads (for servers' odd habits); OpenAI's ``[DONE]`` still ends them
    raw: Sequence[dict[str, Any]] | None = None


@dataclass(eq=False)
class Connection:
    """One client TCP connection, as the fake's server saw it."""

    opened_at: float
    closed_at: float | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class FakeCall:
    """One request the fake received, and what became of it."""

    index: int
    format: str
    path: str
    body: dict[str, Any]
    headers: CIMultiDict[str]
    script: Script
    connection: Connection
    started_at: float
    ended_at: float | None = None
    #: complete | client_closed | cut | error_status | error_event | rejected
    outcome: str | None = None
    tokens_sent: int = 0
    #: set while the call is held (``hold_*``), cleared when it goes on
    paused: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _releases: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    def release(self) -> None:
        """Let a held call go on (a release before the hold is kept for it)."""
        self._releases.release()

    async def sent(self, k: int, timeout: float = DEFAULT_WAIT_S) -> None:
        """Wait until ``k`` tokens have been written."""
        async def wait() -> None:
            async with self._progress:
                await self._progress.wait_for(lambda: self.tokens_sent >= k or self.ended.is_set())
        try:
            async with asyncio.timeout(timeout):
                await wait()
        except TimeoutError:
            raise AssertionError(f"call {self.index}: {self.tokens_sent} of {k} tokens sent "
                                 f"after {timeout}s") from None
        if self.tokens_sent < k:
            raise AssertionError(f"call {self.index} ended ({self.outcome}) after {self.tokens_sent} tokens")

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages")
        return messages if isinstance(messages, list) else []

    @property
    def prompt(self) -> str:
        """The last user message's text."""
        for message in reversed(self.messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
                return str(content)
        return ""

    @property
    def api_key(self) -> str | None:
        if self.format == ANTHROPIC and "x-api-key" in self.headers:  # Anthropic takes either header
            return self.headers["x-api-key"]
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

    async def _hold(self) -> None:
        self.paused.set()
        try:
            await self._releases.acquire()
        finally:
            self.paused.clear()

    async def _advance(self) -> None:
        self.tokens_sent += 1
        async with self._progress:
            self._progress.notify_all()


class _Server(web.Server):
    """The low-level server, noting when each connection opens and closes."""

    def __init__(self, fake: FakeUpstream, **kwargs: Any) -> None:
        super().__init__(fake._handle, handler_cancellation=True, **kwargs)
        self._fake = fake

    def connection_made(self, handler: RequestHandler, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(handler, transport)  # type: ignore[arg-type]
        conn = Connection(opened_at=time.perf_counter())
        self._fake.connections.append(conn)
        self._fake._by_handler[handler] = conn

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        conn = self._fake._by_handler.pop(handler, None)
        if conn is not None:
            conn.closed_at = time.perf_counter()
            conn.closed.set()
        super().connection_lost(handler, exc)


class FakeUpstream:
    def __init__(self, *, api_key: str | None = DEFAULT_API_KEY, script: Script | None = None) -> None:
        #: the key calls must carry; None accepts any
        self.api_key = api_key
        self.default = script or Script()
        self.calls: list[FakeCall] = []
        self.connections: list[Connection] = []
        #: calls being answered now, and the most at once
        self.active = 0
        self.peak = 0
        self.url = ""
        self._rules: list[list[Any]] = []  # [model or None, script, remaining or None], newest first
        self._new: asyncio.Queue[FakeCall] = asyncio.Queue()
        self._by_handler: dict[RequestHandler, Connection] = {}
        self._runner: web.ServerRunner | None = None

    # -- life ------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def start(cls, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = DEFAULT_API_KEY,
                    script: Script | None = None) -> AsyncIterator[FakeUpstream]:
        fake = cls(api_key=api_key, script=script)
        await fake.open(host=host, port=port)
        try:
            yield fake
        finally:
            await fake.close()

    async def open(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runner = web.ServerRunner(_Server(self), shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"

    async def close(self) -> None:
        if self._runner is not None:
            for call in self.calls:
                for _ in range(4):  # let held calls end so the server can stop
                    call.release()
            await self._runner.cleanup()
            self._runner = None

    @property
    def openai_url(self) -> str:
        """An OpenAI-style base URL (with ``/v1``)."""
        return f"{self.url}/v1"

    @property
    def anthropic_url(self) -> str:
        """An Anthropic-style base URL (without ``/v1``)."""
        return self.url

    def env(self, *names: str) -> dict[str, str]:
        """``<NAME>_BASE_URL`` and ``<NAME>_API_KEY`` pointing providers here (default: openai, anthropic)."""
        env: dict[str, str] = {}
        for name in names or ("openai", "anthropic"):
            prefix = name.upper().replace("-", "_")
            env[f"{prefix}_BASE_URL"] = self.anthropic_url if name == "anthropic" else self.openai_url
            if self.api_key is not None:
                env[f"{prefix}_API_KEY"] = self.api_key
        return env

    # -- scripting and watching ---------------------------------------------------

    def script(self, script: Script, *, model: str | None = None, times: int | None = None) -> None:
        """Answer calls (naming ``model``, or all) with ``script``, ``times`` times or until replaced."""
        if model is None and times is None:
            self.default = script
            return
        self._rules.insert(0, [model, script, times])

    def _script_for(self, model: Any) -> Script:
        for rule in self._rules:
            if rule[0] is None or rule[0] == model:
                if rule[2] is not None:
                    rule[2] -= 1
                    if rule[2] == 0:
                        self._rules.remove(rule)
                return rule[1]
        return self.default

    async def next_call(self, timeout: float = DEFAULT_WAIT_S) -> FakeCall:
        """The next call to arrive (each call is handed out once, in order)."""
        try:
            async with asyncio.timeout(timeout):
                return await self._new.get()
        except TimeoutError:
            raise AssertionError(f"no call reached the fake upstream within {timeout}s "
                                 f"({len(self.calls)} so far)") from None

    # -- answering ------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if request.method == "GET" and path.rstrip("/").endswith("/models"):
            return _json({"object": "list", "data": [
                {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})
        if request.method != "POST":
            return _json({"error": {"message": "method not allowed", "type": "invalid_request_error"}}, 405)
        if path.endswith("/chat/completions"):
            fmt = OPENAI
        elif path.rstrip("/") == "/v1/messages":
            fmt = ANTHROPIC
        else:
            return _json({"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}}, 404)
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        conn = self._by_handler.get(request.protocol) or Connection(opened_at=time.perf_counter())
        model = body.get("model") if isinstance(body, dict) else None
        call = FakeCall(index=len(self.calls), format=fmt, path=path,
                        body=body if isinstance(body, dict) else {}, headers=CIMultiDict(request.headers),
                        script=self._script_for(model), connection=conn, started_at=time.perf_counter())
        self.calls.append(call)
        self._new.put_nowait(call)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self._answer(request, call, body)
        except asyncio.CancelledError:
            call.outcome = "client_closed"
            raise
        except ConnectionError:
            call.outcome = "client_closed"
            raise
        finally:
            self.active -= 1
            call.ended_at = time.perf_counter()
            call.outcome = call.outcome or "complete"
            call.ended.set()
            async with call._progress:
                call._progress.notify_all()

    async def _answer(self, request: web.BaseRequest, call: FakeCall, body: Any) -> web.StreamResponse:
        fmt, script = call.format, call.script
        problem = self._check(call, body)
        if problem is not None:
            call.outcome = "rejected"
            return _error(fmt, problem[0], problem[1])
        if script.hold_headers:
            await call._hold()
        if script.status != 200:
            call.outcome = "error_status"
            message = script.message.replace("{api_key}", call.api_key or "")
            headers = {"Retry-After": script.retry_after} if script.retry_after else None
            return _error(fmt, script.status, message, headers)
        tokens = list(script.tokens) if script.tokens is not None else mock_answer(call.prompt, script.n)
        writer = _OpenAIWriter(call, body) if fmt == OPENAI else _AnthropicWriter(call, body)
        if not body.get("stream") or script.non_stream:
            return await self._whole(request, call, writer, tokens)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(writer.start())
        if script.hold_first:
            await call._hold()
        if script.first_token_s:
            await asyncio.sleep(script.first_token_s)
        await resp.write(writer.first())
        pieces = writer.pieces(tokens)
        for i, piece in enumerate(pieces):
            if i and script.interval_s:
                await asyncio.sleep(script.interval_s)
            if i == script.cut_after:
                return _cut(request, call, resp)
            if i == script.error_after:
                call.outcome = "error_event"
                await resp.write(writer.error())
                await resp.write_eof()
                return resp
            if i == script.hold_after:
                await call._hold()
            await resp.write(piece)
            await call._advance()
        n = len(pieces)
        if script.cut_after is not None and script.cut_after >= n:
            return _cut(request, call, resp)
        if script.error_after is not None and script.error_after >= n:
            call.outcome = "error_event"
            await resp.write(writer.error())
        else:
            await resp.write(writer.end(n))
        await resp.write_eof()
        return resp

    def _check(self, call: FakeCall, body: Any) -> tuple[int, str] | None:
        """What the real API would refuse: a missing key, a malformed body."""
        if self.api_key is not None and call.api_key != self.api_key:
            if call.format == ANTHROPIC:
                return 401, "invalid x-api-key"
            shown = call.api_key or ""
            masked = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
            return 401, f"Incorrect API key provided: {masked}."
        if not isinstance(body, dict):
            return 400, "the body must be a JSON object"
        if not isinstance(body.get("model"), str) or not body["model"]:
            return 400, "model: Field required"
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return 400, "messages: Field required"
        if call.format == ANTHROPIC:
            if "anthropic-version" not in call.headers:
                return 400, "anthropic-version: header is required"
            if not isinstance(body.get("max_tokens"), int):
                return 400, "max_tokens: Field required"
            if any(m.get("role") == "system" for m in body["messages"] if isinstance(m, dict)):
                return 400, 'messages: Unexpected role "system". Use the top-level "system" parameter.'
            problem = anthropic_request_problem(body, version=call.headers["anthropic-version"])
            if problem is not None:
                return 400, problem
        return None

    async def _whole(self, request: web.BaseRequest, call: FakeCall, writer: _OpenAIWriter | _AnthropicWriter,
                     tokens: list[str]) -> web.StreamResponse:
        """One JSON answer, sent when a stream's last token would have been: the holds of
        the script happen before it, and a cut drops the connection instead."""
        script = call.script
        if script.hold_first or script.hold_after is not None:
            await call._hold()
        await asyncio.sleep(script.first_token_s + script.interval_s * max(0, len(tokens) - 1))
        if script.cut_after is not None:
            return _cut(request, call, web.StreamResponse())
        call.tokens_sent = len(tokens)
        if script.error_after is not None and call.format == OPENAI:
            call.outcome = "error_event"
        return _json(writer.whole(tokens))


def _usage(call: FakeCall, completion: int) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in call.messages if isinstance(m, dict))
    prompt += len(str(call.body.get("system", "")).split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)


def _error(fmt: str, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    if fmt == ANTHROPIC:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return _json({"type": "error", "error": {"type": kind, "message": message}}, status, headers)
    if status == 422:  # FastAPI's validation answer, as vLLM and other Python servers send it
        return _json({"detail": [{"type": "missing", "loc": ["body", "messages"], "msg": message, "input": None}]},
                     status, headers)
    kind = _OPENAI_ERRORS.get(status, "server_error")
    code = _OPENAI_CODES.get(status)
    return _json({"error": {"message": message, "type": kind, "param": None, "code": code}}, status, headers)


def _cut(request: web.BaseRequest, call: FakeCall, resp: web.StreamResponse) -> web.StreamResponse:
    """Drop the connection mid-body: the client sees the chunked body end unfinished."""
    call.outcome = "cut"
    if request.transport is not None:
        request.transport.abort()
    return resp


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


_MID_STREAM = "the fake upstream failed mid-stream"


class _OpenAIWriter:
    """``chat.completion.chunk`` events, as OpenAI (and compatible servers) send them."""

    def __init__(self, call: FakeCall, body: dict[str, Any]) -> None:
        self.call = call
        self.script = call.script
        options = body.get("stream_options")
        self.include_usage = bool(isinstance(options, dict) and options.get("include_usage")) and call.script.usage
        self.base: dict[str, Any] = {"id": f"chatcmpl-fake{call.index}", "object": "chat.completion.chunk",
                                     "created": int(time.time()), "model": body["model"],
                                     "system_fingerprint": "fp_fake"}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **top: Any) -> bytes:
        chunk = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                 **self.script.extras, **top}
        if self.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def finish_reason(self) -> str:
        return self.script.stop_reason or ("tool_calls" if self.script.tool_calls else "stop")

    def start(self) -> bytes:
        return b""

    def first(self) -> bytes:
        if self.script.raw is not None:
            return b""
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def pieces(self, tokens: list[str]) -> list[bytes]:
        s = self.script
        if s.raw is not None:
            return [_sse(event) for event in s.raw]
        out = [self._chunk({s.reasoning_field: r}) for r in s.reasoning]
        out += [self._chunk({"content": t}) for t in tokens]
        out += [self._chunk({"refusal": r}) for r in s.refusal]
        for i, call in enumerate(s.tool_calls):
            out.append(self._chunk({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                                    "function": {"name": call.name, "arguments": ""}}]}))
            out += [self._chunk({"tool_calls": [{"index": i, "function": {"arguments": a}}]})
                    for a in call.arguments]
        return out

    def _error_object(self) -> dict[str, Any]:
        return {"message": _MID_STREAM, "type": "server_error", "param": None, "code": self.script.error_code}

    def error(self) -> bytes:
        style = self.script.error_style
        if style == "bare":
            return _sse({"object": "error", "message": _MID_STREAM, "type": "InternalServerError", "param": None,
                         "code": self.script.error_code or 500})
        if style == "finish":
            return self._chunk({"content": ""}, "error", error={"code": self.script.error_code or "server_error",
                                                                 "message": _MID_STREAM})
        if style == "finish_only":
            return self._chunk({"content": ""}, "error")
        return _sse({"error": self._error_object()})

    def end(self, n: int) -> bytes:
        out = b"" if self.script.raw is not None else self._chunk({}, self.finish_reason())
        if self.include_usage and self.script.raw is None:
            out += _sse({**self.base, "choices": [], "usage": _usage(self.call, n), **self.script.extras})
        if self.script.done_marker:
            out += b"data: [DONE]\n\n"
        return out

    def whole(self, tokens: list[str]) -> dict[str, Any]:
        """The ``chat.completion`` object (or the in-band error a non-stream answer can be)."""
        s = self.script
        style = s.error_style if s.error_after is not None else None
        if style == "event":
            return {"error": self._error_object()}
        if style == "bare":
            return {"object": "error", "message": _MID_STREAM, "type": "BadRequestError", "param": None,
                    "code": s.error_code or 400}
        text = "".join(tokens)
        message: dict[str, Any] = {"role": "assistant",
                                   "content": text if text or not (s.tool_calls or s.refusal) else None,
                                   "refusal": "".join(s.refusal) or None}
        if s.reasoning:
            message[s.reasoning_field] = "".join(s.reasoning)
        if s.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": "".join(c.arguments)}}
                                     for c in s.tool_calls]
        answer = {"id": f"chatcmpl-fake{self.call.index}", "object": "chat.completion", "created": int(time.time()),
                  "model": self.base["model"], "system_fingerprint": "fp_fake",
                  "choices": [{"index": 0, "message": message, "logprobs": None,
                               "finish_reason": "error" if style else self.finish_reason()}],
                  "usage": _usage(self.call, len(tokens)), **s.extras}
        if style == "finish":
            answer["error"] = {"code": s.error_code or "server_error", "message": _MID_STREAM}
        return answer


class _AnthropicWriter:
    """Messages API stream events, as Anthropic sends them."""

    def __init__(self, call: FakeCall, body: dict[str, Any]) -> None:
        self.call = call
        self.script = call.script
        self.model = body["model"]
        self.usage = _usage(call, 0)
        stops = body.get("stop_sequences")
        self.stop_sequence = stops[0] if isinstance(stops, list) and stops else "END"
        self.blocks = 0  # content blocks sent so far

    def stop_reason(self) -> str:
        if self.script.stop_reason:
            return self.script.stop_reason
        return "refusal" if self.script.refusal else "tool_use" if self.script.tool_calls else "end_turn"

    def start(self) -> bytes:
        if self.script.raw is not None:
            return b""
        usage = {"input_tokens": self.usage["prompt_tokens"], "output_tokens": 1} if self.script.usage else {}
        return _sse({"type": "message_start", "message": {
            "id": f"msg_fake{self.call.index}", "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}}, "message_start")

    def first(self) -> bytes:
        return b"" if self.script.raw is not None else _sse({"type": "ping"}, "ping")

    def _block(self, block: dict[str, Any], deltas: Sequence[dict[str, Any]],
               last: Sequence[dict[str, Any]] = ()) -> list[bytes]:
        """One content block as pieces: its start with the first delta, one delta a piece, then its stop."""
        index = self.blocks
        self.blocks += 1
        events = [_sse({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")
                  for d in deltas] or [b""]
        events[0] = _sse({"type": "content_block_start", "index": index, "content_block": block},
                         "content_block_start") + events[0]
        events[-1] += b"".join(_sse({"type": "content_block_delta", "index": index, "delta": d},
                                    "content_block_delta") for d in last)
        events[-1] += _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
        return events

    def pieces(self, tokens: list[str]) -> list[bytes]:
        s = self.script
        if s.raw is not None:
            return [_sse(event, event.get("type")) for event in s.raw]
        out: list[bytes] = []
        if s.reasoning:
            out += self._block({"type": "thinking", "thinking": "", "signature": ""},
                               [{"type": "thinking_delta", "thinking": r} for r in s.reasoning],
                               [{"type": "signature_delta", "signature": s.signature}])
        if tokens:
            out += self._block({"type": "text", "text": ""}, [{"type": "text_delta", "text": t} for t in tokens])
        for call in s.tool_calls:
            out += self._block({"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
                               [{"type": "input_json_delta", "partial_json": a} for a in call.arguments])
        return out

    def error(self) -> bytes:
        kind = self.script.error_kind
        return _sse({"type": "error", "error": {"type": kind, "message": f"fake {kind}"}}, "error")

    def _stop(self) -> dict[str, Any]:
        stop = self.stop_reason()
        details = None
        if stop == "refusal":
            details = {"type": "refusal", "category": None, "explanation": "".join(self.script.refusal) or None}
        return {"stop_reason": stop, "stop_sequence": self.stop_sequence if stop == "stop_sequence" else None,
                "stop_details": details}

    def end(self, n: int) -> bytes:
        if self.script.raw is not None:
            return b""
        usage = {"output_tokens": n} if self.script.usage else {}
        out = b"" if self.blocks else b"".join(self._block({"type": "text", "text": ""}, []))
        return (out + _sse({"type": "message_delta", "delta": self._stop(), "usage": usage}, "message_delta")
                + _sse({"type": "message_stop"}, "message_stop"))

    def whole(self, tokens: list[str]) -> dict[str, Any]:
        """The ``message`` object."""
        s = self.script
        content: list[dict[str, Any]] = []
        if s.reasoning:
            content.append({"type": "thinking", "thinking": "".join(s.reasoning), "signature": s.signature})
        if tokens or not (s.reasoning or s.tool_calls):
            content.append({"type": "text", "text": "".join(tokens)})
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": orjson.loads("".join(c.arguments))}
                    for c in s.tool_calls]
        usage = _usage(self.call, len(tokens))
        return {"id": f"msg_fake{self.call.index}", "type": "message", "role": "assistant", "model": self.model,
                "content": content, **self._stop(),
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}


#: the Messages API's request fields, as the official SDK types them
_ANTHROPIC_FIELDS = frozenset(MessageCreateParamsStreaming.__required_keys__
                              | MessageCreateParamsStreaming.__optional_keys__)
_ANTHROPIC_STREAMING = pydantic.TypeAdapter(MessageCreateParamsStreaming)
_ANTHROPIC_WHOLE = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)


class _Refused(Exception):
    """What the API would say of a request."""


def _said(path: str, exc: pydantic.ValidationError) -> _Refused:
    """The first problem, preferring the union member whose ``type`` matched (a tool_result's, not a text's)."""
    errors = exc.errors()
    wrong = [e["loc"][:-1] for e in errors if e["type"] == "literal_error" and e["loc"][-1:] == ("type",)]
    fitting = [e for e in errors if not any(e["loc"][:len(w)] == w for w in wrong)]
    first = (fitting or errors)[0]
    return _Refused(".".join([p for p in (path, *map(str, first["loc"])) if p]) + f": {first['msg']}")


def _consume(value: Any, path: str = "") -> None:
    """Walk a validated value, running the validators pydantic defers for ``Iterable`` fields."""
    if isinstance(value, dict):
        for key, item in value.items():
            _consume(item, f"{path}.{key}" if path else str(key))
    elif not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        try:
            for i, item in enumerate(value):
                _consume(item, f"{path}.{i}")
        except pydantic.ValidationError as exc:
            raise _said(path, exc) from None


def anthropic_request_problem(body: dict[str, Any], *, version: str = ANTHROPIC_VERSION) -> str | None:
    """What the Messages API would refuse in ``body``, in its words, checked with the official SDK's types.

    The SDK's types are those of its own API version; ``2023-06-01`` also takes the
    sampling parameters (``temperature``, ``top_p``, ``top_k``) that later versions refuse.
    """
    body = dict(body)
    if version == ANTHROPIC_VERSION:
        for key, (low, high) in _SAMPLING.items():
            value = body.pop(key, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not low <= value <= high):
                return f"{key}: Input should be a number from {low} to {high}"
    for key in body:
        if key not in _ANTHROPIC_FIELDS:
            return f"{key}: Extra inputs are not permitted"
    try:
        _consume((_ANTHROPIC_STREAMING if body.get("stream") else _ANTHROPIC_WHOLE).validate_python(body))
    except pydantic.ValidationError as exc:
        return str(_said("", exc))
    except _Refused as exc:
        return str(exc)
    return None


# -- standalone ------------------------------------------------------------------------


async def serve(*, host: str, port: int, script: Script, api_key: str | None) -> None:
    async with FakeUpstream.start(host=host, port=port, api_key=api_key, script=script) as fake:
        print(f"fake upstream listening on {fake.url} (OpenAI base URL {fake.openai_url}, "
              f"Anthropic base URL {fake.anthropic_url})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"fake upstream: {len(fake.calls)} calls, at most {fake.peak} at once", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_upstream",
                                     description="A fake OpenAI/Anthropic upstream with fixed timing.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port (printed)")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="delay before the first token")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="delay between tokens")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="the key calls must carry ('' accepts any)")
    args = parser.parse_args(argv)
    script = Script(n=args.tokens, first_token_s=args.ttft_ms / 1000, interval_s=args.itl_ms / 1000)
    asyncio.run(serve(host=args.host, port=args.port, script=script, api_key=args.api_key or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
