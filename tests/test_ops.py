"""The operations endpoints over a real socket: /healthz, /readyz, /metrics and
/api/metrics/performance, checked against workloads whose counts are known."""

from __future__ import annotations

import asyncio
import math

import pytest

from server.appkeys import PACER
from server.errors import UpstreamError

from .conftest import GatewayFactory
from .engines import on_every_engine
from .helpers import ScriptedProvider, registry, within
from .workload import (
    ANSWER,
    TOKENS,
    abandoned_stream,
    coalesced_streams,
    failed_request,
    roles_recorded,
    scrape,
    scrape_until,
)

HOLD_S = 0.05


@on_every_engine
async def test_health_and_readiness(gateway_factory: GatewayFactory, engine: str) -> None:
    gw = await gateway_factory()
    for path, expected in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready", "store": engine, "registry": "inprocess"})):
        async with gw.session.get(gw.url + path) as resp:
            assert resp.status == 200
            assert await resp.json() == expected


async def test_metrics_speaks_both_exposition_formats(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    before = await scrape(gw)
    # the coalesce roles exist at 0 before any request, so rate() sees the first one
    for role in ("leader", "follower", "cache"):
        assert before.has("dac_coalesce_total")
        assert before.samples["dac_coalesce_total"][frozenset({("role", role)})] == 0
    assert before.value("dac_active_flights") == 0
    assert "_created" not in before.text
    openmetrics = "application/openmetrics-text; version=1.0.0"
    async with gw.session.get(gw.url + "/metrics", headers={"Accept": openmetrics}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await resp.text()
    assert text.rstrip().endswith("# EOF")
    assert "dac_coalesce_total" in text


async def test_ten_identical_streams_make_one_upstream_call(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()

    results = await coalesced_streams(gw, provider, thread, "What is DAC?", n=10, hold_s=HOLD_S)

    assert sorted(r.role for r in results) == ["follower"] * 9 + ["leader"]
    for r in results:
        assert "".join(ev.json()["text"] for ev in r.events if ev.event == "delta") == ANSWER
        assert r.events[-1].event == "done"
    assert len(provider.calls) == 1

    s = await scrape_until(gw, roles_recorded(10), "10 requests recorded")
    assert s.value("dac_coalesce_total", role="leader") == 1
    assert s.value("dac_coalesce_total", role="follower") == 9
    assert s.value("dac_coalesce_total", role="cache") == 0
    assert s.value("dac_upstream_calls_total") == 1
    assert s.value("dac_upstream_calls_total", provider="scripted", model="scripted", outcome="ok") == 1
    assert s.value("dac_upstream_duration_seconds_count", outcome="ok") == 1
    assert s.value("dac_request_duration_seconds_count", route="messages", mode="sse", outcome="ok") == 10
    assert s.value("dac_time_to_first_token_seconds_count", provider="scripted") == 1
    # the provider was held HOLD_S after its call began: the upstream TTFT is at least that
    assert s.value("dac_time_to_first_token_seconds_sum") >= HOLD_S
    assert s.value("dac_time_to_first_token_seconds_bucket", le="0.025") == 0
    assert s.value("dac_queue_wait_seconds_count", provider="scripted") == 1
    assert s.value("dac_inter_chunk_seconds_count", provider="scripted") == len(TOKENS) - 1
    assert s.value("dac_stream_deltas_total", provider="scripted") == len(TOKENS)
    assert s.value("dac_tokens_total", provider="scripted", type="output") == len(TOKENS)
    assert s.value("dac_tokens_total", provider="scripted", type="input") == 1
    assert s.value("dac_errors_total") == 0
    assert s.value("dac_cancels_total") == 0
    assert s.value("dac_active_flights") == 0
    assert s.value("dac_active_listeners") == 0
    assert s.value("dac_cache_entries") == 1
    assert s.value("dac_cache_bytes") == sum(flight.held_bytes for flight in gw.hub._cache) > len(ANSWER.encode())

    perf = await gw.performance(last_n=100)
    assert perf["requests"] == 10
    assert perf["coalesce"] == {"leaders": 1, "followers": 9, "cache_hits": 0,
                                "upstream_calls_saved": 9, "ratio": 0.9}
    assert perf["error_rate"] == 0 and perf["errors"] == 0 and perf["client_left"] == 0
    for name in ("latency_ms", "ttft_ms"):
        figures = perf[name]
        assert figures["count"] == 10, (name, figures)
        assert HOLD_S * 1000 <= figures["p50"] <= figures["p95"] <= figures["p99"], (name, figures)
    assert perf["ttft_ms"]["p99"] <= perf["latency_ms"]["p99"]
    assert perf["queue_wait_ms"]["count"] == 1  # only the leader waited for a slot
    assert 0 <= perf["queue_wait_ms"]["p50"] <= perf["latency_ms"]["p50"]

    # the same prompt again: answered from the finished flight, no provider call
    status, body = await gw.post(thread, {"content": "What is DAC?", "provider": "scripted"})
    assert status == 200 and body["coalesce"] == "cache"
    assert body["message"]["content"] == ANSWER
    assert len(provider.calls) == 1
    s = await scrape(gw)
    assert s.value("dac_coalesce_total", role="cache") == 1
    assert s.value("dac_upstream_calls_total") == 1
    assert s.value("dac_request_duration_seconds_count", mode="json", outcome="ok") == 1
    perf = await gw.performance(last_n=100)
    assert perf["requests"] == 11
    assert perf["coalesce"]["cache_hits"] == 1
    assert perf["coalesce"]["upstream_calls_saved"] == 10
    assert perf["queue_wait_ms"]["count"] == 1
    # last_n keeps only the newest requests: here, the cache hit alone
    newest = await gw.performance(last_n=1)
    assert newest["requests"] == 1
    assert newest["coalesce"] == {"leaders": 0, "followers": 0, "cache_hits": 1,
                                  "upstream_calls_saved": 1, "ratio": 1.0}
    assert newest["ttft_ms"] == {"p50": None, "p95": None, "p99": None, "count": 0}


async def test_ten_identical_json_requests_share_one_call(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    body = {"content": "Same question", "provider": "scripted"}
    pending = [asyncio.ensure_future(gw.post(thread, body)) for _ in range(10)]
    call = await provider.next_call()
    # the listeners gauge is how an operator sees that all ten are waiting on one flight
    s = await scrape_until(gw, lambda s: s.value("dac_active_listeners") == 10, "10 listeners")
    assert s.value("dac_active_flights") == 1
    call.send(*TOKENS)
    call.finish()
    answers = [await within(p) for p in pending]
    assert all(status == 200 for status, _ in answers), answers
    assert sorted(b["coalesce"] for _, b in answers) == ["follower"] * 9 + ["leader"]
    assert {b["message"]["message_id"] for _, b in answers} == {answers[0][1]["message"]["message_id"]}
    s = await scrape(gw)  # JSON requests are recorded before their answer is sent
    assert s.value("dac_coalesce_total", role="leader") == 1
    assert s.value("dac_coalesce_total", role="follower") == 9
    assert s.value("dac_upstream_calls_total") == 1
    assert s.value("dac_active_listeners") == 0
    assert s.value("dac_active_flights") == 0
    perf = await gw.performance()
    assert perf["requests"] == 10
    assert perf["coalesce"]["upstream_calls_saved"] == 9
    assert perf["ttft_ms"]["count"] == 0  # nothing streamed: TTFT is for streamed answers


async def test_queue_wait_is_measured_while_a_provider_is_full(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider(max_concurrency=1)
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    first = asyncio.ensure_future(gw.post(thread, {"content": "first", "provider": "scripted"}))
    call1 = await provider.next_call()
    second = asyncio.ensure_future(gw.post(thread, {"content": "second", "provider": "scripted"}))
    pacer = gw.app[PACER]

    async def queued() -> None:
        while pacer.snapshot()["scripted"]["waiting"] < 1:
            await asyncio.sleep(0.005)

    await within(queued(), what="the second flight to wait for the provider's only slot")
    await asyncio.sleep(HOLD_S)  # the second flight waits at least this long
    call1.send("one")
    call1.finish()
    call2 = await provider.next_call()
    call2.send("two")
    call2.finish()
    assert (await within(first))[0] == 200 and (await within(second))[0] == 200

    perf = await gw.performance()
    assert perf["queue_wait_ms"]["count"] == 2
    assert perf["queue_wait_ms"]["p99"] >= HOLD_S * 1000
    assert perf["queue_wait_ms"]["p50"] < perf["queue_wait_ms"]["p99"]
    s = await scrape(gw)
    assert s.value("dac_queue_wait_seconds_count", provider="scripted") == 2
    assert s.value("dac_queue_wait_seconds_sum", provider="scripted") >= HOLD_S
    assert s.bucket("dac_queue_wait_seconds", 0.025, provider="scripted") <= 1


async def test_a_client_leaving_is_a_cancel_with_its_latency(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()

    await abandoned_stream(gw, provider, thread, "never mind")

    s = await scrape_until(gw, lambda s: s.value("dac_request_duration_seconds_count") >= 1,
                           "the abandoned request recorded")
    assert s.value("dac_cancels_total", provider="scripted", reason="no_listeners") == 1
    assert s.value("dac_cancel_latency_seconds_count", provider="scripted") == 1
    # the promise is 300 ms; on a loaded machine allow more, but it is a bounded wait
    assert 0 < s.value("dac_cancel_latency_seconds_sum") < 5
    assert s.value("dac_upstream_calls_total", outcome="cancelled") == 1
    assert s.value("dac_request_duration_seconds_count", outcome="cancelled") == 1
    assert s.value("dac_errors_total") == 0  # a client leaving is not an error of ours
    assert s.value("dac_active_flights") == 0
    assert s.value("dac_active_listeners") == 0
    assert s.value("dac_cache_entries") == 0  # a cancelled answer is never served again
    perf = await gw.performance()
    assert perf["client_left"] == 1
    assert perf["error_rate"] == 0


async def test_a_json_client_leaving_is_recorded_as_such(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    pending = asyncio.ensure_future(gw.post(thread, {"content": "too slow", "provider": "scripted"}))
    call = await provider.next_call()
    pending.cancel()  # the client gives up: its connection closes
    await within(call.closed.wait(), what="the upstream call to close")
    s = await scrape_until(gw, lambda s: s.value("dac_cancels_total") >= 1
                           and s.value("dac_request_duration_seconds_count") >= 1, "the cancel recorded")
    assert s.value("dac_request_duration_seconds_count", mode="json", outcome="cancelled") == 1
    assert s.value("dac_cancel_latency_seconds_count") == 1
    assert s.value("dac_errors_total") == 0
    assert s.value("dac_active_listeners") == 0
    perf = await gw.performance()
    assert perf["client_left"] == 1 and perf["error_rate"] == 0


async def test_errors_are_counted_once_by_type(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider), max_body_bytes=2048)
    thread = await gw.new_thread()

    await failed_request(gw, provider, thread, "this one fails")
    s = await scrape(gw)
    assert s.value("dac_errors_total", type="upstream_error") == 1
    assert s.value("dac_upstream_calls_total", outcome="error") == 1
    assert s.value("dac_request_duration_seconds_count", outcome="error") == 1

    # joiners within the error TTL get the same error: each one is an error answered
    for _ in range(2):
        status, body = await gw.post(thread, {"content": "this one fails", "provider": "scripted"})
        assert status == 502 and body["error"]["type"] == "upstream_error"
    assert len(provider.calls) == 1

    # errors that never reach a flight are counted by their type too
    async with gw.session.post(f"{gw.url}/api/threads/{thread}/messages", json={"content": ""},
                               headers=gw.h()) as resp:
        assert resp.status == 400
    async with gw.session.post(f"{gw.url}/api/threads/thr_missing/messages", json={"content": "hi", "provider": "scripted"},
                               headers=gw.h()) as resp:
        assert resp.status == 404
    async with gw.session.get(f"{gw.url}/api/threads/") as resp:
        assert resp.status == 401
    async with gw.session.get(f"{gw.url}/no/such/route") as resp:
        assert resp.status == 404
    async with gw.session.post(f"{gw.url}/api/threads/{thread}/messages", headers=gw.h(),
                               json={"content": "x" * 4096, "provider": "scripted"}) as resp:
        assert resp.status == 413

    s = await scrape(gw)
    assert s.value("dac_errors_total", type="upstream_error") == 3
    assert s.value("dac_errors_total", type="invalid_request") == 1
    assert s.value("dac_errors_total", type="not_found") == 2
    assert s.value("dac_errors_total", type="unauthorized") == 1
    assert s.value("dac_errors_total", type="payload_too_large") == 1
    assert s.value("dac_errors_total") == 8
    perf = await gw.performance()
    assert perf["requests"] == 3  # chat requests that reached a flight
    assert perf["errors"] == 3 and perf["error_rate"] == 1.0


async def test_an_error_inside_a_stream_is_counted(gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    async with gw.open_stream(thread, {"content": "cut short", "provider": "scripted"}) as resp:
        assert resp.status == 200
        call = await provider.next_call()
        call.send("half")
        call.fail(UpstreamError("cut"))
        text = await within(resp.text(), what="the stream to end")
    assert "event: error" in text
    s = await scrape_until(gw, lambda s: s.value("dac_errors_total") >= 1, "the stream's error")
    assert s.value("dac_errors_total", type="upstream_error") == 1
    assert s.value("dac_request_duration_seconds_count", mode="sse", outcome="error") == 1
    assert s.value("dac_upstream_calls_total", outcome="error") == 1
    assert s.value("dac_active_listeners") == 0


@pytest.mark.parametrize("raw", ["0", "-5", "abc", "1.5", "100001"])
async def test_performance_rejects_a_bad_last_n(gateway_factory: GatewayFactory, raw: str) -> None:
    gw = await gateway_factory()
    async with gw.session.get(f"{gw.url}/api/metrics/performance", params={"last_n": raw}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request"
    assert "last_n" in body["error"]["message"]


async def test_performance_on_an_idle_gateway(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    async with gw.session.get(f"{gw.url}/api/metrics/performance") as resp:
        assert resp.status == 200
        perf = await resp.json()
    assert perf["window"] == 100  # the default last_n
    assert perf["requests"] == 0 and perf["error_rate"] == 0
    assert perf["latency_ms"] == {"p50": None, "p95": None, "p99": None, "count": 0}
    assert not any(math.isnan(v) for v in perf["coalesce"].values())
