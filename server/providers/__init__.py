"""Providers by name.

The registry maps the ``provider`` a request names to a :class:`Provider`.
:func:`build_registry` fills it from the settings: ``mock`` always, the
built-in OpenAI-compatible and Anthropic names (see :mod:`.catalog`), and
whatever ``DAC_PROVIDERS_FILE`` declares. A provider without its key is
listed but answers ``400`` naming the variable to set.

The HTTP adapters share one ``aiohttp.ClientSession`` (one connection pool,
one DNS cache); the registry owns it and closes it in :meth:`aclose`, after
the hub has cancelled every flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

import aiohttp

from ..config import Settings
from ..errors import BadRequest, ProviderNotConfigured
from .anthropic import AnthropicProvider
from .base import (
    ChatMessage,
    Chunk,
    FinishReason,
    Provider,
    ProviderRequest,
    ToolCall,
    ToolCallDelta,
    assemble_tool_calls,
    content_part,
)
from .catalog import ProviderConfigError, resolve
from .mock import MockProvider
from .openai import OpenAIProvider

__all__ = [
    "AnthropicProvider",
    "ChatMessage",
    "Chunk",
    "FinishReason",
    "MockProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderConfigError",
    "ProviderRegistry",
    "ProviderRequest",
    "ToolCall",
    "ToolCallDelta",
    "assemble_tool_calls",
    "build_registry",
    "content_part",
    "new_session",
]

#: bytes aiohttp buffers per read; big enough for a chunk with many search results
READ_BUFSIZE = 1 << 20
#: how long an idle pooled connection to an upstream is kept
KEEPALIVE_TIMEOUT_S = 30.0


def new_session() -> aiohttp.ClientSession:
    """The session the HTTP adapters share.

    No connection limit here: the pacer bounds calls per provider, and a
    second, hidden limit would only queue calls where nobody measures it.
    """
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300,
                                     keepalive_timeout=KEEPALIVE_TIMEOUT_S)
    # no cookies: no provider API keeps a session in them, and the jar costs every call a look-up
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                 read_bufsize=READ_BUFSIZE, raise_for_status=False,
                                 cookie_jar=aiohttp.DummyCookieJar())


class ProviderRegistry:
    def __init__(self, providers: Iterable[Provider] = (), *, default: str = "mock",
                 session: aiohttp.ClientSession | None = None) -> None:
        self._providers: dict[str, Provider] = {}
        for provider in providers:
            self.add(provider)
        self.default = default
        #: closed by aclose(); the HTTP providers' calls run over it
        self.session = session

    def add(self, provider: Provider) -> None:
        self._providers[provider.name] = provider

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._providers.values())

    def __contains__(self, name: object) -> bool:
        return name in self._providers

    def get(self, name: str | None) -> Provider:
        """The provider a request names, or a 400 that says what to do."""
        name = name or self.default
        provider = self._providers.get(name)
        if provider is None:
            known = ", ".join(sorted(self._providers)) or "none"
            raise BadRequest(f"unknown provider {name!r}; known providers: {known}", param="provider")
        if not provider.configured():
            raise ProviderNotConfigured(provider.not_configured_reason(), param="provider")
        return provider

    async def probe_local(self) -> None:
        """Probe the local servers (key optional: vLLM, Ollama) once, so ``/v1/models`` lists
        those that are there."""
        await asyncio.gather(*(p.probe() for p in self if p.local and p.configured()))

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        if self.session is not None:
            await self.session.close()


async def build_registry(settings: Settings) -> ProviderRegistry:
    """The providers the settings declare; ``mock`` is always there.

    Raises :class:`ProviderConfigError` (a ``ValueError``) naming the variable
    or the providers file's entry and field when they cannot be used.
    """
    resolved = resolve(settings)
    session = new_session()
    providers: list[Provider] = [MockProvider()]
    for r in resolved:
        spec = r.spec
        if spec.kind == "mock":
            mock = MockProvider(name=spec.name, max_concurrency=spec.max_concurrency)
            providers.append(mock)
            continue
        common: dict[str, Any] = dict(name=spec.name, base_url=r.base_url, session=session, api_key=r.api_key,
                                      api_key_env=spec.api_key_env, key_required=spec.key_required,
                                      max_concurrency=spec.max_concurrency, timeouts=spec.timeouts,
                                      default_model=spec.default_model, models=spec.models,
                                      headers=spec.headers, unusable=r.unusable,
                                      max_temperature=spec.max_temperature)
        if spec.kind == "anthropic":
            extra = {} if spec.max_tokens is None else {"max_tokens": spec.max_tokens}
            providers.append(AnthropicProvider(**common, **extra))
        else:
            providers.append(OpenAIProvider(**common, meta_keys=spec.meta_keys,
                                            stream_options=spec.stream_options))
    budgets = {r.spec.name: r.spec for r in resolved}
    for provider in providers:
        declared = budgets.get(provider.name)
        if declared is not None:
            provider.context_chars = declared.context_chars
            provider.model_context_chars = dict(declared.model_context_chars)
    registry = ProviderRegistry(providers, default=settings.default_provider, session=session)
    if settings.default_provider not in registry:
        await registry.aclose()
        raise ProviderConfigError(f"DAC_DEFAULT_PROVIDER names {settings.default_provider!r}, which is not a "
                                  f"provider; known: {', '.join(sorted(p.name for p in registry))}")
    return registry
