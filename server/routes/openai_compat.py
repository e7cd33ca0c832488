"""``/v1``: OpenAI's chat completions and models API, so the official SDKs work unchanged.

Point a client at ``base_url=http://host:8000/v1`` and its requests become
flights of the hub like any other: identical concurrent requests share one
upstream call, and every subscriber replays the answer from its first token.

- **Models** are named ``provider/model`` (``mock/mock``, ``perplexity/sonar``);
  a name whose prefix is not a provider goes to the default provider as it is,
  so ``meta-llama/Llama-3-8b`` still reaches a vLLM default.
- **Org**: as on ``/api`` (:func:`._http.require_org`): with ``DAC_AUTH=keys``
  the bearer key names it. With ``header``, ``x-org-id`` or ``default``; but
  when ``DAC_API_KEYS`` is set, ``Authorization: Bearer <key>`` must be one of
  them and the org is ``key_`` plus the first 16 hex digits of the key's sha256.
- **Coalesce key**: the turn service's policy (:mod:`server.turns`): with
  ``x-thread-id``, the same key as ``/api`` (org, thread, provider, model, the
  new user message, plus the sampling parameters), so the two surfaces share a
  flight; stateless, the whole normalised conversation and parameters;
  ``Idempotency-Key`` replaces it. Requests with ``tools`` or ``functions``
  never share a flight. A finished answer serves an identical request only
  when ``DAC_V1_RESULT_CACHE`` allows: by default a deterministic one
  (``temperature`` 0, a ``seed``, or an ``Idempotency-Key``).
- **Beside the text**: content parts (images) go upstream, checked per provider
  before anything is written; tool calls, reasoning (``reasoning_content``) and
  refusals come back in OpenAI's shape, one chunk object per upstream chunk.
- **Stateless** unless ``x-thread-id`` names a thread of the org: then the
  last user message and the answer are written to it as one turn.
- **Wire format**: only ``data:`` lines and ``: ping`` comments, never ``id:``,
  ``retry:`` or an empty ``data:`` (the official clients break on them). The
  status line is held back as on ``/api`` (:meth:`server.turns.Lease.hold`):
  until the first token, the end of the flight, or one keep-alive interval,
  so errors before the answer starts (queue full, upstream 429 or 502) leave
  with their own status; an error after that is one ``data: {"error": ...}``
  event, then the end.
- **Errors** anywhere under ``/v1`` (404 and 405 included) leave as
  ``{"error": {"message", "type", "param", "code"}}``; ``code`` is the
  gateway's error type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..appkeys import LIMITS, PROVIDERS, SETTINGS, STORE, TURNS
from ..errors import BadRequest, GatewayError, NotFound
from ..flight import Flight, TurnRequest
from ..providers import Provider, ProviderRegistry, content_part
from ..turns import Lease, Surface, Until
from ._http import Config, json_response, open_sse, read_json, require_org
from ._input import header_text
from .openai_wire import (
    DONE,
    Completion,
    answer_extras,
    answer_finish_reason,
    answer_usage,
    delta_object,
    error_body,
    frame,
)

__all__ = ["setup"]

#: the org of requests that name none (no keys configured, no ``x-org-id``)
DEFAULT_ORG = "default"
#: response header telling how the request was served: leader, follower or cache
COALESCE_HEADER = "x-dac-coalesce"
#: request body fields the gateway handles itself; every other field goes upstream as a parameter
OWN_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n"})
#: message roles accepted, and what they become upstream (``developer`` is OpenAI's new ``system``)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool", "function": "function"}
#: message fields kept beside role and content, for tool-calling conversations
TOOL_FIELDS = ("name", "tool_calls", "tool_call_id", "function_call")
#: sampling parameters checked here, so bad values never reach a provider: name -> (low, high)
RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0),
          "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}


#: when the surface started; the ``created`` of listed models
STARTED = web.AppKey("v1_started", int)
#: the paths of this surface: their errors, 404 and 405 included, leave in OpenAI's shape
PREFIX = "/v1"


# -- errors -------------------------------------------------------------------


def error_response(error: GatewayError) -> web.Response:
    """Every error under /v1 leaves in OpenAI's shape, routing errors included; it is counted
    by the gateway's type (the body's ``type`` is OpenAI's). The app's error middleware
    renders with this under :data:`PREFIX`."""
    return json_response(error_body(error), status=error.status)


# -- who is asking ------------------------------------------------------------


async def _org(request: web.Request, cfg: Config | None = None) -> str:
    return await require_org(request, default=DEFAULT_ORG, env_keys=True, cfg=cfg)


def _resolve_model(providers: ProviderRegistry, name: str, default: str) -> tuple[Provider, str]:
    """``provider/model`` -> (provider, model); a name without a known prefix goes to the default."""
    prefix, sep, rest = name.partition("/")
    if sep and prefix in providers:
        provider_name, model = prefix, rest
    else:
        provider_name, model = default, name
    if not model:
        raise BadRequest(f"model {name!r} names no model after the provider", param="model")
    try:
        provider = providers.get(provider_name)
    except BadRequest as exc:
        if exc.type != "invalid_request":  # known but not configured: that message names the variable
            raise
        raise NotFound(f"the model {name!r} does not exist: {exc.message}",
                       type="model_not_found", param="model") from None
    try:
        provider.validate_model(model)
    except BadRequest as exc:
        raise NotFound(f"the model {name!r} does not exist: {exc.message}",
                       type="model_not_found", param="model") from None
    return provider, model


# -- the request body -----------------------------------------------------------


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or its parts. Text parts alone (no more than
    ``type`` and ``text``) become one string, as every provider takes it."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [content_part(part, f"{where}[{i}]") for i, part in enumerate(content)]
        if all(p["type"] == "text" and p.keys() == {"type", "text"} for p in parts):
            return "\n".join(p["text"] for p in parts)
        return parts
    raise BadRequest(f"{where} must be a string or an array of content parts", param=where)


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a content: the string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def _messages(raw: Any) -> list[dict[str, Any]]:
    """The conversation, normalised: ``{"role", "content"}`` plus tool-call fields."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' is required: a non-empty array of messages", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(raw):
        if type(message) is dict and len(message) == 2 and type(message.get("content")) is str:
            role = message.get("role")
            if type(role) is str and role in ROLES and role != "tool":  # the common message: a role and its text, nothing else
                out.append({"role": ROLES[role], "content": message["content"]})
                continue
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # (an array or object cannot be looked up)
            raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}",
                             param=f"{where}.role")
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise BadRequest(f"{where}.tool_calls must be an array on an assistant message",
                             param=f"{where}.tool_calls")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise BadRequest(f"{where}.tool_call_id is required: the id of the call it answers",
                             param=f"{where}.tool_call_id")
        normal: dict[str, Any] = {"role": ROLES[role]}
        # an assistant turn that only calls tools has no content
        if content is None and role == "assistant" and (calls or message.get("function_call")):
            normal["content"] = None
        else:
            normal["content"] = _content(content, f"{where}.content")
        normal.update((k, message[k]) for k in TOOL_FIELDS if message.get(k) is not None)
        out.append(normal)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _params(body: dict[str, Any]) -> dict[str, Any]:
    """What goes upstream beside the messages; absent and null are the same."""
    params = {k: v for k, v in body.items() if k not in OWN_FIELDS and v is not None}
    if not params:
        return params
    for name, (low, high) in RANGES.items():
        if name in params:
            value = params[name]
            if not _is_number(value) or not low <= value <= high:
                raise BadRequest(f"'{name}' must be a number from {low:g} to {high:g}", param=name)
            params[name] = float(value)  # 1 and 1.0 ask for the same thing
    for name in ("max_tokens", "max_completion_tokens"):
        if name in params and (not isinstance(params[name], int) or isinstance(params[name], bool)
                               or params[name] < 1):
            raise BadRequest(f"'{name}' must be a whole number of at least 1", param=name)
    if "seed" in params and (not isinstance(params["seed"], int) or isinstance(params["seed"], bool)):
        raise BadRequest("'seed' must be a whole number", param="seed")
    if "stop" in params:
        stop = params["stop"]
        if not (isinstance(stop, str) or isinstance(stop, list) and len(stop) <= 4
                and all(isinstance(s, str) for s in stop)):
            raise BadRequest("'stop' must be a string or an array of up to 4 strings", param="stop")
    for name in ("tools", "functions"):
        if name in params and not isinstance(params[name], list):
            raise BadRequest(f"'{name}' must be an array", param=name)
    if params.get("logprobs") or params.get("top_logprobs"):
        raise BadRequest("logprobs are not supported by this gateway", param="logprobs")
    params.pop("logprobs", None)
    params.pop("top_logprobs", None)
    return params


