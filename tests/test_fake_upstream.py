"""The fake upstream itself: the official OpenAI and Anthropic SDKs read it as they read the real APIs,
and it runs standalone."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.providers.mock import mock_answer
from server.providers.upstream import SSEDecoder

from .fake_upstream import DEFAULT_API_KEY, TOOL_CALLS, FakeUpstream, Script, anthropic_request_problem
from .helpers import within

ROOT = Path(__file__).resolve().parent.parent


async def test_the_openai_sdk_streams_reads_and_fails_as_with_openai() -> None:
    async with FakeUpstream.start() as fake:
        client = openai.AsyncOpenAI(base_url=fake.openai_url, api_key=DEFAULT_API_KEY, max_retries=0)
        try:
            fake.script(Script(n=5))
            stream = await within(client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hello"}], stream=True,
                stream_options={"include_usage": True}))
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "".join(mock_answer("hello", 5))
            assert chunks[0].choices[0].delta.role == "assistant"
            assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

            whole = await within(client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hello"}]))
            assert whole.choices[0].message.content == text and whole.usage is not None

            fake.script(Script(status=429, retry_after="2", message="slow down"))
            with pytest.raises(openai.RateLimitError) as caught:
                await within(client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hello"}]))
            assert caught.value.response.headers["Retry-After"] == "2"
            assert "slow down" in str(caught.value)
        finally:
            await client.close()
        bad = openai.AsyncOpenAI(base_url=fake.openai_url, api_key="sk-wrong-key-123456", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError):
                await within(bad.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hello"}]))
        finally:
            await bad.close()
        assert [c.outcome for c in fake.calls] == ["complete", "complete", "error_status", "rejected"]


async def test_standalone_it_serves_both_formats_with_fixed_timing() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--ttft-ms", "5", "--tokens", "3",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = (await within(proc.stdout.readline(), 20, "the listening line")).decode()
        match = re.search(r"listening on (http://\S+) ", line)
        assert match, line
        url = match.group(1)
        headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}", "x-api-key": DEFAULT_API_KEY,
                   "anthropic-version": "2023-06-01"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                openai_body = await within(resp.text())
            async with http.post(f"{url}/v1/messages", json=body) as resp:
                assert resp.status == 200
                anthropic_body = await within(resp.text())
        assert openai_body.count('"content":') == 4 and openai_body.endswith("data: [DONE]\n\n")  # role + 3
        assert anthropic_body.count("event: content_block_delta") == 3 and "event: message_stop" in anthropic_body
        proc.send_signal(signal.SIGTERM)
        rest = (await within(proc.stdout.read(), 20, "the fake to stop")).decode()
        assert "2 calls" in rest
        assert await within(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- the scripted cases speak the real formats: each event read with the official SDKs' types ------

#: scripts in OpenAI's own format (OpenRouter's and vLLM's error styles are not: see below)
OPENAI_CASES = {
    "text": Script(tokens=["Hel", "lo"]),
    "reasoning": Script(reasoning=["Think", "ing"], tokens=["Done"]),
    "refusal": Script(tokens=[], refusal=["I can't ", "help with that."]),
    "tool_calls": Script(tokens=["Checking."], tool_calls=TOOL_CALLS),
    "length": Script(tokens=["cut"], stop_reason="length"),
    "content_filter": Script(tokens=[], stop_reason="content_filter"),
}

ANTHROPIC_CASES = {
    "text": Script(tokens=["Bon", "jour"]),
    "thinking": Script(reasoning=["Let me ", "think."], tokens=["Done"]),
    "tool_use": Script(tokens=["Checking."], tool_calls=TOOL_CALLS),
    "thinking_then_tool_use": Script(reasoning=["Hmm"], tokens=[], tool_calls=TOOL_CALLS[:1]),
    **{stop: Script(tokens=["a", "b"], stop_reason=stop)
       for stop in ("max_tokens", "stop_sequence", "pause_turn", "model_context_window_exceeded")},
    "refusal": Script(tokens=["I"], refusal=["This request is out of bounds."]),
    "empty": Script(tokens=[]),
}

ANTHROPIC_EVENT = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
HEADERS = {"Authorization": f"Bearer {DEFAULT_API_KEY}", "x-api-key": DEFAULT_API_KEY,
           "anthropic-version": "2023-06-01"}


async def raw_events(url: str, body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The events of a streamed answer, as they came."""
    async def go() -> list[tuple[str, bytes]]:
        decoder, events = SSEDecoder(), []
        async with aiohttp.ClientSession(headers=HEADERS) as http, http.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for data in resp.content.iter_any():
                events += decoder.feed(data)
        return events
    return await within(go(), what=f"the fake's answer from {url}")


