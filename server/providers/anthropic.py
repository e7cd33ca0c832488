"""The Anthropic adapter: the Messages API, spoken to and read in OpenAI's terms.

One call is ``POST {base_url}/v1/messages`` with ``x-api-key`` and
``anthropic-version: 2023-06-01``; ``base_url`` has no version path, like the
official SDK's ``ANTHROPIC_BASE_URL`` (``https://api.anthropic.com``).

Outbound, the OpenAI-style request becomes a Messages request:

==========================================  ==========================================
request (OpenAI's chat format)              Messages API
==========================================  ==========================================
``system`` / ``developer`` messages         top-level ``system``: one string when every
                                            one is a string, else text blocks (each
                                            part's ``cache_control`` kept)
``content`` parts: text, ``image_url``      ``text`` blocks; ``image`` blocks with a
                                            ``base64`` source (``data:`` URLs) or a
                                            ``url`` source (``https``)
assistant ``tool_calls``                    ``tool_use`` blocks after its text
``role: "tool"`` messages                   one user message of ``tool_result``
                                            blocks per run of consecutive ones
``tools`` (``type: "function"``)            ``{name, description, input_schema}``;
                                            tools already in Anthropic's shape pass
``tool_choice`` auto / none / required /    ``auto`` / ``none`` / ``any`` /
``{"type": "function", ...}``               ``{"type": "tool", "name"}``
``parallel_tool_calls: false``              ``tool_choice.disable_parallel_tool_use``
``max_tokens`` / ``max_completion_tokens``  ``max_tokens`` (required: else the
                                            provider's default)
``stop``                                    ``stop_sequences``
``user``, ``metadata.user_id``              ``metadata: {user_id}``, nothing else of
                                            ``metadata`` (Anthropic refuses other keys)
``temperature``                             at most 1 (Anthropic's range is 0-1)
``top_p``, ``top_k``, ``thinking``,         as they are (``service_tier`` only with
``stop_sequences``, ``service_tier``        Anthropic's values ``auto``, ``standard_only``)
==========================================  ==========================================

Nothing else is sent: OpenAI-only fields that Anthropic has no use for or
would refuse (``response_format``, ``seed``, ``frequency_penalty``,
``presence_penalty``, ``logit_bias``, ``logprobs``, ``top_logprobs``, ``n``,
``store``, ``modalities``, ``reasoning_effort``, ...) are dropped. A
``tool_choice`` goes only with ``tools``.

Inbound, the stream is read as named events::

    event: message_start        usage.input_tokens
    event: content_block_start  text (its text, if any) | thinking | tool_use (id, name) | ...
    event: ping                 (keeps the call alive)
    event: content_block_delta  text_delta -> text; thinking_delta -> reasoning;
                                input_json_delta -> a tool call's arguments;
                                signature_delta -> meta.thinking_signatures;
                                citations_delta -> meta.citations
    event: content_block_stop
    event: message_delta        stop_reason, usage.output_tokens
    event: message_stop         the answer is complete
    event: error                overloaded_error, rate_limit_error, ... -> the matching error

Each ``tool_use`` block becomes an OpenAI tool call: its own ``index`` (0,
1, ... in block order), its ``id`` and ``name`` on the first piece, then its
JSON input in pieces as ``arguments``. Stop reasons become OpenAI's finish
reasons (see :data:`STOP_REASONS`); where OpenAI's word hides Anthropic's,
the meta keeps Anthropic's as ``stop_reason``. Usage is reported under
OpenAI's names, with Anthropic's own fields kept beside them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Required, TypedDict

import orjson

from ..errors import BadRequest, ProviderAuthError, RateLimited, UpstreamError, UpstreamProtocolError
from .base import Chunk, FinishReason, ProviderRequest, ToolCallDelta
from .upstream import HTTPProvider, StreamParser, object_of, scrub

__all__ = ["ANTHROPIC_VERSION", "AnthropicProvider", "DEFAULT_MAX_TOKENS", "STOP_REASONS"]

#: the Messages API version spoken; it still takes temperature, top_p and top_k, which
#: 2026-10-21 refuses (moving to it means no longer sending them)
ANTHROPIC_VERSION = "2023-06-01"
#: every Claude model can produce this many tokens
DEFAULT_MAX_TOKENS = 4096
#: request params passed through as they are
_PASSED = ("temperature", "top_p", "top_k", "stop_sequences", "thinking")
#: Anthropic's service tiers (OpenAI's ``default``, ``flex``, ... mean nothing there)
_SERVICE_TIERS = ("auto", "standard_only")
#: Anthropic's temperature range ends here
MAX_TEMPERATURE = 1.0
#: Anthropic's stop reasons under OpenAI's finish reasons
STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "max_tokens": "length",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "pause_turn": "stop",  # a server tool paused a long turn: send the answer back to go on
    "refusal": "content_filter",
    "model_context_window_exceeded": "length",
}
#: stop reasons that OpenAI's word says all of; the others are kept in meta as ``stop_reason``
_PLAIN_STOPS = ("end_turn", "max_tokens", "tool_use")
#: the refusal a ``refusal`` stop reports when Anthropic gives no explanation
REFUSAL = "The model declined to answer."


# -- the request's shapes ------------------------------------------------------------


class TextBlock(TypedDict, total=False):
    type: Required[Literal["text"]]
    text: Required[str]
    cache_control: dict[str, Any]


class ImageSource(TypedDict, total=False):
    type: Required[Literal["base64", "url"]]
    media_type: str  # base64
    data: str  # base64
    url: str  # url


class ImageBlock(TypedDict, total=False):
    type: Required[Literal["image"]]
    source: Required[ImageSource]
    cache_control: dict[str, Any]


class ToolUseBlock(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(TypedDict, total=False):
    type: Required[Literal["tool_result"]]
    tool_use_id: Required[str]
    content: str | list[Block]


#: a block of a message; other block types (``document``, ...) pass as they came
Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | dict[str, Any]


class Message(TypedDict):
    role: str
    content: str | list[Block]


class Tool(TypedDict, total=False):
    name: Required[str]
    description: str
    input_schema: Required[dict[str, Any]]
    cache_control: dict[str, Any]


class AnthropicProvider(HTTPProvider):
    kind = "anthropic"
    #: OpenAI's text and image parts (translated), and Anthropic's own blocks
    content_parts = frozenset({"text", "image_url", "image", "document"})

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
        system, messages = _conversation(request.messages)
        params = request.params
        body: dict[str, Any] = {k: params[k] for k in _PASSED if k in params}
        self.clamp_temperature(body, MAX_TEMPERATURE)
        if params.get("service_tier") in _SERVICE_TIERS:
            body["service_tier"] = params["service_tier"]
        stop = params.get("stop")
        if "stop_sequences" not in body and stop:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        if (user_id := _user_id(params)) is not None:
            body["metadata"] = {"user_id": user_id}
        tools = params.get("tools")
        if isinstance(tools, list) and tools:
            body["tools"] = [_tool(t) for t in tools if isinstance(t, dict)]
            choice = _tool_choice(params.get("tool_choice"), params.get("parallel_tool_calls"))
            if choice is not None:
                body["tool_choice"] = choice
        max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or self.max_tokens
        body.update(model=request.model, messages=messages, max_tokens=max_tokens, stream=request.stream)
        if system:
            body["system"] = system
        return body

    def parser(self) -> StreamParser:
        return _EventParser(self)

    def whole(self, answer: Any) -> Chunk:
        """A ``message`` object (asked for, or from a server that ignored ``stream: true``):
        read as its events would be."""
        if not isinstance(answer, dict) or answer.get("type") != "message":
            raise UpstreamProtocolError(f"provider {self.name!r} answered JSON that is not a message")
        parser = _EventParser(self)
        chunks = [parser.take(event) for event in _events_of(answer)]
        return _joined([c for c in chunks if c is not None])


# -- outbound -------------------------------------------------------------------------


def _conversation(messages: list[dict[str, Any]]) -> tuple[str | list[Block], list[Message]]:
    """The ``system`` field and the ``messages`` of an OpenAI-style conversation."""
    system: list[Block] = []
    system_texts: list[str] = []
    out: list[Message] = []
    results: list[Block] | None = None  # the tool results being gathered into one user message
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if isinstance(content, list):
                system += _blocks(content)
            elif content:
                system_texts.append(str(content))
                system.append(TextBlock(type="text", text=str(content)))
            continue
        if role == "tool":
            block = ToolResultBlock(type="tool_result", tool_use_id=str(message.get("tool_call_id") or ""))
            if isinstance(content, list):
                block["content"] = _blocks(content)
            elif content is not None:
                block["content"] = str(content)
            if results is None:
                results = []
                out.append(Message(role="user", content=results))
            results.append(block)
            continue
        results = None
        if role == "assistant" and message.get("tool_calls"):
            out.append(Message(role="assistant", content=_assistant_blocks(content, message["tool_calls"])))
        else:  # user, assistant, and roles Anthropic will judge itself
            out.append(Message(role=str(role), content=content if isinstance(content, str) else (
                _blocks(content) if isinstance(content, list) else "")))
    if len(system_texts) == len(system):  # all plain strings: the simplest form
        return "\n\n".join(system_texts), out
    return system, out


def _blocks(parts: list[Any]) -> list[Block]:
    """OpenAI content parts as Anthropic blocks; a part of another kind passes as it came."""
    blocks: list[Block] = []
    for part in parts:
        if isinstance(part, str):
            blocks.append(TextBlock(type="text", text=part))
        elif not isinstance(part, dict):
            continue
        elif part.get("type") == "text":
            text = TextBlock(type="text", text=str(part.get("text") or ""))
            if isinstance(part.get("cache_control"), dict):
                text["cache_control"] = part["cache_control"]
            blocks.append(text)
        elif part.get("type") == "image_url":
            blocks.append(_image(part))
        else:
            blocks.append(part)
    return blocks


def _image(part: dict[str, Any]) -> ImageBlock:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise BadRequest("an image_url part needs image_url.url", param="messages")
    block: ImageBlock
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not media_type:
            raise BadRequest("an image data: URL must be base64, like data:image/png;base64,...",
                             param="messages")
        block = ImageBlock(type="image", source=ImageSource(type="base64", media_type=media_type, data=data))
    else:
        block = ImageBlock(type="image", source=ImageSource(type="url", url=url))
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _assistant_blocks(content: Any, calls: Any) -> list[Block]:
    blocks: list[Block] = []
    if isinstance(content, str) and content:
        blocks.append(TextBlock(type="text", text=content))
    elif isinstance(content, list):
        blocks += _blocks(content)
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        function = object_of(call.get("function"))
        blocks.append(ToolUseBlock(type="tool_use", id=str(call.get("id") or ""), name=str(function.get("name") or ""),
                                   input=_arguments(function.get("arguments"))))
    return blocks


def _arguments(raw: Any) -> dict[str, Any]:
    """A tool call's ``arguments`` (JSON text) as the object Anthropic wants for ``input``."""
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    try:
        value = orjson.loads(raw) if isinstance(raw, str | bytes) else None
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadRequest("a tool call's arguments must be a JSON object to send to Anthropic", param="messages")
    return value


