"""OpenAI's wire format for ``/v1`` answers: the objects a flight is rendered as.

No HTTP here: :mod:`server.routes.openai_compat` parses requests and writes
these objects. ``chat.completion`` (a whole answer), ``chat.completion.chunk``
(a streamed one: only ``data:`` lines, ``[DONE]`` at the end) and the
``{"error": {"message", "type", "param", "code"}}`` body.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError
from ..eventlog import Delta
from ..flight import Flight
from ..store import epoch_seconds

__all__ = ["DONE", "Completion", "answer_extras", "answer_finish_reason", "answer_usage", "delta_object",
           "error_body", "frame"]

#: vendor extras kept beside the text that OpenAI-style clients know how to read
EXTRAS = ("citations", "search_results")


def error_body(error: GatewayError) -> dict[str, Any]:
    if error.status == 429:
        kind = "rate_limit_error"
    elif error.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    body: dict[str, Any] = {"message": error.message, "type": kind, "param": error.param, "code": error.type}
    if error.retry_after is not None:
        body["retry_after"] = error.retry_after
    if error.limit is not None:
        body["limit"] = error.limit
    return {"error": body}



def answer_usage(flight: Flight) -> dict[str, Any]:
    usage = dict(flight.usage or {})
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    usage.setdefault("total_tokens", prompt + completion)
    return {**usage, "prompt_tokens": prompt, "completion_tokens": completion}


def _meta(flight: Flight) -> dict[str, Any]:
    return flight.message["meta"] if flight.message else {}


def answer_finish_reason(flight: Flight) -> str:
    """What ended the answer, in OpenAI's words, as the flight kept it in the message meta
    (``length``, ``tool_calls``, ``content_filter``...)."""
    meta = _meta(flight)
    reason = meta.get("finish_reason")
    if isinstance(reason, str) and reason:
        return reason
    return "tool_calls" if meta.get("tool_calls") else "stop"


def delta_object(delta: Delta) -> dict[str, Any]:
    """One log delta as a chunk's ``delta``: its text, reasoning, refusal and tool-call pieces."""
    out: dict[str, Any] = {"content": delta.text} if delta.text else {}
    extra = delta.extra
    if extra:
        if "reasoning" in extra:
            out["reasoning_content"] = extra["reasoning"]
        if "refusal" in extra:
            out["refusal"] = extra["refusal"]
        if "tool_calls" in extra:
            out["tool_calls"] = extra["tool_calls"]
    return out


def _message(text: str, flight: Flight) -> dict[str, Any]:
    """The assistant ``message`` of a whole answer; ``content`` is null when the answer is
    only tool calls or a refusal."""
    meta = _meta(flight)
    refusal = meta.get("refusal") or None
    calls = meta.get("tool_calls") or None
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls or refusal else ""),
                               "refusal": refusal}
    if meta.get("reasoning"):
        message["reasoning_content"] = meta["reasoning"]
    if calls:
        message["tool_calls"] = calls
    return message


def answer_extras(flight: Flight) -> dict[str, Any]:
    meta = flight.message["meta"] if flight.message else {}
    return {k: meta[k] for k in EXTRAS if k in meta}


def frame(data: Any) -> bytes:
    """One SSE event: a single ``data:`` line (orjson never emits newlines)."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


class Completion:
    """The id, created and model that every object of one response shares.

    The id comes from the flight's assistant message, so coalesced clients see
    the same completion id (and with ``x-thread-id`` it names the stored row).
    """

    __slots__ = ("_head", "created", "id", "model")

    def __init__(self, *, flight: Flight, model: str) -> None:
        self.id = "chatcmpl-" + flight.stream_id.removeprefix("msg_")
        self.created = epoch_seconds(flight.created_at)
        self.model = model
        self._head: bytes | None = None

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extras: Any) -> bytes:
        if finish_reason is None and not extras:
            # the common chunk: what every chunk of the response shares is encoded once, the
            # same bytes orjson writes for the whole object
            if self._head is None:
                self._head = (b'data: {"id":' + orjson.dumps(self.id)
                              + b',"object":"chat.completion.chunk","created":' + orjson.dumps(self.created)
                              + b',"model":' + orjson.dumps(self.model)
                              + b',"system_fingerprint":null,"choices":[{"index":0,"delta":')
            return self._head + orjson.dumps(delta) + _CHUNK_TAIL
        return frame({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extras,
        })

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        return frame({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": None, "choices": [], "usage": usage,
        })

    def completion(self, text: str, flight: Flight) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": _message(text, flight),
                         "logprobs": None, "finish_reason": answer_finish_reason(flight)}],
            "usage": answer_usage(flight),
            **answer_extras(flight),
        }


DONE = b"data: [DONE]\n\n"
#: what follows the delta in a chunk without a finish reason
_CHUNK_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'
