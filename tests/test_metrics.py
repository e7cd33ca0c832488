"""server/metrics.py on its own: the rolling window's figures, and the Prometheus
series' names, labels and buckets."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from server.metrics import (
    GAP_BUCKETS,
    LATENCY_BUCKETS,
    MAX_MODELS_PER_PROVIDER,
    Metrics,
    Outcome,
    RequestRecord,
    percentile,
)
from server.states import MessageStatus

from .workload import Scrape

#: labels that would make a series per thread, org, message or client
UNBOUNDED_LABELS = {"thread_id", "thread", "org_id", "org", "message_id", "stream_id", "user", "key"}


def rec(coalesce: str | None = "leader", latency_ms: float = 100, **kw: object) -> RequestRecord:
    return RequestRecord(route="messages", org=str(kw.pop("org", "org_a")), mode="json", coalesce=coalesce,
                         latency_s=latency_ms / 1000, **kw)  # type: ignore[arg-type]


def exposed(metrics: Metrics) -> Scrape:
    return Scrape(generate_latest(metrics.registry).decode())


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([7.0], 99, 7.0),
        ([float(v) for v in range(1, 11)], 50, 5.0),
        ([float(v) for v in range(1, 11)], 95, 10.0),
        ([float(v) for v in range(1, 101)], 95, 95.0),
        ([float(v) for v in range(100, 0, -1)], 99, 99.0),  # order does not matter
        ([3.0, 1.0, 2.0], 0, 1.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_performance_figures_over_the_window() -> None:
    m = Metrics()
    m.record(rec("leader", 400, ttft_s=0.1, queue_wait_s=0.02))
    for i in range(6):
        m.record(rec("follower", 300 + i, ttft_s=0.05))
    m.record(rec("cache", 5))
    m.record(rec("leader", 50, error="upstream_error", queue_wait_s=0.0))
    m.record(rec("follower", 900, client_left=True))
    perf = m.performance(100)
    assert perf["requests"] == 10
    assert perf["window"] == 100
    assert perf["coalesce"] == {"leaders": 2, "followers": 7, "cache_hits": 1,
                                "upstream_calls_saved": 8, "ratio": 0.8}
    assert perf["errors"] == 1 and perf["error_rate"] == 0.1
    assert perf["client_left"] == 1
    assert perf["latency_ms"] == {"p50": 302.0, "p95": 900.0, "p99": 900.0, "count": 10}
    assert perf["ttft_ms"] == {"p50": 50.0, "p95": 100.0, "p99": 100.0, "count": 7}
    assert perf["queue_wait_ms"] == {"p50": 0.0, "p95": 20.0, "p99": 20.0, "count": 2}


def test_last_n_keeps_the_newest_and_the_window_is_bounded() -> None:
    m = Metrics(window=5)
    for i in range(8):
        m.record(rec("leader" if i < 6 else "cache", latency_ms=i))
    assert m.performance(100)["requests"] == 5  # the window holds the newest 5
    newest = m.performance(2)
    assert newest["requests"] == 2
    assert newest["coalesce"]["cache_hits"] == 2 and newest["coalesce"]["leaders"] == 0
    assert newest["latency_ms"]["p99"] == 7.0
    # the Prometheus series are not windowed: they count every request
    assert exposed(m).value("dac_request_duration_seconds_count") == 8


def test_an_org_sees_only_its_own_records_and_last_n_counts_within_them() -> None:
    m = Metrics()
    for i in range(4):
        m.record(rec("leader", latency_ms=10 + i, org="org_a"))
        m.record(rec("cache", latency_ms=500, org="org_b"))
    a = m.performance(3, "org_a")
    assert a["requests"] == 3 and a["coalesce"]["cache_hits"] == 0
    assert a["latency_ms"]["p99"] == 13.0  # the newest three of org A: 11, 12, 13 ms
    assert m.performance(100, "org_b")["coalesce"] == {"leaders": 0, "followers": 0, "cache_hits": 4,
                                                       "upstream_calls_saved": 4, "ratio": 1.0}
    assert m.performance(100, "org_c")["requests"] == 0
    assert m.performance(100)["requests"] == 8  # every org's, for an operator


def test_requests_without_a_role_do_not_dilute_the_coalesce_ratio() -> None:
    m = Metrics()
    m.record(rec("leader"))
    m.record(rec("follower"))
    m.record(RequestRecord(route="streams", org="org_a", mode="sse", coalesce=None, latency_s=0.1))
    perf = m.performance(10)
    assert perf["requests"] == 3
    assert perf["coalesce"]["ratio"] == 0.5


def test_an_empty_window_has_no_percentiles_and_no_nan() -> None:
    perf = Metrics().performance(100)
    assert perf["requests"] == 0
    assert perf["error_rate"] == 0.0 and perf["coalesce"]["ratio"] == 0.0
    for name in ("latency_ms", "ttft_ms", "queue_wait_ms"):
        assert perf[name] == {"p50": None, "p95": None, "p99": None, "count": 0}


def test_record_feeds_the_prometheus_series() -> None:
    m = Metrics()
    m.record(rec("leader", 200))
    m.record(rec("follower", 200))
    m.record(rec("follower", 3000, error="upstream_error"))
    m.record(rec("cache", 1, client_left=True))
    s = exposed(m)
    assert s.value("dac_request_duration_seconds_count", outcome="ok") == 2
    assert s.value("dac_request_duration_seconds_count", outcome="error") == 1
    assert s.value("dac_request_duration_seconds_count", outcome="cancelled") == 1
    assert s.bucket("dac_request_duration_seconds", 0.25, outcome="ok") == 2
    assert s.bucket("dac_request_duration_seconds", 2.5, outcome="error") == 0
    assert s.bucket("dac_request_duration_seconds", 5.0, outcome="error") == 1
    assert s.value("dac_coalesce_total", role="leader") == 1
    assert s.value("dac_coalesce_total", role="follower") == 2
    assert s.value("dac_coalesce_total", role="cache") == 1
    assert s.value("dac_errors_total", type="upstream_error") == 1


def test_an_error_is_counted_once_per_request_scope() -> None:
    m = Metrics()
    with m.request_scope() as scope:
        m.record(rec("leader", error="upstream_error"))
        m.count_error("upstream_error", scope)  # the answer's middleware sees the same error
    with m.request_scope() as scope:
        m.count_error("invalid_request", scope)
    with m.request_scope() as scope:
        m.record(rec("follower", client_left=True))
        m.count_error("internal_error", scope)  # the exception of a connection gone is no error
    m.count_error("not_found")  # outside any request: counted as it comes
    s = exposed(m)
    assert s.value("dac_errors_total", type="upstream_error") == 1
    assert s.value("dac_errors_total", type="invalid_request") == 1
    assert s.value("dac_errors_total", type="not_found") == 1
    assert s.value("dac_errors_total", type="internal_error") == 0
    assert s.value("dac_request_duration_seconds_count", outcome="cancelled") == 1


def test_upstream_calls_and_token_usage() -> None:
    m = Metrics()
    m.upstream_finished(provider="openai", model="gpt-4o", outcome=Outcome.OK, duration_s=1.2)
    m.upstream_finished(provider="openai", model="gpt-4o", outcome=Outcome.CANCELLED, duration_s=0.3)
    m.token_usage("openai", {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42})
    m.token_usage("openai", {"prompt_tokens": 3000, "completion_tokens": 2})
    m.token_usage("anthropic", {"input_tokens": 5, "output_tokens": 7})
    m.token_usage("openai", {"prompt_tokens": True, "completion_tokens": "9"})  # not numbers: ignored
    s = exposed(m)
    assert s.value("dac_upstream_calls_total", provider="openai", model="gpt-4o", outcome="ok") == 1
    assert s.value("dac_upstream_calls_total", outcome="cancelled") == 1
    assert s.bucket("dac_upstream_duration_seconds", 1.5, outcome="ok") == 1
    assert s.bucket("dac_upstream_duration_seconds", 1.0, outcome="ok") == 0
    assert s.value("dac_tokens_total", provider="openai", type="input") == 3012
    assert s.value("dac_tokens_total", provider="openai", type="output") == 32
    assert s.value("dac_tokens_total", provider="anthropic", type="input") == 5
    assert s.value("dac_tokens_total", provider="anthropic", type="output") == 7
    # beside the counters, one observation per call
    assert s.value("dac_token_usage_tokens_count", provider="openai", type="input") == 2
    assert s.bucket("dac_token_usage_tokens", 16, provider="openai", type="input") == 1
    assert s.bucket("dac_token_usage_tokens", 4096, provider="openai", type="input") == 2
    assert s.value("dac_token_usage_tokens_sum", provider="openai", type="output") == 32


def test_time_per_output_token_is_the_opentelemetry_formula() -> None:
    m = Metrics()
    m.time_per_output_token("openai", "gpt-4o", duration_s=2.5, first_s=0.5, usage={"completion_tokens": 11})
    m.time_per_output_token("openai", "gpt-4o", duration_s=2.5, first_s=0.5, usage={"completion_tokens": 1})
    m.time_per_output_token("openai", "gpt-4o", duration_s=2.5, first_s=0.5, usage=None)
    s = exposed(m)
    # (2.5 - 0.5) / (11 - 1); an answer of one token, or without usage, has no figure
    assert s.value("dac_time_per_output_token_seconds_count", provider="openai", model="gpt-4o") == 1
    assert s.value("dac_time_per_output_token_seconds_sum", provider="openai", model="gpt-4o") == pytest.approx(0.2)


def test_outcomes_speak_one_vocabulary() -> None:
    assert {Outcome.of(status) for status in MessageStatus if status is not MessageStatus.STREAMING} == set(Outcome)
    assert [o.value for o in Outcome] == ["ok", "error", "cancelled"]
    assert {rec("leader").outcome, rec("leader", error="x").outcome, rec("leader", client_left=True).outcome} \
        == set(Outcome)


def test_build_info_names_the_version() -> None:
    s = exposed(Metrics())
    families = [f for f in Metrics().registry.collect() if f.name == "dac_build_info"]
    assert families and families[0].samples[0].labels["version"] not in ("", "unknown")
    assert s.value("dac_build_info") == 1


def test_model_labels_stay_bounded() -> None:
    m = Metrics()
    assert m.model_label("mock", "mock:ttft=5,n=3") == "mock"
    names = [f"model-{i}" for i in range(MAX_MODELS_PER_PROVIDER + 5)]
    labels = [m.model_label("openai", name) for name in names]
    assert labels[:MAX_MODELS_PER_PROVIDER] == names[:MAX_MODELS_PER_PROVIDER]
    assert set(labels[MAX_MODELS_PER_PROVIDER:]) == {"other"}
    assert m.model_label("openai", "model-0") == "model-0"  # a known one keeps its name
    assert m.model_label("anthropic", "model-99") == "model-99"  # the bound is per provider


def test_a_model_no_provider_answered_takes_no_label_slot() -> None:
    m = Metrics()
    for i in range(MAX_MODELS_PER_PROVIDER * 2):  # bogus names the upstream refused (404)
        m.upstream_finished(provider="openai", model=f"typo-{i}", outcome=Outcome.ERROR, duration_s=0.1,
                            answered=False)
    m.upstream_finished(provider="openai", model="gpt-4o", outcome=Outcome.OK, duration_s=1.0)
    s = exposed(m)
    assert s.value("dac_upstream_calls_total", provider="openai", model="other", outcome="error") == 64
    assert s.value("dac_upstream_calls_total", provider="openai", model="gpt-4o", outcome="ok") == 1
    assert m.model_label("openai", "typo-1", answered=False) == "other"


def test_cache_gauges_read_the_cache_at_scrape_time() -> None:
    m = Metrics()
    held = {"entries": 0, "bytes": 0}
    m.watch_cache(entries=lambda: held["entries"], size_bytes=lambda: held["bytes"])
    assert exposed(m).value("dac_cache_entries") == 0
    held.update(entries=3, bytes=1234)
    s = exposed(m)
    assert s.value("dac_cache_entries") == 3
    assert s.value("dac_cache_bytes") == 1234


def test_each_app_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.record(rec("leader"))
    assert exposed(a).value("dac_coalesce_total", role="leader") == 1
    assert exposed(b).value("dac_coalesce_total", role="leader") == 0


def test_series_follow_prometheus_naming_rules() -> None:
    m = Metrics()
    families = list(m.registry.collect())
    assert families
    for family in families:
        assert family.name.startswith("dac_"), family.name
        assert family.documentation, f"{family.name} has no help text"
        if family.type == "counter":
            # prometheus-client adds _total to the sample; the family name must not repeat it
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram":  # a duration in base units, or a count of tokens
            assert family.name.endswith(("_seconds", "_tokens")), f"{family.name}: its unit in the name"
    # every label any series may carry is a bounded one
    for collector in (m.request_duration, m.upstream_duration, m.ttft, m.ttfb, m.tpot, m.queue_wait,
                      m.inter_chunk, m.token_histogram, m.cancel_latency, m.upstream_calls, m.coalesce,
                      m.answers, m.deltas, m.tokens, m.cancels, m.errors, m.build_info):
        names = set(collector._labelnames)  # noqa: SLF001 - the declared label names
        assert not names & UNBOUNDED_LABELS, (collector, names)
    text = generate_latest(m.registry).decode()
    assert "_created" not in text


def test_buckets_fit_llm_latencies() -> None:
    assert LATENCY_BUCKETS[0] == 0.005 and LATENCY_BUCKETS[-1] == 600.0  # the total timeout
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert list(GAP_BUCKETS) == sorted(set(GAP_BUCKETS))
    assert 0.3 in GAP_BUCKETS  # the cancel promise is a bucket boundary
    m = Metrics()
    for hist in (m.request_duration.labels("messages", "json", "ok"), m.ttft.labels("p", "m"),
                 m.queue_wait.labels("p"), m.upstream_duration.labels("p", "m", "ok")):
        hist.observe(0.001)
    s = exposed(m)
    assert s.bucket("dac_time_to_first_token_seconds", 600.0) == 1
    assert s.bucket("dac_queue_wait_seconds", 0.005) == 1
