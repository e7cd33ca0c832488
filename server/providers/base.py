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
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Required, TypedDict

from ..errors import BadRequest

__all__ = [
    "ChatMessage",
    "Chunk",
    "ContentPart",
    "FinishReason",
    "FunctionCall",
    "FunctionCallDelta",
    "ImagePart",
    "ImageURL",
    "Provider",
    "ProviderRequest",
    "TextPart",
    "ToolCall",
    "ToolCallDelta",
    "assemble_tool_calls",
    "content_part",
]

DEFAULT_MAX_CONCURRENCY = 16
#: characters a token stands for when a context window is known only in tokens (on the safe side)
CHARS_PER_TOKEN = 3
#: context windows of well-known models, in tokens (a context budget defaults to these)
KNOWN_CONTEXT_TOKENS: dict[str, int] = {
    "gpt-4o": 128_000, "gpt-4o-mini": 128_000, "gpt-4.1": 1_047_576, "gpt-4.1-mini": 1_047_576,
    "o3-mini": 200_000, "claude-3-5-haiku-latest": 200_000, "claude-3-5-sonnet-latest": 200_000,
    "claude-3-7-sonnet-latest": 200_000, "sonar": 127_072, "sonar-pro": 200_000,
    "llama-3.1-8b-instant": 131_072, "llama3.2": 131_072,
}


# -- what a request carries: OpenAI's chat messages ------------------------------------


class TextPart(TypedDict, total=False):
    type: Required[Literal["text"]]
    text: Required[str]
    #: Anthropic's prompt-caching mark, kept where the adapter can send it
    cache_control: dict[str, Any]


class ImageURL(TypedDict, total=False):
    #: ``data:image/png;base64,...`` or ``https://...``
    url: Required[str]
    detail: Literal["auto", "low", "high"]


class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart
#: where an ``image_url`` part may point
IMAGE_URL_SCHEMES = ("data:", "https://")


def content_part(part: Any, where: str) -> dict[str, Any]:
    """One content part from a client, checked where its shape is known (text,
    ``image_url``); other kinds pass as they came, for the provider to take or
    refuse by name (:meth:`Provider.check_parts`). ``where`` names it in the 400."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise BadRequest(f"{where} must be a content part: an object with a 'type'", param=where)
    kind = part["type"]
    if kind == "text" and not isinstance(part.get("text"), str):
        raise BadRequest(f"{where} is a text part without a string 'text'", param=where)
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str) or not url.startswith(IMAGE_URL_SCHEMES):
            raise BadRequest(f"{where}.image_url.url must be a data: or https:// URL", param=where)
    return part


class FunctionCall(TypedDict):
    name: str
    #: the arguments as a JSON text, as the model wrote them
    arguments: str


class ToolCall(TypedDict):
    """A whole tool call on an assistant message."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(TypedDict, total=False):
    """One message of :attr:`ProviderRequest.messages`, in OpenAI's chat format.

    ``content`` is a string or a list of parts (text; images by ``data:`` or
    ``https`` URL). An assistant message may carry ``tool_calls``; a
    ``role: "tool"`` message answers one of them by ``tool_call_id``.
    """

    role: Required[Literal["system", "developer", "user", "assistant", "tool"]]
    content: str | list[ContentPart] | None
    name: str
    tool_calls: list[ToolCall]
    tool_call_id: str


@dataclass(slots=True, kw_only=True)
class ProviderRequest:
    """What the leader of a flight asks of a provider."""

    model: str
    # The conversation, oldest first, each message shaped like :class:`ChatMessage`
    # (typed loosely: it arrives from clients and the store as plain JSON).
    messages: list[dict[str, Any]]
    # Sampling parameters passed through as they are (temperature, max_tokens, tools, ...).
    params: dict[str, Any] = field(default_factory=dict)
    # Ask the upstream for an event stream (True) or for one whole answer (False: cheaper,
    # for a flight whose leader waits for the whole answer anyway). Either way the
    # provider yields chunks; a whole answer is one.
    stream: bool = True


# -- what an answer is made of --------------------------------------------------------


class FunctionCallDelta(TypedDict, total=False):
    name: str
    arguments: str


class ToolCallDelta(TypedDict, total=False):
    """A piece of a tool call, as OpenAI streams it.

    The first piece of each ``index`` carries ``id``, ``type`` and
    ``function.name`` (and maybe the first ``arguments``); later pieces carry
    only ``index`` and more ``function.arguments``, to be appended.
    """

    index: Required[int]
    id: str
    type: Literal["function"]
    function: FunctionCallDelta


