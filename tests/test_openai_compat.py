"""The /v1 surface, driven by the official ``openai`` client: wire format, errors, coalescing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from server.errors import RateLimited, UpstreamError
from server.providers import Chunk, MockProvider, ProviderRequest
from server.providers.mock import mock_answer
from server.routes import _http

from .fake_upstream import FakeUpstream, Script
from .helpers import ScriptedProvider, registry, slow_reader, within
from .workload import scrape

FAST = "mock:ttft=0,itl=0,n=6"


def sdk(gw: Any, org: str = "org_a", *, api_key: str = "x", **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=api_key, max_retries=0, timeout=20,
                              default_headers={"x-org-id": org, **headers})


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def read_all(stream: Any, what: str = "the stream to end") -> list[ChatCompletionChunk]:
    async def run() -> list[ChatCompletionChunk]:
        return [chunk async for chunk in stream]

    return await within(run(), 10, what)


async def streamed(client: openai.AsyncOpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    stream = await within(client.chat.completions.create(stream=True, **kwargs), 10, "the stream to start")
    return await read_all(stream)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await within(poll(), timeout, what)


def listeners(gw: Any) -> float:
    return gw.metrics.registry.get_sample_value("dac_active_listeners") or 0.0


def stored_messages(gw: Any) -> int:
    with sqlite3.connect(gw.settings.db_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]


# -- the happy paths ----------------------------------------------------------------


async def test_stream_is_the_mock_answer_in_openai_chunks(gateway) -> None:
    async with sdk(gateway) as client:
        chunks = await streamed(client, model="mock/" + FAST, messages=user("What is DAC?"))
    assert text_of(chunks) == "".join(mock_answer("What is DAC?", 6))
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.created for c in chunks} == {chunks[0].created}
    assert abs(chunks[0].created - time.time()) < 60
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {"mock/" + FAST}
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


async def test_non_stream_completion_with_and_without_provider_prefix(gateway) -> None:
    async with sdk(gateway) as client:
        plain = await within(client.chat.completions.create(model=FAST, messages=user("hello"), temperature=0))
        raw = await within(client.chat.completions.with_raw_response.create(
            model="mock/" + FAST, messages=user("hello"), temperature=0))
    prefixed = raw.parse()
    expected = "".join(mock_answer("hello", 6))
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == expected == prefixed.choices[0].message.content
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and plain.usage.completion_tokens == 6
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 6
    assert plain.model == FAST and prefixed.model == "mock/" + FAST
    # "mock:..." and "mock/mock:..." name the same provider and model: one flight, then its result
    assert raw.headers["x-dac-coalesce"] == "cache"
    assert prefixed.id == plain.id


async def test_usage_chunk_comes_last_when_asked_for(gateway) -> None:
    async with sdk(gateway) as client:
        chunks = await streamed(client, model="mock/" + FAST, messages=user("count me"),
                                stream_options={"include_usage": True})
    *body, usage = chunks
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 6 and usage.usage.prompt_tokens == 2
    assert usage.usage.total_tokens == 8
    assert body[-1].choices[0].finish_reason == "stop"
    assert text_of(body) == "".join(mock_answer("count me", 6))
    assert usage.id == body[0].id


async def test_text_parts_and_developer_role_are_normalised_for_the_provider(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    async with sdk(gw) as client:
        task = asyncio.create_task(client.chat.completions.create(
            model="scripted/scripted", temperature=1, max_tokens=50, stop=["\n\n"], seed=7,
            extra_body={"search_recency_filter": "week"},
            messages=[{"role": "developer", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "part one"},
                                                   {"type": "text", "text": "part two"}]}]))
        call = await scripted.next_call()
        call.send("ok")
        call.finish()
        answer = await within(task)
    assert answer.choices[0].message.content == "ok"
    assert call.request.model == "scripted"
    assert call.request.messages == [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "part one\npart two"}]
    assert call.request.params == {"temperature": 1.0, "max_tokens": 50, "stop": ["\n\n"], "seed": 7,
                                   "search_recency_filter": "week"}


class TruncatingProvider(MockProvider):
    """Answers two words, then says the answer was cut at its token limit, as adapters do."""

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        yield Chunk(text="cut")
        yield Chunk(text=" short")
        yield Chunk(meta={"finish_reason": "length", "citations": ["https://example.org/a"]})


async def test_finish_reason_and_vendor_extras_come_from_the_upstream(gateway_factory) -> None:
    gw = await gateway_factory(providers=registry(TruncatingProvider(name="short")))
    async with sdk(gw) as client:
        chunks = await streamed(client, model="short/mock", messages=user("long question"), max_tokens=2)
        whole = await within(client.chat.completions.create(model="short/mock", messages=user("another"),
                                                            max_tokens=2))
    assert text_of(chunks) == "cut short" and chunks[-1].choices[0].finish_reason == "length"
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.content == "cut short"
    # Perplexity-style extras ride at the top level, where OpenAI-style clients look for them
    assert chunks[-1].model_extra == {"citations": ["https://example.org/a"]}
    assert whole.model_extra == {"citations": ["https://example.org/a"]}


async def test_a_model_name_without_a_provider_prefix_goes_to_the_default_provider(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted, default="scripted"), default_provider="scripted")
    async with sdk(gw) as client:
        task = asyncio.create_task(client.chat.completions.create(
            model="meta-llama/Llama-3-8b", messages=user("hi")))
        call = await scripted.next_call()
        call.send("hey")
        call.finish()
        answer = await within(task)
    assert call.request.model == "meta-llama/Llama-3-8b"
    assert answer.model == "meta-llama/Llama-3-8b" and answer.choices[0].message.content == "hey"


async def test_models_are_listed_as_provider_slash_model(gateway_factory) -> None:
    gw = await gateway_factory(providers=registry(ScriptedProvider()))
    async with sdk(gw) as client:
        page = await within(client.models.list())
        one = await within(client.models.retrieve("mock/mock"))
        with pytest.raises(openai.NotFoundError):
            await within(client.models.retrieve("nope/nothing"))
    listed = {m.id: m for m in page.data}
    assert set(listed) == {"mock/mock", "scripted/scripted"}
    assert listed["mock/mock"].owned_by == "mock" and listed["scripted/scripted"].owned_by == "scripted"
    assert listed["mock/mock"].object == "model" and listed["mock/mock"].created > 0
    assert one.id == "mock/mock" and one.owned_by == "mock"


# -- the wire ---------------------------------------------------------------------------


async def test_raw_stream_has_only_data_lines_and_ping_comments(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), ping_interval_s=0.05)
    body = {"model": "scripted/scripted", "messages": user("wire"), "stream": True}
    async with gw.session.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
        call = await scripted.next_call()
        # no token yet: after one keep-alive interval the stream starts, with pings only
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines: list[str] = []

        async def read_until(predicate: Callable[[str], bool]) -> None:
            while True:
                raw = await resp.content.readline()
                assert raw, f"the stream ended early; lines: {lines!r}"
                lines.append(raw.decode())
                if predicate(lines[-1]):
                    return

        await within(read_until(lambda line: line == ": ping\n"), 5, "a keep-alive comment")
        call.send("one", " two")
        await within(read_until(lambda line: '"content":"one' in line), 5, "the first text")
        await within(read_until(lambda line: line == ": ping\n"), 5, "a keep-alive between tokens")
        call.send(" three")
        call.finish()
        rest = await within(resp.content.read(), 5, "the end of the stream")
    lines += rest.decode().splitlines(keepends=True)
    events = [line for line in lines if line.strip()]
    assert all(line == ": ping\n" or line.startswith("data: {") or line == "data: [DONE]\n"
               for line in events), events
    assert not [line for line in lines if line.startswith(("id:", "retry:", "event:"))]
    assert "data:\n" not in lines and "data: \n" not in lines
    assert events[-1] == "data: [DONE]\n" and rest.endswith(b"data: [DONE]\n\n")
    assert "".join(lines).count("[DONE]") == 1


async def test_a_pushed_stream_that_falls_behind_catches_up_with_every_chunk_once_in_order(
        gateway_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the live edge the log writes the chunks itself; a push its transport refuses (paused)
    sends the handler back to its cursor: it writes what was missed, then is pushed to again."""
    push, pushed, refused, pause = _http.PingedSSE.push, [], [], [False]

    def spy(self: _http.PingedSSE, data: bytes) -> bool:
        if data == _http.PING:
            return push(self, data)
        if pause[0]:
            pause[0] = False
            refused.append(data)
            return False
        pushed.append(data)
        return push(self, data)

    monkeypatch.setattr(_http.PingedSSE, "push", spy)
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    body = {"model": "scripted/scripted", "messages": user("behind"), "stream": True}
    opening = asyncio.ensure_future(gw.session.post(f"{gw.url}/v1/chat/completions", json=body))
    call = await scripted.next_call()
    call.send("t0")  # the status line is held until the first text
    async with await within(opening, 5, "the status line") as resp:
        lines: list[str] = []

        async def read_through(text: str) -> None:
            while f'"content":"{text}"' not in (lines[-1] if lines else ""):
                raw = await resp.content.readline()
                assert raw, f"the stream ended early; lines: {lines!r}"
                lines.append(raw.decode())

        await within(read_through("t0"), 5, "the first text, written by the handler")
        assert not pushed
        call.send("t1")
        await within(read_through("t1"), 5, "a pushed chunk")
        assert len(pushed) == 1 and b'"content":"t1"' in pushed[0]
        pause[0] = True
        call.send("t2")
        await within(read_through("t2"), 5, "the chunk the paused transport missed")
        call.send("t3")
        await within(read_through("t3"), 5, "a chunk pushed again")
        call.finish()
        lines += (await within(resp.content.read(), 5, "the end")).decode().splitlines(keepends=True)
    assert len(refused) == 1 and b'"content":"t2"' in refused[0]  # the handler wrote it itself
    assert not any(b'"content":"t2"' in data for data in pushed)
    assert b'"content":"t3"' in pushed[1] and pushed[-1].endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "t0", "t1", "t2", "t3", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({c["id"] for c in chunks}) == 1
    assert [line for line in lines if line.strip()][-1] == "data: [DONE]\n"
    assert "".join(lines).count("[DONE]") == 1
    assert gw.metrics.registry.get_sample_value("dac_active_listeners") == 0


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "param", "says"), [
    ({"messages": []}, "messages", "'messages' is required"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": {"user": 1}, "content": "hi", "name": "n"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content", "string or an array"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "data: or https:// URL"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages[0].content[0]", "cannot take a 'input_audio' content part"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id", "tool_call_id is required"),
    ({"messages": user("hi"), "n": 2}, "n", "'n' must be 1"),
    ({"messages": user("hi"), "temperature": 5}, "temperature", "from 0 to 2"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"messages": user("hi"), "logprobs": True}, "logprobs", "not supported"),
    ({"messages": user("hi"), "model": ""}, "model", "'model' is required"),
])
async def test_bad_input_is_a_bad_request_error_and_never_reaches_the_provider(
        gateway_factory, kwargs: dict[str, Any], param: str, says: str) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    async with sdk(gw) as client:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                await within(client.chat.completions.create(**{"model": "mock/" + FAST, **kwargs},
                                                            stream=stream))
            assert caught.value.status_code == 400
            assert caught.value.body["type"] == "invalid_request_error"
            assert caught.value.body["param"] == param
            assert says in caught.value.body["message"]
    assert mock.calls == 0 and stored_messages(gw) == 0


