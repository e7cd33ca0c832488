"""What the HTTP adapters share: the SSE decoder, Retry-After, status mapping, scrubbing, deadlines."""

from __future__ import annotations

import asyncio
import email.utils
import time

import aiohttp
import pytest

from server.errors import (
    ProviderAuthError,
    RateLimited,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamNotFound,
    UpstreamPayloadTooLarge,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from server.providers import AnthropicProvider, OpenAIProvider, ProviderRequest
from server.providers.upstream import (
    MAX_SSE_LINE_BYTES,
    Deadlines,
    HTTPProvider,
    SSEDecoder,
    Timeouts,
    parse_retry_after,
    scrub,
    status_error,
)

from .fake_upstream import DEFAULT_API_KEY, FakeUpstream, Script
from .helpers import stream_chunks, stream_failure


def test_sse_decoder_joins_pieces_split_anywhere() -> None:
    stream = (b": keep-alive comment\r\n\r\n"
              b"event: message_start\r\ndata: {\"a\": 1}\r\n\r\n"
              b"data: line one\ndata: line two\nid: 7\nretry: 10\n\n"
              b"data:no-space\n\n"
              b"data: [DONE]\n\n")
    expected = [("message_start", b'{"a": 1}'), ("message", b"line one\nline two"),
                ("message", b"no-space"), ("message", b"[DONE]")]
    for size in (1, 2, 7, len(stream)):
        decoder = SSEDecoder()
        events = []
        for i in range(0, len(stream), size):
            events += decoder.feed(stream[i:i + size])
        assert events == expected, size


def test_sse_decoder_refuses_an_endless_line() -> None:
    decoder = SSEDecoder()
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"data: " + b"x" * (MAX_SSE_LINE_BYTES + 1))


def test_retry_after_in_seconds_milliseconds_or_a_date() -> None:
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "1500", "Retry-After": "7"}) == 1.5
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = parse_retry_after({"Retry-After": later})
    assert seconds is not None and 25 <= seconds <= 31
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_scrub_replaces_every_secret() -> None:
    assert scrub("key sk-123456 and sk-123456 again", ["sk-123456", None, ""]) == (
        "key [redacted] and [redacted] again")


@pytest.mark.parametrize(("status", "cls", "retryable"), [
    (401, ProviderAuthError, False), (403, ProviderAuthError, False), (429, RateLimited, True),
    (408, UpstreamError, True), (409, UpstreamError, True), (500, UpstreamError, True),
    (502, UpstreamError, True), (529, UpstreamError, True), (400, UpstreamBadRequest, False),
    (404, UpstreamNotFound, False), (413, UpstreamPayloadTooLarge, False), (422, UpstreamBadRequest, False),
    (418, UpstreamError, False),
])
def test_statuses_map_to_gateway_errors(status: int, cls: type[UpstreamError], retryable: bool) -> None:
    body = b'{"error": {"message": "model gpt-x does not exist; key sk-abcdef", "type": "x"}}'
    error = status_error(provider="openai", status=status, body=body, headers={"Retry-After": "3"},
                         key_env="OPENAI_API_KEY", secrets=["sk-abcdef"])
    assert type(error) is cls
    assert error.retryable is retryable
    assert "sk-abcdef" not in error.message and "'openai'" in error.message
    if cls is ProviderAuthError:
        assert "OPENAI_API_KEY" in error.message and "gpt-x" not in error.message
    else:
        assert "model gpt-x does not exist; key [redacted]" in error.message
    assert error.retry_after == (3.0 if status == 429 else None)


def test_anthropic_error_bodies_and_plain_text_are_quoted() -> None:
    anthropic = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    error = status_error(provider="anthropic", status=529, body=anthropic, headers={}, key_env=None, secrets=[])
    assert error.message == "provider 'anthropic' is overloaded (HTTP 529): Overloaded"
    error = status_error(provider="p", status=502, body=b"<html>Bad   gateway</html>" + b"x" * 1000,
                         headers={}, key_env=None, secrets=[])
    assert error.message.startswith("provider 'p' failed (HTTP 502): <html>Bad gateway</html>")
    assert len(error.message) < 400


async def test_deadlines_first_token_then_idle_then_total() -> None:
    never = asyncio.Event()
    first = Deadlines(provider="p", timeouts=Timeouts(first_token=0.05, idle=10, total=10))
    with pytest.raises(UpstreamTimeout, match="no first token within 0.05s"):
        await first.run(never.wait())
    idle = Deadlines(provider="p", timeouts=Timeouts(first_token=10, idle=0.05, total=10))
    assert await idle.run(asyncio.sleep(0, "ok")) == "ok"
    idle.got_output()
    with pytest.raises(UpstreamTimeout, match="no data for 0.05s mid-stream"):
        await idle.run(never.wait())
    total = Deadlines(provider="p", timeouts=Timeouts(first_token=10, idle=10, total=0.05))
    with pytest.raises(UpstreamTimeout, match="longer than 0.05s in total"):
        await total.run(never.wait())


async def test_a_cancel_from_outside_is_not_taken_for_a_deadline_and_close_drops_the_timer() -> None:
    never, started = asyncio.Event(), asyncio.Event()

    async def waits() -> None:
        started.set()
        await never.wait()

    deadlines = Deadlines(provider="p", timeouts=Timeouts(first_token=0.05, idle=10, total=10))
    waiting = asyncio.ensure_future(deadlines.run(waits()))
    await asyncio.wait_for(started.wait(), 5)
    waiting.cancel()  # the flight was aborted: that is no upstream timeout
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)
    deadlines.close()
    assert deadlines._timer is None


async def test_a_timeout_raised_inside_is_not_taken_for_a_deadline() -> None:
    deadlines = Deadlines(provider="p", timeouts=Timeouts())

    async def fails() -> None:
        raise TimeoutError("from inside")

    with pytest.raises(TimeoutError, match="from inside"):
        await deadlines.run(fails())


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_reasoning_is_output_for_the_first_token_deadline(
    fake: FakeUpstream, session: aiohttp.ClientSession, kind: str
) -> None:
    # A reasoning model thinks for a while before its first word: 0.6 s of reasoning against a
    # 0.25 s first-token deadline (3 s against 1 s, scaled down).
    timeouts = Timeouts(first_token=0.25, idle=5, total=10)
    provider: HTTPProvider
    if kind == "openai":
        provider = OpenAIProvider(name=kind, base_url=fake.openai_url, session=session, api_key=DEFAULT_API_KEY,
                                  timeouts=timeouts)
    else:
        provider = AnthropicProvider(name=kind, base_url=fake.anthropic_url, session=session,
                                     api_key=DEFAULT_API_KEY, timeouts=timeouts)
    request = ProviderRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    fake.script(Script(reasoning=["hmm"] * 6, interval_s=0.1, tokens=["Answer."]))
    chunks = await stream_chunks(provider, request)
    assert "".join(c.reasoning for c in chunks) == "hmm" * 6 and "".join(c.text for c in chunks) == "Answer."
    assert fake.calls[-1].ended_at is not None and fake.calls[-1].ended_at - fake.calls[-1].started_at >= 0.5
    # the same silence without reasoning is a missing first token
    fake.script(Script(first_token_s=0.6, tokens=["Answer."]))
    error, _ = await stream_failure(provider, request)
    assert isinstance(error, UpstreamTimeout) and "no first token within 0.25s" in error.message
