"""Which providers exist: built-ins, ``<NAME>_BASE_URL``/``<NAME>_API_KEY``, and the providers file."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from server.config import Settings
from server.providers import (
    AnthropicProvider,
    MockProvider,
    OpenAIProvider,
    ProviderConfigError,
    build_registry,
)
from server.providers.catalog import load_file

from .helpers import within

ROOT = Path(__file__).resolve().parent.parent


def settings(env: dict[str, str] | None = None, **changes: Any) -> Settings:
    return Settings.from_env(env or {}).with_(**changes)


async def test_built_ins_with_their_urls_keys_and_overrides() -> None:
    registry = await build_registry(settings({
        "OPENAI_API_KEY": "k1", "OPENAI_BASE_URL": "https://proxy.example.org/v1",
        "ANTHROPIC_API_KEY": "k2", "ANTHROPIC_BASE_URL": "https://claude.example.org",
    }))
    try:
        providers = {p.name: p for p in registry}
        assert set(providers) == {"mock", "openai", "perplexity", "groq", "together", "openrouter", "vllm",
                                  "ollama", "anthropic"}
        urls = {name: getattr(p, "url", None) for name, p in providers.items()}
        assert urls == {
            "mock": None,
            "openai": "https://proxy.example.org/v1/chat/completions",
            "perplexity": "https://api.perplexity.ai/chat/completions",
            "groq": "https://api.groq.com/openai/v1/chat/completions",
            "together": "https://api.together.xyz/v1/chat/completions",
            "openrouter": "https://openrouter.ai/api/v1/chat/completions",
            "vllm": "http://127.0.0.1:8000/v1/chat/completions",
            "ollama": "http://127.0.0.1:11434/v1/chat/completions",
            "anthropic": "https://claude.example.org/v1/messages",
        }
        assert isinstance(providers["anthropic"], AnthropicProvider)
        assert all(p.max_concurrency == 16 for name, p in providers.items() if name != "mock")
        configured = {name for name, p in providers.items() if p.configured()}
        # keys given for two; ollama needs none; vllm's default port is this gateway's own (8000)
        assert configured == {"mock", "openai", "anthropic", "ollama"}
        assert "VLLM_BASE_URL" in providers["vllm"].not_configured_reason()
        assert "this gateway itself" in providers["vllm"].not_configured_reason()
        assert providers["groq"].not_configured_reason() == "provider 'groq' has no API key: set GROQ_API_KEY"
        assert "k1" not in repr(providers["openai"])
        session = registry.session
        assert session is not None and not session.closed
    finally:
        await registry.aclose()
    assert session.closed  # the registry owns the shared session


async def test_the_providers_file_adds_and_changes_providers(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text("""
[[providers]]
name = "local"
kind = "openai"
base_url = "http://127.0.0.1:9999/v1"
api_key_env = ""
max_concurrency = 4
default_model = "llama3"
models = ["llama3", "qwen2.5"]
timeouts = { connect = 1.5, first_token = 20, idle = 10, total = 100 }

[[providers]]
name = "openai"
max_concurrency = 2

