"""Everything a provider sends reaches the official ``openai`` client through /v1: tool calls,
reasoning, refusals, stop reasons, images, statuses; and the /v1 result cache.

The gateway's ``openai`` and ``anthropic`` providers point at the fake upstream, which
speaks each wire format (its Anthropic side checks every request body with the
official ``anthropic`` SDK's types, so a body it takes is one the Messages API takes).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from server.appkeys import PROVIDERS
from server.providers.mock import mock_answer

from .conftest import GatewayFactory
from .fake_upstream import TOOL_CALLS, FakeUpstream, Script, wait_until
from .helpers import Gateway, collect, within

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image").decode()
DATA_URL = f"data:image/png;base64,{PNG}"
HTTPS_URL = "https://example.org/cat.png"
ADAPTERS = ("openai", "anthropic")


def sdk(gw: Gateway, *, max_retries: int = 0, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=max_retries, timeout=20,
                              default_headers={"x-org-id": "org_a", **headers})


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def streamed(client: openai.AsyncOpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    async def run() -> list[ChatCompletionChunk]:
        stream = await client.chat.completions.create(stream=True, **kwargs)
        return [chunk async for chunk in stream]

    return list(await within(run(), 15, "the stream to end"))


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def extra_of(chunks: list[ChatCompletionChunk], name: str) -> str:
    """A delta field the SDK does not type (``reasoning_content``), joined over the stream."""
    return "".join((c.choices[0].delta.model_extra or {}).get(name) or "" for c in chunks if c.choices)


def finish_of(chunks: list[ChatCompletionChunk]) -> str | None:
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) == 1, reasons
    return reasons[0]


def tool_calls_of(chunks: list[ChatCompletionChunk]) -> list[dict[str, Any]]:
    """Tool calls assembled from the stream's pieces as a client does: by index, id and
    name from the first piece, arguments appended."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
            call["pieces"] += 1
            if piece.id:
                assert call["id"] is None, "the id comes once, on the first piece"
                call["id"] = piece.id
            if piece.function and piece.function.name:
                call["name"] = piece.function.name
            if piece.function and piece.function.arguments:
                call["arguments"] += piece.function.arguments
    return [calls[i] for i in sorted(calls)]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.start() as f:
        yield f


async def upstream_gateway(gateway_factory: GatewayFactory, fake: FakeUpstream, tmp_path: Path | None = None,
                           timeouts: str | None = None, **settings: Any) -> Gateway:
    """A gateway whose openai and anthropic providers are the fake; ``timeouts`` (TOML) for both."""
    if timeouts is not None:
        assert tmp_path is not None
        file = tmp_path / "providers.toml"
        file.write_text("".join(f'[[providers]]\nname = "{name}"\ntimeouts = {timeouts}\n' for name in ADAPTERS))
        settings["providers_file"] = str(file)
    return await gateway_factory(env=fake.env(), **settings)


# -- tool calls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_tool_call_round_trip(gateway_factory: GatewayFactory, fake: FakeUpstream, adapter: str,
                                      stream: bool) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    model = f"{adapter}/tooling"
    fake.script(Script(tokens=["It is ", "sunny ", "in Paris."]), model="tooling", times=1)
    fake.script(Script(tokens=[], tool_calls=TOOL_CALLS[:1]), model="tooling", times=1)  # newest rule first
    question = user("What is the weather in Paris?")
    async with sdk(gw) as client:
        ask: dict[str, Any] = {"model": model, "tools": [WEATHER_TOOL], "tool_choice": "auto",
                               "parallel_tool_calls": False}
        if stream:
            chunks = await streamed(client, messages=question, **ask)
            assert finish_of(chunks) == "tool_calls"
            assert content_of(chunks) == ""
            [call] = tool_calls_of(chunks)
            assert call["pieces"] == 4  # the start, then the arguments in the three fragments sent
            call_id, name, arguments = call["id"], call["name"], call["arguments"]
        else:
            whole = await within(client.chat.completions.create(messages=question, **ask))
            choice = whole.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            [made] = choice.message.tool_calls or []
            assert made.type == "function"
            call_id, name, arguments = made.id, made.function.name, made.function.arguments
        # a streamed call keeps the upstream's fragments; a whole Anthropic answer holds an object
        assert (call_id, name, json.loads(arguments)) == ("call_weather", "get_weather", {"city": "Paris"})

        follow_up = [*question,
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                     {"role": "tool", "tool_call_id": call_id, "content": '{"sky": "sunny"}'}]
        if stream:
            final = await streamed(client, messages=follow_up, **ask)
            text, finish = content_of(final), finish_of(final)
        else:
            answer = await within(client.chat.completions.create(messages=follow_up, **ask))
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (text, finish) == ("It is sunny in Paris.", "stop")

    first, second = fake.calls
    assert first.outcome == second.outcome == "complete"  # neither body was refused by the fake's checks
    if adapter == "anthropic":
        assert first.body["tools"] == [{"name": "get_weather", "description": "The weather in a city",
                                        "input_schema": WEATHER_TOOL["function"]["parameters"]}]
        assert first.body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
        assert second.body["messages"] == [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_weather", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_weather",
                                          "content": '{"sky": "sunny"}'}]},
        ]
    else:
        assert first.body["tools"] == [WEATHER_TOOL] and first.body["tool_choice"] == "auto"
        assert first.body["parallel_tool_calls"] is False
        assert second.body["messages"] == follow_up