@dataclass(slots=True, kw_only=True)
class _Call:
    """One parsed /v1/chat/completions request."""

    turn: TurnRequest
    model: str  # as the client named it; echoed in every response
    stream: bool
    include_usage: bool


async def _parse(request: web.Request, org: str, cfg: Config) -> _Call:
    settings = cfg[SETTINGS]
    body = await read_json(request, settings)
    model_name = body.get("model")
    if not isinstance(model_name, str) or not model_name.strip():
        raise BadRequest("'model' is required: a string such as 'mock/mock'", param="model")
    messages = _messages(body.get("messages"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be true or false", param="stream_options")
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise BadRequest("'n' must be 1: this gateway answers with one choice", param="n")
    params = _params(body)
    provider, model = _resolve_model(cfg[PROVIDERS], model_name.strip(), settings.default_provider)

    users = [m["content"] for m in messages if m["role"] == "user"]
    last = users[-1] if users else ""
    content = _text_of(last)
    thread_id = header_text(request, "x-thread-id") or None
    if thread_id is not None:
        if not users:
            raise BadRequest("with x-thread-id the messages must hold a user message to write to the thread",
                             param="messages")
        if await cfg[STORE].get_thread(org, thread_id) is None:
            raise NotFound("thread not found (x-thread-id)", param="x-thread-id")

    idempotency_key = header_text(request, "Idempotency-Key")
    policy = _reusable(settings.v1_result_cache, params, idempotency_key)
    # the policy reads only what a stateless key holds (the parameters, the Idempotency-Key): an
    # answer it leaves out has a key that no request it lets in can share (a thread's key is /api's too)
    reusable = policy or thread_id is not None
    turn = cfg[TURNS].turn(
        surface=Surface.V1, org_id=org, thread_id=thread_id, content=content, provider=provider, model=model,
        streaming=bool(stream), messages=messages, params=params,
        shareable=not params.get("tools") and not params.get("functions"),
        idempotency_key=idempotency_key,
        no_cache="no-cache" in request.headers.get("Cache-Control", "").lower() or not policy,
        reusable=reusable,
        attachments=[p for p in last if p.get("type") != "text"] if isinstance(last, list) else None,
    )
    return _Call(turn=turn, model=model_name, stream=bool(stream), include_usage=include_usage)


def _reusable(policy: str, params: dict[str, Any], idempotency_key: str | None) -> bool:
    """Whether a finished answer may serve this request (``DAC_V1_RESULT_CACHE``): with
    ``deterministic``, only a request that asks for the same answer again does:
    ``temperature`` 0, a ``seed``, or an ``Idempotency-Key``."""
    if policy == "always":
        return True
    if policy == "off":
        return False
    return params.get("temperature") == 0 or "seed" in params or bool(idempotency_key)




#: the delta of the first chunk of every streamed answer
ROLE_DELTA = {"role": "assistant", "content": "", "refusal": None}


async def _stream(request: web.Request, lease: Lease, call: _Call) -> web.StreamResponse:
    """Write the flight as chunk objects, one per upstream chunk (a replay keeps the
    original chunking); whatever arrived since the last write goes in one write.

    The first write (it carries the status line) and any catching up are awaited
    writes; at the live edge the log writes the chunks itself, straight from its
    append (:meth:`Lease.push`), and this handler sleeps until the end, or until
    its client fell behind (its transport paused): then it catches up again from
    where the pushes stopped.
    """
    flight = lease.flight
    log_ = flight.log
    answer = Completion(flight=flight, model=call.model)

    def encode(cursor: int) -> bytes:
        deltas, _, finished = log_.deltas(cursor)
        frames = [answer.chunk(delta) for d in deltas if (delta := delta_object(d))]
        if finished:
            frames.extend(_ending(answer, flight, call))
        return b"".join(frames)

    stream = await open_sse(request, headers={COALESCE_HEADER: lease.role})
    async with stream:  # stops the keep-alive pings however the stream ends
        frames = [answer.chunk(ROLE_DELTA)]
        cursor: int | None = 1
        while cursor is not None and cursor > 0:
            deltas, cursor, finished = lease.take(cursor)
            frames.extend(answer.chunk(delta) for d in deltas if (delta := delta_object(d)))
            if finished:
                frames.extend(_ending(answer, flight, call))
            if frames:
                await stream.write(b"".join(frames))
                frames = []
            if finished:
                break
            cursor = await lease.push(stream, encode, cursor)
    return stream.response


def _ending(answer: Completion, flight: Flight, call: _Call) -> list[bytes]:
    """The frames after the last text: an error event, or the finish (and usage) and [DONE]."""
    if flight.error is not None:
        return [frame(error_body(flight.error))]
    frames = [answer.chunk({}, answer_finish_reason(flight), **answer_extras(flight))]
    if call.include_usage:
        frames.append(answer.usage_chunk(answer_usage(flight)))
    frames.append(DONE)
    return frames


# -- handlers -------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    # the app's own mapping: every route is on the one app (no sub-application), where
    # ``request.config_dict`` would build a chained view to read through
    cfg = request.app
    org = await _org(request, cfg)
    cfg[LIMITS].admit(org)
    call = await _parse(request, org, cfg)
    mode = "sse" if call.stream else "json"
    async with cfg[TURNS].lease(call.turn, route="v1", mode=mode, started=started) as lease:
        if call.stream:
            await lease.hold(Until.FIRST_TEXT)
            return await _stream(request, lease, call)
        message = await lease.result()
        answer = Completion(flight=lease.flight, model=call.model)
        return json_response(answer.completion(message["content"], lease.flight),
                             headers={COALESCE_HEADER: lease.role})


def _model_object(name: str, owner: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    await _org(request)
    created = request.app[STARTED]
    data = [
        _model_object(f"{provider.name}/{model}", provider.name, created)
        for provider in request.config_dict[PROVIDERS]
        # a local server (key optional) is listed once it has answered: a call, or the probe at start
        if provider.configured() and (provider.answered or not provider.local)
        for model in provider.models()
    ]
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    await _org(request)
    name = request.match_info["model"]
    settings = request.config_dict[SETTINGS]
    provider, _ = _resolve_model(request.config_dict[PROVIDERS], name, settings.default_provider)
    return json_response(_model_object(name, provider.name, request.app[STARTED]))


def setup(app: web.Application) -> None:
    """Add the /v1 routes to ``app`` (not a sub-application: that would cost every request a
    second resolution and middleware chain); :func:`error_response` renders their errors."""
    app[STARTED] = int(time.time())
    app.router.add_post(f"{PREFIX}/chat/completions", chat_completions)
    app.router.add_get(f"{PREFIX}/models", list_models)
    app.router.add_get(PREFIX + "/models/{model:.+}", get_model)
