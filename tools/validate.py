#!/usr/bin/env python3
"""The phase-1 acceptance suite, run against a gateway that is already running.

    tools/validate.py [--base http://127.0.0.1:8000] [--duration 20] [--quick] [--json]
    tools/validate.py --serve    # start a server on a free port with a fresh database, run, stop it
    make validate                # the same as --serve

Checks, in order (``--only`` picks some):

- ``burst``: 50 identical non-stream POSTs on one thread over 10 connections
  (as ``autocannon -c 10 -a 50``): all 200 with one answer, one provider call,
  two messages stored, the coalesce ratio from ``/api/metrics/performance``,
  and the P95 latency.
- ``cache``: the same request again after the answer: served from the cache.
- ``fanout``: 10 identical streams at once: TTFT P95, one provider call.
- ``cancel``: open a stream, close the connection (mid-stream and before the
  first token): the server's cancel latency (``dac_cancel_latency_seconds``:
  last listener left -> upstream closed) and, end to end, the time until the
  message reads ``cancelled``.
- ``chats``: 25 chats, each sending its next message as soon as the last one
  was answered (streaming and non-stream alternately), for ``--duration``
  seconds: error rate, P95 latency, TTFT P95 and queue wait P95.

Prints the targets table (Check | Target | Actual | Result), or with
``--json`` one JSON object; progress goes to stderr. Exits 1 if any target
fails, 2 if the server cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson

from tools._common import (
    DEFAULT_ORG,
    ServerProcess,
    markdown_table,
    metric_sum,
    ms,
    percentile,
    progress,
)
from tools.client import GatewayClient
from tools.sse import sse_events

DEFAULT_BASE = "http://127.0.0.1:8000"
DEFAULT_PROVIDER = "mock"
#: a realistic answer: 300 ms to the first token, then 40 tokens 30 ms apart
DEFAULT_MODEL = "mock:ttft=300,itl=30,n=40"
DEFAULT_DURATION_S = 20.0
QUICK_DURATION_S = 4.0
CHECKS = ("burst", "cache", "fanout", "cancel", "chats")

BURST_REQUESTS = 50
BURST_CONNECTIONS = 10
FANOUT_STREAMS = 10
ACTIVE_CHATS = 25
DEFAULT_CANCEL_TRIALS = 3
QUICK_CANCEL_TRIALS = 1
#: polling interval while waiting for a cancelled message or a metric to move
POLL_S = 0.01
#: how long a cancellation may take to show before the trial counts as failed
CANCEL_WAIT_S = 5.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_read=60)

# Phase-1 targets.
TARGET_ERROR_RATE = 0.01
TARGET_LATENCY_P95_S = 6.0
TARGET_TTFT_P95_S = 1.5
TARGET_QUEUE_WAIT_P95_S = 1.0
TARGET_CANCEL_S = 0.3
TARGET_COALESCE_RATIO = 0.9


@dataclass(slots=True, kw_only=True)
class Result:
    check: str  # one of CHECKS
    name: str
    target: str
    actual: str
    #: None for a figure shown for information, without a target
    passed: bool | None
    #: the measured figure in base units (seconds, ratio, count), for --json
    value: float | int | None = None


@dataclass(slots=True, kw_only=True)
class Turn:
    kind: str  # "stream" or "json"
    latency_s: float
    ttft_s: float | None = None
    error: str | None = None


def mock_variant(model: str, **options: object) -> str:
    """``model`` with some mock options replaced (other providers' models are returned as they are)."""
    name, _, rest = model.partition(":")
    if name != "mock":
        return model
    values = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
    values.update({k: str(v) for k, v in options.items()})
    return "mock:" + ",".join(f"{k}={v}" for k, v in values.items())


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def pct(value: float) -> str:
    return f"{value * 100:.1f}%"


class Validator:
    def __init__(self, *, gateway: GatewayClient, provider: str, model: str, duration_s: float,
                 cancel_trials: int) -> None:
        self.gw = gateway
        self.provider = provider
        self.model = model
        self.duration_s = duration_s
        self.cancel_trials = cancel_trials
        self.run_id = uuid.uuid4().hex[:8]
        self.results: list[Result] = []
        self.details: dict[str, Any] = {}
        self.has_upstream_counter = False
        self.has_cancel_histogram = False

    def body(self, content: str, model: str | None = None) -> dict[str, Any]:
        return {"role": "user", "content": content, "provider": self.provider, "model": model or self.model,
                "reason": "validate", "scope": "private"}

    def add(self, **fields: Any) -> Result:
        result = Result(**fields)
        self.results.append(result)
        verdict = "info" if result.passed is None else ("PASS" if result.passed else "FAIL")
        progress(f"  {verdict:4} {result.name}: {result.actual}")
        return result

    async def probe(self) -> None:
        async with self.gw.session.get(f"{self.gw.url}/readyz") as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.gw.url}/readyz answered {resp.status}")
        async with self.gw.session.get(f"{self.gw.url}/metrics") as resp:
            text = await resp.text() if resp.status == 200 else ""
        self.has_upstream_counter = "dac_upstream_calls" in text
        self.has_cancel_histogram = "dac_cancel_latency_seconds" in text

    async def upstream_calls(self) -> float:
        samples = await self.gw.prometheus()
        return metric_sum(samples, "dac_upstream_calls_total", provider=self.provider)

    # -- burst ------------------------------------------------------------------

    async def burst(self) -> None:
        progress(f"burst: {BURST_REQUESTS} identical requests on {BURST_CONNECTIONS} connections")
        thread = await self.gw.new_thread("validate: burst")
        body = self.body(f"Burst test {self.run_id}: what is DAC?")
        calls_before = await self.upstream_calls()
        connector = aiohttp.TCPConnector(limit=BURST_CONNECTIONS)
        outcomes: list[tuple[int, Any, float]] = []
        remaining = iter(range(BURST_REQUESTS))
        async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
            burst_gw = GatewayClient(session, self.gw.url, org=self.gw.org, key=self.gw.key)

            async def connection() -> None:
                # Like autocannon -c 10 -a 50: ten connections, each sending its next request when answered.
                for _ in remaining:
                    started = time.perf_counter()
                    status, data = await burst_gw.post(thread, body)
                    outcomes.append((status, data, time.perf_counter() - started))

            await asyncio.gather(*(connection() for _ in range(BURST_CONNECTIONS)))
        ok = [data for status, data, _ in outcomes if status == 200]
        texts = {data["message"]["content"] for data in ok}
        roles = {"leader": 0, "follower": 0, "cache": 0}
        for data in ok:
            roles[data.get("coalesce", "")] = roles.get(data.get("coalesce", ""), 0) + 1
        calls = int(await self.upstream_calls() - calls_before) if self.has_upstream_counter else roles["leader"]
        messages = (await self.gw.thread(thread))["messages"]
        perf = (await self.gw.performance(BURST_REQUESTS))["coalesce"]
        shared = perf["followers"] + perf["cache_hits"]
        ratio = shared / BURST_REQUESTS
        latency_p95 = percentile([lat for _, _, lat in outcomes], 95)
        self.details["burst"] = {"thread_id": thread, "statuses": sorted({s for s, _, _ in outcomes}),
                                 "roles_from_responses": roles, "performance_coalesce": perf,
                                 "provider_calls": calls, "messages": len(messages)}
        self.add(check="burst", name=f"Burst: {BURST_REQUESTS} requests on {BURST_CONNECTIONS} connections",
                 target=f"{BURST_REQUESTS}/{BURST_REQUESTS} HTTP 200, one answer",
                 actual=f"{len(ok)}/{BURST_REQUESTS} HTTP 200, {plural(len(texts), 'distinct answer')}",
                 passed=len(ok) == BURST_REQUESTS and len(texts) == 1, value=len(ok))
        self.add(check="burst", name="Burst: provider calls", target="1 (phase-1 notes: <= 3)",
                 actual=f"{calls}", passed=calls == 1, value=calls)
        self.add(check="burst", name="Burst: messages stored", target="2 (1 user + 1 assistant)",
                 actual=f"{len(messages)}", passed=len(messages) == 2, value=len(messages))
        self.add(check="burst", name="Burst: coalesce ratio", target=f"> {TARGET_COALESCE_RATIO:.0%}",
                 actual=(f"{pct(ratio)} ({perf['leaders']} leader, {perf['followers']} followers, "
                         f"{perf['cache_hits']} cache hits)"),
                 passed=ratio > TARGET_COALESCE_RATIO, value=ratio)
        self.add(check="burst", name="Burst: P95 latency", target=f"<= {ms(TARGET_LATENCY_P95_S)}",
                 actual=ms(latency_p95), passed=latency_p95 is not None and latency_p95 <= TARGET_LATENCY_P95_S,
                 value=latency_p95)

    # -- cache --------------------------------------------------------------------

    async def cache(self) -> None:
        progress("cache: the same request again after it was answered")
        thread = await self.gw.new_thread("validate: cache")
        body = self.body(f"Cache test {self.run_id}: what is DAC?")
        calls_before = await self.upstream_calls()
        first_status, first = await self.gw.post(thread, body)
        started = time.perf_counter()
        second_status, second = await self.gw.post(thread, body)
        elapsed = time.perf_counter() - started
        calls = int(await self.upstream_calls() - calls_before) if self.has_upstream_counter else 1
        messages = (await self.gw.thread(thread))["messages"]
        role = second.get("coalesce") if second_status == 200 else f"HTTP {second_status}"
        same = (first_status == second_status == 200
                and first["message"]["content"] == second["message"]["content"])
        self.add(check="cache", name="Cache hit: identical request after the answer",
                 target="coalesce=cache, same answer, 1 provider call, 2 messages",
                 actual=(f"coalesce={role} in {ms(elapsed)}, {'same' if same else 'different'} answer, "
                         f"{plural(calls, 'provider call')}, {len(messages)} messages"),
                 passed=role == "cache" and same and calls == 1 and len(messages) == 2, value=elapsed)

    # -- streaming fan-out ----------------------------------------------------------

    async def fanout(self) -> None:
        progress(f"fanout: {FANOUT_STREAMS} identical streams at once")
        thread = await self.gw.new_thread("validate: fan-out")
        body = self.body(f"Fan-out test {self.run_id}: what is DAC?")
        calls_before = await self.upstream_calls()

        async def one() -> tuple[float | None, str, str]:
            started = time.monotonic()
            ttft, text, end = None, "", "incomplete"
            async with self.gw.open_stream(thread, body) as resp:
                if resp.status != 200:
                    return None, "", f"HTTP {resp.status}"
                async for ev in sse_events(resp):
                    if ev.event in ("delta", "snapshot"):
                        piece = ev.json()["text"]
                        if piece and ttft is None:
                            ttft = ev.at - started
                        text = text + piece if ev.event == "delta" else piece
                    elif ev.event in ("done", "error"):
                        end = ev.event
            return ttft, text, end

        outcomes = await asyncio.gather(*(one() for _ in range(FANOUT_STREAMS)))
        calls = int(await self.upstream_calls() - calls_before) if self.has_upstream_counter else None
        ttfts = [t for t, _, _ in outcomes if t is not None]
        ttft_p95 = percentile(ttfts, 95)
        texts = {text for _, text, _ in outcomes}
        done = sum(1 for _, _, end in outcomes if end == "done")
        self.add(check="fanout", name=f"Streaming fan-out: TTFT P95 ({FANOUT_STREAMS} streams)",
                 target=f"<= {ms(TARGET_TTFT_P95_S)}", actual=ms(ttft_p95),
                 passed=ttft_p95 is not None and len(ttfts) == FANOUT_STREAMS and ttft_p95 <= TARGET_TTFT_P95_S,
                 value=ttft_p95)
        self.add(check="fanout", name="Streaming fan-out: one upstream call, same full text",
                 target=f"1 call, {FANOUT_STREAMS}/{FANOUT_STREAMS} done, 1 text",
                 actual=(f"{'? calls' if calls is None else plural(calls, 'call')}, "
                         f"{done}/{FANOUT_STREAMS} done, {plural(len(texts), 'distinct text')}"),
                 passed=(calls in (None, 1)) and done == FANOUT_STREAMS and len(texts) == 1 and "" not in texts,
                 value=calls)

    # -- cancel -------------------------------------------------------------------------

    async def cancel_histogram(self) -> tuple[float, float]:
        samples = await self.gw.prometheus()
        return (metric_sum(samples, "dac_cancel_latency_seconds_sum", provider=self.provider),
                metric_sum(samples, "dac_cancel_latency_seconds_count", provider=self.provider))

    async def cancel_trial(self, *, mid_stream: bool) -> dict[str, Any]:
        thread = await self.gw.new_thread("validate: cancel")
        # Long enough that the answer cannot finish on its own during the trial.
        model = mock_variant(self.model, n=2000) if mid_stream else mock_variant(self.model, ttft=10_000)
        body = self.body(f"Cancel test {self.run_id} {uuid.uuid4().hex[:6]}: tell me everything", model)
        before = await self.cancel_histogram() if self.has_cancel_histogram else None
        stream_id = None
        async with self.gw.open_stream(thread, body) as resp:
            if resp.status != 200:
                return {"error": f"HTTP {resp.status}: {await resp.text()}"}
            deltas = 0
            async for ev in sse_events(resp):
                if ev.event == "meta":
                    stream_id = ev.json()["stream_id"]
                    if not mid_stream:
                        break
                elif ev.event == "delta":
                    deltas += 1
                    if deltas >= 3:
                        break
                elif ev.event in ("done", "error"):
                    return {"error": f"the stream ended ({ev.event}) before it could be cancelled"}
            closed = time.monotonic()
            resp.close()  # drops the connection: the client has left
        status, content = "streaming", ""
        while time.monotonic() - closed < CANCEL_WAIT_S:
            messages = (await self.gw.thread(thread))["messages"]
            message = next((m for m in messages if m["message_id"] == stream_id), None)
            if message is not None and message["status"] != "streaming":
                status, content = message["status"], message["content"]
                break
            await asyncio.sleep(POLL_S)
        end_to_end = time.monotonic() - closed if status != "streaming" else None
        server = None
        if before is not None:
            while time.monotonic() - closed < CANCEL_WAIT_S:
                total, count = await self.cancel_histogram()
                if count > before[1]:
                    server = (total - before[0]) / (count - before[1])
                    break
                await asyncio.sleep(POLL_S)
        return {"mid_stream": mid_stream, "status": status, "partial_chars": len(content),
                "end_to_end_s": end_to_end, "server_s": server}

    async def cancel(self) -> None:
        progress(f"cancel: {plural(self.cancel_trials, 'trial')} mid-stream and {self.cancel_trials} "
                 "before the first token")
        trials = []
        for _ in range(self.cancel_trials):
            for mid_stream in (True, False):
                trials.append(await self.cancel_trial(mid_stream=mid_stream))
        self.details["cancel"] = trials
        failures = [t.get("error") or f"message {t['status']}" for t in trials
                    if t.get("error") or t["status"] != "cancelled"]
        failures += ["mid-stream cancel kept no partial text" for t in trials
                     if t.get("mid_stream") and not t.get("error") and t["partial_chars"] == 0]
        e2e = [t["end_to_end_s"] for t in trials if t.get("end_to_end_s") is not None]
        server = [t["server_s"] for t in trials if t.get("server_s") is not None]

        def by_case(key: str) -> str:
            parts = []
            for label, mid in (("mid-stream", True), ("before first token", False)):
                values = [t[key] for t in trials if t.get("mid_stream") is mid and t.get(key) is not None]
                parts.append(f"{label} {ms(max(values)) if values else 'n/a'}")
            return ", ".join(parts)

        if server and len(server) == len(trials):
            name, worst, shown = "Cancel: last listener left -> upstream closed (server)", max(server), by_case("server_s")
        else:
            name, worst, shown = "Cancel: client close -> message cancelled", max(e2e) if e2e else None, by_case("end_to_end_s")
        self.add(check="cancel", name=name, target=f"< {ms(TARGET_CANCEL_S)}",
                 actual=(f"worst {ms(worst)} of {len(trials)} ({shown})" if not failures
                         else "; ".join(sorted(set(failures)))),
                 passed=not failures and worst is not None and worst < TARGET_CANCEL_S, value=worst)
        if server:
            self.add(check="cancel", name="Cancel: client close -> message reads cancelled (end to end)",
                     target="(information)", actual=f"worst {ms(max(e2e)) if e2e else 'n/a'} ({by_case('end_to_end_s')})",
                     passed=None, value=max(e2e) if e2e else None)

    # -- 25 active chats ------------------------------------------------------------------

    async def chats(self) -> None:
        progress(f"chats: {ACTIVE_CHATS} active chats for {self.duration_s:g} s")
        threads = await asyncio.gather(*(self.gw.new_thread(f"validate: chat {i}") for i in range(ACTIVE_CHATS)))
        turns: list[Turn] = []
        in_flight = 0
        peak = 0
        per_chat = [0] * ACTIVE_CHATS
        deadline = time.monotonic() + self.duration_s

        async def stream_turn(thread: str, body: dict[str, Any]) -> Turn:
            started = time.monotonic()
            ttft, error = None, "no done event"
            async with self.gw.open_stream(thread, body) as resp:
                if resp.status != 200:
                    return Turn(kind="stream", latency_s=time.monotonic() - started, error=f"HTTP {resp.status}")
                async for ev in sse_events(resp):
                    if ev.event in ("delta", "snapshot") and ttft is None:
                        ttft = ev.at - started
                    elif ev.event == "done":
                        error = None
                    elif ev.event == "error":
                        error = str(ev.json()["error"].get("type"))
            return Turn(kind="stream", latency_s=time.monotonic() - started, ttft_s=ttft, error=error)

        async def json_turn(thread: str, body: dict[str, Any]) -> Turn:
            started = time.monotonic()
            status, data = await self.gw.post(thread, body)
            error = None if status == 200 else f"HTTP {status} {data.get('error', {}).get('type') if isinstance(data, dict) else ''}"
            return Turn(kind="json", latency_s=time.monotonic() - started, error=error)

        async def chat(i: int) -> None:
            nonlocal in_flight, peak
            k = 0
            while time.monotonic() < deadline:
                body = self.body(f"Chat {i}, turn {k}, run {self.run_id}: what else about DAC?")
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    turn = await (stream_turn if k % 2 == 0 else json_turn)(threads[i], body)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    turn = Turn(kind="stream" if k % 2 == 0 else "json", latency_s=0.0, error=exc.__class__.__name__)
                finally:
                    in_flight -= 1
                turns.append(turn)
                per_chat[i] += 1
                k += 1

        async def report() -> None:
            started = time.monotonic()
            while True:
                await asyncio.sleep(2.0)
                errors = sum(1 for t in turns if t.error)
                progress(f"  chats: {time.monotonic() - started:4.1f}/{self.duration_s:g} s, {len(turns)} turns, "
                         f"{errors} errors, {in_flight} in flight")

        reporter = asyncio.ensure_future(report())
        started = time.monotonic()
        try:
            await asyncio.gather(*(chat(i) for i in range(ACTIVE_CHATS)))
        finally:
            reporter.cancel()
        elapsed = time.monotonic() - started
        perf = await self.gw.performance(len(turns))
        errors = sum(1 for t in turns if t.error)
        error_rate = errors / len(turns) if turns else 1.0
        latency_p95 = percentile([t.latency_s for t in turns if t.kind == "json" and not t.error], 95)
        ttft_p95 = percentile([t.ttft_s for t in turns if t.ttft_s is not None], 95)
        queue_p95_ms = perf["queue_wait_ms"]["p95"]
        queue_p95 = None if queue_p95_ms is None else queue_p95_ms / 1000
        self.details["chats"] = {"turns": len(turns), "errors": sorted({t.error for t in turns if t.error}),
                                 "per_chat_turns": per_chat, "peak_in_flight": peak, "elapsed_s": elapsed,
                                 "server_performance": perf}
        self.add(check="chats", name=f"Concurrency: {ACTIVE_CHATS} active chats",
                 target=f"{ACTIVE_CHATS} in flight at once, each answered",
                 actual=(f"peak {peak} in flight, {len(turns)} turns in {elapsed:.1f} s, "
                         f"fewest per chat {min(per_chat)}"),
                 passed=peak == ACTIVE_CHATS and min(per_chat) >= 1, value=peak)
        self.add(check="chats", name="Error rate", target=f"< {TARGET_ERROR_RATE:.0%}",
                 actual=f"{pct(error_rate)} ({errors}/{len(turns)})", passed=error_rate < TARGET_ERROR_RATE,
                 value=error_rate)
        self.add(check="chats", name="P95 latency (non-stream)", target=f"<= {ms(TARGET_LATENCY_P95_S)}",
                 actual=ms(latency_p95), passed=latency_p95 is not None and latency_p95 <= TARGET_LATENCY_P95_S,
                 value=latency_p95)
        self.add(check="chats", name="TTFT P95 (stream)", target=f"<= {ms(TARGET_TTFT_P95_S)}",
                 actual=ms(ttft_p95), passed=ttft_p95 is not None and ttft_p95 <= TARGET_TTFT_P95_S,
                 value=ttft_p95)
        self.add(check="chats", name="P95 queue wait (server)", target=f"<= {ms(TARGET_QUEUE_WAIT_P95_S)}",
                 actual=ms(queue_p95), passed=queue_p95 is not None and queue_p95 <= TARGET_QUEUE_WAIT_P95_S,
                 value=queue_p95)