async def test_unknown_model_is_not_found(gateway) -> None:
    async with sdk(gateway) as client:
        for model in ("nope/thing", "mock/mock:speed=9", "gpt-4o"):
            with pytest.raises(openai.NotFoundError) as caught:
                await within(client.chat.completions.create(model=model, messages=user("hi")))
            assert caught.value.body["code"] == "model_not_found"
            assert model in caught.value.body["message"]


async def test_a_provider_without_its_key_is_a_bad_request_naming_the_variable(gateway) -> None:
    async with sdk(gateway) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await within(client.chat.completions.create(model="openai/gpt-4o-mini", messages=user("hi")))
        listed = [m.id for m in (await within(client.models.list())).data]
    assert "OPENAI_API_KEY" in caught.value.message
    assert caught.value.body["code"] == "provider_not_configured"
    # only providers that can answer are listed (ollama needs no key)
    assert "mock/mock" in listed and not [m for m in listed if m.startswith(("openai/", "perplexity/"))]


async def test_raw_errors_have_openai_shape_and_status(gateway_factory) -> None:
    gw = await gateway_factory(max_body_bytes=4096)
    url = f"{gw.url}/v1/chat/completions"
    cases = [
        ("POST", url, {"data": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ("POST", url, {"data": b"[1]", "headers": {"Content-Type": "application/json"}}, 400, "JSON object"),
        ("POST", url, {"data": b'{"model": "mock/mock"}', "headers": {"Content-Type": "text/plain"}}, 415,
         "application/json"),
        ("POST", url, {"json": {"model": "mock", "messages": user("x"), "stream": "yes"}}, 400, "'stream'"),
        ("POST", url, {"json": {"model": "mock", "messages": user("x" * 5000)}}, 413, "too large"),
        ("POST", url, {"json": {"model": "mock", "messages": user("x")},
                       "headers": {"x-org-id": "bad org!"}}, 401, "x-org-id"),
        ("GET", url, {}, 405, "Method Not Allowed"),
        ("GET", f"{gw.url}/v1/embeddings", {}, 404, "no route"),
    ]
    for method, target, kwargs, status, says in cases:
        async with gw.session.request(method, target, **kwargs) as resp:
            body = await resp.json()
            assert resp.status == status, (target, kwargs, body)
            # OpenAI's four fields; a limit's name beside them (413, 429)
            assert set(body["error"]) - {"limit"} == {"message", "type", "param", "code"}, body
            assert says in body["error"]["message"], body
    assert stored_messages(gw) == 0


async def test_errors_are_counted_once_by_the_gateway_type(gateway) -> None:
    async with sdk(gateway) as client:
        with pytest.raises(openai.BadRequestError):
            await within(client.chat.completions.create(model=FAST, messages=[]))
        with pytest.raises(openai.NotFoundError):
            await within(client.chat.completions.create(model="nope/x", messages=user("hi")))
        with pytest.raises(openai.InternalServerError):
            await within(client.chat.completions.create(model="mock:ttft=0,fail=1", messages=user("hi")))

    def count(kind: str) -> float:
        return gateway.metrics.registry.get_sample_value("dac_errors_total", {"type": kind}) or 0.0

    assert (count("invalid_request"), count("model_not_found"), count("upstream_error")) == (1, 1, 1)
    assert count("invalid_request_error") == count("server_error") == 0


class BrokenProvider(ScriptedProvider):
    def validate_model(self, model: str) -> None:
        raise RuntimeError("a bug in the adapter")


async def test_an_unexpected_failure_is_a_500_in_openai_shape(gateway_factory) -> None:
    gw = await gateway_factory(providers=registry(BrokenProvider("broken")))
    async with sdk(gw) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await within(client.chat.completions.create(model="broken/x", messages=user("hi"), stream=True))
    assert caught.value.status_code == 500
    assert caught.value.body["code"] == "internal_error" and "logged" in caught.value.body["message"]


async def test_api_keys_decide_who_may_call_and_which_org_it_is(gateway_factory) -> None:
    gw = await gateway_factory(env={"DAC_API_KEYS": "key-one, key-two"})
    org_one = "key_" + hashlib.sha256(b"key-one").hexdigest()[:16]
    tid = await gw.new_thread(org=org_one)
    async with gw.session.post(f"{gw.url}/v1/chat/completions",
                               json={"model": FAST, "messages": user("hi")}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    async with sdk(gw, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await within(client.chat.completions.create(model=FAST, messages=user("hi")))
        with pytest.raises(openai.AuthenticationError):
            await within(client.models.list())
    # the key, not x-org-id, names the org: key-one reaches its thread, key-two does not
    async with sdk(gw, org="anything", api_key="key-one", **{"x-thread-id": tid}) as client:
        answer = await within(client.chat.completions.create(model=FAST, messages=user("hi")))
    assert answer.choices[0].message.content == "".join(mock_answer("hi", 6))
    async with sdk(gw, org=org_one, api_key="key-two", **{"x-thread-id": tid}) as client:
        with pytest.raises(openai.NotFoundError):
            await within(client.chat.completions.create(model=FAST, messages=user("hi")))
    assert [m["role"] for m in (await gw.thread(tid, org=org_one))["messages"]] == ["user", "assistant"]


async def test_upstream_failures_keep_their_status(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), error_ttl_s=0)
    async with sdk(gw) as client:
        for stream in (False, True):
            task = asyncio.create_task(client.chat.completions.create(
                model="scripted/scripted", messages=user(f"limited {stream}"), stream=stream))
            call = await scripted.next_call()
            call.fail(RateLimited("the provider is rate limiting", retry_after=3))
            with pytest.raises(openai.RateLimitError) as limited:
                await within(task)
            assert limited.value.response.headers["retry-after"] == "3"
            assert limited.value.body["type"] == "rate_limit_error"

            task = asyncio.create_task(client.chat.completions.create(
                model="scripted/scripted", messages=user(f"broken {stream}"), stream=stream))
            call = await scripted.next_call()
            call.fail(UpstreamError("the provider answered 500"))
            with pytest.raises(openai.InternalServerError) as broken:
                await within(task)
            assert broken.value.status_code == 502 and broken.value.body["code"] == "upstream_error"
        with pytest.raises(openai.InternalServerError) as failed:
            await within(client.chat.completions.create(model="mock/mock:ttft=0,fail=1", messages=user("x"),
                                                        stream=True))
        assert failed.value.status_code == 502


async def test_full_provider_queue_is_503_with_retry_after(gateway_factory) -> None:
    scripted = ScriptedProvider(max_concurrency=1)
    gw = await gateway_factory(providers=registry(scripted), queue_timeout_s=0.2)
    async with sdk(gw) as client:
        first = asyncio.create_task(client.chat.completions.create(
            model="scripted/scripted", messages=user("first")))
        call = await scripted.next_call()
        with pytest.raises(openai.InternalServerError) as caught:
            await within(client.chat.completions.create(
                model="scripted/scripted", messages=user("second"), stream=True))
        assert caught.value.status_code == 503 and caught.value.body["code"] == "queue_full"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        call.send("done")
        call.finish()
        assert (await within(first)).choices[0].message.content == "done"
    assert len(scripted.calls) == 1


async def test_error_after_the_stream_started_is_an_error_event(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    async with sdk(gw) as client:
        task = asyncio.create_task(client.chat.completions.create(
            model="scripted/scripted", messages=user("cut"), stream=True))
        call = await scripted.next_call()
        call.send("partial")
        stream = await within(task)
        received: list[ChatCompletionChunk] = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                received.append(chunk)
                if text_of(received) == "partial":
                    call.fail(UpstreamError("connection to the provider was cut"))
    assert text_of(received) == "partial"
    assert "connection to the provider was cut" in caught.value.message
    assert caught.value.body["code"] == "upstream_error"


# -- coalescing -----------------------------------------------------------------------------


async def test_twenty_identical_sdk_streams_make_one_upstream_call(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    async with sdk(gw) as client:
        def start() -> asyncio.Task[list[ChatCompletionChunk]]:
            return asyncio.create_task(streamed(client, model="scripted/scripted", messages=user("same"),
                                                stream_options={"include_usage": True}))

        early = [start() for _ in range(10)]
        call = await scripted.next_call()
        await until(lambda: listeners(gw) == 10, "ten listeners")
        call.send("Hel")
        late = [start() for _ in range(10)]  # these join after the first token and replay it
        await until(lambda: listeners(gw) == 20, "twenty listeners")
        call.send("lo", " world")
        call.finish()
        results = [await within(t, 10, "a stream") for t in early + late]
    assert [text_of(chunks) for chunks in results] == ["Hello world"] * 20
    assert len(scripted.calls) == 1
    assert len({chunks[0].id for chunks in results}) == 1  # one completion, shared
    assert all(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3 for chunks in results)
    perf = await gw.performance()
    assert perf["coalesce"]["leaders"] == 1 and perf["coalesce"]["followers"] == 19


async def test_idempotency_key_shares_one_answer_per_org(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    async with sdk(gw, **{"Idempotency-Key": "order-17"}) as client:
        first = await within(client.chat.completions.create(model=FAST, messages=user("first wording")))
        again = await within(client.chat.completions.with_raw_response.create(
            model=FAST, messages=user("first wording")))
        with pytest.raises(openai.UnprocessableEntityError) as reused:
            await within(client.chat.completions.create(model=FAST, messages=user("second wording")))
    assert reused.value.body["code"] == "idempotency_key_reused"
    assert again.headers["x-dac-coalesce"] == "cache"
    assert again.parse().choices[0].message.content == first.choices[0].message.content
    assert mock.calls == 1
    async with sdk(gw, org="org_b", **{"Idempotency-Key": "order-17"}) as other:
        theirs = await within(other.chat.completions.create(model=FAST, messages=user("second wording")))
    assert mock.calls == 2
    assert theirs.choices[0].message.content == "".join(mock_answer("second wording", 6))


async def test_key_covers_org_messages_and_sampling_parameters(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    async with sdk(gw) as a, sdk(gw, org="org_b") as b:
        async def ask(client: openai.AsyncOpenAI, messages: list[dict[str, Any]], **params: Any) -> str:
            raw = await within(client.chat.completions.with_raw_response.create(
                model=FAST, messages=messages, **params))
            return raw.headers["x-dac-coalesce"]

        assert await ask(a, user("q"), temperature=0.2, seed=1) == "leader"
        assert await ask(a, user("q"), temperature=0.2, seed=1) == "cache"
        assert await ask(a, user("q"), stream_options=None, temperature=0.2, seed=1, top_p=None) == "cache"
        assert await ask(a, user("q"), temperature=0.3, seed=1) == "leader"
        assert await ask(a, [{"role": "system", "content": "terse"}, *user("q")], temperature=0.2, seed=1) == "leader"
        assert await ask(b, user("q"), temperature=0.2, seed=1) == "leader"
        # no-cache skips the finished result (it would still join a running flight)
        assert await ask(a, user("q"), temperature=0.2, seed=1, extra_headers={"Cache-Control": "no-cache"}) == "leader"
    assert mock.calls == 5


async def test_an_answer_the_result_cache_policy_leaves_out_is_not_kept(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock))
    async with sdk(gw) as client:
        async def ask(**params: Any) -> str:
            raw = await within(client.chat.completions.with_raw_response.create(
                model=FAST, messages=user("kept or not"), **params))
            return raw.headers["x-dac-coalesce"]

        assert [await ask(), await ask()] == ["leader", "leader"]
        assert (await scrape(gw)).value("dac_cache_entries") == 0  # no request could ever take it
        assert [await ask(temperature=0), await ask(temperature=0)] == ["leader", "cache"]
        assert (await scrape(gw)).value("dac_cache_entries") == 1
    assert mock.calls == 3


async def test_tools_are_never_coalesced(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    async with sdk(gw, **{"Idempotency-Key": "same"}) as client:
        tasks = [asyncio.create_task(client.chat.completions.create(
            model="scripted/scripted", messages=user("what time is it"), tools=tools)) for _ in range(2)]
        calls = [await scripted.next_call(), await scripted.next_call()]
        for i, call in enumerate(calls):
            call.send(f"answer {i}")
            call.finish()
        answers = sorted([(await within(t)).choices[0].message.content for t in tasks])
    assert answers == ["answer 0", "answer 1"]
    assert all(call.request.params["tools"] == tools for call in calls)


async def test_coalesce_disabled_gives_each_request_its_own_call(gateway_factory) -> None:
    mock = MockProvider()
    gw = await gateway_factory(providers=registry(mock), coalesce_enabled=False)
    async with sdk(gw) as client:
        for _ in range(3):
            await within(client.chat.completions.create(model=FAST, messages=user("same")))
    assert mock.calls == 3


# -- threads and state -----------------------------------------------------------------------


async def test_stateless_calls_write_no_rows(gateway) -> None:
    async with sdk(gateway) as client:
        await streamed(client, model=FAST, messages=user("nothing to keep"))
        await within(client.chat.completions.create(model=FAST, messages=user("nothing either")))
    assert stored_messages(gateway) == 0


async def test_x_thread_id_writes_one_user_and_assistant_pair(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    tid = await gw.new_thread()
    conversation = [{"role": "system", "content": "be brief"}, *user("earlier"),
                    {"role": "assistant", "content": "earlier answer"}, *user("and now?")]
    async with sdk(gw, **{"x-thread-id": tid}) as client:
        tasks = [asyncio.create_task(client.chat.completions.create(
            model="scripted/scripted", messages=conversation, stream=i % 2 == 0)) for i in range(4)]
        call = await scripted.next_call()
        await until(lambda: listeners(gw) == 4, "four listeners")
        call.send("now ", "this")
        call.finish()
        results = [await within(t) for t in tasks]
        answers: list[tuple[str, str]] = []
        for result in results:
            if isinstance(result, openai.AsyncStream):
                chunks = await read_all(result)
                answers.append((chunks[0].id, text_of(chunks)))
            else:
                answers.append((result.id, result.choices[0].message.content))
    assert call.request.messages == conversation  # the client's conversation goes upstream as sent
    messages = (await gw.thread(tid))["messages"]
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "and now?", "complete"), ("assistant", "now this", "complete")]
    # every client got the stored answer, under an id naming the stored row
    assert answers == [("chatcmpl-" + messages[1]["message_id"].removeprefix("msg_"), "now this")] * 4
    assert len(scripted.calls) == 1


async def test_x_thread_id_of_another_org_is_not_found_and_untouched(gateway) -> None:
    tid = await gateway.new_thread(org="org_a")
    for org, thread in (("org_b", tid), ("org_a", "thr_missing")):
        async with sdk(gateway, org=org, **{"x-thread-id": thread}) as client:
            with pytest.raises(openai.NotFoundError):
                await within(client.chat.completions.create(model=FAST, messages=user("hi")))
    async with sdk(gateway, **{"x-thread-id": tid}) as client:
        with pytest.raises(openai.BadRequestError):  # nothing to write as the user's message
            await within(client.chat.completions.create(
                model=FAST, messages=[{"role": "system", "content": "only a system prompt"}]))
    assert (await gateway.thread(tid))["messages"] == []


async def test_client_leaving_mid_stream_aborts_the_upstream_call(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))
    async with sdk(gw) as client:
        task = asyncio.create_task(client.chat.completions.create(
            model="scripted/scripted", messages=user("long answer"), stream=True))
        call = await scripted.next_call()
        call.send("first")
        stream = await within(task)
        async for chunk in stream:
            if text_of([chunk]) == "first":
                break
        left = time.perf_counter()
        await stream.close()
        await within(call.closed.wait(), 5, "the upstream call to close")
    assert call.closed_at is not None and call.closed_at - left < 1.0
    # recorded as a client that left, not as an error
    labels = {"route": "v1", "mode": "sse", "outcome": "cancelled"}
    await until(lambda: gw.metrics.registry.get_sample_value("dac_request_duration_seconds_count", labels) == 1,
                "the request to be recorded as client_left")
    assert not [r for r in gw.metrics.records if r.error]


# -- through a real adapter: the fake OpenAI-compatible upstream ---------------------------------


async def test_twenty_sdk_streams_through_the_openai_provider_make_one_upstream_call(gateway_factory) -> None:
    async with FakeUpstream.start() as fake:
        fake.script(Script(n=6))
        fake.script(Script(n=6, hold_first=True), times=1)  # the gateway's call waits for all 20
        gw = await gateway_factory(env=fake.env("openai"))
        async with sdk(gw) as client:
            tasks = [asyncio.create_task(streamed(client, model="openai/gpt-4o-mini", messages=user("fan out"),
                                                  temperature=0.5))
                     for _ in range(20)]
            call = await fake.next_call()
            await within(call.paused.wait(), 10, "the upstream call to be held before its first token")
            await until(lambda: listeners(gw) == 20, "twenty listeners")
            call.release()
            results = [await within(t, 10, "a stream") for t in tasks]
        async with openai.AsyncOpenAI(base_url=fake.openai_url, api_key=fake.api_key, max_retries=0) as direct:
            straight = await streamed(direct, model="gpt-4o-mini", messages=user("fan out"))
        assert len(fake.calls) == 2  # one for the twenty gateway streams, one direct
    expected = "".join(mock_answer("fan out", 6))
    assert [text_of(chunks) for chunks in results] == [expected] * 20
    assert text_of(straight) == expected
    assert call.body["model"] == "gpt-4o-mini" and call.body["temperature"] == 0.5
    assert call.body["messages"] == user("fan out")


async def test_upstream_statuses_through_the_openai_provider_reach_the_sdk(gateway_factory) -> None:
    async with FakeUpstream.start() as fake:
        fake.script(Script(status=429, retry_after="7"), model="busy")
        fake.script(Script(status=500), model="broken")
        gw = await gateway_factory(env=fake.env("openai"))
        async with sdk(gw) as client:
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as limited:
                    await within(client.chat.completions.create(
                        model="openai/busy", messages=user(f"a {stream}"), stream=stream))
                assert limited.value.response.headers["retry-after"] == "7"
                with pytest.raises(openai.InternalServerError) as broken:
                    await within(client.chat.completions.create(
                        model="openai/broken", messages=user(f"b {stream}"), stream=stream))
                assert broken.value.status_code == 502


async def test_a_stream_client_that_takes_nothing_is_dropped_after_the_send_timeout(
        gateway_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes below the transport's high-water mark go without a timer; once the client stops
    reading and the buffers fill, the send timeout still drops it (``slow_client``), and its
    connection is closed although it still reads nothing (a graceful close waits for a peer
    that never drains)."""
    write, shrunk = _http.PingedSSE.write, set()

    async def small_buffers(self: _http.PingedSSE, frames: bytes) -> None:
        transport = self._request.transport
        if transport is not None and id(transport) not in shrunk:  # the kernel's buffer fills soon
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            shrunk.add(id(transport))
        await write(self, frames)

    monkeypatch.setattr(_http.PingedSSE, "write", small_buffers)
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), send_timeout_s=0.5)
    guard = gw.runner.guard
    before = guard.open
    payload = json.dumps({"model": "scripted/scripted", "messages": user("flood"), "stream": True})
    reader, writer = await slow_reader(gw, f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                           f"Content-Type: application/json\r\n"
                                           f"Content-Length: {len(payload)}\r\n\r\n{payload}")
    call = await scripted.next_call()
    dropped = {"reason": "slow_client"}

    def gone() -> bool:
        return gw.metrics.registry.get_sample_value("dac_listeners_dropped_total", dropped) == 1.0

    sent = 0
    while not gone() and sent < 5000:
        call.send("x" * 2000)
        sent += 1
        await asyncio.sleep(0.001)  # the leader appends, the writer writes
    await until(gone, "the slow client to be dropped")
    assert sent < 5000
    try:
        await until(lambda: guard.open == before, "the dropped client's connection to close", timeout=5)
        assert (await within(reader.read(100), 5, "the first bytes")).startswith(b"HTTP/1.1 200")
    finally:
        reader.feed_eof()
        writer.close()
        call.finish()


def test_a_chunk_from_its_shared_head_is_the_whole_object_encoded() -> None:
    from types import SimpleNamespace

    from server.routes.openai_wire import Completion, frame

    flight: Any = SimpleNamespace(stream_id="msg_0123abcd", created_at="2026-12-01T00:46:00.336Z")
    for model in ("mock/mock", 'a "quoted" modèle/name'):
        answer = Completion(flight=flight, model=model)
        for delta in ({"content": "hi"}, {"role": "assistant", "content": "", "refusal": None},
                      {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, {}):
            whole = {"id": answer.id, "object": "chat.completion.chunk", "created": answer.created,
                     "model": model, "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            assert answer.chunk(delta) == frame(whole)


async def test_nesting_is_refused_past_64_levels_and_a_shallow_body_of_many_brackets_is_not(gateway) -> None:
    """Bodies of few brackets are not walked for their depth; the limit holds either way."""
    import aiohttp

    def nested(levels: int) -> str:  # ``levels`` objects, one inside the other
        return '{"a":' * levels + "1" + "}" * levels

    def body(extra: str, messages: int = 1) -> bytes:
        said = ",".join([json.dumps({"role": "user", "content": "[{x}] deep"})] * messages)
        return f'{{"model": "mock/{FAST}", "messages": [{said}], "metadata": {extra}}}'.encode()

    async with aiohttp.ClientSession() as s:
        async def post(raw: bytes) -> tuple[int, Any]:
            async with s.post(gateway.url + "/v1/chat/completions", data=raw,
                              headers={"x-org-id": "org_a", "Content-Type": "application/json"}) as resp:
                return resp.status, await resp.json()

        status, answer = await within(post(body(nested(63))), what="64 levels")  # the body is the first
        assert status == 200, answer
        status, answer = await within(post(body(nested(64))), what="65 levels")
        assert status == 400 and "deeper than 64" in answer["error"]["message"]
        status, answer = await within(post(body(nested(2), messages=80)), what="many shallow brackets")
        assert status == 200, answer
