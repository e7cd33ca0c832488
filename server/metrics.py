"""What the gateway measures: a rolling window for ``/api/metrics/performance``
and Prometheus series for ``/metrics``.

Naming follows Prometheus's rules: prefix ``dac_``, base units in the name
(``_seconds``, ``_bytes``), ``_total`` on counters, and only bounded labels
(provider, model, route, mode, outcome, role, reason, error type; never a
thread, org or message id). Model names are client-supplied, so a model gets
its own label only once a provider has answered it (a bogus name never takes
a slot), at most ``MAX_MODELS_PER_PROVIDER`` per provider; the rest count as
``other``. Every ``outcome`` label speaks one vocabulary (:class:`Outcome`):
``ok``, ``error``, ``cancelled``.

Where an OpenTelemetry GenAI metric measures the same thing, a comment beside
ours names it; ours stay Prometheus-native (seconds, ``_total``, snake case).

Each app owns its own ``CollectorRegistry``, so several apps in one process
(tests) never share counts.

Errors are counted once per answered request: :meth:`Metrics.record` counts
the error of a chat request (which may travel inside an SSE stream), and
:meth:`Metrics.count_error` counts any other error answer (bad input, unknown
thread, ...). Inside :meth:`Metrics.request_scope` the second skips a request
whose outcome the first already recorded: its error, or its client leaving.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from .states import MessageStatus

__all__ = [
    "GAP_BUCKETS",
    "LATENCY_BUCKETS",
    "MAX_MODELS_PER_PROVIDER",
    "TOKEN_BUCKETS",
    "Metrics",
    "Outcome",
    "RequestRecord",
    "RequestScope",
    "percentile",
]

# No ``*_created`` series: the classic text format turns each into one more gauge
# per label set, doubling what Prometheus stores for counters and histograms while
# no query here reads them. (The switch is process-wide; this process is the gateway.)
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

#: 5 ms to 600 s (the default total timeout of an upstream call): from a cached
#: answer to a long reasoning stream.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)
#: gaps between tokens and cancel latencies are short: 1 ms to 10 s, with a
#: boundary at 0.3 s, the promised upper bound of a cancel.
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
#: tokens of one call: from a one-word answer to a long context
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
MAX_MODELS_PER_PROVIDER = 32
#: the coalesce roles a request can have; their series exist from the start at 0,
#: so that ``rate()`` sees the first increase
ROLES = ("leader", "follower", "cache")


class Outcome(StrEnum):
    """How a request, an answer or an upstream call ended: the one ``outcome`` vocabulary."""

    OK = "ok"
    ERROR = "error"
    #: the client left, or the upstream call was aborted (nobody listening, shutdown)
    CANCELLED = "cancelled"

    @classmethod
    def of(cls, status: MessageStatus) -> Outcome:
        """The outcome of an answer that ended with ``status``."""
        if status is MessageStatus.COMPLETE:
            return cls.OK
        return cls.ERROR if status is MessageStatus.ERROR else cls.CANCELLED


def _version() -> str:
    # the package's own attribute (pyproject.toml reads its version from it): importlib.metadata
    # would load the email, csv and zipfile modules into every server for one string
    from . import __version__

    return __version__


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """One client request, as the performance endpoint sees it."""

    route: str  # "messages", "streams", "v1"
    #: the org whose request this was: the performance endpoint shows each org its own
    org: str
    mode: str  # "json", "sse" or "accepted" (mode 3's 202)
    coalesce: str | None  # "leader", "follower", "cache" or None (not coalesced: error before)
    latency_s: float
    #: from the request's arrival to its first token written (streamed answers only)
    ttft_s: float | None = None
    #: the leader's wait for a provider slot (followers and cache hits did not wait)
    queue_wait_s: float | None = None
    error: str | None = None  # error type, None when the request succeeded
    #: the client left before its answer ended (not an error of ours)
    client_left: bool = False
    #: this request is a chat answer (``dac_chat_answers_total``): a chat request that reached
    #: a flight, or the first attach of a ``stream: true`` request's stream
    answer: bool = False

    @property
    def outcome(self) -> Outcome:
        if self.error:
            return Outcome.ERROR
        return Outcome.CANCELLED if self.client_left else Outcome.OK


class RequestScope:
    """Marks whether the current HTTP request's outcome is counted already: its
    error, or the client's leaving (whose exception is then no error of ours); and
    whether its response has started (``started``: an error after that can no longer
    change its status). Use as ``with``: the scope is the current one inside the block."""

    __slots__ = ("settled", "started", "_token")

    def __init__(self) -> None:
        self.settled = False
        self.started = False
        self._token: Token[RequestScope | None] | None = None

    def __enter__(self) -> RequestScope:
        self._token = _SCOPE.set(self)
        return self

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _SCOPE.reset(self._token)
            self._token = None


_SCOPE: ContextVar[RequestScope | None] = ContextVar("dac_request_scope", default=None)


_M = TypeVar("_M", Counter, Gauge, Histogram)


def _memo(metric: _M) -> _M:
    """``metric`` whose ``labels(...)`` remembers each child it handed out.

    prometheus_client validates, stringifies and locks on every ``labels`` call;
    the request path asks for the same few children thousands of times a second.
    Label sets are bounded here (see the module docstring) and no child is ever
    removed, so a plain unbounded cache is right.
    """
    metric.labels = functools.cache(metric.labels)  # type: ignore[method-assign]
    return metric


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (``q`` in 0..100); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class Metrics:
    def __init__(self, *, window: int = 10_000) -> None:
        self.records: deque[RequestRecord] = deque(maxlen=window)
        self.registry = CollectorRegistry()
        self._models: dict[str, set[str]] = {}
        r = self.registry

        # -- histograms ---------------------------------------------------
        # OpenTelemetry GenAI: gen_ai.server.request.duration
        self.request_duration = _memo(Histogram(
            "dac_request_duration_seconds",
            "Client request duration, from arrival to the last byte of the answer.",
            ["route", "mode", "outcome"], buckets=LATENCY_BUCKETS, registry=r))
        # OpenTelemetry GenAI: gen_ai.client.operation.duration
        self.upstream_duration = _memo(Histogram(
            "dac_upstream_duration_seconds",
            "Upstream call duration, from the request to the provider until its stream closed.",
            ["provider", "model", "outcome"], buckets=LATENCY_BUCKETS, registry=r))
        # OpenTelemetry GenAI: gen_ai.server.time_to_first_token
        self.ttft = _memo(Histogram(
            "dac_time_to_first_token_seconds",
            "From the request to the provider until the first chunk of answer text.",
            ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r))
        # as seen by a client of the provider: gen_ai.client.operation.time_to_first_chunk
        self.ttfb = _memo(Histogram(
            "dac_time_to_first_byte_seconds",
            "From the request to the provider until its first output of any kind "
            "(reasoning, answer text, a tool call or a refusal).",
            ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r))
        self.queue_wait = _memo(Histogram(
            "dac_queue_wait_seconds", "Time a flight waited for a provider slot.",
            ["provider"], buckets=LATENCY_BUCKETS, registry=r))
        # OpenTelemetry GenAI: gen_ai.server.time_per_output_token
        self.tpot = _memo(Histogram(
            "dac_time_per_output_token_seconds",
            "Per successful answer: (upstream duration - time to its first output) / (output tokens - 1).",
            ["provider", "model"], buckets=GAP_BUCKETS, registry=r))
        # client side, per chunk: gen_ai.client.operation.time_per_output_chunk
        self.inter_chunk = _memo(Histogram(
            "dac_inter_chunk_seconds", "Gap between consecutive upstream chunks of answer text.",
            ["provider"], buckets=GAP_BUCKETS, registry=r))
        # OpenTelemetry GenAI: gen_ai.client.token.usage
        self.token_histogram = _memo(Histogram(
            "dac_token_usage_tokens", "Tokens of one upstream call as its usage reports them, input or output.",
            ["provider", "type"], buckets=TOKEN_BUCKETS, registry=r))
        self.cancel_latency = _memo(Histogram(
            "dac_cancel_latency_seconds",
            "From the last listener leaving (or the abort) to the upstream stream closed.",
            ["provider"], buckets=GAP_BUCKETS, registry=r))

        # -- counters ------------------------------------------------------
        self.upstream_calls = _memo(Counter(
            "dac_upstream_calls_total", "Upstream calls by provider and how they ended.",
            ["provider", "model", "outcome"], registry=r))
        self.coalesce = _memo(Counter(
            "dac_coalesce_total",
            "Chat requests by coalesce role: leader (called upstream), follower (joined a "
            "running flight) or cache (answered from a finished one).",
            ["role"], registry=r))
        for role in ROLES:
            self.coalesce.labels(role)
        self.answers = _memo(Counter(
            "dac_chat_answers_total",
            "Chat answers handed to clients, by outcome (requests refused before any answer "
            "was attempted are not answers).",
            ["route", "outcome"], registry=r))
        for route in ("messages", "streams", "v1"):
            for outcome in Outcome:
                self.answers.labels(route, outcome)
        self.deltas = _memo(Counter(
            "dac_stream_deltas_total",
            "Output chunks streamed from upstream (answer text, reasoning, refusal or tool-call pieces), "
            "counted as each upstream call ends.",
            ["provider"], registry=r))
        # the sums of dac_token_usage_tokens, by provider and type
        self.tokens = _memo(Counter(
            "dac_tokens_total", "Tokens as the providers' usage reports them, input or output.",
            ["provider", "type"], registry=r))
        self.cancels = _memo(Counter(
            "dac_cancels_total",
            "Flights aborted upstream, by reason (no_listeners, attach_timeout, shutdown).",
            ["provider", "reason"], registry=r))
        self.drops = _memo(Counter(
            "dac_listeners_dropped_total",
            "Listeners the server let go, by reason (slow_client: took nothing for the send timeout).",
            ["reason"], registry=r))
        self.errors = _memo(Counter(
            "dac_errors_total", "Requests answered with an error, by error type.",
            ["type"], registry=r))
        self.refused_writes = _memo(Counter(
            "dac_store_writes_refused_total",
            "Writes of an answer's row refused because the row is no longer this instance's "
            "streaming row (another instance ended it; this one had lost the lead), by write "
            "(checkpoint, finish).", ["write"], registry=r))
        self.swept = Counter(
            "dac_answers_swept_total",
            "Answers this instance marked interrupted because the instance streaming them is gone.",
            registry=r)

        # -- gauges --------------------------------------------------------
        #: flights whose leader task runs, and clients attached to flights: plain counts the
        #: request path moves (a gauge's inc takes a lock), read at each scrape
        self.flights_running = 0
        self.listeners_attached = 0
        self.active_flights = Gauge(
            "dac_active_flights", "Flights whose leader task is running.", registry=r)
        self.active_flights.set_function(lambda: self.flights_running)
        self.active_listeners = Gauge(
            "dac_active_listeners", "Clients attached to flights.", registry=r)
        self.active_listeners.set_function(lambda: self.listeners_attached)
        self.cache_entries = Gauge(
            "dac_cache_entries", "Finished flights kept to answer identical requests.", registry=r)
        self.cache_bytes = Gauge(
            "dac_cache_bytes", "UTF-8 bytes of answer text held by the kept flights.", registry=r)
        self.build_info = Gauge(
            "dac_build_info", "Always 1; the running gateway's version as a label.", ["version"], registry=r)
        self.build_info.labels(_version()).set(1)

    def watch_cache(self, *, entries: Callable[[], float], size_bytes: Callable[[], float]) -> None:
        """Read the result cache's size at each scrape."""
        self.cache_entries.set_function(entries)
        self.cache_bytes.set_function(size_bytes)

    def model_label(self, provider: str, model: str, *, answered: bool = True) -> str:
        """A bounded label for a client-supplied model name: its own once the provider has
        ``answered`` it (while there is room), else ``other``."""
        if provider == "mock" or model.startswith("mock:"):
            return model.split(":", 1)[0]
        seen = self._models.setdefault(provider, set())
        if model in seen:
            return model
        if answered and len(seen) < MAX_MODELS_PER_PROVIDER:
            seen.add(model)
            return model
        return "other"

    def first_byte(self, provider: str, model: str, seconds: float) -> None:
        """The provider's first output of any kind (it has answered the model)."""
        self.ttfb.labels(provider, self.model_label(provider, model)).observe(seconds)

    def first_token(self, provider: str, model: str, seconds: float) -> None:
        """The provider's first answer text."""
        self.ttft.labels(provider, self.model_label(provider, model)).observe(seconds)

    def upstream_finished(self, *, provider: str, model: str, outcome: Outcome, duration_s: float,
                          answered: bool = True) -> None:
        """One upstream call ended; ``answered``: the provider produced output for it."""
        label = self.model_label(provider, model, answered=answered or outcome is Outcome.OK)
        self.upstream_calls.labels(provider, label, outcome).inc()
        self.upstream_duration.labels(provider, label, outcome).observe(duration_s)

    def time_per_output_token(self, provider: str, model: str, *, duration_s: float, first_s: float,
                              usage: dict[str, Any] | None) -> None:
        """OpenTelemetry's time_per_output_token for a successful answer: the time after its
        first output over the tokens after the first. Needs the usage's output tokens (at least 2).

        The first output may be reasoning: reasoning tokens are output tokens too.
        """
        output = _tokens(usage or {}, OUTPUT_NAMES)
        if output is None or output < 2:
            return
        label = self.model_label(provider, model)
        self.tpot.labels(provider, label).observe(max(0.0, duration_s - first_s) / (output - 1))

    def dropped(self, reason: str) -> None:
        """A listener was let go by the server (not by its client)."""
        self.drops.labels(reason).inc()

    def token_usage(self, provider: str, usage: dict[str, Any]) -> None:
        """Count one call's reported usage (OpenAI's or Anthropic's field names)."""
        for kind, names in (("input", INPUT_NAMES), ("output", OUTPUT_NAMES)):
            value = _tokens(usage, names)
            if value is not None:
                self.tokens.labels(provider, kind).inc(value)
                self.token_histogram.labels(provider, kind).observe(value)

    # -- per request -----------------------------------------------------

    def request_scope(self) -> RequestScope:
        """Wrap one HTTP request (``with``), so that its error is counted once."""
        return RequestScope()

    def response_started(self) -> None:
        """The current request's streamed response has started (:attr:`RequestScope.started`)."""
        scope = _SCOPE.get()
        if scope is not None:
            scope.started = True

    def count_error(self, error_type: str, scope: RequestScope | None = None) -> None:
        """Count an error answer, unless this request's error was counted already."""
        scope = scope or _SCOPE.get()
        if scope is not None:
            if scope.settled:
                return
            scope.settled = True
        self.errors.labels(error_type).inc()

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.request_duration.labels(record.route, record.mode, record.outcome).observe(record.latency_s)
        if record.answer:
            self.answers.labels(record.route, record.outcome).inc()
        if record.coalesce:
            self.coalesce.labels(record.coalesce).inc()
        if record.error:
            self.count_error(record.error)
        elif record.client_left and (scope := _SCOPE.get()) is not None:
            scope.settled = True

    def performance(self, last_n: int, org: str | None = None) -> dict[str, Any]:
        """Figures over the last ``last_n`` requests (each HTTP request is one record) of
        ``org``, or of every org when ``org`` is None."""
        records = self.records if org is None else [rec for rec in self.records if rec.org == org]
        recent = list(records)[-last_n:] if last_n > 0 else []

        def summary(values: list[float]) -> dict[str, float | int | None]:
            ms = [v * 1000 for v in values]
            return {
                "p50": _round(percentile(ms, 50)),
                "p95": _round(percentile(ms, 95)),
                "p99": _round(percentile(ms, 99)),
                "count": len(ms),
            }

        roles = dict.fromkeys(ROLES, 0)
        for rec in recent:
            if rec.coalesce in roles:
                roles[rec.coalesce] += 1
        errors = sum(1 for rec in recent if rec.error)
        saved = roles["follower"] + roles["cache"]
        coalesced = saved + roles["leader"]
        return {
            "requests": len(recent),
            "window": last_n,
            "coalesce": {
                "leaders": roles["leader"],
                "followers": roles["follower"],
                "cache_hits": roles["cache"],
                # every follower and cache hit is an upstream call that did not happen
                "upstream_calls_saved": saved,
                "ratio": _round(saved / coalesced if coalesced else 0.0, 4),
            },
            "latency_ms": summary([r.latency_s for r in recent]),
            "ttft_ms": summary([r.ttft_s for r in recent if r.ttft_s is not None]),
            "queue_wait_ms": summary([r.queue_wait_s for r in recent if r.queue_wait_s is not None]),
            "error_rate": _round(errors / len(recent) if recent else 0.0, 4),
            "errors": errors,
            "client_left": sum(1 for rec in recent if rec.client_left and not rec.error),
        }


#: usage fields of input and output tokens, OpenAI's name first, then Anthropic's
INPUT_NAMES = ("prompt_tokens", "input_tokens")
OUTPUT_NAMES = ("completion_tokens", "output_tokens")


def _tokens(usage: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        value: Any = usage.get(name)
        if type(value) in _NUMBERS and value >= 0:  # not a bool: its type is neither
            return float(value)
    return None


_NUMBERS = (int, float)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