async def test_tool_calls_and_reasoning_are_kept_in_the_api_message_meta(gateway_factory: GatewayFactory,
                                                                         fake: FakeUpstream) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    fake.script(Script(tokens=["Let me look."], reasoning=["The user ", "wants weather."],
                       tool_calls=TOOL_CALLS), model="agent")
    tid = await gw.new_thread()
    status, body = await gw.post(tid, {"content": "weather and time?", "provider": "anthropic", "model": "agent",
                                       "tools": [WEATHER_TOOL]})
    assert status == 200, body
    message = body["message"]
    assert message["content"] == "Let me look."
    meta = message["meta"]
    assert meta["reasoning"] == "The user wants weather."
    assert meta["finish_reason"] == "tool_calls"
    assert [(c["id"], c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in meta["tool_calls"]] == [("call_weather", "function", "get_weather", {"city": "Paris"}),
                                             ("call_time", "function", "get_time", {})]
    assert body["coalesce"] == "leader"
    stored = (await gw.thread(tid))["messages"][1]
    assert stored["meta"]["tool_calls"] == meta["tool_calls"] and stored["meta"]["reasoning"] == meta["reasoning"]


# -- reasoning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_long_reasoning_prelude_does_not_hit_the_first_token_deadline(
        gateway_factory: GatewayFactory, fake: FakeUpstream, tmp_path: Path, adapter: str) -> None:
    # scaled down: 1.2 s of reasoning before the first answer text, a 0.5 s first-token deadline
    # (each reasoning step comes 0.4 s inside the deadlines, so a busy machine cannot trip them)
    gw = await upstream_gateway(gateway_factory, fake, tmp_path,
                                timeouts="{ first_token = 0.5, idle = 0.5, total = 10 }")
    thinking = [f"step {i}. " for i in range(12)]
    fake.script(Script(tokens=["Forty", "-two."], reasoning=thinking, first_token_s=0.05, interval_s=0.1),
                model="thinker")
    fake.script(Script(tokens=["late"], first_token_s=1.5), model="silent")
    async with sdk(gw) as client:
        chunks = await streamed(client, model=f"{adapter}/thinker", messages=user("the answer?"))
        whole = await within(client.chat.completions.create(model=f"{adapter}/thinker",
                                                            messages=user("the answer, whole?")))
        # the same silence with no reasoning is a timeout: the deadline is real (on a streamed
        # call; a whole answer says nothing until it is done, so only the total deadline holds)
        with pytest.raises(openai.APIStatusError) as timed_out:
            await within(client.chat.completions.create(model=f"{adapter}/silent", messages=user("hello?"),
                                                        stream=True))
    assert extra_of(chunks, "reasoning_content") == "".join(thinking)
    assert content_of(chunks) == "Forty-two." and finish_of(chunks) == "stop"
    reasoning_first = [c for c in chunks if c.choices and (c.choices[0].delta.model_extra or {}).get(
        "reasoning_content")]
    assert len(reasoning_first) == 12 and chunks.index(reasoning_first[-1]) < chunks.index(
        next(c for c in chunks if c.choices and c.choices[0].delta.content))
    assert (whole.choices[0].message.model_extra or {})["reasoning_content"] == "".join(thinking)
    assert whole.choices[0].message.content == "Forty-two."
    assert timed_out.value.status_code == 504 and "no first token within 0.5s" in str(timed_out.value)

    tid = await gw.new_thread()
    async with gw.open_stream(tid, {"content": "the answer?", "provider": adapter, "model": "thinker"}) as resp:
        events = await collect(resp)
    message = events[-1].json()["message"]
    assert message["meta"]["reasoning"] == "".join(thinking)
    assert message["content"] == "Forty-two."
    # time to first byte counts the reasoning; time to first token waits for the answer text
    ttfb = gw.metrics.registry.get_sample_value("dac_time_to_first_byte_seconds_sum", {
        "provider": adapter, "model": "thinker"})
    ttft = gw.metrics.registry.get_sample_value("dac_time_to_first_token_seconds_sum", {
        "provider": adapter, "model": "thinker"})
    assert ttfb is not None and ttft is not None and ttft - ttfb > 2 * 1.0  # two streamed answers, 1.1 s of thought each


