"""The OpenAI-compatible adapter: OpenAI, Perplexity, Groq, Together, OpenRouter, vLLM, Ollama, ...

One call is ``POST {base_url}/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``, read as ``chat.completion.chunk`` events::

    data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], ...}
    data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}], ...}
    data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], ...}
    data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, ...}}
    data: [DONE]

``base_url`` includes the version path, like the official SDK's
``OPENAI_BASE_URL`` (``https://api.openai.com/v1``). Choice 0's delta
becomes a chunk:

=================================================  ==============================
delta field                                        chunk field
=================================================  ==============================
``content``                                        ``text``
``reasoning_content`` (vLLM, DeepSeek), else       ``reasoning``
``reasoning`` (OpenRouter, Ollama, newer vLLM)
``refusal``                                        ``refusal``
``tool_calls``                                     ``tool_calls``, normalized: an
                                                   ``index`` on every piece, ``id``
                                                   and ``name`` on the first only
``finish_reason``                                  ``finish_reason`` (and meta)
=================================================  ==============================

``usage`` goes onto the message; vendor extras beside the text (Perplexity's
``citations`` and ``search_results``, by default) go into the message's
``meta``, as does the ``finish_reason``. A finish reason outside OpenAI's
four is reported as ``stop``, the server's own word kept in meta as
``upstream_finish_reason``.

Errors inside a stream that started well end the call with the matching
gateway error: an ``{"error": ...}`` event (OpenAI, OpenRouter), a bare
``{"object": "error", "message": ...}`` event (older vLLM), or a
``finish_reason: "error"`` (OpenRouter, with or without an error object).
A whole JSON answer (a server that ignores ``stream: true``) is read the
same way, into one chunk.

Per provider (see :mod:`.catalog`): ``stream_options = false`` for servers
that refuse the field (usage is then whatever the server sends unasked), and
``max_temperature`` for servers whose range is narrower than OpenAI's 0-2.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from ..errors import UpstreamError, UpstreamProtocolError
from .base import Chunk, FinishReason, FunctionCallDelta, ProviderRequest, ToolCallDelta
from .upstream import HTTPProvider, StreamParser, object_of, status_error

__all__ = ["DEFAULT_META_KEYS", "OpenAIProvider"]

#: top-level fields of a chunk kept in the message's meta (Perplexity's extras)
DEFAULT_META_KEYS = ("citations", "search_results", "images", "related_questions")
#: never overridable by request params: the gateway always streams
_FORCED = ("model", "messages", "stream", "stream_options")
#: where compatible servers put the reasoning, in the order they are believed
_REASONING_KEYS = ("reasoning_content", "reasoning")
#: OpenAI's finish reasons, and the words some compatible servers use for them
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                                    "content_filter": "content_filter", "eos": "stop", "end_turn": "stop",
                                    "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


class OpenAIProvider(HTTPProvider):
    kind = "openai"

    def __init__(self, *, meta_keys: Sequence[str] = DEFAULT_META_KEYS, stream_options: bool = True,
                 **options: Any) -> None:
        super().__init__(**options)
        self.meta_keys = tuple(meta_keys)
        #: whether ``stream_options.include_usage`` is sent
        self.stream_options = stream_options

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
        self.clamp_temperature(params)
        body = {**params, "model": request.model, "messages": request.messages, "stream": request.stream}
        if self.stream_options and request.stream:
            options = request.params.get("stream_options")
            body["stream_options"] = {**object_of(options), "include_usage": True}
        return body

    def parser(self) -> StreamParser:
        return _ChunkParser(self)

    def whole(self, answer: Any) -> Chunk:
        """A ``chat.completion`` object: asked for (``stream: false``), or from a server
        that ignored ``stream: true``."""
        if isinstance(answer, dict) and _error_of(answer) is not None:
            raise _inband_error(self, answer, "an error answer")
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise UpstreamProtocolError(f"provider {self.name!r} answered JSON that is not a chat.completion")
        chunk = Chunk()
        raw_finish = None
        for choice in answer["choices"]:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                message = choice.get("message")
                if isinstance(message, dict):
                    calls = message.get("tool_calls")
                    if isinstance(calls, list):  # whole calls: each its own index
                        message = {**message, "tool_calls": [
                            {"index": i, **c} for i, c in enumerate(calls) if isinstance(c, dict)]}
                    _read_delta(message, chunk, None)
                raw_finish = choice.get("finish_reason")
                if raw_finish == "error":
                    raise _inband_error(self, choice, "an answer that ended in error")
        meta = {k: answer[k] for k in self.meta_keys if k in answer}
        if isinstance(raw_finish, str) and raw_finish:
            chunk.finish_reason = _finish(raw_finish, meta)
        usage = answer.get("usage")
        chunk.usage = usage if isinstance(usage, dict) and usage else None
        chunk.meta = meta or None
        return chunk


class _ToolCalls:
    """Tool-call pieces as OpenAI streams them, whatever the server's habits.

    Some servers repeat ``id`` and ``name`` on every piece, omit ``index``
    (one whole call per piece), or send no ``id``: every piece leaves here
    with an ``index``, and the first piece of an index alone carries its
    ``id`` (made up when the server sent none), ``type`` and ``name``.
    """

    __slots__ = ("_started", "_by_id")

    def __init__(self) -> None:
        self._started: set[int] = set()
        self._by_id: dict[str, int] = {}

    def _index(self, piece: dict[str, Any], call_id: str | None, name: str) -> int:
        index = piece.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            return index
        if call_id is not None:
            return self._by_id.get(call_id, len(self._started))
        if name or not self._started:
            return len(self._started)  # a name starts a call
        return max(self._started)  # more arguments for the call in progress

    def feed(self, raw: Any) -> list[ToolCallDelta]:
        if not isinstance(raw, list):
            return []
        out: list[ToolCallDelta] = []
        for piece in raw:
            if not isinstance(piece, dict):
                continue
            given_id, function = piece.get("id"), object_of(piece.get("function"))
            call_id = given_id if isinstance(given_id, str) and given_id else None
            name = function["name"] if isinstance(function.get("name"), str) else ""
            index = self._index(piece, call_id, name)
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # a server that sends the object, not its JSON text
                arguments = orjson.dumps(arguments).decode()
            arguments = arguments if isinstance(arguments, str) else ""
            if index not in self._started:
                self._started.add(index)
                call_id = call_id or f"call_{uuid.uuid4().hex[:24]}"
                self._by_id[call_id] = index
                out.append({"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}})
            elif arguments:
                out.append({"index": index, "function": FunctionCallDelta(arguments=arguments)})
        return out


def _read_delta(delta: dict[str, Any], chunk: Chunk, tools: _ToolCalls | None) -> None:
    """Append a delta's (or a whole message's) fields to ``chunk``; ``tools`` reads the
    tool-call pieces of a stream (None: a whole message's, read afresh)."""
    content = delta.get("content")
    if isinstance(content, str):
        chunk.text += content
        if len(delta) == 1 or (len(delta) == 2 and "role" in delta):
            return  # the common delta: its text, nothing beside it
    for key in _REASONING_KEYS:
        reasoning = delta.get(key)
        if isinstance(reasoning, str) and reasoning:
            chunk.reasoning += reasoning
            break  # servers that send both send the same text twice
    refusal = delta.get("refusal")
    if isinstance(refusal, str):
        chunk.refusal += refusal
    calls = delta.get("tool_calls")
    if calls is not None:
        chunk.tool_calls += (tools or _ToolCalls()).feed(calls)


def _finish(raw: str, meta: dict[str, Any]) -> FinishReason:
    """OpenAI's word for ``raw``, noted in ``meta`` (with the server's own when it differs)."""
    finish = _FINISH.get(raw, "stop")
    meta["finish_reason"] = finish
    if finish != raw:
        meta["upstream_finish_reason"] = raw
    return finish


class _ChunkParser(StreamParser):
    __slots__ = ("_provider", "_finish", "_extras", "_tools", "done")

    def __init__(self, provider: OpenAIProvider) -> None:
        self._provider = provider
        self._finish: str | None = None
        self._extras: dict[str, Any] = {}  # the extras last passed on, to pass only changes
        self._tools = _ToolCalls()
        self.done = False

    def feed(self, event: str, data: bytes) -> Chunk | None:
        if data == b"[DONE]":
            self.done = True
            return None
        p = self._provider
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is not dict:
            obj = self.json_object(p.name, data)  # raises the protocol error that fits
        error = obj.get("error")
        if (error is not None and (error or isinstance(error, dict))) or obj.get("object") == "error":
            raise _inband_error(p, obj, "an error event mid-stream")  # what _error_of finds
        chunk = Chunk()
        raw_finish = None
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 is not asked for; other choices are ignored
            delta = choice.get("delta")
            if isinstance(delta, dict):
                _read_delta(delta, chunk, self._tools)
            raw_finish = choice.get("finish_reason") or raw_finish
            if raw_finish == "error":
                raise _inband_error(p, choice, "an answer that ended in error")
        meta: dict[str, Any] = {}
        for key in p.meta_keys:
            value = obj.get(key)
            if value is not None and self._extras.get(key) != value:
                self._extras[key] = value
                meta[key] = value
        if isinstance(raw_finish, str):
            self._finish = raw_finish
            chunk.finish_reason = _finish(raw_finish, meta)
        usage = obj.get("usage")
        chunk.usage = usage if isinstance(usage, dict) and usage else None
        chunk.meta = meta or None
        if not (chunk.has_output() or chunk.usage or chunk.meta):
            return None
        return chunk

    def complete(self) -> bool:
        # Some servers end the body without [DONE]; a finish_reason says the answer is whole.
        return self.done or self._finish is not None


def _error_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The error an event or answer carries: ``{"error": {...}}``, or vLLM's bare ``{"object": "error"}``."""
    error = obj.get("error")
    if isinstance(error, dict):
        return error
    if error:  # {"error": "text"}
        return {"message": str(error)}
    if obj.get("object") == "error":
        return obj
    return None


def _inband_error(provider: OpenAIProvider, obj: dict[str, Any], label: str) -> UpstreamError:
    """The gateway error for an error inside a 200 answer; its ``code``, when an HTTP status, decides."""
    error = _error_of(obj)
    if error is None:  # finish_reason "error" and nothing said: the provider failed
        return UpstreamError(f"provider {provider.name!r} ended the answer with finish_reason 'error'")
    code = error.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 500
    return status_error(provider=provider.name, status=status, body=orjson.dumps({"error": error}), headers={},
                        key_env=provider.api_key_env, secrets=provider._secrets(), label=label)
