"""Which providers exist: the built-in names, and more from a TOML file.

Built-ins need no file; each reads its key from ``<NAME>_API_KEY`` and lets
``<NAME>_BASE_URL`` replace its base URL (OpenAI-compatible URLs include the
version path, as with the official SDK's ``OPENAI_BASE_URL``; Anthropic's do
not, as with ``ANTHROPIC_BASE_URL``):

============  ==========  ===================================  ==============
name          kind        base URL                             key
============  ==========  ===================================  ==============
openai        openai      https://api.openai.com/v1            required
perplexity    openai      https://api.perplexity.ai            required
groq          openai      https://api.groq.com/openai/v1       required
together      openai      https://api.together.xyz/v1          required
openrouter    openai      https://openrouter.ai/api/v1         required
vllm          openai      http://127.0.0.1:8000/v1             optional
ollama        openai      http://127.0.0.1:11434/v1            optional
anthropic     anthropic   https://api.anthropic.com            required
============  ==========  ===================================  ==============

The file (``DAC_PROVIDERS_FILE``) declares more, or changes a built-in::

    [[providers]]
    name = "local"                      # what requests put in "provider"
    kind = "openai"                     # openai | anthropic | mock
    base_url = "http://127.0.0.1:9000/v1"
    api_key_env = ""                    # the variable holding the key; "" = no key
    max_concurrency = 4                 # upstream calls at once (default 16)
    default_model = "llama3"
    models = ["llama3", "qwen2.5"]      # listed on GET /v1/models
    timeouts = { connect = 5, first_token = 30, idle = 30, total = 300 }   # seconds
    headers = { "HTTP-Referer" = "https://example.org" }                     # sent upstream
    # max_tokens = 4096                 # anthropic: when the request sets none
    # meta_keys = ["citations"]         # openai: chunk fields kept in the message's meta
    # stream_options = false            # openai: never send stream_options (servers that refuse it)
    # max_temperature = 1.0             # a higher temperature is sent as this (anthropic: at most 1)
    # context_chars = 200000            # conversation characters sent upstream at most (oldest turns dropped)
    # model_context_chars = { "llama3" = 24000 }   # the same per model

An entry named like a built-in starts from the built-in's values. Unknown
fields, wrong types and duplicate names stop the start with a message naming
the file, the entry and the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from ..config import Settings, is_loopback
from .base import DEFAULT_MAX_CONCURRENCY
from .openai import DEFAULT_META_KEYS
from .upstream import Timeouts

__all__ = ["BUILTINS", "KINDS", "ProviderSpec", "ProviderConfigError", "env_prefix", "load_file", "resolve"]

KINDS = ("openai", "anthropic", "mock")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS = {"name", "kind", "base_url", "api_key_env", "max_concurrency", "timeouts", "default_model",
           "models", "headers", "max_tokens", "meta_keys", "stream_options", "max_temperature",
           "context_chars", "model_context_chars"}
_TIMEOUTS = ("connect", "first_token", "idle", "total")


class ProviderConfigError(ValueError):
    """The providers cannot be set up; the message names the variable, or the file, entry and field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSpec:
    """One provider as declared; :func:`resolve` fills in the environment."""

    name: str
    kind: str
    base_url: str = ""
    #: the variable holding the key; None when the provider takes none
    api_key_env: str | None = None
    key_required: bool = True
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeouts: Timeouts = field(default_factory=Timeouts)
    default_model: str = ""
    models: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    max_tokens: int | None = None
    meta_keys: tuple[str, ...] = DEFAULT_META_KEYS
    #: openai: whether ``stream_options.include_usage`` is sent
    stream_options: bool = True
    #: a temperature above this is sent as this
    max_temperature: float | None = None
    #: conversation characters sent upstream at most (0: the model's window when known)
    context_chars: int = 0
    model_context_chars: Mapping[str, int] = field(default_factory=dict)
    #: whether base_url came from the file (then ``<NAME>_BASE_URL`` does not replace it)
    fixed_url: bool = False