async def test_reasoning_reaches_an_api_stream_and_a_late_joiner(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    tid = await gw.new_thread()
    body = {"content": "think first", "model": "mock:ttft=0,itl=0,n=3,think=4"}
    status, first = await gw.post(tid, body)
    assert status == 200 and first["coalesce"] == "leader"
    thought = "".join(mock_answer("think think first", 4))
    assert first["message"]["meta"]["reasoning"] == thought
    async with gw.open_stream(tid, body) as resp:  # the cached answer, replayed
        events = await collect(resp)
    deltas = [e.json() for e in events if e.event == "delta"]
    assert "".join(d.get("reasoning", "") for d in deltas) == thought
    assert "".join(d["text"] for d in deltas) == first["message"]["content"]
    assert [set(d) for d in deltas[:4]] == [{"text", "reasoning"}] * 4 and deltas[4] == {"text": deltas[4]["text"]}


# -- refusals, stop reasons, errors -----------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_refusal_reaches_the_sdk(gateway_factory: GatewayFactory, fake: FakeUpstream, adapter: str) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    fake.script(Script(tokens=[], refusal=["I can't ", "help with that."]), model="careful")
    async with sdk(gw) as client:
        chunks = await streamed(client, model=f"{adapter}/careful", messages=user("something bad"))
        whole = await within(client.chat.completions.create(model=f"{adapter}/careful",
                                                            messages=user("something else bad")))
    refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
    assert refusal == "I can't help with that." and content_of(chunks) == ""
    message = whole.choices[0].message
    assert message.refusal == "I can't help with that." and message.content is None
    # OpenAI says stop for a refusal; Anthropic's refusal stop reason is a content filter
    expected = "content_filter" if adapter == "anthropic" else "stop"
    assert finish_of(chunks) == whole.choices[0].finish_reason == expected


ANTHROPIC_STOPS = [
    ("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("tool_use", "tool_calls"),
    ("pause_turn", "stop"), ("refusal", "content_filter"), ("model_context_window_exceeded", "length"),
]
OPENAI_STOPS = [("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"),
                ("content_filter", "content_filter")]


@pytest.mark.parametrize(("adapter", "upstream", "finish"),
                         [("anthropic", u, f) for u, f in ANTHROPIC_STOPS] + [("openai", u, f) for u, f in OPENAI_STOPS])
async def test_stop_reasons_become_openai_finish_reasons(gateway_factory: GatewayFactory, fake: FakeUpstream,
                                                         adapter: str, upstream: str, finish: str) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    calls = TOOL_CALLS[:1] if finish == "tool_calls" else ()
    fake.script(Script(tokens=["Some ", "text"], stop_reason=upstream, tool_calls=calls), model="stopper")
    async with sdk(gw) as client:
        chunks = await streamed(client, model=f"{adapter}/stopper", messages=user(f"why stop {upstream}"))
        whole = await within(client.chat.completions.create(model=f"{adapter}/stopper",
                                                            messages=user(f"why stop {upstream}, whole")))
    assert finish_of(chunks) == finish
    assert whole.choices[0].finish_reason == finish
    assert content_of(chunks) == "Some text" == whole.choices[0].message.content


@pytest.mark.parametrize("style", ["finish", "finish_only"])
async def test_finish_reason_error_is_an_error(gateway_factory: GatewayFactory, fake: FakeUpstream,
                                               style: str) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    fake.script(Script(n=6, error_after=3, error_style=style), model="flaky")
    async with sdk(gw) as client:
        with pytest.raises(openai.APIError) as in_stream:
            await streamed(client, model="openai/flaky", messages=user("streamed"))
        with pytest.raises(openai.InternalServerError) as whole:
            await within(client.chat.completions.create(model="openai/flaky", messages=user("whole")))
    assert "finish_reason" in str(in_stream.value) or "mid-stream" in str(in_stream.value)
    assert whole.value.status_code == 502
    errors = gw.metrics.registry.get_sample_value("dac_chat_answers_total", {"route": "v1", "outcome": "error"})
    ok = gw.metrics.registry.get_sample_value("dac_chat_answers_total", {"route": "v1", "outcome": "ok"})
    assert (errors, ok) == (2, 0)  # never counted as a success


# -- images and other content parts ------------------------------------------------------------


async def test_an_image_part_reaches_each_provider_in_its_format(gateway_factory: GatewayFactory,
                                                                 fake: FakeUpstream) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    parts = [{"type": "text", "text": "What is in these?"},
             {"type": "image_url", "image_url": {"url": DATA_URL}},
             {"type": "image_url", "image_url": {"url": HTTPS_URL, "detail": "low"}}]
    async with sdk(gw) as client:
        for adapter in ADAPTERS:
            answer = await within(client.chat.completions.create(
                model=f"{adapter}/vision", messages=[{"role": "user", "content": parts}]))
            assert answer.choices[0].message.content
    openai_call, anthropic_call = fake.calls
    assert openai_call.body["messages"] == [{"role": "user", "content": parts}]
    assert anthropic_call.outcome == "complete"
    assert anthropic_call.body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": HTTPS_URL}}]}]


async def test_api_attachments_go_upstream_as_content_parts(gateway_factory: GatewayFactory,
                                                            fake: FakeUpstream) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    tid = await gw.new_thread()
    image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    status, body = await gw.post(tid, {"content": "Describe it", "provider": "anthropic", "model": "vision",
                                       "attachments": [image]})
    assert status == 200, body
    [call] = fake.calls
    assert call.body["messages"][-1] == {"role": "user", "content": [
        {"type": "text", "text": "Describe it"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}


async def test_two_requests_differing_only_in_the_image_do_not_coalesce(gateway_factory: GatewayFactory,
                                                                        fake: FakeUpstream) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    fake.script(Script(n=3, hold_first=True), model="vision")

    def ask(url: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "text", "text": "same words"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    async with sdk(gw) as client:
        first = asyncio.create_task(client.chat.completions.with_raw_response.create(
            model="openai/vision", messages=ask(HTTPS_URL), temperature=0))
        one = await fake.next_call()
        second = asyncio.create_task(client.chat.completions.with_raw_response.create(
            model="openai/vision", messages=ask(DATA_URL), temperature=0))
        two = await fake.next_call()
        same = asyncio.create_task(client.chat.completions.with_raw_response.create(
            model="openai/vision", messages=ask(HTTPS_URL), temperature=0))
        for call in (one, two):
            await within(call.paused.wait(), what="the calls to be held")
        await wait_until(lambda: gw.metrics.registry.get_sample_value("dac_active_listeners") == 3,
                         "the third request to join")
        one.release()
        two.release()
        results = [await within(t) for t in (first, second, same)]
    assert [r.headers["x-dac-coalesce"] for r in results] == ["leader", "leader", "follower"]
    assert len(fake.calls) == 2


async def test_a_part_the_provider_cannot_take_is_a_400_naming_it_before_anything_is_written(
        gateway_factory: GatewayFactory, fake: FakeUpstream) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    tid = await gw.new_thread()
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    async with sdk(gw, **{"x-thread-id": tid}) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await within(client.chat.completions.create(
                model="anthropic/claude", messages=[{"role": "user", "content": [
                    {"type": "text", "text": "hear this"}, audio]}]))
    assert caught.value.body["param"] == "messages[0].content[1]"
    assert "'anthropic' cannot take a 'input_audio' content part" in caught.value.body["message"]
    status, body = await gw.post(tid, {"content": "hear this", "attachments": [audio]})  # the mock: text, images
    assert status == 400 and body["error"]["param"] == "attachments[0]"
    assert (await gw.thread(tid))["messages"] == [] and fake.calls == []


# -- statuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize(("status", "error"), [(400, openai.BadRequestError), (404, openai.NotFoundError),
                                               (422, openai.BadRequestError)])
async def test_an_upstream_refusal_keeps_its_meaning_and_is_not_retried(
        gateway_factory: GatewayFactory, fake: FakeUpstream, adapter: str, status: int,
        error: type[openai.APIStatusError]) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    fake.script(Script(status=status, message="no such thing"), model="refused")
    async with sdk(gw, max_retries=2) as client:  # the SDK would retry a 502 twice
        for stream in (False, True):
            with pytest.raises(error) as caught:
                await within(client.chat.completions.create(model=f"{adapter}/refused",
                                                            messages=user(f"stream {stream}"), stream=stream))
            assert caught.value.response.headers["x-should-retry"] == "false"
            assert "no such thing" in caught.value.message
    assert len(fake.calls) == 2  # one upstream call per request
    counted = gw.metrics.registry.get_sample_value("dac_upstream_calls_total", {
        "provider": adapter, "model": "other", "outcome": "error"})
    assert counted == 2  # counted, and a model the upstream refused takes no label of its own


# -- the /v1 result cache -------------------------------------------------------------------------


async def test_a_finished_answer_serves_only_deterministic_requests(gateway_factory: GatewayFactory,
                                                                    fake: FakeUpstream) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    async with sdk(gw) as client:
        async def twice(prompt: str, headers: dict[str, str] | None = None, **params: Any) -> list[str]:
            roles = []
            for _ in range(2):
                raw = await within(client.chat.completions.with_raw_response.create(
                    model="openai/gpt", messages=user(prompt), extra_headers=headers, **params))
                roles.append(raw.headers["x-dac-coalesce"])
            return roles

        before = len(fake.calls)
        assert await twice("sample", temperature=1) == ["leader", "leader"]
        assert len(fake.calls) - before == 2
        assert await twice("default temperature") == ["leader", "leader"]  # OpenAI's default is 1
        before = len(fake.calls)
        assert await twice("greedy", temperature=0) == ["leader", "cache"]
        assert await twice("seeded", temperature=1, seed=42) == ["leader", "cache"]
        assert await twice("keyed", {"Idempotency-Key": "k-1"}, temperature=1) == ["leader", "cache"]
        assert len(fake.calls) - before == 3


async def test_concurrent_identical_requests_still_share_one_call(gateway_factory: GatewayFactory,
                                                                  fake: FakeUpstream) -> None:
    gw = await upstream_gateway(gateway_factory, fake)
    fake.script(Script(n=4, hold_first=True), model="gpt", times=1)
    async with sdk(gw) as client:
        tasks = [asyncio.create_task(client.chat.completions.with_raw_response.create(
            model="openai/gpt", messages=user("together"), temperature=1)) for _ in range(3)]
        call = await fake.next_call()
        await within(call.paused.wait(), what="the call to be held")
        await wait_until(lambda: gw.metrics.registry.get_sample_value("dac_active_listeners") == 3,
                         "three listeners")
        call.release()
        results = [await within(t) for t in tasks]
    assert sorted(r.headers["x-dac-coalesce"] for r in results) == ["follower", "follower", "leader"]
    assert len(fake.calls) == 1


@pytest.mark.parametrize(("policy", "roles"), [("off", ["leader", "leader"]), ("always", ["leader", "cache"])])
async def test_the_result_cache_setting(gateway_factory: GatewayFactory, policy: str, roles: list[str]) -> None:
    gw = await gateway_factory(v1_result_cache=policy)
    async with sdk(gw) as client:
        seen = []
        for _ in range(2):
            raw = await within(client.chat.completions.with_raw_response.create(
                model="mock:ttft=0,itl=0,n=3", messages=user("policy"), temperature=0))
            seen.append(raw.headers["x-dac-coalesce"])
    assert seen == roles


async def test_a_replayed_stream_keeps_the_original_chunking(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    async with sdk(gw) as client:
        ask = {"model": "mock:ttft=0,itl=0,n=7,think=2", "messages": user("chunked"), "temperature": 0}
        first = await streamed(client, **ask)
        raw = await within(client.chat.completions.with_raw_response.create(stream=True, **ask))
        assert raw.headers["x-dac-coalesce"] == "cache"

        async def read() -> list[ChatCompletionChunk]:
            return [chunk async for chunk in raw.parse()]

        again = await within(read())

    def shape(chunks: list[ChatCompletionChunk]) -> list[tuple[str | None, str | None]]:
        return [(c.choices[0].delta.content, (c.choices[0].delta.model_extra or {}).get("reasoning_content"))
                for c in chunks if c.choices]

    assert shape(again) == shape(first)
    assert sum(1 for content, _ in shape(first) if content) == 7  # one chunk per upstream token
    assert {c.id for c in again} == {first[0].id}


async def test_v1_models_lists_a_local_provider_only_once_it_answers(gateway_factory: GatewayFactory,
                                                                     fake: FakeUpstream) -> None:
    # Ollama's URL is the fake's (it answers GET /models); nothing listens at vLLM's
    env = {"OLLAMA_BASE_URL": fake.openai_url, "VLLM_BASE_URL": "http://127.0.0.1:9/v1", **fake.env("openai")}
    gw = await gateway_factory(env=env)

    async def listed() -> set[str]:
        async with sdk(gw) as client:
            page = await within(client.models.list())
        return {m.id.split("/")[0] for m in page.data}

    providers = {p.name: p for p in gw.app[PROVIDERS]}
    await wait_until(lambda: providers["ollama"].answered, "the probe at start to find ollama")
    assert {"ollama", "openai", "mock"} <= await listed()
    assert "vllm" not in await listed()
