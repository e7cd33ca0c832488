"""What the gateway measures: a rolling window for ``/api/metrics/performance``
and Prometheus series for ``/metrics``.

Naming follows Prometheus's rules: prefix ``dac_``, base units in the name
(``_seconds``, ``_bytes``), ``_total`` on counters, and only bounded labels
(provider, model, route, mode, outcome, role, reason, error type; never a
thread, org or message id). Model names are client-supplied, so at most
``MAX_MODELS_PER_PROVIDER`` distinct ones are labelled per provider and the
rest count as ``other``.

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

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

__all__ = [
    "GAP_BUCKETS",
    "LATENCY_BUCKETS",
    "MAX_MODELS_PER_PROVIDER",
    "Metrics",
    "RequestRecord",
    "RequestScope",
    "percentile",
]

# No ``*_created`` series: the classic text format turns each into one more gauge
# per label set, doubling what Prometheus stores for counters and histograms while
# no query here reads them. (The switch is process-wide; this process is the gateway.)
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

#: 5 ms to 120 s: from a cached answer to a long reasoning stream.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)
#: gaps between tokens and cancel latencies are short: 1 ms to 10 s, with a
#: boundary at 0.3 s, the promised upper bound of a cancel.
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_MODELS_PER_PROVIDER = 32
#: the coalesce roles a request can have; their series exist from the start at 0,
#: so that ``rate()`` sees the first increase
ROLES = ("leader", "follower", "cache")


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """One client request, as the performance endpoint sees it."""

    route: str  # "messages", "streams", "v1"
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

    @property
    def outcome(self) -> str:
        if self.error:
            return "error"
        return "client_left" if self.client_left else "ok"


class RequestScope:
    """Marks whether the current HTTP request's outcome is counted already: its
    error, or the client's leaving (whose exception is then no error of ours)."""

    __slots__ = ("settled",)

    def __init__(self) -> None:
        self.settled = False


_SCOPE: ContextVar[RequestScope | None] = ContextVar("dac_request_scope", default=None)


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
        self.request_duration = Histogram(
            "dac_request_duration_seconds",
            "Client request duration, from arrival to the last byte of the answer.",
            ["route", "mode", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        # OpenTelemetry GenAI: gen_ai.client.operation.duration
        self.upstream_duration = Histogram(
            "dac_upstream_duration_seconds",
            "Upstream call duration, from the request to the provider until its stream closed.",
            ["provider", "model", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        # OpenTelemetry GenAI: gen_ai.server.time_to_first_token
        # (as seen by a client of the provider: gen_ai.client.operation.time_to_first_chunk)
        self.ttft = Histogram(
            "dac_time_to_first_token_seconds",
            "From the request to the provider until its first text chunk.",
            ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "dac_queue_wait_seconds", "Time a flight waited for a provider slot.",
            ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        # OpenTelemetry GenAI: gen_ai.server.time_per_output_token
        # (client side: gen_ai.client.operation.time_per_output_chunk)
        self.inter_token = Histogram(
            "dac_inter_token_seconds", "Gap between consecutive upstream text chunks.",
            ["provider"], buckets=GAP_BUCKETS, registry=r)
        self.cancel_latency = Histogram(
            "dac_cancel_latency_seconds",
            "From the last listener leaving (or the abort) to the upstream stream closed.",
            ["provider"], buckets=GAP_BUCKETS, registry=r)

        # -- counters ------------------------------------------------------
        self.upstream_calls = Counter(
            "dac_upstream_calls_total", "Upstream calls by provider and how they ended.",
            ["provider", "model", "outcome"], registry=r)
        self.coalesce = Counter(
            "dac_coalesce_total",
            "Chat requests by coalesce role: leader (called upstream), follower (joined a "
            "running flight) or cache (answered from a finished one).",
            ["role"], registry=r)
        for role in ROLES:
            self.coalesce.labels(role)
        self.deltas = Counter(
            "dac_stream_deltas_total", "Text chunks streamed from upstream (about one token each).",
            ["provider"], registry=r)
        # OpenTelemetry GenAI: gen_ai.client.token.usage (a histogram per call there;
        # a counter by gen_ai.token.type here)
        self.tokens = Counter(
            "dac_tokens_total", "Tokens as the providers' usage reports them, input or output.",
            ["provider", "type"], registry=r)
        self.cancels = Counter(
            "dac_cancels_total",
            "Flights aborted upstream, by reason (no_listeners, attach_timeout, shutdown).",
            ["provider", "reason"], registry=r)
        self.drops = Counter(
            "dac_listeners_dropped_total",
            "Listeners the server let go, by reason (slow_client: took nothing for the send timeout).",
            ["reason"], registry=r)
        self.errors = Counter(
            "dac_errors_total", "Requests answered with an error, by error type.",
            ["type"], registry=r)

        # -- gauges --------------------------------------------------------
        self.active_flights = Gauge(
            "dac_active_flights", "Flights whose leader task is running.", registry=r)
        self.active_listeners = Gauge(
            "dac_active_listeners", "Clients attached to flights.", registry=r)
        self.cache_entries = Gauge(
            "dac_cache_entries", "Finished flights kept to answer identical requests.", registry=r)
        self.cache_bytes = Gauge(
            "dac_cache_bytes", "UTF-8 bytes of answer text held by the kept flights.", registry=r)

    def watch_cache(self, *, entries: Callable[[], float], size_bytes: Callable[[], float]) -> None:
        """Read the result cache's size at each scrape."""
        self.cache_entries.set_function(entries)
        self.cache_bytes.set_function(size_bytes)

    def model_label(self, provider: str, model: str) -> str:
        """A bounded label for a client-supplied model name."""
        if provider == "mock" or model.startswith("mock:"):
            return model.split(":", 1)[0]
        seen = self._models.setdefault(provider, set())
        if model in seen:
            return model
        if len(seen) < MAX_MODELS_PER_PROVIDER:
            seen.add(model)
            return model
        return "other"

    def upstream_finished(self, *, provider: str, model: str, outcome: str, duration_s: float) -> None:
        """One upstream call ended: ``complete``, ``error`` or ``cancelled``."""
        label = self.model_label(provider, model)
        self.upstream_calls.labels(provider, label, outcome).inc()
        self.upstream_duration.labels(provider, label, outcome).observe(duration_s)

    def dropped(self, reason: str) -> None:
        """A listener was let go by the server (not by its client)."""
        self.drops.labels(reason).inc()

    def token_usage(self, provider: str, usage: dict[str, Any]) -> None:
        """Count a provider's reported usage (OpenAI's or Anthropic's field names)."""
        for kind, names in (("input", ("prompt_tokens", "input_tokens")),
                            ("output", ("completion_tokens", "output_tokens"))):
            for name in names:
                value = usage.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                    self.tokens.labels(provider, kind).inc(value)
                    break

    # -- per request -----------------------------------------------------

    @contextmanager
    def request_scope(self) -> Iterator[RequestScope]:
        """Wrap one HTTP request, so that its error is counted once."""
        scope = RequestScope()
        token = _SCOPE.set(scope)
        try:
            yield scope
        finally:
            _SCOPE.reset(token)

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
        if record.coalesce:
            self.coalesce.labels(record.coalesce).inc()
        if record.error:
            self.count_error(record.error)
        elif record.client_left and (scope := _SCOPE.get()) is not None:
            scope.settled = True

    def performance(self, last_n: int) -> dict[str, Any]:
        """Figures over the last ``last_n`` requests (each HTTP request is one record)."""
        recent = list(self.records)[-last_n:] if last_n > 0 else []

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


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