def _tool(tool: dict[str, Any]) -> Tool | dict[str, Any]:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        return tool  # Anthropic's own shape (or a server tool): as it came
    schema = function.get("parameters")
    out = Tool(name=str(function.get("name") or ""),
               input_schema=schema if isinstance(schema, dict) else {"type": "object", "properties": {}})
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    if isinstance(tool.get("cache_control"), dict):
        out["cache_control"] = tool["cache_control"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice == "none":
        return {"type": "none"}  # nothing to run in parallel
    if choice == "required":
        result = {"type": "any"}
    elif choice == "auto":
        result = {"type": "auto"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        result = {"type": "tool", "name": str(object_of(choice.get("function")).get("name") or "")}
    elif isinstance(choice, dict):
        result = dict(choice)  # Anthropic's own shape
    else:
        result = None
    if parallel is False:
        result = result or {"type": "auto"}
        if result.get("type") != "none":
            result["disable_parallel_tool_use"] = True
    return result


def _user_id(params: dict[str, Any]) -> str | None:
    metadata = params.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str) and user_id:
        return user_id
    user = params.get("user")
    return user if isinstance(user, str) and user else None


# -- inbound --------------------------------------------------------------------------


class _EventParser(StreamParser):
    __slots__ = ("_provider", "_usage", "_stop", "_citations", "_signatures", "_redacted", "_tools", "done")

    def __init__(self, provider: AnthropicProvider) -> None:
        self._provider = provider
        self._usage: dict[str, Any] = {}
        self._stop: str | None = None
        self._citations: list[Any] = []
        self._signatures: list[str] = []
        self._redacted: list[str] = []
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self.done = False

    def feed(self, event: str, data: bytes) -> Chunk | None:
        return self.take(self.json_object(self._provider.name, data), event)

    def take(self, obj: dict[str, Any], event: str = "") -> Chunk | None:
        """The chunk one parsed event carries, if any."""
        kind = obj.get("type") or event
        if kind == "content_block_delta":
            return self._delta(obj.get("index"), object_of(obj.get("delta")))
        if kind == "content_block_start":
            return self._start(obj.get("index"), object_of(obj.get("content_block")))
        if kind == "message_start":
            self._take_usage(object_of(obj.get("message")).get("usage"))
            return None
        if kind == "message_delta":
            self._take_usage(obj.get("usage"))
            return self._stopped(object_of(obj.get("delta")))
        if kind == "message_stop":
            self.done = True
            return None
        if kind == "error":
            raise _event_error(self._provider, object_of(obj.get("error")))
        return None  # ping, content_block_stop, and event types added later

    def _start(self, index: Any, block: dict[str, Any]) -> Chunk | None:
        kind = block.get("type")
        if kind == "text":  # its text, if any, is the first piece
            return self._delta(index, {"type": "text_delta", "text": block.get("text")})
        if kind == "thinking":
            thinking = block.get("thinking")
            return self._signed(block.get("signature"), reasoning=thinking if isinstance(thinking, str) else "")
        if kind == "redacted_thinking" and isinstance(block.get("data"), str):
            self._redacted.append(block["data"])
            return Chunk(meta={"redacted_thinking": list(self._redacted)})
        if kind == "tool_use" and isinstance(index, int):
            call = self._tools[index] = len(self._tools)
            given = block.get("input")
            arguments = orjson.dumps(given).decode() if isinstance(given, dict) and given else ""
            piece: ToolCallDelta = {"index": call, "id": str(block.get("id") or ""), "type": "function",
                                    "function": {"name": str(block.get("name") or ""), "arguments": arguments}}
            return Chunk(tool_calls=[piece])
        return None  # server tools' blocks (web search, ...): not the client's to run

    def _delta(self, index: Any, delta: dict[str, Any]) -> Chunk | None:
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return Chunk(text=text) if isinstance(text, str) and text else None
        if kind == "thinking_delta":
            thinking = delta.get("thinking")
            return Chunk(reasoning=thinking) if isinstance(thinking, str) and thinking else None
        if kind == "signature_delta":
            return self._signed(delta.get("signature"))
        if kind == "input_json_delta":
            call = self._tools.get(index) if isinstance(index, int) else None
            partial = delta.get("partial_json")
            if call is None or not isinstance(partial, str) or not partial:
                return None
            return Chunk(tool_calls=[{"index": call, "function": {"arguments": partial}}])
        if kind == "citations_delta" and "citation" in delta:
            self._citations.append(delta["citation"])
            return Chunk(meta={"citations": list(self._citations)})
        return None

    def _signed(self, signature: Any, *, reasoning: str = "") -> Chunk | None:
        """A thinking block's signature (needed to send the thinking back) kept in meta."""
        meta = None
        if isinstance(signature, str) and signature:
            self._signatures.append(signature)
            meta = {"thinking_signatures": list(self._signatures)}
        return Chunk(reasoning=reasoning, meta=meta) if reasoning or meta else None

    def _stopped(self, delta: dict[str, Any]) -> Chunk:
        stop = delta.get("stop_reason")
        if not isinstance(stop, str) or not stop:
            return Chunk(usage=self.usage())
        self._stop = stop
        finish = STOP_REASONS.get(stop, "stop")
        meta: dict[str, Any] = {"finish_reason": finish}
        if stop not in _PLAIN_STOPS:
            meta["stop_reason"] = stop
        if isinstance(delta.get("stop_sequence"), str):
            meta["stop_sequence"] = delta["stop_sequence"]
        refusal = ""
        if stop == "refusal":
            details = delta.get("stop_details")
            explanation = details.get("explanation") if isinstance(details, dict) else None
            refusal = explanation if isinstance(explanation, str) and explanation else REFUSAL
            if isinstance(details, dict):
                meta["stop_details"] = details
        return Chunk(refusal=refusal, usage=self.usage(), meta=meta, finish_reason=finish)

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


def _events_of(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The stream events that would have carried a whole ``message``."""
    yield {"type": "message_start", "message": {**message, "content": []}}
    content = message.get("content")
    for i, block in enumerate(content if isinstance(content, list) else ()):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            yield {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}
            yield {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta",
                                                                        "text": block.get("text")}}
            for citation in block.get("citations") or ():
                yield {"type": "content_block_delta", "index": i, "delta": {"type": "citations_delta",
                                                                            "citation": citation}}
        elif kind == "thinking":
            yield {"type": "content_block_start", "index": i, "content_block": {"type": "thinking", "thinking": ""}}
            yield {"type": "content_block_delta", "index": i, "delta": {"type": "thinking_delta",
                                                                        "thinking": block.get("thinking")}}
            yield {"type": "content_block_delta", "index": i, "delta": {"type": "signature_delta",
                                                                        "signature": block.get("signature")}}
        elif kind == "tool_use":
            yield {"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}}
            arguments = orjson.dumps(block.get("input") or {}).decode()
            yield {"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta",
                                                                        "partial_json": arguments}}
        else:
            yield {"type": "content_block_start", "index": i, "content_block": block}
    yield {"type": "message_delta", "delta": {k: message.get(k) for k in ("stop_reason", "stop_sequence",
                                                                         "stop_details")}, "usage": {}}


def _joined(chunks: list[Chunk]) -> Chunk:
    """One chunk saying what ``chunks`` say in turn: texts appended, each tool call whole."""
    whole = Chunk()
    calls: dict[int, ToolCallDelta] = {}
    for chunk in chunks:
        whole.text += chunk.text
        whole.reasoning += chunk.reasoning
        whole.refusal += chunk.refusal
        for piece in chunk.tool_calls:
            call = calls.get(piece["index"])
            if call is None:
                calls[piece["index"]] = {**piece, "function": {**piece.get("function", {})}}
            else:
                function = call.setdefault("function", {})
                function["arguments"] = function.get("arguments", "") + piece.get("function", {}).get("arguments", "")
        if chunk.meta:
            whole.meta = {**(whole.meta or {}), **chunk.meta}
        whole.usage = chunk.usage or whole.usage
        whole.finish_reason = chunk.finish_reason or whole.finish_reason
    whole.tool_calls = [calls[i] for i in sorted(calls)]
    return whole


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
