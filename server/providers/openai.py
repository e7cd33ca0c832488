"""The OpenAI-compatible adapter: OpenAI, Perplexity, Groq, Together, OpenRouter, vLLM, Ollama, ...

One call is ``POST {base_url}/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``, read as ``chat.completion.chunk`` events::

    data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], ...}
    data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}], ...}
    data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], ...}
    data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, ...}}
    data: [DONE]

``base_url`` includes the version path, like the official SDK's
``OPENAI_BASE_URL`` (``https://api.openai.com/v1``). Text deltas of choice 0
become chunks; ``usage`` goes onto the message; vendor extras beside the text
(Perplexity's ``citations`` and ``search_results``, by default) go into the
message's ``meta``, as does the ``finish_reason``. An ``{"error": ...}`` event
mid-stream (OpenRouter sends them) ends the call with that error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..errors import UpstreamError, UpstreamProtocolError
from .base import Chunk, ProviderRequest
from .upstream import HTTPProvider, StreamParser, status_error

__all__ = ["DEFAULT_META_KEYS", "OpenAIProvider"]

#: top-level fields of a chunk kept in the message's meta (Perplexity's extras)
DEFAULT_META_KEYS = ("citations", "search_results", "images", "related_questions")
#: never overridable by request params: the gateway always streams
_FORCED = ("model", "messages", "stream", "stream_options")


class OpenAIProvider(HTTPProvider):
    kind = "openai"

    def __init__(self, *, meta_keys: Sequence[str] = DEFAULT_META_KEYS, **options: Any) -> None:
        super().__init__(**options)
        self.meta_keys = tuple(meta_keys)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **self._extra_headers}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        params = {k: v for k, v in request.params.items() if k not in _FORCED}
        options = request.params.get("stream_options")
        return {
            **params,
            "model": request.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
        }

    def parser(self) -> StreamParser:
        return _ChunkParser(self)

    def whole(self, answer: Any) -> Chunk:
        """A ``chat.completion`` object, from a server that ignored ``stream: true``."""
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise UpstreamProtocolError(f"provider {self.name!r} answered JSON that is not a chat.completion")
        text, finish = "", None
        for choice in answer["choices"]:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                message = choice.get("message") or {}
                content = message.get("content") if isinstance(message, dict) else None
                text = content if isinstance(content, str) else ""
                finish = choice.get("finish_reason")
        meta = {k: answer[k] for k in self.meta_keys if k in answer}
        if finish:
            meta["finish_reason"] = finish
        usage = answer.get("usage")
        return Chunk(text=text, usage=usage if isinstance(usage, dict) and usage else None,
                     meta=meta or None, finish_reason=finish)


class _ChunkParser(StreamParser):
    __slots__ = ("_provider", "_finish", "_extras", "done")

    def __init__(self, provider: OpenAIProvider) -> None:
        self._provider = provider
        self._finish: str | None = None
        self._extras: dict[str, Any] = {}  # the extras last passed on, to pass only changes
        self.done = False

    def feed(self, event: str, data: bytes) -> Chunk | None:
        if data == b"[DONE]":
            self.done = True
            return None
        p = self._provider
        obj = self.json_object(p.name, data)
        if obj.get("error"):
            raise _inband_error(p, obj)
        text, finish = "", None
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 is not asked for; other choices are ignored
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str):
                    text += content
            finish = choice.get("finish_reason") or finish
        meta: dict[str, Any] | None = None
        for key in p.meta_keys:
            value = obj.get(key)
            if value is not None and self._extras.get(key) != value:
                self._extras[key] = value
                meta = meta or {}
                meta[key] = value
        if finish:
            self._finish = finish
            meta = meta or {}
            meta["finish_reason"] = finish
        usage = obj.get("usage")
        usage = usage if isinstance(usage, dict) and usage else None
        if not (text or usage or meta):
            return None
        return Chunk(text=text, usage=usage, meta=meta, finish_reason=finish)

    def complete(self) -> bool:
        # Some servers end the body without [DONE]; a finish_reason says the answer is whole.
        return self.done or self._finish is not None


def _inband_error(provider: OpenAIProvider, obj: dict[str, Any]) -> UpstreamError:
    error = obj["error"]
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    return status_error(provider=provider.name, status=status, body=orjson.dumps(obj), headers={},
                        key_env=provider.api_key_env, secrets=provider._secrets(),
                        label="an error event mid-stream")
