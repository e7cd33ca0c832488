"""The Anthropic adapter against the fake upstream's Messages API wire format, alone and in the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.providers import AnthropicProvider, ProviderRequest
from server.providers.anthropic import DEFAULT_MAX_TOKENS, REFUSAL
from server.providers.mock import mock_answer

from .fake_upstream import DEFAULT_API_KEY, FakeToolCall, FakeUpstream, Script, anthropic_request_problem
from .helpers import collect, stream_chunks as run, stream_failure as failure, text_of
from .test_providers_openai import pieces

KEY = DEFAULT_API_KEY


def adapter(fake: FakeUpstream, session: aiohttp.ClientSession, **options: Any) -> AnthropicProvider:
    settings: dict[str, Any] = dict(name="anthropic", base_url=fake.anthropic_url, session=session, api_key=KEY,
                                    api_key_env="ANTHROPIC_API_KEY")
    return AnthropicProvider(**{**settings, **options})


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": "answer"},
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "second"},
]


def ask(**params: Any) -> ProviderRequest:
    return ProviderRequest(model="claude-test", messages=[{"role": "user", "content": "hi"}], params=params)


async def test_the_request_on_the_wire(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    provider = adapter(fake, session)
    await run(provider, ProviderRequest(model="claude-test", messages=CONVERSATION))
    await run(provider, ProviderRequest(model="claude-test", messages=CONVERSATION[1:2], params={
        "max_tokens": 50, "temperature": 0.5, "stop": "END", "frequency_penalty": 1.0}))
    first, second = fake.calls
    assert first.path == "/v1/messages"
    assert first.headers["x-api-key"] == KEY
    assert first.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in first.headers
    assert first.body == {
        "model": "claude-test", "max_tokens": DEFAULT_MAX_TOKENS, "stream": True,
        "system": "Be brief.\n\nBe kind.",
        "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"},
                     {"role": "user", "content": "second"}],
    }
    assert second.body == {"model": "claude-test", "max_tokens": 50, "stream": True, "temperature": 0.5,
                           "stop_sequences": ["END"], "messages": [{"role": "user", "content": "first"}]}


async def test_events_become_text_usage_and_finish(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.script(Script(tokens=["Bon", "jour"]))
    chunks = await run(adapter(fake, session), ProviderRequest(model="claude-test", messages=CONVERSATION))
    assert [c.text for c in chunks if c.text] == ["Bon", "jour"]
    [last] = [c for c in chunks if c.usage]
    assert last.usage == {"input_tokens": 7, "output_tokens": 2, "prompt_tokens": 7, "completion_tokens": 2,
                          "total_tokens": 9}  # 3 words of turns + 4 of system
    assert last.meta == {"finish_reason": "stop"} and last.finish_reason == "stop"


async def test_a_server_that_ignores_stream_true_still_answers(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.script(Script(tokens=["all ", "at once"], non_stream=True))
    [chunk] = await run(adapter(fake, session), ask())
    assert chunk.text == "all at once"
    assert chunk.usage is not None and chunk.usage["completion_tokens"] == 2


@pytest.mark.parametrize(("kind", "error_type", "retryable"), [
    ("overloaded_error", "upstream_error", True),
    ("api_error", "upstream_error", True),
    ("rate_limit_error", "rate_limited", True),
    ("invalid_request_error", "upstream_error", False),
    ("authentication_error", "provider_auth", False),
])
async def test_error_events_mid_stream_are_mapped(
    fake: FakeUpstream, session: aiohttp.ClientSession, kind: str, error_type: str, retryable: bool
) -> None:
    fake.script(Script(tokens=["a", "b", "c"], error_after=2, error_kind=kind))
    error, text = await failure(adapter(fake, session), ask())
    assert (error.type, error.retryable, text) == (error_type, retryable, "ab")
    assert "anthropic" in error.message


@pytest.mark.parametrize(("status", "kind", "retryable", "gateway_status"), [
    (401, "provider_auth", False, 502),
    (429, "rate_limited", True, 429),
    (500, "upstream_error", True, 502),
    (529, "upstream_error", True, 502),
])
async def test_upstream_statuses_are_mapped(
    fake: FakeUpstream, gateway_factory: Any, status: int, kind: str, retryable: bool, gateway_status: int
) -> None:
    gw = await gateway_factory(env=fake.env())
    fake.script(Script(status=status, message="Overloaded" if status == 529 else "no",
                       retry_after="3" if status == 429 else None))
    tid = await gw.new_thread()
    async with gw.session.post(f"{gw.url}/api/threads/{tid}/messages", headers=gw.h(),
                               json={"content": "hi", "provider": "anthropic"}) as resp:
        assert resp.status == gateway_status
        answer = await resp.json()
        assert resp.headers.get("Retry-After") == ("3" if status == 429 else None)
    assert answer["error"]["type"] == kind
    assert answer["error"].get("retryable", False) is retryable
    if status == 401:
        assert "ANTHROPIC_API_KEY" in answer["error"]["message"]
    if status == 529:
        assert "overloaded" in answer["error"]["message"]


async def test_a_stream_through_the_gateway_keeps_text_usage_and_a_cut(
    fake: FakeUpstream, gateway_factory: Any
) -> None:
    gw = await gateway_factory(env=fake.env())
    tid = await gw.new_thread()
    fake.script(Script(n=5))
    async with gw.open_stream(tid, {"content": "tell me", "provider": "anthropic"}) as resp:
        events = await collect(resp)
    message = events[-1].json()["message"]
    assert text_of(events) == message["content"] == "".join(mock_answer("tell me", 5))
    assert message["model"] == "claude-3-5-haiku-latest"  # the built-in default
    assert message["usage"]["completion_tokens"] == 5 and message["usage"]["prompt_tokens"] == 2
    fake.script(Script(n=5, cut_after=2))
    async with gw.open_stream(tid, {"content": "and then?", "provider": "anthropic"}) as resp:
        events = await collect(resp)
    assert [e.event for e in events] == ["meta", "delta", "delta", "error"]
    stored = (await gw.thread(tid))["messages"][-1]
    assert (stored["status"], stored["content"]) == ("error", "".join(mock_answer("and then?", 2)))
    # what went upstream for the second turn: the first turn, then the new message
    assert fake.calls[-1].body["messages"] == [
        {"role": "user", "content": "tell me"}, {"role": "assistant", "content": message["content"]},
        {"role": "user", "content": "and then?"}]


async def test_max_tokens_and_models_from_the_providers_file(
    fake: FakeUpstream, gateway_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "providers.toml"
    path.write_text('[[providers]]\nname = "claude"\nkind = "anthropic"\napi_key_env = "CLAUDE_KEY"\n'
                    f'base_url = "{fake.anthropic_url}"\nmax_tokens = 256\ndefault_model = "claude-x"\n')
    gw = await gateway_factory(env={"CLAUDE_KEY": KEY}, providers_file=str(path))
    tid = await gw.new_thread()
    status, answer = await gw.post(tid, {"content": "hi", "provider": "claude"})
    assert status == 200 and answer["message"]["model"] == "claude-x"
    assert fake.calls[0].body["max_tokens"] == 256


# -- OpenAI's requests in Anthropic's terms ---------------------------------------------------------

PNG = "iVBORw0KGgo="
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]},
    {"role": "developer", "content": "Use tools."},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in these, and the weather in Paris and Rome?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.org/cat.jpg", "detail": "low"}}]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "21C"}]},
    {"role": "user", "content": "Thanks. Anything else?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_3", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "toolu_3", "content": "error: no city"},
]


async def test_tools_images_and_system_parts_go_upstream_in_anthropics_format(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    await run(adapter(fake, session), ProviderRequest(model="claude-test", messages=TOOL_CONVERSATION, params={
        "tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False,
        "max_completion_tokens": 300, "temperature": 1.7, "top_p": 0.9, "user": "user-42",
        "metadata": {"purpose": "test"}, "response_format": {"type": "json_object"}, "seed": 7,
        "frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"1": 2}, "n": 1, "store": True,
        "service_tier": "default", "reasoning_effort": "low"}))
    [call] = fake.calls
    assert call.outcome == "complete"  # the fake took it: it checks bodies with the official SDK's types
    assert anthropic_request_problem(call.body) is None
    assert call.body == {
        "model": "claude-test", "max_tokens": 300, "stream": True, "temperature": 1.0, "top_p": 0.9,
        "metadata": {"user_id": "user-42"},
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Use tools."}],
        "tools": [{"name": "get_weather", "description": "The weather in a city", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in these, and the weather in Paris and Rome?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://example.org/cat.jpg"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [  # consecutive tool answers: one user message
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "21C"}]}]},
            {"role": "user", "content": "Thanks. Anything else?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_3", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3", "content": "error: no city"}]},
        ],
    }


@pytest.mark.parametrize(("tool_choice", "parallel", "sent"), [
    (None, None, None),
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, False,
     {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
    ("auto", True, {"type": "auto"}),
])
async def test_tool_choice_and_parallel_tool_calls(
    fake: FakeUpstream, session: aiohttp.ClientSession, tool_choice: Any, parallel: bool | None, sent: Any
) -> None:
    params: dict[str, Any] = {"tools": [WEATHER_TOOL]}
    if tool_choice is not None:
        params["tool_choice"] = tool_choice
    if parallel is not None:
        params["parallel_tool_calls"] = parallel
    await run(adapter(fake, session), ask(**params))
    [call] = fake.calls
    assert call.body.get("tool_choice") == sent
    # without tools there is nothing to choose: neither is sent
    await run(adapter(fake, session), ask(**{k: v for k, v in params.items() if k != "tools"}))
    assert "tool_choice" not in fake.calls[-1].body and "tools" not in fake.calls[-1].body


async def test_metadata_goes_only_as_its_user_id(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    provider = adapter(fake, session)
    await run(provider, ask(metadata={"user_id": "u-1", "tag": "x"}, user="u-2"))
    await run(provider, ask(metadata={"tag": "x"}))
    assert fake.calls[0].body["metadata"] == {"user_id": "u-1"}
    assert "metadata" not in fake.calls[1].body


async def test_untranslatable_parts_are_refused_by_name(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    provider = adapter(fake, session)
    svg = {"type": "image_url", "image_url": {"url": "data:image/svg+xml,<svg/>"}}
    error, _ = await failure(provider, ProviderRequest(model="claude-test", messages=[
        {"role": "user", "content": [svg]}]))
    assert (error.status, error.type) == (400, "invalid_request") and "base64" in error.message
    error, _ = await failure(provider, ProviderRequest(model="claude-test", messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
                                              "function": {"name": "f", "arguments": "{not json"}}]}]))
    assert (error.status, error.type) == (400, "invalid_request") and "JSON object" in error.message
    assert fake.calls == []  # refused before the call


# -- Anthropic's answers in OpenAI's terms -------------------------------------------------------

#: the second call has no input pieces at all (a tool without parameters)
TOOLS = (FakeToolCall("toolu_weather", "get_weather", ('{"city": ', '"Paris"', "}")),
         FakeToolCall("toolu_time", "get_time", ()))


async def test_thinking_text_and_tool_use_become_reasoning_text_and_tool_calls(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.script(Script(reasoning=["Let me ", "think."], signature="sig-123", tokens=["Checking."], tool_calls=TOOLS))
    chunks = await run(adapter(fake, session), ask(tools=[WEATHER_TOOL]))
    assert pieces(chunks) == {"reasoning": "Let me think.", "text": "Checking.", "refusal": "", "tool_calls": [
        {"index": 0, "id": "toolu_weather", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Paris"'}},
        {"index": 0, "function": {"arguments": "}"}},
        {"index": 1, "id": "toolu_time", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    ], "finish": ["tool_calls"]}
    assert [c.reasoning for c in chunks if c.reasoning] == ["Let me ", "think."]
    signed = [c.meta for c in chunks if c.meta and "thinking_signatures" in c.meta]
    assert signed == [{"thinking_signatures": ["sig-123"]}]
    [last] = [c for c in chunks if c.finish_reason]
    assert last.meta == {"finish_reason": "tool_calls"}


async def test_a_whole_message_reads_as_its_stream_would(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.script(Script(non_stream=True, reasoning=["Let me ", "think."], signature="sig-9", tokens=["Checking."],
                       tool_calls=(FakeToolCall("toolu_w", "get_weather", ('{"city": "Paris"}',)),)))
    [chunk] = await run(adapter(fake, session), ask())
    assert pieces([chunk]) == {"reasoning": "Let me think.", "text": "Checking.", "refusal": "", "tool_calls": [
        {"index": 0, "id": "toolu_w", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}], "finish": ["tool_calls"]}
    assert chunk.meta == {"thinking_signatures": ["sig-9"], "finish_reason": "tool_calls"}
    assert chunk.usage is not None and chunk.usage["prompt_tokens"] == 1


@pytest.mark.parametrize(("stop", "finish", "meta", "refusal"), [
    ("end_turn", "stop", {}, ""),
    ("max_tokens", "length", {}, ""),
    ("stop_sequence", "stop", {"stop_reason": "stop_sequence", "stop_sequence": "END"}, ""),
    ("tool_use", "tool_calls", {}, ""),
    ("pause_turn", "stop", {"stop_reason": "pause_turn"}, ""),
    ("refusal", "content_filter", {"stop_reason": "refusal", "stop_details": {
        "type": "refusal", "category": None, "explanation": "Out of bounds."}}, "Out of bounds."),
    ("model_context_window_exceeded", "length", {"stop_reason": "model_context_window_exceeded"}, ""),
])
@pytest.mark.parametrize("whole", [False, True], ids=["stream", "whole"])
async def test_stop_reasons_become_finish_reasons(
    fake: FakeUpstream, session: aiohttp.ClientSession, stop: str, finish: str, meta: dict[str, Any],
    refusal: str, whole: bool
) -> None:
    fake.script(Script(tokens=["a", "b"], stop_reason=stop, refusal=[refusal] if refusal else [], non_stream=whole))
    chunks = await run(adapter(fake, session), ask(stop="END"))
    [last] = [c for c in chunks if c.finish_reason]
    assert (last.finish_reason, last.meta, "".join(c.refusal for c in chunks)) == (
        finish, {"finish_reason": finish, **meta}, refusal)
    assert "".join(c.text for c in chunks) == "ab"


async def test_a_refusal_without_an_explanation_still_says_so(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.script(Script(tokens=[], stop_reason="refusal"))
    chunks = await run(adapter(fake, session), ask())
    assert pieces(chunks)["refusal"] == REFUSAL and pieces(chunks)["finish"] == ["content_filter"]


async def test_server_tool_blocks_are_not_tool_calls(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.script(Script(raw=[
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 3, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {
            "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"q":1}'}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "opaque"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Found it."}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    ]))
    chunks = await run(adapter(fake, session), ask())
    assert pieces(chunks) == {"reasoning": "", "text": "Found it.", "refusal": "", "tool_calls": [],
                              "finish": ["stop"]}
    assert {"redacted_thinking": ["opaque"]} in [c.meta for c in chunks]


@pytest.mark.parametrize(("status", "gateway_status", "kind"), [
    (400, 400, "invalid_request"), (404, 404, "model_not_found"), (413, 413, "payload_too_large"),
    (422, 400, "invalid_request"),
])
async def test_a_refused_request_keeps_its_status(
    fake: FakeUpstream, session: aiohttp.ClientSession, status: int, gateway_status: int, kind: str
) -> None:
    fake.script(Script(status=status, message="max_tokens: too large for {api_key}"))
    error, _ = await failure(adapter(fake, session), ask())
    assert (error.status, error.type, error.retryable, error.headers()) == (
        gateway_status, kind, False, {"x-should-retry": "false"})
    assert f"HTTP {status}" in error.message and "max_tokens: too large for [redacted]" in error.message
