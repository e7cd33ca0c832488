"""The OpenAI-compatible adapter against the fake upstream's OpenAI wire format, alone and in the gateway."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from server.appkeys import PROVIDERS
from server.errors import UpstreamBadRequest, UpstreamNotFound, UpstreamPayloadTooLarge, UpstreamTimeout
from server.providers import Chunk, OpenAIProvider, ProviderRequest
from server.providers.mock import mock_answer
from server.providers.upstream import Timeouts

from .fake_upstream import DEFAULT_API_KEY, TOOL_CALLS, FakeUpstream, Script
from .helpers import collect, stream_chunks as run, stream_failure as failure, text_of, within

KEY = DEFAULT_API_KEY


def adapter(fake: FakeUpstream, session: aiohttp.ClientSession, **options: Any) -> OpenAIProvider:
    settings: dict[str, Any] = dict(name="openai", base_url=fake.openai_url, session=session, api_key=KEY,
                                    api_key_env="OPENAI_API_KEY")
    return OpenAIProvider(**{**settings, **options})


def ask(content: str = "hello", **params: Any) -> ProviderRequest:
    return ProviderRequest(model="gpt-test", messages=[{"role": "user", "content": content}], params=params)


async def test_the_request_on_the_wire(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    provider = adapter(fake, session, headers={"HTTP-Referer": "https://example.org"})
    await run(provider, ask(temperature=0.2, stream=False, stream_options={"extra": 1}, model="other"))
    [call] = fake.calls
    assert call.path == "/v1/chat/completions"
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["HTTP-Referer"] == "https://example.org"
    assert call.body == {
        "model": "gpt-test", "messages": [{"role": "user", "content": "hello"}], "temperature": 0.2,
        "stream": True, "stream_options": {"extra": 1, "include_usage": True},
    }


async def test_chunks_carry_text_then_finish_then_usage(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.script(Script(tokens=["Hel", "lo", "!"]))
    chunks = await run(adapter(fake, session), ask("say hello"))
    assert [c.text for c in chunks if c.text] == ["Hel", "lo", "!"]
    finish = [c for c in chunks if c.finish_reason]
    assert [c.meta for c in finish] == [{"finish_reason": "stop"}]
    usage = [c.usage for c in chunks if c.usage]
    assert usage == [{"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}]
    assert chunks[-1].usage is not None  # usage comes after the finish, before [DONE]


async def test_a_server_that_ignores_stream_true_still_answers(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.script(Script(tokens=["whole ", "answer"], non_stream=True, extras={"citations": ["https://a"]}))
    [chunk] = await run(adapter(fake, session), ask())
    assert chunk.text == "whole answer"
    assert chunk.usage is not None and chunk.usage["completion_tokens"] == 2
    assert chunk.meta == {"citations": ["https://a"], "finish_reason": "stop"}


async def test_a_body_ending_after_finish_without_done_is_complete(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.script(Script(tokens=["a", "b"], done_marker=False))
    chunks = await run(adapter(fake, session), ask())
    assert "".join(c.text for c in chunks) == "ab"


async def test_a_cut_or_an_error_event_ends_after_the_partial_text(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    provider = adapter(fake, session)
    fake.script(Script(tokens=["a", "b", "c", "d"], cut_after=2))
    error, text = await failure(provider, ask())
    assert (error.type, error.retryable, text) == ("upstream_error", True, "ab")
    assert "closed before the answer was complete" in error.message
    fake.script(Script(tokens=["a", "b", "c", "d"], error_after=3))
    error, text = await failure(provider, ask())
    assert (error.type, error.retryable, text) == ("upstream_error", True, "abc")
    assert "mid-stream" in error.message and "failed mid-stream" in error.message


@pytest.mark.parametrize(("status", "kind", "retryable", "gateway_status"), [
    (401, "provider_auth", False, 502),
    (403, "provider_auth", False, 502),
    (429, "rate_limited", True, 429),
    (400, "invalid_request", False, 400),
    (404, "model_not_found", False, 404),
    (413, "payload_too_large", False, 413),
    (422, "invalid_request", False, 400),
    (500, "upstream_error", True, 502),
    (503, "upstream_error", True, 502),
])
async def test_upstream_statuses_are_mapped(
    fake: FakeUpstream, gateway_factory: Any, status: int, kind: str, retryable: bool, gateway_status: int
) -> None:
    gw = await gateway_factory(env=fake.env())
    fake.script(Script(status=status, message="upstream says no", retry_after="7" if status == 429 else None))
    tid = await gw.new_thread()
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", headers=gw.h(),
                               json={"content": "hi", "provider": "openai"}) as resp:
        assert resp.status == gateway_status
        answer = await resp.json()
        retry_after = resp.headers.get("Retry-After")
    assert answer["error"]["type"] == kind
    assert answer["error"].get("retryable", False) is retryable
    if status in (401, 403):
        assert "OPENAI_API_KEY" in answer["error"]["message"]
        assert "upstream says no" not in answer["error"]["message"]  # may quote the key: never echoed
    else:
        assert "upstream says no" in answer["error"]["message"]
        assert f"HTTP {status}" in answer["error"]["message"]
    assert retry_after == ("7" if status == 429 else None)
    stored = (await gw.thread(tid))["messages"][-1]
    assert stored["status"] == "error" and stored["meta"]["error"]["type"] == kind


async def test_perplexity_extras_land_in_meta_and_usage_on_the_message(
    fake: FakeUpstream, gateway_factory: Any
) -> None:
    # Perplexity's base URL has no /v1: calls go to {base}/chat/completions
    gw = await gateway_factory(env={"PERPLEXITY_BASE_URL": fake.url, "PERPLEXITY_API_KEY": KEY})
    citations = ["https://example.org/a", "https://example.org/b"]
    results = [{"title": "A", "url": "https://example.org/a", "date": "2024-01-01"}]
    fake.script(Script(n=4, extras={"citations": citations, "search_results": results}))
    tid = await gw.new_thread()
    async with gw.open_stream(tid, {"content": "news?", "provider": "perplexity", "model": "sonar",
                                    "reason": "research", "scope": "team"}) as resp:
        events = await collect(resp)
    assert fake.calls[0].path == "/chat/completions"
    message = events[-1].json()["message"]
    assert text_of(events) == message["content"] == "".join(mock_answer("news?", 4))
    assert message["meta"] == {"reason": "research", "scope": "team", "citations": citations,
                               "search_results": results, "finish_reason": "stop"}
    assert message["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    stored = (await gw.thread(tid))["messages"][-1]
    assert stored["meta"] == message["meta"] and stored["usage"] == message["usage"]


def timeouts_file(tmp_path: Path, **seconds: float) -> str:
    table = ", ".join(f"{k} = {v}" for k, v in seconds.items())
    path = tmp_path / "providers.toml"
    path.write_text(f'[[providers]]\nname = "openai"\ntimeouts = {{ {table} }}\n')
    return str(path)


async def test_a_missing_first_token_ends_in_upstream_timeout_and_closes_the_call(
    fake: FakeUpstream, gateway_factory: Any, tmp_path: Path
) -> None:
    gw = await gateway_factory(env=fake.env(), providers_file=timeouts_file(tmp_path, first_token=0.3))
    fake.script(Script(hold_first=True))
    tid = await gw.new_thread()
    async with gw.open_stream(tid, {"content": "hi", "provider": "openai"}) as resp:
        events = await collect(resp)
    assert events[-1].event == "error"
    error = events[-1].json()["error"]
    assert error["type"] == "upstream_timeout" and error["retryable"] is True
    assert "no first token within 0.3s" in error["message"]
    call = fake.calls[0]
    await within(call.connection.closed.wait(), 5, "the timed-out call's connection to close")
    stored = (await gw.thread(tid))["messages"][-1]
    assert stored["status"] == "error" and stored["meta"]["error"]["type"] == "upstream_timeout"


async def test_idle_and_total_deadlines(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    idle = adapter(fake, session, timeouts=Timeouts(first_token=30, idle=0.2, total=30))
    fake.script(Script(tokens=["a", "b", "c"], hold_after=2))
    error, text = await failure(idle, ask())
    assert isinstance(error, UpstreamTimeout) and text == "ab"
    assert "no data for 0.2s mid-stream" in error.message
    total = adapter(fake, session, timeouts=Timeouts(first_token=30, idle=30, total=0.3))
    fake.script(Script(n=1000, interval_s=0.02))
    error, text = await failure(total, ask())
    assert isinstance(error, UpstreamTimeout) and text
    assert "longer than 0.3s in total" in error.message
    for call in fake.calls:
        await within(call.connection.closed.wait(), 5, "each timed-out call's connection to close")


async def test_an_unreachable_upstream_is_a_retryable_error(session: aiohttp.ClientSession) -> None:
    async with FakeUpstream.start() as gone:
        url = gone.openai_url  # a port that was just freed: nothing listens there
    provider = OpenAIProvider(name="openai", base_url=url, session=session, api_key=KEY)
    error, _ = await failure(provider, ask())
    assert error.type == "upstream_error" and error.retryable
    assert "cannot connect" in error.message


async def test_closing_the_stream_closes_the_connection_and_complete_calls_reuse_it(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    provider = adapter(fake, session)
    await run(provider, ask("one"))
    await run(provider, ask("two"))
    assert len(fake.connections) == 1  # read to the end: the connection went back to the pool
    fake.script(Script(n=5, hold_after=2))
    stream = provider.stream(ask("three"))
    assert isinstance(stream, AsyncGenerator)  # closable: how a flight aborts its call
    assert (await anext(stream)).text and (await anext(stream)).text
    call = fake.calls[-1]
    await stream.aclose()
    await within(call.connection.closed.wait(), 5, "the connection to close")
    await within(call.ended.wait(), 5, "the fake's handler to end")
    assert call.outcome == "client_closed"


async def test_a_provider_without_its_key_is_refused_before_anything_is_written(
    fake: FakeUpstream, gateway_factory: Any
) -> None:
    gw = await gateway_factory(env={"OPENAI_BASE_URL": fake.openai_url})
    tid = await gw.new_thread()
    status, answer = await gw.post(tid, {"content": "hi", "provider": "openai"})
    assert status == 400
    assert answer["error"]["type"] == "provider_not_configured"
    assert "OPENAI_API_KEY" in answer["error"]["message"]
    assert (await gw.thread(tid))["messages"] == []
    assert fake.calls == []


async def test_keys_never_appear_in_errors_messages_metrics_or_logs(
    fake: FakeUpstream, gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await gateway_factory(env=fake.env())
    tid = await gw.new_thread()
    seen: list[str] = []
    for i, script in enumerate([
        Script(status=500, message="internal error for key {api_key}"),
        Script(status=400, message="bad request from {api_key}"),
        Script(status=429, message="slow down {api_key}", retry_after="1"),
        Script(n=4, cut_after=2),
    ]):
        fake.script(script)
        status, answer = await gw.post(tid, {"content": f"try {i}", "provider": "openai"})
        assert status >= 400
        seen.append(str(answer))
    fake.api_key = "sk-a-different-key-the-upstream-wants"  # now ours is refused: a 401 quoting part of it
    status, answer = await gw.post(tid, {"content": "try 401", "provider": "openai"})
    assert status == 502 and answer["error"]["type"] == "provider_auth"
    seen.append(str(answer))
    assert "[redacted]" in seen[0]
    seen.append(str(await gw.thread(tid)))
    seen.append(str(await gw.performance()))
    async with gw.session.get(f"{gw.url}/metrics") as resp:
        seen.append(await resp.text())
    seen.append(caplog.text)
    seen.append(repr(list(gw.app[PROVIDERS])))
    everything = "\n".join(seen)
    assert KEY not in everything
    assert f"{KEY[:3]}***{KEY[-4:]}" not in everything  # how the fake's 401 quotes a key


# -- beside the text: reasoning, refusals, tool calls ------------------------------------------

#: the tool-call pieces a client receives for TOOL_CALLS, in OpenAI's shape
TOOL_PIECES = [
    {"index": 0, "id": "call_weather", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city": '}},
    {"index": 0, "function": {"arguments": '"Paris"'}},
    {"index": 0, "function": {"arguments": "}"}},
    {"index": 1, "id": "call_time", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    {"index": 1, "function": {"arguments": "{}"}},
]


def pieces(chunks: list[Chunk]) -> dict[str, Any]:
    """What a client would show: each kind of output joined, tool-call pieces in order, the finish."""
    return {"reasoning": "".join(c.reasoning for c in chunks), "text": "".join(c.text for c in chunks),
            "refusal": "".join(c.refusal for c in chunks), "tool_calls": [p for c in chunks for p in c.tool_calls],
            "finish": [c.finish_reason for c in chunks if c.finish_reason]}


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_text_and_tool_calls_stream_through(
    fake: FakeUpstream, session: aiohttp.ClientSession, field: str
) -> None:
    # vLLM and DeepSeek say reasoning_content, OpenRouter and Ollama say reasoning
    fake.script(Script(reasoning=["Think", "ing"], reasoning_field=field, tokens=["Let me check."], tool_calls=TOOL_CALLS))
    chunks = await run(adapter(fake, session), ask(tools=[{"type": "function", "function": {"name": "get_weather"}}]))
    assert pieces(chunks) == {"reasoning": "Thinking", "text": "Let me check.", "refusal": "",
                              "tool_calls": TOOL_PIECES, "finish": ["tool_calls"]}
    assert [c.reasoning for c in chunks if c.reasoning] == ["Think", "ing"]  # streamed as it came
    assert fake.calls[0].body["tools"] == [{"type": "function", "function": {"name": "get_weather"}}]


async def test_a_refusal_streams_as_a_refusal(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.script(Script(tokens=[], refusal=["I can't ", "help with that."]))
    chunks = await run(adapter(fake, session), ask())
    assert pieces(chunks) == {"reasoning": "", "text": "", "refusal": "I can't help with that.", "tool_calls": [],
                              "finish": ["stop"]}


async def test_a_whole_answer_carries_the_same_fields(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.script(Script(non_stream=True, reasoning=["Think", "ing"], tokens=["Let me check."], tool_calls=TOOL_CALLS))
    [chunk] = await run(adapter(fake, session), ask())
    assert pieces([chunk]) == {"reasoning": "Thinking", "text": "Let me check.", "refusal": "", "finish": ["tool_calls"],
                               "tool_calls": [
        {"index": 0, "id": "call_weather", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"index": 1, "id": "call_time", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    fake.script(Script(non_stream=True, tokens=[], refusal=["No."], reasoning_field="reasoning", reasoning=["Hm"]))
    [chunk] = await run(adapter(fake, session), ask())
    assert (chunk.refusal, chunk.reasoning, chunk.text, chunk.finish_reason) == ("No.", "Hm", "", "stop")


def raw_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def test_tool_call_pieces_leave_in_openais_shape_whatever_the_servers_habits(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.script(Script(raw=[
        raw_chunk({"role": "assistant", "content": None}),
        # id and name repeated on every piece, and the arguments' object itself on the first
        raw_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                   "function": {"name": "lookup", "arguments": '{"q": '}}]}),
        raw_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                   "function": {"name": "lookup", "arguments": '"x"}'}}]}),
        # whole calls with no index, one without an id
        raw_chunk({"tool_calls": [{"id": "call_b", "function": {"name": "other", "arguments": {"n": 1}}}]}),
        raw_chunk({"tool_calls": [{"function": {"name": "third", "arguments": "{}"}}]}),
        # both reasoning fields with the same text: shown once
        raw_chunk({"reasoning_content": "why", "reasoning": "why"}),
        raw_chunk({}, "tool_calls"),
    ]))
    chunks = await run(adapter(fake, session), ask())
    calls = pieces(chunks)["tool_calls"]
    assert calls[:3] == [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"q": '}},
        {"index": 0, "function": {"arguments": '"x"}'}},
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "other", "arguments": '{"n":1}'}},
    ]
    [third] = calls[3:]
    assert (third["index"], third.get("type"), third.get("function")) == (
        2, "function", {"name": "third", "arguments": "{}"})
    assert third.get("id", "").startswith("call_")  # made up: a client must be able to answer it
    assert pieces(chunks)["reasoning"] == "why"


@pytest.mark.parametrize(("raw", "finish", "kept"), [
    ("stop", "stop", None), ("length", "length", None), ("tool_calls", "tool_calls", None),
    ("content_filter", "content_filter", None), ("eos", "stop", "eos"), ("abort", "stop", "abort"),
])
async def test_finish_reasons_are_openais(
    fake: FakeUpstream, session: aiohttp.ClientSession, raw: str, finish: str, kept: str | None
) -> None:
    fake.script(Script(tokens=["a"], stop_reason=raw))
    [last] = [c for c in await run(adapter(fake, session), ask()) if c.finish_reason]
    assert last.finish_reason == finish
    assert last.meta == {"finish_reason": finish, **({"upstream_finish_reason": kept} if kept else {})}


@pytest.mark.parametrize(("style", "code", "kind", "retryable"), [
    ("event", None, "upstream_error", True),             # OpenAI, SGLang: {"error": {...}}
    ("bare", None, "upstream_error", True),              # older vLLM: {"object": "error", ...}
    ("bare", 400, "invalid_request", False),             # ... refusing the request once streaming
    ("finish", None, "upstream_error", True),            # OpenRouter: finish_reason "error" with the error
    ("finish_only", None, "upstream_error", True),       # ... and without it
])
async def test_errors_inside_a_stream_end_it_after_the_partial_text(
    fake: FakeUpstream, session: aiohttp.ClientSession, style: str, code: int | None, kind: str, retryable: bool
) -> None:
    fake.script(Script(tokens=["a", "b", "c"], error_after=2, error_style=style, error_code=code))
    error, text = await failure(adapter(fake, session), ask())
    assert (error.type, error.retryable, text) == (kind, retryable, "ab")
    assert "'openai'" in error.message
    if style == "finish_only":
        assert "finish_reason 'error'" in error.message
    else:
        assert "failed mid-stream" in error.message  # the upstream's own words


@pytest.mark.parametrize(("style", "code", "kind"), [
    ("event", None, "upstream_error"), ("bare", None, "invalid_request"), ("bare", 404, "model_not_found"),
    ("finish", None, "upstream_error"), ("finish_only", None, "upstream_error"),
])
async def test_errors_in_a_whole_answer(
    fake: FakeUpstream, session: aiohttp.ClientSession, style: str, code: int | None, kind: str
) -> None:
    fake.script(Script(non_stream=True, error_after=0, error_style=style, error_code=code))
    error, text = await failure(adapter(fake, session), ask())
    assert (error.type, text) == (kind, "")


@pytest.mark.parametrize(("status", "cls", "gateway_status", "kind"), [
    (400, UpstreamBadRequest, 400, "invalid_request"),
    (404, UpstreamNotFound, 404, "model_not_found"),
    (413, UpstreamPayloadTooLarge, 413, "payload_too_large"),
    (422, UpstreamBadRequest, 400, "invalid_request"),
])
async def test_a_refused_request_keeps_its_status_and_says_not_to_retry(
    fake: FakeUpstream, session: aiohttp.ClientSession, status: int, cls: type[Exception], gateway_status: int,
    kind: str
) -> None:
    fake.script(Script(status=status, message="bad 'temperature' with key {api_key}"))
    error, _ = await failure(adapter(fake, session), ask())
    assert type(error) is cls
    assert (error.status, error.type, error.retryable) == (gateway_status, kind, False)
    assert error.headers() == {"x-should-retry": "false"}
    assert "bad 'temperature' with key [redacted]" in error.message and KEY not in error.message


async def test_the_sdk_does_not_retry_what_the_upstream_refused(fake: FakeUpstream, gateway_factory: Any) -> None:
    gw = await gateway_factory(env=fake.env())
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=2, timeout=10,
                                default_headers={"x-org-id": "org_a"})
    try:
        fake.script(Script(status=404, message="The model `gpt-x` does not exist"))
        with pytest.raises(openai.NotFoundError) as caught:
            await within(client.chat.completions.create(model="openai/gpt-x", messages=[
                {"role": "user", "content": "hi"}]))
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert "does not exist" in str(caught.value)
        fake.api_key = "sk-another-key-the-upstream-wants"  # our key refused: the gateway's 502
        with pytest.raises(openai.InternalServerError) as refused:
            await within(client.chat.completions.create(model="openai/gpt-y", messages=[
                {"role": "user", "content": "hi"}]))
        assert refused.value.status_code == 502 and refused.value.response.headers["x-should-retry"] == "false"
    finally:
        await within(client.close())
    assert len(fake.calls) == 2  # the SDK, told not to, did not retry either
    async with gw.session.post(f"{gw.url}/api/threads/{await gw.new_thread()}/messages", headers=gw.h(),
                               json={"content": "hi", "provider": "openai", "model": "gpt-z"}) as resp:
        assert resp.status == 502 and resp.headers["x-should-retry"] == "false"


# -- per-provider options -------------------------------------------------------------------------


async def test_stream_options_and_max_temperature_options(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    plain = adapter(fake, session, stream_options=False, max_temperature=1.0)
    fake.script(Script(tokens=["a", "b"]))
    chunks = await run(plain, ask(temperature=1.7, stream_options={"include_usage": True}))
    assert "".join(c.text for c in chunks) == "ab"
    assert not any(c.usage for c in chunks)  # not asked for: not sent
    await run(plain, ask(temperature=0.4))
    first, second = fake.calls
    assert "stream_options" not in first.body and first.body["temperature"] == 1.0
    assert second.body["temperature"] == 0.4


async def test_the_options_from_the_providers_file(fake: FakeUpstream, gateway_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(f'[[providers]]\nname = "local"\nkind = "openai"\nbase_url = "{fake.openai_url}"\n'
                    'api_key_env = "LOCAL_KEY"\nstream_options = false\nmax_temperature = 1.2\n')
    gw = await gateway_factory(env={"LOCAL_KEY": KEY}, providers_file=str(path))
    async with gw.session.post(f"{gw.url}/v1/chat/completions", headers=gw.h(), json={
            "model": "local/m", "temperature": 1.9, "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 200, await resp.text()
    [call] = fake.calls
    assert "stream_options" not in call.body and call.body["temperature"] == 1.2