[[providers]]
name = "slow-mock"
kind = "mock"
max_concurrency = 1
""")
    registry = await build_registry(settings({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "https://o.example/v1"},
                                             providers_file=str(path)))
    try:
        local, openai, slow = (registry.get(n) for n in ("local", "openai", "slow-mock"))
        assert isinstance(local, OpenAIProvider) and local.configured()
        assert (local.url, local.max_concurrency, local.default_model) == (
            "http://127.0.0.1:9999/v1/chat/completions", 4, "llama3")
        assert local.models() == ["llama3", "qwen2.5"]
        assert (local.timeouts.connect, local.timeouts.first_token, local.timeouts.idle,
                local.timeouts.total) == (1.5, 20, 10, 100)
        # a built-in changed by the file keeps what the file does not say: its URL from the env, its key
        assert isinstance(openai, OpenAIProvider)
        assert (openai.max_concurrency, openai.url) == (2, "https://o.example/v1/chat/completions")
        assert openai.configured() and openai.default_model == "gpt-4o-mini"
        assert isinstance(slow, MockProvider) and slow.max_concurrency == 1
    finally:
        await registry.aclose()


BAD_FILES = [
    ("providers = 3", "'providers' must be [[providers]] tables"),
    ("[[providers]]\nname = 'x'\n", "providers[0] ('x'): 'kind' is required"),
    ("[[providers]]\nname = 'x'\nkind = 'gemini'\n", "'kind' must be one of openai, anthropic, mock, not 'gemini'"),
    ("[[providers]]\nname = 'x'\nkind = 'openai'\nbase_url = 'ftp://h'\n", "'base_url' must be an http(s) URL"),
    ("[[providers]]\nname = 'x'\nkind = 'openai'\nmax_concurrency = 0\n",
     "'max_concurrency' must be a whole number >= 1, not 0"),
    ("[[providers]]\nname = 'x'\nkind = 'openai'\ntimeouts = { first_token = -1 }\n",
     "timeouts.first_token must be a positive number of seconds"),
    ("[[providers]]\nname = 'x'\nkind = 'openai'\ntimeouts = { read = 1 }\n", "unknown timeout(s) read"),
    ("[[providers]]\nname = 'x'\nkind = 'openai'\napi_key = 'sk-secret'\n", "unknown field(s) api_key"),
    ("[[providers]]\nname = 'x'\nkind = 'mock'\n[[providers]]\nname = 'x'\nkind = 'mock'\n",
     "providers[1]: name 'x' is declared twice"),
    ("[[providers]]\nname = 'has space'\nkind = 'mock'\n", "'name' must be 1-64 letters"),
    ("[[providers]\nname = 'x'", "not valid TOML"),
    ("[provider]\nname = 'x'", "unknown top-level key(s) provider"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_FILES)
def test_a_bad_providers_file_is_refused_naming_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    with pytest.raises(ProviderConfigError) as caught:
        load_file(str(path))
    assert problem in str(caught.value)
    assert str(caught.value).startswith(f"DAC_PROVIDERS_FILE {path}")


async def test_bad_settings_around_providers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="no such file"):
        await build_registry(settings(providers_file=str(tmp_path / "missing.toml")))
    with pytest.raises(ProviderConfigError, match="OPENAI_BASE_URL must be an http"):
        await build_registry(settings({"OPENAI_BASE_URL": "api.openai.com/v1"}))
    with pytest.raises(ProviderConfigError, match="DAC_DEFAULT_PROVIDER names 'gemini'"):
        await build_registry(settings(default_provider="gemini"))


async def test_the_server_does_not_start_with_a_bad_providers_file(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text("[[providers]]\nname = 'x'\nkind = 'openai'\nmax_concurrency = 'many'\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--port", "0", "--db", str(tmp_path / "dac.db"), cwd=ROOT,
        env={**os.environ, "DAC_PROVIDERS_FILE": str(path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await within(proc.communicate(), 30, "the server to refuse to start")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    assert b"listening" not in out
    assert f"error: DAC_PROVIDERS_FILE {path}: providers[0] ('x'): 'max_concurrency' must be a whole number".encode() \
        in err
    assert b"Traceback" not in err


async def test_a_local_provider_on_the_gateways_own_port_is_refused_by_name(gateway_factory: Any) -> None:
    gw = await gateway_factory()  # settings say port 8000: vLLM's default URL would call the gateway itself
    tid = await gw.new_thread()
    status, answer = await gw.post(tid, {"content": "hi", "provider": "vllm", "model": "m"})
    assert status == 400 and "VLLM_BASE_URL" in answer["error"]["message"]
    assert (await gw.thread(tid))["messages"] == []


async def test_stream_options_and_max_temperature_in_the_providers_file(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text('[[providers]]\nname = "local"\nkind = "openai"\nbase_url = "http://127.0.0.1:9999/v1"\n'
                    'api_key_env = ""\nstream_options = false\nmax_temperature = 1\n'
                    '[[providers]]\nname = "anthropic"\nmax_temperature = 0.7\n')
    registry = await build_registry(settings({"ANTHROPIC_API_KEY": "k"}, providers_file=str(path)))
    try:
        providers = {p.name: p for p in registry}
        local, claude, openai = (providers[n] for n in ("local", "anthropic", "openai"))
        assert isinstance(local, OpenAIProvider) and (local.stream_options, local.max_temperature) == (False, 1.0)
        assert isinstance(claude, AnthropicProvider) and claude.max_temperature == 0.7
        assert isinstance(openai, OpenAIProvider) and (openai.stream_options, openai.max_temperature) == (True, None)
    finally:
        await registry.aclose()


@pytest.mark.parametrize(("text", "problem"), [
    ("stream_options = 'no'", "'stream_options' must be true or false, not 'no'"),
    ("max_temperature = 3", "'max_temperature' must be a number from 0 to 2, not 3"),
    ("max_temperature = true", "'max_temperature' must be a number from 0 to 2, not True"),
])
def test_bad_stream_options_or_max_temperature_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(f"[[providers]]\nname = 'x'\nkind = 'openai'\n{text}\n")
    with pytest.raises(ProviderConfigError) as caught:
        load_file(str(path))
    assert problem in str(caught.value)
