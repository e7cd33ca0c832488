"""The provider interface every upstream adapter implements.

A provider turns a :class:`ProviderRequest` into an async iterator of
:class:`Chunk`. Closing the iterator (``aclose()``, or cancelling the task that
iterates it) must close the upstream connection: that is how a flight whose
last listener left aborts its upstream call.

Adapters raise subclasses of :class:`server.errors.UpstreamError`; anything
else escaping ``stream`` is reported as an ``upstream_error``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Chunk", "Provider", "ProviderRequest"]

DEFAULT_MAX_CONCURRENCY = 16


@dataclass(slots=True, kw_only=True)
class ProviderRequest:
    """What the leader of a flight asks of a provider."""

    model: str
    # The conversation, oldest first: ``{"role": "system"|"user"|"assistant", "content": str}``.
    messages: list[dict[str, Any]]
    # Sampling parameters passed through as they are (temperature, max_tokens, ...).
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class Chunk:
    """One piece of an upstream answer. Any field may be empty."""

    text: str = ""
    # Token usage as the provider reports it (OpenAI's names: prompt_tokens, ...).
    usage: dict[str, Any] | None = None
    # Extras beside the text (Perplexity's citations, ...), merged into the message's meta.
    meta: dict[str, Any] | None = None
    finish_reason: str | None = None


class Provider(abc.ABC):
    """An upstream. One instance per configured provider name, shared by all flights."""

    #: the name clients use in ``provider`` (and in ``provider/model`` on /v1).
    name: str
    #: ``mock``, ``openai`` or ``anthropic``.
    kind: str
    #: at most this many upstream calls at once; the pacer enforces it.
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    #: the model used when a request names none.
    default_model: str = ""

    def configured(self) -> bool:
        """Whether the provider can be called (has its key, say)."""
        return True

    def not_configured_reason(self) -> str:
        return f"provider {self.name!r} is not configured"

    def validate_model(self, model: str) -> None:  # noqa: B027 - optional hook
        """Raise BadRequest for a model this provider can never serve (checked before any row is written)."""

    def models(self) -> list[str]:
        """Models to list on ``GET /v1/models``."""
        return [self.default_model] if self.default_model else []

    @abc.abstractmethod
    def stream(self, request: ProviderRequest) -> AsyncGenerator[Chunk, None]:
        """Yield the answer chunk by chunk (an async generator); raise UpstreamError subclasses."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the provider holds (called once at shutdown)."""
