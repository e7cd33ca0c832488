#!/usr/bin/env python3
"""A fake OpenAI-compatible upstream for the benchmarks, speaking the real wire format.

    python -m tools.fake_openai --port 9100 [--ttft-ms 300 --itl-ms 30 --tokens 40]

- ``POST /v1/chat/completions``: with ``"stream": true`` an SSE stream of
  ``chat.completion.chunk`` objects (a role chunk, one chunk per token, a chunk
  with ``finish_reason``, a usage chunk when ``stream_options.include_usage``,
  then ``data: [DONE]``); otherwise one ``chat.completion`` object. The answer
  is a deterministic list of words derived from the last user message (the
  gateway's ``mock`` provider derives the same words), on a fixed schedule:
  token ``i`` is due ``ttft_ms + i * itl_ms`` after the call started (a token
  sent late does not delay the ones after it, as with a real model streaming
  from elsewhere).
- ``GET /v1/models``: the one model, ``fake-model`` (any model name is accepted).
- Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
  ``401`` without ``Authorization: Bearer ...``, ``400`` for a body that is not
  a chat request.

For the benchmark, outside the OpenAI surface:

- ``GET /stats``: ``{"calls", "open", "config", "recent": [...]}``, where each
  recent call has its ``prompt`` (the last user message, cut to 200 chars),
  ``stream``, ``started``, ``first_due`` (when its first token was due),
  ``ended`` (``time.monotonic()`` seconds, the same clock as every process on
  the machine) and ``outcome``: ``complete`` or ``disconnected`` (the client
  closed the connection first).
- ``POST /config`` with any of ``{"ttft_ms", "itl_ms", "tokens", "hold"}``: new
  timings for calls from then on; with ``"hold": true`` new calls wait, before
  they answer anything, until ``POST /release``, and their schedule starts
  then. ``POST /stats/reset`` forgets the counts.

Only 127.0.0.1 is served.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from aiohttp import web

from server.providers.mock import mock_answer

__all__ = ["FakeConfig", "make_app"]

DEFAULT_TTFT_MS = 300.0
DEFAULT_ITL_MS = 30.0
DEFAULT_TOKENS = 40
MODEL = "fake-model"
#: calls remembered for /stats
RECENT_CALLS = 10_000
MAX_TOKENS = 100_000

CONFIG: web.AppKey[FakeConfig] = web.AppKey("config")
STATS: web.AppKey[Stats] = web.AppKey("stats")
#: set while calls may go on; cleared by ``"hold": true``, set again by ``POST /release``
RELEASED: web.AppKey[asyncio.Event] = web.AppKey("released")


@dataclass(slots=True, kw_only=True)
class FakeConfig:
    ttft_ms: float = DEFAULT_TTFT_MS
    itl_ms: float = DEFAULT_ITL_MS
    tokens: int = DEFAULT_TOKENS
    hold: bool = False


@dataclass(slots=True, kw_only=True)
class Call:
    prompt: str
    stream: bool
    started: float
    first_due: float | None = None
    ended: float | None = None
    outcome: str | None = None


class Stats:
    def __init__(self) -> None:
        self.calls = 0
        self.open = 0
        self.recent: deque[Call] = deque(maxlen=RECENT_CALLS)

    def start(self, prompt: str, stream: bool) -> Call:
        call = Call(prompt=prompt[:200], stream=stream, started=time.monotonic())
        self.calls += 1
        self.open += 1
        self.recent.append(call)
        return call

    def end(self, call: Call, outcome: str) -> None:
        call.ended = time.monotonic()
        call.outcome = outcome
        self.open -= 1


def error(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _last_user(messages: list[Any]) -> str | None:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # content parts
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        return error(401, "You didn't provide an API key.", type="invalid_request_error", code="invalid_api_key")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error(400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return error(400, "'messages' is a required property")
    prompt = _last_user(body["messages"])
    if prompt is None:
        return error(400, "the conversation has no user message")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error(400, "you must provide a model parameter")
    config = request.app[CONFIG]
    tokens = mock_answer(prompt, min(config.tokens, MAX_TOKENS))
    stream = body.get("stream") is True
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens),
             "total_tokens": len(prompt.split()) + len(tokens)}
    stats = request.app[STATS]
    call = stats.start(prompt, stream)
    outcome = "disconnected"
    completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    try:
        if config.hold:
            await request.app[RELEASED].wait()
        due = call.first_due = time.monotonic() + config.ttft_ms / 1000
        itl = config.itl_ms / 1000
        await _until(due)
        if not stream:
            await _until(due + itl * (len(tokens) - 1))
            answer = {
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
            outcome = "complete"
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        head = {"id": completion_id, "created": created, "model": model}
        resp = await _stream(request, body, tokens, usage, head, due=due, itl=itl)
        outcome = "complete"
        return resp
    finally:
        stats.end(call, outcome)


async def _stream(request: web.Request, body: dict[str, Any], tokens: list[str], usage: dict[str, int],
                  head: dict[str, Any], *, due: float, itl: float) -> web.StreamResponse:
    """The answer as ``chat.completion.chunk`` events, token ``i`` at ``due + i * itl``."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = {**head, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    await resp.write(chunk({"role": "assistant", "content": ""}))
    for i, token in enumerate(tokens):
        await _until(due + itl * i)
        await resp.write(chunk({"content": token}))
    await resp.write(chunk({}, "stop"))
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        final = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _until(when: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``when`` (a loop's timers may wake a little early);
    not at all when it has."""
    while (delay := when - time.monotonic()) > 0:
        await asyncio.sleep(delay)


async def models(_: web.Request) -> web.Response:
    body = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def get_stats(request: web.Request) -> web.Response:
    stats = request.app[STATS]
    last = request.query.get("last")
    recent = list(stats.recent)[-int(last):] if last else list(stats.recent)
    body = {"calls": stats.calls, "open": stats.open, "config": asdict(request.app[CONFIG]),
            "recent": [asdict(c) for c in recent]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATS] = Stats() if request.app[STATS].open == 0 else request.app[STATS]
    request.app[STATS].calls = 0
    request.app[STATS].recent.clear()
    return web.json_response({"ok": True})


async def set_config(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read() or b"{}")
    config = request.app[CONFIG]
    for name, kind in (("ttft_ms", float), ("itl_ms", float), ("tokens", int)):
        if name in body:
            value = kind(body[name])
            if value < 0:
                return error(400, f"{name} must not be negative")
            setattr(config, name, value)
    if "hold" in body:
        config.hold = bool(body["hold"])
        if config.hold:
            request.app[RELEASED].clear()
    return web.json_response(asdict(config))


async def release(request: web.Request) -> web.Response:
    """Let the calls held by ``"hold": true`` go on (and new calls start at once)."""
    request.app[CONFIG].hold = False
    request.app[RELEASED].set()
    return web.json_response({"released": time.monotonic()})


def make_app(config: FakeConfig | None = None) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[CONFIG] = config or FakeConfig()
    app[STATS] = Stats()
    app[RELEASED] = asyncio.Event()
    app[RELEASED].set()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    app.router.add_post("/config", set_config)
    app.router.add_post("/release", release)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fake_openai", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=DEFAULT_TTFT_MS)
    parser.add_argument("--itl-ms", type=float, default=DEFAULT_ITL_MS)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    args = parser.parse_args(argv)
    import uvloop

    app = make_app(FakeConfig(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens))
    print(f"fake OpenAI upstream on http://127.0.0.1:{args.port}/v1", flush=True)
    # handler_cancellation: a client that leaves cancels its handler at once, so 'ended' is when it left.
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None,
                handler_cancellation=True, loop=uvloop.new_event_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