async def run(args: argparse.Namespace) -> tuple[Validator, float]:
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        validator = Validator(
            gateway=GatewayClient(session, args.base, org=args.org, key=args.key), provider=args.provider, model=args.model,
            duration_s=args.duration, cancel_trials=args.cancel_trials,
        )
        await validator.probe()
        started = time.monotonic()
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "burst": validator.burst, "cache": validator.cache, "fanout": validator.fanout,
            "cancel": validator.cancel, "chats": validator.chats,
        }
        for name in CHECKS:
            if name in args.only:
                await steps[name]()
        return validator, time.monotonic() - started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/validate.py", description="The phase-1 acceptance suite against a running gateway.")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"gateway address (default {DEFAULT_BASE})")
    parser.add_argument("--serve", action="store_true",
                        help="start `python -m server` on a free port with a fresh database (settings from the "
                             "environment), validate it, then stop it; --base is ignored")
    parser.add_argument("--org", default=DEFAULT_ORG, help=f"x-org-id (default {DEFAULT_ORG}), for DAC_AUTH=header")
    parser.add_argument("--key", default=os.environ.get("DAC_KEY") or None,
                        help="API key for DAC_AUTH=keys (default $DAC_KEY); the key decides the org")
    parser.add_argument("--provider", default=DEFAULT_PROVIDER, help=f"provider (default {DEFAULT_PROVIDER})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"seconds of the 25-chat run (default {DEFAULT_DURATION_S:g}, {QUICK_DURATION_S:g} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer cancel trials, a short chat run")
    parser.add_argument("--only", default=",".join(CHECKS),
                        help=f"comma-separated checks to run (default all: {','.join(CHECKS)})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(args.only) - set(CHECKS)
    if unknown or not args.only:
        parser.error(f"--only takes some of {','.join(CHECKS)}; unknown: {','.join(sorted(unknown)) or '(none given)'}")
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    if args.duration <= 0:
        parser.error("--duration must be positive")
    args.cancel_trials = QUICK_CANCEL_TRIALS if args.quick else DEFAULT_CANCEL_TRIALS
    args.base = args.base.rstrip("/")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        server = ServerProcess()
        progress(f"starting a server on {server.url} (db {server.db})")
        try:
            server.start()
        except RuntimeError as exc:
            print(f"validate: {exc}", file=sys.stderr)
            return 2
        args.base = server.url
        with server:
            return _validate(args)
    return _validate(args)


def _validate(args: argparse.Namespace) -> int:
    progress(f"validating {args.base} with {args.provider}/{args.model}")
    try:
        validator, elapsed = asyncio.run(run(args))
    except (aiohttp.ClientConnectionError, RuntimeError) as exc:
        print(f"validate: cannot run against {args.base}: {exc}", file=sys.stderr)
        return 2
    results = validator.results
    passed = all(r.passed is not False for r in results)
    if args.json:
        out = {"base": args.base, "provider": args.provider, "model": args.model, "quick": args.quick,
               "duration_s": args.duration, "elapsed_s": round(elapsed, 2), "pass": passed,
               "results": [asdict(r) for r in results], "details": validator.details}
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(f"\nPhase-1 validation of {args.base} ({args.provider}/{args.model}), {elapsed:.1f} s\n")
        print(markdown_table(["Check", "Target", "Actual", "Result"],
                             [(r.name, r.target, r.actual, "info" if r.passed is None else ("PASS" if r.passed else "FAIL"))
                              for r in results]))
        failed = sum(1 for r in results if r.passed is False)
        print(f"\n{'ALL PASS' if passed else f'{failed} FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
