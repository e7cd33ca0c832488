"""What the gateway measures: a rolling window for ``/api/metrics/performance``
and Prometheus series for ``/metrics``.

Naming follows Prometheus's rules: prefix ``dac_``, base units in the name,
``_total`` on counters, and only bounded labels (provider, model, route, mode,
outcome, role, error type; never a thread, org or message id). Model names are
client-supplied, so at most ``MAX_MODELS_PER_PROVIDER`` distinct ones are
labelled per provider and the rest count as ``other``.

Each app owns its own ``CollectorRegistry``, so several apps in one process
(tests) never share counts.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS", "Metrics", "RequestRecord", "percentile"]

#: 5 ms to 120 s: from a cached answer to a long reasoning stream.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)
#: gaps between tokens and cancel latencies are short: 1 ms to 10 s.
SHORT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_MODELS_PER_PROVIDER = 32


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """One client request, as the performance endpoint sees it."""

    route: str  # "messages", "streams", "v1"
    mode: str  # "json" or "sse"
    coalesce: str | None  # "leader", "follower", "cache" or None (not coalesced: error before)
    latency_s: float
    ttft_s: float | None = None
    queue_wait_s: float | None = None
    error: str | None = None  # error type, None when the request succeeded


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
        # OpenTelemetry GenAI: gen_ai.server.request.duration / gen_ai.client.operation.duration
        self.request_duration = Histogram(
            "dac_request_duration_seconds", "Client request duration, from arrival to the last byte.",
            ["route", "mode", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        # OpenTelemetry GenAI: gen_ai.server.time_to_first_token
        self.ttft = Histogram(
            "dac_time_to_first_token_seconds",
            "Time from a flight's start to its first upstream token.",
            ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "dac_queue_wait_seconds", "Time a flight waited for a provider slot.",
            ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        # OpenTelemetry GenAI: gen_ai.server.time_per_output_token
        self.inter_token = Histogram(
            "dac_inter_token_seconds", "Gap between consecutive upstream tokens.",
            ["provider"], buckets=SHORT_BUCKETS, registry=r)
        self.cancel_latency = Histogram(
            "dac_cancel_latency_seconds",
            "From the last listener leaving to the upstream stream closed.",
            ["provider"], buckets=SHORT_BUCKETS, registry=r)
        self.upstream_calls = Counter(
            "dac_upstream_calls_total", "Upstream calls by provider and how they ended.",
            ["provider", "model", "outcome"], registry=r)
        self.coalesce = Counter(
            "dac_coalesce_total", "Requests by coalesce role: leader, follower or cache.",
            ["role"], registry=r)
        # OpenTelemetry GenAI: gen_ai.client.token.usage (ours counts streamed deltas)
        self.deltas = Counter(
            "dac_stream_deltas_total", "Upstream chunks with text, streamed to flights.",
            ["provider"], registry=r)
        self.tokens = Counter(
            "dac_tokens_total", "Tokens as reported by providers' usage.",
            ["provider", "type"], registry=r)
        self.cancels = Counter(
            "dac_cancels_total", "Flights aborted upstream, by reason.",
            ["provider", "reason"], registry=r)
        self.errors = Counter(
            "dac_errors_total", "Requests answered with an error, by error type.",
            ["type"], registry=r)
        self.active_flights = Gauge(
            "dac_active_flights", "Flights whose upstream call is in progress.", registry=r)
        self.active_listeners = Gauge(
            "dac_active_listeners", "Clients attached to running flights.", registry=r)

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

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)
        outcome = "error" if record.error else "ok"
        self.request_duration.labels(record.route, record.mode, outcome).observe(record.latency_s)
        if record.coalesce:
            self.coalesce.labels(record.coalesce).inc()
        if record.error:
            self.errors.labels(record.error).inc()

    def performance(self, last_n: int) -> dict[str, Any]:
        recent = list(self.records)[-last_n:] if last_n > 0 else []

        def summary(values: list[float]) -> dict[str, float | None]:
            ms = [v * 1000 for v in values]
            return {
                "p50": _round(percentile(ms, 50)),
                "p95": _round(percentile(ms, 95)),
                "p99": _round(percentile(ms, 99)),
                "count": len(ms),
            }

        roles = {"leader": 0, "follower": 0, "cache": 0}
        for rec in recent:
            if rec.coalesce in roles:
                roles[rec.coalesce] += 1
        errors = sum(1 for rec in recent if rec.error)
        return {
            "requests": len(recent),
            "window": last_n,
            "coalesce": {
                "leaders": roles["leader"],
                "followers": roles["follower"],
                "cache_hits": roles["cache"],
                "upstream_calls_saved": roles["follower"] + roles["cache"],
                "ratio": _round((roles["follower"] + roles["cache"]) / len(recent) if recent else 0.0, 4),
            },
            "latency_ms": summary([r.latency_s for r in recent]),
            "ttft_ms": summary([r.ttft_s for r in recent if r.ttft_s is not None]),
            "queue_wait_ms": summary([r.queue_wait_s for r in recent if r.queue_wait_s is not None]),
            "error_rate": _round(errors / len(recent) if recent else 0.0, 4),
            "errors": errors,
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
