"""Providers by name.

The registry maps the ``provider`` a request names to a :class:`Provider`.
Built-ins need no configuration file: ``mock`` always; the OpenAI-compatible
and Anthropic adapters are added by :func:`build_registry` from the settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..config import Settings
from ..errors import BadRequest, ProviderNotConfigured
from .base import Chunk, Provider, ProviderRequest
from .mock import MockProvider

__all__ = ["Chunk", "MockProvider", "Provider", "ProviderRegistry", "ProviderRequest", "build_registry"]


class ProviderRegistry:
    def __init__(self, providers: Iterable[Provider] = (), *, default: str = "mock") -> None:
        self._providers: dict[str, Provider] = {}
        for provider in providers:
            self.add(provider)
        self.default = default

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

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()


async def build_registry(settings: Settings) -> ProviderRegistry:
    """The providers the settings declare; ``mock`` is always there."""
    return ProviderRegistry([MockProvider()], default=settings.default_provider)
