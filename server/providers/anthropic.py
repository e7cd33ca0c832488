"""The Anthropic adapter: the Messages API.

One call is ``POST {base_url}/v1/messages`` with ``x-api-key`` and
``anthropic-version: 2023-06-01``; ``base_url`` has no version path, like the
official SDK's ``ANTHROPIC_BASE_URL`` (``https://api.anthropic.com``). The
stream is read as named events::

    event: message_start        usage.input_tokens
    event: content_block_start  a text block (its text, if any, is the first piece)
    event: ping                 (keeps the call alive)
    event: content_block_delta  text_delta -> a chunk; citations_delta -> meta.citations
    event: content_block_stop
    event: message_delta        stop_reason, usage.output_tokens
    event: message_stop         the answer is complete
    event: error                overloaded_error, rate_limit_error, ... -> the matching error

The conversation maps as Anthropic wants it: ``system`` messages go into the
top-level ``system`` field, the rest stay in order (the API merges
consecutive turns of one role). ``max_tokens`` is required by Anthropic: it
comes from the request's ``max_tokens`` (or ``max_completion_tokens``), else
the provider's default. Usage is reported under OpenAI's names, with
Anthropic's own fields kept beside them.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import ProviderAuthError, RateLimited, UpstreamError, UpstreamProtocolError
from .base import Chunk, ProviderRequest
from .upstream import HTTPProvider, StreamParser, scrub

__all__ = ["ANTHROPIC_VERSION", "AnthropicProvider", "DEFAULT_MAX_TOKENS"]

ANTHROPIC_VERSION = "2023-06-01"
#: every Claude model can produce this many tokens
DEFAULT_MAX_TOKENS = 4096
#: request params passed through as they are
_PASSED = ("temperature", "top_p", "top_k", "metadata", "stop_sequences", "thinking", "service_tier")
#: Anthropic's stop reasons under OpenAI's names
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter"}


class AnthropicProvider(HTTPProvider):
    kind = "anthropic"

    def __init__(self, *, max_tokens: int = DEFAULT_MAX_TOKENS, **options: Any) -> None:
        super().__init__(**options)
        self.max_tokens = max_tokens

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/messages"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "anthropic-version": ANTHROPIC_VERSION, **self._extra_headers}
        if self._api_key is not None:
            headers["x-api-key"] = self._api_key
        return headers

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            if message.get("role") == "system":
                content = message.get("content")
                system.append(content if isinstance(content, str) else _text_of(content))
            else:
                messages.append({"role": message.get("role"), "content": message.get("content")})
        params = request.params
        body: dict[str, Any] = {k: params[k] for k in _PASSED if k in params}
        stop = params.get("stop")
        if "stop_sequences" not in body and stop:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or self.max_tokens
        body.update(model=request.model, messages=messages, max_tokens=max_tokens, stream=True)
        if system:
            body["system"] = "\n\n".join(system)
        return body

    def parser(self) -> StreamParser:
        return _EventParser(self)

    def whole(self, answer: Any) -> Chunk:
        """A ``message`` object, from a server that ignored ``stream: true``."""
        if not isinstance(answer, dict) or answer.get("type") != "message":
            raise UpstreamProtocolError(f"provider {self.name!r} answered JSON that is not a message")
        parser = _EventParser(self)
        parser.feed("message_start", orjson.dumps({"type": "message_start", "message": answer}))
        text = _text_of(answer.get("content"))
        stop = answer.get("stop_reason")
        finish = _FINISH.get(stop, stop) if stop else None
        return Chunk(text=text, usage=parser.usage(), meta={"finish_reason": finish} if finish else None,
                     finish_reason=finish)


def _text_of(content: Any) -> str:
    """The text parts of a content list, joined (system prompts given as parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


class _EventParser(StreamParser):
    __slots__ = ("_provider", "_usage", "_stop", "_citations", "done")

    def __init__(self, provider: AnthropicProvider) -> None:
        self._provider = provider
        self._usage: dict[str, Any] = {}
        self._stop: str | None = None
        self._citations: list[Any] = []
        self.done = False

    def feed(self, event: str, data: bytes) -> Chunk | None:
        p = self._provider
        obj = self.json_object(p.name, data)
        kind = obj.get("type") or event
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                text = delta.get("text")
                return Chunk(text=text) if isinstance(text, str) and text else None
            if delta.get("type") == "citations_delta" and "citation" in delta:
                self._citations.append(delta["citation"])
                return Chunk(meta={"citations": list(self._citations)})
            return None  # thinking, tool input: not text of the answer
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            text = block.get("text") if block.get("type") == "text" else None
            return Chunk(text=text) if isinstance(text, str) and text else None
        if kind == "message_start":
            message = obj.get("message") or {}
            self._take_usage(message.get("usage"))
            return None
        if kind == "message_delta":
            self._take_usage(obj.get("usage"))
            stop = (obj.get("delta") or {}).get("stop_reason")
            if stop:
                self._stop = stop
            finish = _FINISH.get(stop, stop) if stop else None
            return Chunk(usage=self.usage(), meta={"finish_reason": finish} if finish else None,
                         finish_reason=finish)
        if kind == "message_stop":
            self.done = True
            return None
        if kind == "error":
            raise _event_error(p, obj.get("error") or {})
        return None  # ping, content_block_stop, and event types added later

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._usage.update({k: v for k, v in usage.items() if v is not None})

    def usage(self) -> dict[str, Any] | None:
        u = self._usage
        if not u:
            return None
        counts = [u.get(k) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
        prompt = sum(c for c in counts if isinstance(c, int))
        output = u.get("output_tokens")
        completion = output if isinstance(output, int) else 0
        return {**u, "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def complete(self) -> bool:
        return self.done or self._stop is not None


def _event_error(provider: AnthropicProvider, error: dict[str, Any]) -> UpstreamError:
    kind = str(error.get("type") or "error")
    message = " ".join(scrub(str(error.get("message") or ""), provider._secrets()).split())[:300]
    said = f"provider {provider.name!r} reported {kind} mid-stream" + (f": {message}" if message else "")
    if kind in ("authentication_error", "permission_error"):
        where = f"; check {provider.api_key_env}" if provider.api_key_env else ""
        return ProviderAuthError(f"provider {provider.name!r} refused the credentials ({kind}){where}")
    if kind == "rate_limit_error":
        return RateLimited(said)
    if kind in ("invalid_request_error", "not_found_error", "request_too_large"):
        return UpstreamError(said, retryable=False)
    return UpstreamError(said)  # overloaded_error, api_error, ...: worth a retry