def env_prefix(name: str) -> str:
    """``perplexity`` -> ``PERPLEXITY``, ``my-llm.local`` -> ``MY_LLM_LOCAL``."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def _builtin(name: str, kind: str, base_url: str, default_model: str, *, key_required: bool = True) -> ProviderSpec:
    return ProviderSpec(name=name, kind=kind, base_url=base_url, api_key_env=f"{env_prefix(name)}_API_KEY",
                        key_required=key_required, default_model=default_model)


BUILTINS: tuple[ProviderSpec, ...] = (
    _builtin("openai", "openai", "https://api.openai.com/v1", "gpt-4o-mini"),
    _builtin("perplexity", "openai", "https://api.perplexity.ai", "sonar"),
    _builtin("groq", "openai", "https://api.groq.com/openai/v1", "llama-3.1-8b-instant"),
    _builtin("together", "openai", "https://api.together.xyz/v1", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    _builtin("openrouter", "openai", "https://openrouter.ai/api/v1", "openai/gpt-4o-mini"),
    _builtin("vllm", "openai", "http://127.0.0.1:8000/v1", "", key_required=False),
    _builtin("ollama", "openai", "http://127.0.0.1:11434/v1", "llama3.2", key_required=False),
    _builtin("anthropic", "anthropic", "https://api.anthropic.com", "claude-3-5-haiku-latest"),
)


# -- the file -------------------------------------------------------------------


def load_file(path: str, *, base: Mapping[str, ProviderSpec] | None = None) -> list[ProviderSpec]:
    """The providers a TOML file declares; entries named like ``base`` ones start from them."""
    import tomllib  # only a server with a providers file needs the parser

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ProviderConfigError(f"DAC_PROVIDERS_FILE {path}: no such file") from None
    except OSError as exc:
        raise ProviderConfigError(f"DAC_PROVIDERS_FILE {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProviderConfigError(f"DAC_PROVIDERS_FILE {path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"providers"}
    if unknown:
        raise ProviderConfigError(f"DAC_PROVIDERS_FILE {path}: unknown top-level key(s) "
                                 f"{', '.join(sorted(unknown))}; declare providers as [[providers]] tables")
    entries = data.get("providers", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ProviderConfigError(f"DAC_PROVIDERS_FILE {path}: 'providers' must be [[providers]] tables")
    specs: list[ProviderSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        spec = _entry(entry, base or {}, where=f"DAC_PROVIDERS_FILE {path}: providers[{i}]")
        if spec.name in seen:
            raise ProviderConfigError(f"DAC_PROVIDERS_FILE {path}: providers[{i}]: "
                                     f"name {spec.name!r} is declared twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _entry(entry: dict[str, Any], base: Mapping[str, ProviderSpec], *, where: str) -> ProviderSpec:
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProviderConfigError(f"{where}: 'name' must be 1-64 letters, digits or _.- (got {name!r})")
    where = f"{where} ({name!r})"
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ProviderConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(sorted(_FIELDS))}")

    def text(key: str) -> str | None:
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise ProviderConfigError(f"{where}: {key!r} must be a string, not {value!r}")
        return value

    def whole(key: str) -> int | None:
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ProviderConfigError(f"{where}: {key!r} must be a whole number >= 1, not {value!r}")
        return value

    def strings(key: str) -> tuple[str, ...] | None:
        value = entry.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProviderConfigError(f"{where}: {key!r} must be a list of strings")
        return tuple(value)

    spec = base.get(name)
    kind = text("kind")
    if kind is None and spec is None:
        raise ProviderConfigError(f"{where}: 'kind' is required: one of {', '.join(KINDS)}")
    if kind is not None and kind not in KINDS:
        raise ProviderConfigError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
    if spec is None or (kind is not None and kind != spec.kind):
        spec = ProviderSpec(name=name, kind=kind or "openai", api_key_env=f"{env_prefix(name)}_API_KEY")
    changes: dict[str, Any] = {}
    base_url = text("base_url")
    if base_url is not None:
        _check_url(base_url, f"{where}: 'base_url'")
        changes.update(base_url=base_url, fixed_url=True)
    if "api_key_env" in entry:
        key_env = text("api_key_env") or ""
        if key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
            raise ProviderConfigError(f"{where}: 'api_key_env' must be a variable name, not {key_env!r}")
        changes.update(api_key_env=key_env or None, key_required=bool(key_env))
    if (limit := whole("max_concurrency")) is not None:
        changes["max_concurrency"] = limit
    if (model := text("default_model")) is not None:
        changes["default_model"] = model
    if (models := strings("models")) is not None:
        changes["models"] = models
    if (max_tokens := whole("max_tokens")) is not None:
        changes["max_tokens"] = max_tokens
    if (meta_keys := strings("meta_keys")) is not None:
        changes["meta_keys"] = meta_keys
    if "stream_options" in entry:
        if not isinstance(entry["stream_options"], bool):
            raise ProviderConfigError(f"{where}: 'stream_options' must be true or false, "
                                     f"not {entry['stream_options']!r}")
        changes["stream_options"] = entry["stream_options"]
    if "max_temperature" in entry:
        ceiling = entry["max_temperature"]
        if isinstance(ceiling, bool) or not isinstance(ceiling, int | float) or not 0 <= ceiling <= 2:
            raise ProviderConfigError(f"{where}: 'max_temperature' must be a number from 0 to 2, not {ceiling!r}")
        changes["max_temperature"] = float(ceiling)
    if (budget := whole("context_chars")) is not None:
        changes["context_chars"] = budget
    if "model_context_chars" in entry:
        table = entry["model_context_chars"]
        if not isinstance(table, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in table.values()):
            raise ProviderConfigError(f"{where}: 'model_context_chars' must be a table of whole numbers >= 1, "
                                     "like { model = 24000 }")
        changes["model_context_chars"] = dict(table)
    if "headers" in entry:
        headers = entry["headers"]
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ProviderConfigError(f"{where}: 'headers' must be a table of strings")
        changes["headers"] = dict(headers)
    if "timeouts" in entry:
        changes["timeouts"] = _timeouts(entry["timeouts"], spec.timeouts, where)
    return replace(spec, **changes)


def _timeouts(value: Any, base: Timeouts, where: str) -> Timeouts:
    if not isinstance(value, dict):
        raise ProviderConfigError(f"{where}: 'timeouts' must be a table like {{ connect = 5, total = 300 }}")
    unknown = set(value) - set(_TIMEOUTS)
    if unknown:
        raise ProviderConfigError(f"{where}: unknown timeout(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(_TIMEOUTS)}")
    for key, seconds in value.items():
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise ProviderConfigError(f"{where}: timeouts.{key} must be a positive number of seconds, "
                                     f"not {seconds!r}")
    return replace(base, **{k: float(v) for k, v in value.items()})


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderConfigError(f"{where} must be an http(s) URL, not {url!r}")


# -- with the environment ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """A spec with its base URL and key read from the environment."""

    spec: ProviderSpec
    base_url: str
    api_key: str | None
    #: why the provider cannot be used although it has what it needs, if so
    unusable: str | None = None


def resolve(settings: Settings) -> list[Resolved]:
    """The built-ins and the file's providers, with base URLs and keys from ``settings.env``."""
    specs = {s.name: s for s in BUILTINS}
    if settings.providers_file:
        for spec in load_file(settings.providers_file, base=specs):
            specs[spec.name] = spec
    env = settings.env
    resolved = []
    for spec in specs.values():
        if spec.kind == "mock":
            resolved.append(Resolved(spec=spec, base_url="", api_key=None))
            continue
        url_env = f"{env_prefix(spec.name)}_BASE_URL"
        from_env = None if spec.fixed_url else env.get(url_env)
        if from_env:
            _check_url(from_env, url_env)
        base_url = from_env or spec.base_url
        unusable = None
        if not base_url:
            unusable = f"provider {spec.name!r} has no base URL: set {url_env} or base_url in DAC_PROVIDERS_FILE"
        elif _points_at_gateway(base_url, settings):
            unusable = (f"provider {spec.name!r} would call this gateway itself ({base_url}); "
                        f"set {url_env} to the provider's address")
        key = env.get(spec.api_key_env) if spec.api_key_env else None
        resolved.append(Resolved(spec=spec, base_url=base_url, api_key=key or None, unusable=unusable))
    return resolved


def _points_at_gateway(url: str, settings: Settings) -> bool:
    """A base URL on this gateway's own loopback port (vLLM's default port is ours too)."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return port == settings.port and is_loopback(parts.hostname or "") and (
        is_loopback(settings.host) or settings.host in ("0.0.0.0", "::", ""))