async def whole_answer(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession(headers=HEADERS) as http, http.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()
    return await within(go(), what=f"the fake's whole answer from {url}")


ASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@pytest.mark.parametrize("case", OPENAI_CASES)
async def test_openai_cases_are_chat_completion_chunks(fake: FakeUpstream, case: str) -> None:
    fake.script(OPENAI_CASES[case])
    events = await raw_events(f"{fake.openai_url}/chat/completions",
                              {**ASK, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == ("message", b"[DONE]")
    chunks = [ChatCompletionChunk.model_validate_json(data) for _, data in events[:-1]]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [{"reasoning": "stop", "refusal": "stop", "text": "stop"}.get(case, case)]
    whole = ChatCompletion.model_validate(await whole_answer(f"{fake.openai_url}/chat/completions", ASK))
    assert whole.choices[0].finish_reason == finishes[0]


async def test_the_openai_sdk_assembles_streamed_tool_calls_reasoning_and_refusals(fake: FakeUpstream) -> None:
    client = openai.AsyncOpenAI(base_url=fake.openai_url, api_key=DEFAULT_API_KEY, max_retries=0, timeout=10)
    try:
        fake.script(Script(reasoning=["Think", "ing"], tokens=["Checking."], tool_calls=TOOL_CALLS))
        async with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "hi"}]) as s:
            await within(s.until_done())
            final = await within(s.get_final_completion())
        message = final.choices[0].message
        assert message.content == "Checking." and final.choices[0].finish_reason == "tool_calls"
        assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []] == [
            ("call_weather", "get_weather", {"city": "Paris"}), ("call_time", "get_time", {})]
        assert (message.model_extra or {}).get("reasoning_content") == "Thinking"
        fake.script(Script(tokens=[], refusal=["I can't ", "help with that."]))
        async with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "hi"}]) as s:
            await within(s.until_done())
            final = await within(s.get_final_completion())
        assert final.choices[0].message.refusal == "I can't help with that."
        # an error event mid-stream is what the SDK raises as an APIError
        fake.script(Script(tokens=["a", "b"], error_after=1))
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            stream = await within(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
            await within(_drain(stream))
    finally:
        await within(client.close())


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


@pytest.mark.parametrize(("style", "expected"), [
    ("event", {"error": {"message": "the fake upstream failed mid-stream", "type": "server_error",
                         "param": None, "code": None}}),
    ("bare", {"object": "error", "message": "the fake upstream failed mid-stream", "type": "InternalServerError",
              "param": None, "code": 500}),
    ("finish", {"error": {"code": "server_error", "message": "the fake upstream failed mid-stream"}}),
    ("finish_only", {}),
])
async def test_openai_compatible_error_styles(fake: FakeUpstream, style: str, expected: dict[str, Any]) -> None:
    fake.script(Script(tokens=["a", "b"], error_after=1, error_style=style))
    events = await raw_events(f"{fake.openai_url}/chat/completions", {**ASK, "stream": True})
    last = json.loads(events[-1][1])
    assert json.loads(events[-2][1])["choices"][0]["delta"] == {"content": "a"}
    if style in ("event", "bare"):
        assert last == expected
    else:  # OpenRouter's: a chunk whose choice finished with "error", with or without the error beside it
        assert last["choices"][0]["finish_reason"] == "error"
        assert {k: v for k, v in last.items() if k == "error"} == expected


@pytest.mark.parametrize("case", ANTHROPIC_CASES)
async def test_anthropic_cases_are_message_stream_events(fake: FakeUpstream, case: str) -> None:
    script = ANTHROPIC_CASES[case]
    fake.script(script)
    body = {**ASK, "stream": True, "stop_sequences": ["END"]}
    events = await raw_events(f"{fake.anthropic_url}/v1/messages", body)
    parsed = [ANTHROPIC_EVENT.validate_json(data) for name, data in events if name != "ping"]
    assert all(name == json.loads(data)["type"] for name, data in events)
    assert parsed[0].type == "message_start" and parsed[-1].type == "message_stop"
    starts = [e.content_block.type for e in parsed if e.type == "content_block_start"]
    stops = [e.index for e in parsed if e.type == "content_block_stop"]
    assert stops == list(range(len(starts)))  # every block opened is closed, in order
    [delta] = [e for e in parsed if e.type == "message_delta"]
    assert delta.delta.stop_reason == (script.stop_reason or {"tool_use": "tool_use", "thinking_then_tool_use":
                                       "tool_use", "refusal": "refusal"}.get(case, "end_turn"))
    # the whole answer is a Message, with the same blocks
    message = anthropic.types.Message.model_validate(await whole_answer(f"{fake.anthropic_url}/v1/messages", {
        **ASK, "stop_sequences": ["END"]}))
    assert [b.type for b in message.content] == (starts or ["text"])
    assert message.stop_reason == delta.delta.stop_reason


async def test_the_anthropic_sdk_assembles_thinking_tool_use_and_refusals(fake: FakeUpstream) -> None:
    client = anthropic.AsyncAnthropic(base_url=fake.anthropic_url, api_key=DEFAULT_API_KEY, max_retries=0,
                                      timeout=10)
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    try:
        fake.script(Script(reasoning=["Let me ", "think."], tokens=["Checking."], tool_calls=TOOL_CALLS))
        async with client.messages.stream(model="m", max_tokens=50, messages=messages) as stream:
            final = await within(stream.get_final_message())
        thinking, text, weather, time_ = final.content
        assert thinking.type == "thinking" and thinking.thinking == "Let me think." and thinking.signature
        assert text.type == "text" and text.text == "Checking."
        assert weather.type == "tool_use" and (weather.id, weather.name, weather.input) == (
            "call_weather", "get_weather", {"city": "Paris"})
        assert time_.type == "tool_use" and time_.input == {}
        assert final.stop_reason == "tool_use"
        fake.script(Script(tokens=[], refusal=["Out of bounds."]))
        async with client.messages.stream(model="m", max_tokens=50, messages=messages) as stream:
            final = await within(stream.get_final_message())
        assert final.stop_reason == "refusal"
        assert final.stop_details is not None and final.stop_details.explanation == "Out of bounds."
        fake.script(Script(tokens=["a", "b"], error_after=1, error_kind="overloaded_error"))
        with pytest.raises(anthropic.APIStatusError, match="overloaded"):
            async with client.messages.stream(model="m", max_tokens=50, messages=messages) as stream:
                await within(stream.get_final_message())
    finally:
        await within(client.close())


@pytest.mark.parametrize(("body", "version", "problem"), [
    ({**ASK, "temperature": 0.5, "top_k": 5}, "2023-06-01", None),
    ({**ASK, "temperature": 1.5}, "2023-06-01", "temperature: Input should be a number from 0.0 to 1.0"),
    ({**ASK, "temperature": 0.5}, "2026-10-21", "temperature: Extra inputs are not permitted"),
    ({**ASK, "response_format": {"type": "json_object"}}, "2023-06-01",
     "response_format: Extra inputs are not permitted"),
    ({**ASK, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "2023-06-01", "messages.0"),
    ({**ASK, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/bmp", "data": "Qk0="}}]}]}, "2023-06-01", "messages.0"),
])
async def test_the_fake_refuses_what_the_messages_api_refuses(
    fake: FakeUpstream, body: dict[str, Any], version: str, problem: str | None
) -> None:
    said = anthropic_request_problem(body, version=version)
    if problem is None:
        assert said is None
        return
    assert said is not None and said.startswith(problem)
    async def refused() -> Any:
        async with aiohttp.ClientSession(headers={**HEADERS, "anthropic-version": version}) as http:
            async with http.post(f"{fake.anthropic_url}/v1/messages", json=body) as resp:
                assert resp.status == 400
                return await resp.json()

    answer = await within(refused(), what="the fake's refusal")
    assert answer == {"type": "error", "error": {"type": "invalid_request_error", "message": said}}
    assert fake.calls[-1].outcome == "rejected"
