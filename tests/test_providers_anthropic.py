"""The Anthropic adapter against the fake upstream's Messages API wire format, alone and in the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.providers import AnthropicProvider, ProviderRequest
from server.providers.anthropic import DEFAULT_MAX_TOKENS
from server.providers.mock import mock_answer

from .fake_upstream import DEFAULT_API_KEY, FakeUpstream, Script
from .helpers import collect, stream_chunks as run, stream_failure as failure, text_of

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
