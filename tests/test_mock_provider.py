"""The built-in mock: deterministic, timed and failing on request."""

from __future__ import annotations

import pytest

from server.errors import BadRequest, UpstreamError
from server.providers import MockProvider, ProviderRequest
from server.providers.mock import MockSpec, mock_answer

from .helpers import within


async def run(model: str, prompt: str = "hello") -> list[str]:
    provider = MockProvider()
    out = []
    async for chunk in provider.stream(ProviderRequest(model=model, messages=[{"role": "user", "content": prompt}])):
        out.append(chunk.text)
    assert provider.open_streams == 0
    return out


async def test_same_prompt_same_answer_and_usage() -> None:
    a = await within(run("mock:ttft=0,itl=0,n=5"))
    b = await within(run("mock:ttft=0,itl=0,n=5"))
    assert a == b and "".join(a) == "".join(mock_answer("hello", 5))
    assert a[-1] == "" and len([t for t in a if t]) == 5
    assert await within(run("mock:ttft=0,itl=0,n=5", "other")) != a


async def test_fail_and_failat() -> None:
    with pytest.raises(UpstreamError, match="fail=1"):
        await within(run("mock:ttft=0,fail=1"))
    provider = MockProvider()
    got = []
    with pytest.raises(UpstreamError, match="cut after 2"):
        async for chunk in provider.stream(ProviderRequest(model="mock:ttft=0,itl=0,n=5,failat=2",
                                                           messages=[{"role": "user", "content": "x"}])):
            got.append(chunk.text)
    assert len(got) == 2 and provider.open_streams == 0


def test_spec_parsing_and_errors() -> None:
    assert MockSpec.parse("mock") == MockSpec()
    assert MockSpec.parse("mock:ttft=5,itl=1,n=3") == MockSpec(ttft_ms=5, itl_ms=1, n=3)
    for bad in ("gpt-4", "mock:n", "mock:ttft=x", "mock:ttft=-1", "mock:nope=1"):
        with pytest.raises(BadRequest):
            MockSpec.parse(bad)
