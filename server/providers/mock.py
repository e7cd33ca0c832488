"""The built-in ``mock`` provider: deterministic answers, no network.

Model ``mock`` streams an answer derived from the last user message. Model
``mock:ttft=MS,itl=MS,n=TOKENS,fail=0|1,failat=K,think=R,tool=NAME`` sets its
timing, failure and what it produces beside the text:

- ``ttft``: milliseconds before the first token (default 100)
- ``itl``: milliseconds between tokens (default 20)
- ``n``: number of tokens (default 24)
- ``fail=1``: fail with ``upstream_error`` before the first token
- ``failat=K``: fail after K tokens (a stream cut mid-way)
- ``think=R``: R reasoning pieces before the text (each after ``itl``)
- ``tool=NAME``: end with a call of tool NAME (arguments ``{"query": <prompt>}``),
  finish reason ``tool_calls``

The same prompt and model always give the same text, so coalesced and direct
answers can be compared byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

import orjson

from ..errors import BadRequest, UpstreamError
from .base import Chunk, Provider, ProviderRequest

__all__ = ["MockProvider", "MockSpec", "mock_answer"]

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
    "mike november oscar papa quebec romeo sierra tango uniform victor whiskey "
    "xray yankee zulu"
).split()


DEFAULT_TTFT_MS = 100.0
DEFAULT_ITL_MS = 20.0
DEFAULT_TOKENS = 24


@dataclass(frozen=True, slots=True)
class MockSpec:
    ttft_ms: float = DEFAULT_TTFT_MS
    itl_ms: float = DEFAULT_ITL_MS
    n: int = DEFAULT_TOKENS
    fail: bool = False
    fail_at: int | None = None
    think: int = 0
    tool: str = ""

    @classmethod
    def parse(cls, model: str) -> MockSpec:
        """Parse ``mock`` or ``mock:ttft=..,itl=..,n=..,fail=..,failat=..``."""
        name, _, options = model.partition(":")
        if name != "mock":
            raise BadRequest(f"unknown mock model {model!r}; use 'mock' or 'mock:ttft=MS,itl=MS,n=N'")
        values: dict[str, str] = {}
        for part in filter(None, options.split(",")):
            key, sep, value = part.partition("=")
            if not sep:
                raise BadRequest(f"mock option {part!r} must be key=value")
            values[key.strip()] = value.strip()
        unknown = set(values) - {"ttft", "itl", "n", "fail", "failat", "think", "tool"}
        if unknown:
            raise BadRequest(f"unknown mock option(s): {', '.join(sorted(unknown))}")
        try:
            spec = cls(
                ttft_ms=float(values.get("ttft", DEFAULT_TTFT_MS)),
                itl_ms=float(values.get("itl", DEFAULT_ITL_MS)),
                n=int(values.get("n", DEFAULT_TOKENS)),
                fail=values.get("fail", "0") not in ("0", "", "false"),
                fail_at=int(values["failat"]) if "failat" in values else None,
                think=int(values.get("think", 0)),
                tool=values.get("tool", ""),
            )
        except ValueError as exc:
            raise BadRequest(f"bad mock option in {model!r}: {exc}") from None
        if not (math.isfinite(spec.ttft_ms) and math.isfinite(spec.itl_ms)):
            raise BadRequest(f"mock timings must be finite numbers in {model!r}")
        if spec.ttft_ms < 0 or spec.itl_ms < 0 or not 0 <= spec.n <= 100_000 or not 0 <= spec.think <= 100_000:
            raise BadRequest(f"mock options out of range in {model!r}")
        if spec.ttft_ms > 600_000 or spec.itl_ms > 60_000:
            raise BadRequest(f"mock timings too long in {model!r}")
        return spec


def _last_user_text(request: ProviderRequest) -> str:
    for message in reversed(request.messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # its text parts; images do not change the answer
                return "\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
            return content if isinstance(content, str) else str(content)
    return ""


def mock_answer(prompt: str, n: int) -> list[str]:
    """The ``n`` tokens the mock streams for ``prompt``."""
    return list(_tokens(prompt, n))


def _tokens(prompt: str, n: int) -> Iterator[str]:
    """The tokens of :func:`mock_answer`, one at a time (a long answer is never held whole)."""
    digest = hashlib.sha1(prompt.encode()).digest()
    for i in range(n):
        word = _WORDS[(digest[i % len(digest)] + i * 7) % len(_WORDS)]
        yield word if i == 0 else " " + word


class MockProvider(Provider):
    kind = "mock"
    content_parts = frozenset({"text", "image_url"})

    def __init__(self, *, name: str = "mock", max_concurrency: int = 64) -> None:
        self.name = name
        self.max_concurrency = max_concurrency
        self.default_model = "mock"
        #: upstream calls started; tests and benchmarks read it.
        self.calls = 0
        #: streams currently open (incremented on start, decremented when closed).
        self.open_streams = 0

    def validate_model(self, model: str) -> None:
        MockSpec.parse(model)

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Chunk, None]:
        spec = MockSpec.parse(request.model)
        self.calls += 1
        self.open_streams += 1
        try:
            prompt = _last_user_text(request)
            await asyncio.sleep(spec.ttft_ms / 1000)
            if spec.fail:
                raise UpstreamError("mock provider failed as asked (fail=1)")
            for i, word in enumerate(mock_answer("think " + prompt, spec.think)):
                if i and spec.itl_ms:
                    await asyncio.sleep(spec.itl_ms / 1000)
                yield Chunk(reasoning=word)
            for i, token in enumerate(_tokens(prompt, spec.n)):
                if i and spec.itl_ms:
                    await asyncio.sleep(spec.itl_ms / 1000)
                if spec.fail_at is not None and i == spec.fail_at:
                    raise UpstreamError(f"mock stream cut after {i} tokens (failat={spec.fail_at})")
                yield Chunk(text=token)
            if spec.tool:
                arguments = orjson.dumps({"query": prompt}).decode()
                yield Chunk(tool_calls=[{"index": 0, "id": "call_" + hashlib.sha1(prompt.encode()).hexdigest()[:24],
                                         "type": "function", "function": {"name": spec.tool, "arguments": ""}}])
                yield Chunk(tool_calls=[{"index": 0, "function": {"arguments": arguments}}])
            yield Chunk(
                finish_reason="tool_calls" if spec.tool else "stop",
                usage={
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": spec.think + spec.n,
                    "total_tokens": len(prompt.split()) + spec.think + spec.n,
                },
            )
        finally:
            self.open_streams -= 1
