"""The fake upstream itself: the official OpenAI SDK reads it as it reads OpenAI, and it runs standalone."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from server.providers.mock import mock_answer

from .fake_upstream import DEFAULT_API_KEY, FakeUpstream, Script
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
