"""Settings, read once from the environment (and the command line).

Every setting has an environment variable; README.md lists them. Values that
cannot be parsed stop the server at start with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DATABASE_SCHEMES", "REDIS_SCHEMES", "V1_RESULT_CACHE", "Settings", "is_loopback", "redact_url"]

#: the values of ``DAC_V1_RESULT_CACHE``: when a finished answer serves an identical /v1 request
V1_RESULT_CACHE = ("off", "deterministic", "always")
#: the URL schemes of ``DAC_DATABASE_URL`` (both name PostgreSQL, as libpq accepts)
DATABASE_SCHEMES = ("postgresql", "postgres")
#: the URL schemes of ``DAC_REDIS_URL`` (TCP, TLS, a Unix socket), as redis-py reads them
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, not {raw!r}")


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {raw!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return value


def is_loopback(host: str) -> bool:
    """Whether a host name or address stays on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    """The URL setting ``name``, checked for one of ``schemes``; None when unset."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"{name} is not a valid URL ({exc}): {redact_url(raw)!r}") from None
    if parts.scheme not in schemes:
        starts = [f"{scheme}://" for scheme in schemes]
        raise ValueError(f"{name} must start with {', '.join(starts[:-1])} or {starts[-1]}, not {redact_url(raw)!r}")
    return raw


AUTH_MODES = ("keys", "header")


def _auth_mode(env: Mapping[str, str]) -> str:
    raw = env.get("DAC_AUTH", "").strip().lower() or "keys"
    if raw not in AUTH_MODES:
        raise ValueError(f"DAC_AUTH must be keys or header, not {env.get('DAC_AUTH')!r}")
    return raw


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    """``DAC_CORS_ORIGINS``: ``scheme://host[:port]`` each, as a browser sends ``Origin``."""
    origins = []
    for raw in env.get("DAC_CORS_ORIGINS", "").split(","):
        origin = raw.strip().rstrip("/")
        if not origin:
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"DAC_CORS_ORIGINS: {raw.strip()!r} is not an origin such as https://app.example.org")
        origins.append(origin)
    return tuple(origins)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    db_path: str = "./data/dac.db"
    #: ``postgresql://...``: threads and messages on PostgreSQL; None: SQLite at ``db_path``
    database_url: str | None = None
    #: PostgreSQL connections one process keeps at most
    database_pool_size: int = 10
    #: ``redis://...``: flights on Redis, shared by every instance that names it; None: in-process
    redis_url: str | None = None
    #: the prefix of every Redis key and channel (several gateways can share one Redis)
    redis_prefix: str = "dac:"
    #: a flight's leadership lease on Redis: a leader that stops renewing it is lost after this
    redis_lease_s: float = 2.0
    #: processes serving one port (``--workers``); more than one needs ``redis_url``
    workers: int = 1
    #: listen with SO_REUSEPORT (set for the workers of ``--workers``)
    reuse_port: bool = False
    coalesce_enabled: bool = True
    stream_fanout_enabled: bool = True
    #: how long a failed flight answers identical requests with its error
    error_ttl_s: float = 2.0
    #: how long a finished flight answers identical requests with its result
    result_ttl_s: float = 60.0
    #: which /v1 requests a finished answer serves: off, deterministic (temperature 0,
    #: a seed, or an Idempotency-Key) or always
    v1_result_cache: str = "deterministic"
    #: finished flights kept for the result TTL, at most this many ...
    cache_max_entries: int = 1024
    #: ... and at most this many bytes of answer text
    cache_max_bytes: int = 64 * 1024 * 1024
    #: every this many seconds, a quiet server hands the C heap's free memory back (0: never)
    trim_idle_s: float = 0.5
    #: a flight nobody listens to (mode 3, before its EventSource opens) is cancelled after this
    attach_timeout_s: float = 10.0
    #: after the last listener leaves, wait this long for a new one before aborting upstream
    cancel_grace_s: float = 0.05
    #: events kept per flight for replay; older deltas are replaced by a snapshot
    ring_size: int = 4096
    #: keep-alive comment interval on SSE responses
    ping_interval_s: float = 15.0
    #: a stream client that takes nothing for this long is dropped (reason slow_client)
    send_timeout_s: float = 120.0
    #: a waiting flight gives up on a provider slot after this long (503 + Retry-After)
    queue_timeout_s: float = 30.0
    #: request bodies larger than this are refused with 413
    max_body_bytes: int = 1024 * 1024
    default_provider: str = "mock"
    default_model: str = ""
    #: TOML file declaring extra providers (see README)
    providers_file: str | None = None
    #: requests kept for /api/metrics/performance
    perf_window: int = 10_000
    #: ``keys``: an API key names the org; ``header``: ``x-org-id`` is trusted (behind a proxy)
    auth: str = "keys"
    #: signs stream URLs; empty: a secret generated once beside the SQLite file
    secret: str = field(default="", repr=False)
    #: how long a key's verdict (its org, or unknown) is kept in memory: a revocation takes this long at most
    key_cache_ttl_s: float = 10.0
    #: how long a stream URL's token is good for
    stream_token_ttl_s: float = 3600.0
    #: origins whose browsers may call the API from another site (CORS)
    cors_origins: tuple[str, ...] = ()
    # -- limits per org (0: no limit) --
    #: chat requests and thread creations an org may make per minute
    org_rpm: int = 0
    #: flights an org may lead at once (followers of a running flight are free)
    org_max_flights: int = 256
    #: threads an org may keep
    org_max_threads: int = 0
    # -- connections --
    #: a request line and headers must arrive within this from their first byte (slowloris)
    header_timeout_s: float = 10.0
    #: a request body must arrive within this once its headers are in
    body_timeout_s: float = 30.0
    #: an idle connection between requests is closed after this
    keepalive_timeout_s: float = 75.0
    #: open connections beyond this are answered 503 and closed
    max_connections: int = 10_000
    # -- memory and data --
    #: an answer is cut at this many characters and ends with finish_reason ``length`` (0: no cut)
    max_answer_chars: int = 1_000_000
    #: characters of history sent upstream when neither the providers file nor the model says (0: no cut)
    context_chars: int = 0
    #: the partial answer is written to its row every this many deltas ...
    checkpoint_deltas: int = 50
    #: ... or every this many seconds, whichever comes first (0 for both: only at the end)
    checkpoint_s: float = 2.0
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        d = cls()
        return cls(
            host=env.get("DAC_HOST") or d.host,
            port=int(_number(env, "DAC_PORT", d.port)),
            db_path=env.get("DAC_DB") or d.db_path,
            database_url=_url(env, "DAC_DATABASE_URL", DATABASE_SCHEMES),
            database_pool_size=int(_number(env, "DAC_DATABASE_POOL_SIZE", d.database_pool_size, minimum=1)),
            redis_url=_url(env, "DAC_REDIS_URL", REDIS_SCHEMES),
            redis_prefix=env.get("DAC_REDIS_PREFIX", d.redis_prefix),
            redis_lease_s=_number(env, "DAC_REDIS_LEASE_MS", d.redis_lease_s * 1000, minimum=200) / 1000,
            workers=int(_number(env, "DAC_WORKERS", d.workers, minimum=1)),
            reuse_port=_flag(env, "DAC_REUSE_PORT", d.reuse_port),
            coalesce_enabled=_flag(env, "COALESCE_ENABLED", d.coalesce_enabled),
            stream_fanout_enabled=_flag(env, "STREAM_FANOUT_ENABLED", d.stream_fanout_enabled),
            error_ttl_s=_number(env, "DAC_ERROR_TTL_S", d.error_ttl_s),
            result_ttl_s=_number(env, "DAC_RESULT_TTL_S", d.result_ttl_s),
            v1_result_cache=_choice(env, "DAC_V1_RESULT_CACHE", V1_RESULT_CACHE, d.v1_result_cache),
            cache_max_entries=int(_number(env, "DAC_CACHE_MAX_ENTRIES", d.cache_max_entries)),
            cache_max_bytes=int(_number(env, "DAC_CACHE_MAX_BYTES", d.cache_max_bytes)),
            attach_timeout_s=_number(env, "DAC_ATTACH_TIMEOUT_S", d.attach_timeout_s),
            trim_idle_s=_number(env, "DAC_TRIM_IDLE_S", d.trim_idle_s),
            cancel_grace_s=_number(env, "DAC_CANCEL_GRACE_MS", d.cancel_grace_s * 1000) / 1000,
            ring_size=int(_number(env, "DAC_RING_SIZE", d.ring_size, minimum=1)),
            ping_interval_s=_number(env, "DAC_PING_INTERVAL_S", d.ping_interval_s, minimum=0.01),
            send_timeout_s=_number(env, "DAC_SEND_TIMEOUT_S", d.send_timeout_s, minimum=0.01),
            queue_timeout_s=_number(env, "DAC_QUEUE_TIMEOUT_S", d.queue_timeout_s),
            max_body_bytes=int(_number(env, "DAC_MAX_BODY_BYTES", d.max_body_bytes, minimum=1024)),
            default_provider=env.get("DAC_DEFAULT_PROVIDER") or d.default_provider,
            default_model=env.get("DAC_DEFAULT_MODEL") or d.default_model,
            providers_file=env.get("DAC_PROVIDERS_FILE") or None,
            perf_window=int(_number(env, "DAC_PERF_WINDOW", d.perf_window, minimum=1)),
            auth=_auth_mode(env),
            secret=env.get("DAC_SECRET", ""),
            key_cache_ttl_s=_number(env, "DAC_KEY_CACHE_TTL_S", d.key_cache_ttl_s),
            stream_token_ttl_s=_number(env, "DAC_STREAM_TOKEN_TTL_S", d.stream_token_ttl_s, minimum=1),
            cors_origins=_origins(env),
            org_rpm=int(_number(env, "DAC_ORG_RPM", d.org_rpm)),
            org_max_flights=int(_number(env, "DAC_ORG_MAX_FLIGHTS", d.org_max_flights)),
            org_max_threads=int(_number(env, "DAC_ORG_MAX_THREADS", d.org_max_threads)),
            header_timeout_s=_number(env, "DAC_HEADER_TIMEOUT_S", d.header_timeout_s, minimum=0.01),
            body_timeout_s=_number(env, "DAC_BODY_TIMEOUT_S", d.body_timeout_s, minimum=0.01),
            keepalive_timeout_s=_number(env, "DAC_KEEPALIVE_TIMEOUT_S", d.keepalive_timeout_s, minimum=0.01),
            max_connections=int(_number(env, "DAC_MAX_CONNECTIONS", d.max_connections, minimum=1)),
            max_answer_chars=int(_number(env, "DAC_MAX_ANSWER_CHARS", d.max_answer_chars)),
            context_chars=int(_number(env, "DAC_CONTEXT_CHARS", d.context_chars)),
            checkpoint_deltas=int(_number(env, "DAC_CHECKPOINT_DELTAS", d.checkpoint_deltas)),
            checkpoint_s=_number(env, "DAC_CHECKPOINT_S", d.checkpoint_s),
            env=env,
        )

    @property
    def database(self) -> str:
        """Where threads are kept, for messages: the PostgreSQL URL without its password, or the SQLite file."""
        return redact_url(self.database_url) if self.database_url else self.db_path

    @property
    def redis(self) -> str:
        """The Redis URL without its password, for messages; empty when flights are in-process."""
        return redact_url(self.redis_url) if self.redis_url else ""

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