def assemble_tool_calls(pieces: Iterable[ToolCallDelta]) -> list[ToolCall]:
    """Whole tool calls from their pieces, by ``index``: ``id``, ``type`` and the name from
    the first piece of each index, the ``arguments`` of all its pieces appended."""
    calls: dict[int, ToolCall] = {}
    for piece in pieces:
        function = piece.get("function") or FunctionCallDelta()
        call = calls.get(piece["index"])
        if call is None:
            calls[piece["index"]] = ToolCall(id=piece.get("id", ""), type="function", function=FunctionCall(
                name=function.get("name", ""), arguments=function.get("arguments", "")))
        else:
            call["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


#: OpenAI's words for why an answer ended
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


@dataclass(slots=True, kw_only=True)
class Chunk:
    """One piece of an upstream answer, in OpenAI's vocabulary whatever the upstream.

    Any field may be empty. Text-like fields are pieces to append to what
    came before; ``usage`` replaces the previous one; ``meta`` is merged into
    the message's meta (a key replaces the same key).
    """

    #: a piece of the answer's text
    text: str = ""
    #: a piece of the model's reasoning (OpenAI-compatible ``reasoning_content``,
    #: Anthropic's thinking), shown apart from the answer
    reasoning: str = ""
    #: a piece of a refusal (OpenAI's ``delta.refusal``; Anthropic's ``refusal`` stop)
    refusal: str = ""
    #: pieces of tool calls, see :class:`ToolCallDelta`
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    #: set once, on the chunk that ends the answer
    finish_reason: FinishReason | None = None
    # Token usage as the provider reports it (OpenAI's names: prompt_tokens, ...).
    usage: dict[str, Any] | None = None
    # Extras beside the text (Perplexity's citations, Anthropic's thinking signatures,
    # ``finish_reason``), merged into the message's meta.
    meta: dict[str, Any] | None = None

    def has_output(self) -> bool:
        """Whether the model produced something here (what the first-token deadline waits for)."""
        return bool(self.text or self.reasoning or self.refusal or self.tool_calls)


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
    #: content part types (``text``, ``image_url``, ...) this provider takes; None: any,
    #: the upstream judges
    content_parts: frozenset[str] | None = None
    #: a server of one's own whose key is optional (vLLM, Ollama): listed on ``/v1/models``
    #: only once it has answered
    local: bool = False
    #: it has produced output (or answered a probe) since the start
    answered: bool = False
    #: characters of conversation sent upstream at most (0: the model's window when known)
    context_chars: int = 0
    #: the same per model (the providers file's ``model_context_chars``)
    model_context_chars: dict[str, int] = {}  # replaced per instance, never mutated

    def context_budget(self, model: str) -> int:
        """Characters of conversation this provider takes for ``model``; 0 when unknown."""
        if model in self.model_context_chars:
            return self.model_context_chars[model]
        if self.context_chars:
            return self.context_chars
        tokens = KNOWN_CONTEXT_TOKENS.get(model.rpartition("/")[2])
        return tokens * CHARS_PER_TOKEN if tokens else 0

    def configured(self) -> bool:
        """Whether the provider can be called (has its key, say)."""
        return True

    def not_configured_reason(self) -> str:
        return f"provider {self.name!r} is not configured"

    def validate_model(self, model: str) -> None:  # noqa: B027 - optional hook
        """Raise BadRequest for a model this provider can never serve (checked before any row is written)."""

    def check_content(self, messages: Iterable[dict[str, Any]]) -> None:
        """Raise BadRequest naming the first content part of ``messages`` this provider
        cannot take (checked before any row is written)."""
        if self.content_parts is None and type(self).check_parts is Provider.check_parts:
            return  # it takes any part
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, list):
                self.check_parts(content, f"messages[{i}].content")

    def check_parts(self, parts: Iterable[Any], where: str) -> None:
        """Raise BadRequest naming the first of ``parts`` (found at ``where``) this provider cannot take."""
        allowed = self.content_parts
        if allowed is None:
            return
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in allowed:
                raise BadRequest(f"provider {self.name!r} cannot take a {kind!r} content part ({where}[{j}]); "
                                 f"it takes {', '.join(sorted(allowed))}", param=f"{where}[{j}]")

    async def probe(self) -> bool:
        """Ask the upstream whether it is there (a local server at start); True when it answered."""
        return False

    def models(self) -> list[str]:
        """Models to list on ``GET /v1/models``."""
        return [self.default_model] if self.default_model else []

    @abc.abstractmethod
    def stream(self, request: ProviderRequest) -> AsyncGenerator[Chunk, None]:
        """Yield the answer chunk by chunk (an async generator); raise UpstreamError subclasses."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the provider holds (called once at shutdown)."""
