#!/usr/bin/env python3
"""Side-by-side benchmarks of the gateway.

    tools/bench.py [--quick] [--sections 1,2,3,4,5,6] [--json FILE] [--litellm auto|off|CMD]
    tools/bench_fanout.py [--subscribers 100,500,1000]      # section 5 alone

Columns, all against the same fake OpenAI-compatible upstream
(``tools/fake_openai.py``, its own process on 127.0.0.1): ``direct`` (the
client calls the upstream itself), ``gateway`` (``python -m server`` in its
own process, through the thread API; it reaches the fake through its
``openai`` provider, or where it has none, through its built-in mock set to
the same timings), and ``litellm`` where LiteLLM's proxy is installed. Runs
alternate between the columns so that a noisy neighbour hurts them alike;
ratios to ``direct`` are given beside the absolute figures.

1. TTFT of one stream: the time the gateway adds to a direct call.
2. 50 identical streams at once: upstream calls, and TTFT p95 as a ratio to direct.
3. Cancel latency: the client closes its socket after 3 tokens; the time
   until the upstream saw its connection close (the fake's timestamps share
   ``CLOCK_MONOTONIC`` with the client).
4. Throughput of distinct non-stream requests against an upstream that
   answers at once, and the server's CPU per request.
5. Fan-out of one mock flight to 100, 500 and 1000 SSE subscribers driven
   from separate processes: every token checked, server CPU per delivered
   event, p50/p99/max delivery lag, server RSS per subscriber.
6. Server RSS idle and at its peak under the load of sections 2 and 4.

Where there are at least two cores, the server runs on one half and the load
(with the fake upstream) on the other (``os.sched_setaffinity``). Prints
Markdown; ``--json FILE`` writes everything measured. Exits 1 if a check
failed (a fan-out subscriber missed a token, a stream broke).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing
import os
import queue
import secrets
import shutil
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson
import uvloop

from server.providers.mock import mock_answer
from tools._common import (
    DEFAULT_ORG,
    ServerProcess,
    cpu_split,
    http_open,
    markdown_table,
    metric_sum,
    percentile,
    pin,
    progress,
    prometheus_samples,
    raise_open_files,
)
from tools.sse import sse_events

# -- section 5: fan-out of one flight ------------------------------------------------

DEFAULT_FANOUT_LEVELS = (100, 500, 1000)
QUICK_FANOUT_LEVELS = (50, 200)
#: tokens of the flight, and the gap between them (50 tokens/s, a fast model)
FANOUT_TOKENS = 50
QUICK_FANOUT_TOKENS = 20
FANOUT_ITL_MS = 20
#: the flight's first token comes this long after it starts (plus per subscriber,
#: below), so that every subscriber is attached before it and none replays
FANOUT_TTFT_BASE_MS = 1000
FANOUT_TTFT_PER_SUBSCRIBER_MS = 3
#: subscribers connecting at once per load process (the server's listen backlog is 128)
FANOUT_CONNECT_CONCURRENCY = 64
FANOUT_PROMPT = "Fan-out benchmark: what is DAC?"
#: a level that takes longer than this is abandoned
FANOUT_LEVEL_TIMEOUT_S = 120.0
#: failures listed per load process (the rest are only counted)
MAX_LISTED_FAILURES = 10


@dataclass(slots=True, kw_only=True)
class FanoutJob:
    url: str
    org: str
    tokens: list[str]


async def _subscribe_all(index: int, count: int, inbox: Any, outbox: Any) -> None:
    """One load process: ``count`` SSE subscribers to the job's stream, each checking every token."""
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=FANOUT_LEVEL_TIMEOUT_S, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        outbox.put(("ready", index, None))
        job: FanoutJob = await loop.run_in_executor(None, inbox.get)
        tokens = job.tokens
        n = len(tokens)
        full_text = "".join(tokens)
        gate = asyncio.Semaphore(FANOUT_CONNECT_CONCURRENCY)
        arrivals: list[list[float]] = [[0.0] * n for _ in range(count)]
        failures: list[str] = []
        failed = 0
        attached = 0
        monotonic = time.monotonic
        headers = {"x-org-id": job.org, "Accept": "text/event-stream"}

        def attach() -> None:
            nonlocal attached
            attached += 1
            if attached == count:
                outbox.put(("attached", index, monotonic()))

        async def subscriber(i: int) -> None:
            nonlocal failed
            mine = arrivals[i]
            problems: list[str] = []
            done = False
            holding = True
            await gate.acquire()
            try:
                async with session.get(job.url, headers=headers) as resp:
                    if resp.status != 200:
                        problems.append(f"HTTP {resp.status}")
                        return
                    async for ev in sse_events(resp):
                        seq = ev.id
                        if ev.event == "delta":
                            if seq is None or not 1 <= seq <= n or mine[seq - 1]:
                                problems.append(f"unexpected or repeated delta {seq}")
                            elif ev.json()["text"] != tokens[seq - 1]:
                                problems.append(f"wrong text in delta {seq}")
                            else:
                                mine[seq - 1] = ev.at
                        elif ev.event == "meta":
                            if holding:
                                holding = False
                                gate.release()
                                attach()
                        elif ev.event == "done":
                            done = ev.json()["message"]["content"] == full_text
                            if not done:
                                problems.append("done with a different text")
                        elif ev.event == "snapshot":
                            problems.append("fell behind the ring (snapshot)")
                        elif ev.event == "error":
                            problems.append(f"error event {ev.data[:200]!r}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{exc.__class__.__name__}: {exc}")
            finally:
                if holding:
                    gate.release()
                    attach()  # counted, so that the level is not held up by one broken subscriber
                missing = sum(1 for t in mine if not t)
                if missing:
                    problems.append(f"{missing} of {n} deltas missing")
                if not done and not problems:
                    problems.append("no done event")
                if problems:
                    failed += 1
                    if len(failures) < MAX_LISTED_FAILURES:
                        failures.append(f"subscriber {index}.{i}: " + "; ".join(problems))

        await asyncio.gather(*(subscriber(i) for i in range(count)))
        usage = os.times()
        outbox.put(("result", index, {
            "arrivals": arrivals, "failed": failed, "failures": failures,
            "cpu_s": usage.user + usage.system,
        }))


def _fanout_worker(index: int, count: int, cores: set[int] | None, inbox: Any, outbox: Any) -> None:
    pin(0, cores)
    raise_open_files(count + 256)
    uvloop.run(_subscribe_all(index, count, inbox, outbox))


def _post_json(url: str, body: dict[str, Any], *, org: str, accept: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=orjson.dumps(body), method="POST",
        headers={"Content-Type": "application/json", "Accept": accept, "x-org-id": org},
    )
    with http_open(request) as resp:
        return resp.status, resp.read()


def _new_thread(base: str, org: str) -> str:
    status, raw = _post_json(f"{base}/api/threads/", {"title": "bench"}, org=org)
    return str(orjson.loads(raw)["thread_id"])


def fanout_level(subscribers: int, *, tokens: int, workers: int, server_cores: set[int] | None,
                 load_cores: set[int] | None) -> dict[str, Any]:
    """One flight to ``subscribers`` SSE clients, on a fresh server; every token checked."""
    org = DEFAULT_ORG
    ttft_ms = FANOUT_TTFT_BASE_MS + FANOUT_TTFT_PER_SUBSCRIBER_MS * subscribers
    model = f"mock:ttft={ttft_ms},itl={FANOUT_ITL_MS},n={tokens}"
    expected = mock_answer(FANOUT_PROMPT, tokens)
    raise_open_files(subscribers * 2 + 512)  # the server inherits it
    with ServerProcess(cores=server_cores) as server:
        # Warm up: one small flight end to end, so that first-use costs are not counted.
        thread = _new_thread(server.url, org)
        _post_json(f"{server.url}/api/threads/{thread}/messages",
                   {"content": "warm-up", "model": "mock:ttft=0,itl=0,n=5"}, org=org, accept="text/event-stream")
        ctx = multiprocessing.get_context("spawn")
        outbox = ctx.Queue()
        shares = [subscribers // workers + (1 if i < subscribers % workers else 0) for i in range(workers)]
        shares = [s for s in shares if s]
        inboxes = [ctx.Queue() for _ in shares]
        procs = [ctx.Process(target=_fanout_worker, args=(i, share, load_cores, inboxes[i], outbox), daemon=True)
                 for i, share in enumerate(shares)]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + FANOUT_LEVEL_TIMEOUT_S
            rss_peak = 0

            def wait_for(kind: str) -> dict[int, Any]:
                nonlocal rss_peak
                got: dict[int, Any] = {}
                while len(got) < len(procs):
                    try:
                        what, index, value = outbox.get(timeout=0.02)
                    except queue.Empty:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"fan-out to {subscribers}: load processes did not report {kind!r}")
                        if any(not p.is_alive() and p.exitcode for p in procs):
                            raise RuntimeError(f"fan-out to {subscribers}: a load process died")
                        rss_peak = max(rss_peak, server.rss_bytes())
                        continue
                    if what != kind:
                        raise RuntimeError(f"fan-out: expected {kind!r} from load process {index}, got {what!r}")
                    got[index] = value
                return got

            wait_for("ready")
            thread = _new_thread(server.url, org)
            time.sleep(0.2)
            rss_idle = server.rss_bytes()
            cpu_start = server.cpu_seconds()
            status, raw = _post_json(f"{server.url}/api/threads/{thread}/messages",
                                     {"content": FANOUT_PROMPT, "model": model, "stream": True}, org=org)
            posted = time.monotonic()
            accepted = orjson.loads(raw)
            job = FanoutJob(url=server.url + accepted["stream_url"], org=org, tokens=expected)
            for inbox in inboxes:
                inbox.put(job)
            attached_at = max(wait_for("attached").values())
            cpu_attached = server.cpu_seconds()
            rss_attached = server.rss_bytes()
            rss_peak = rss_attached
            results = wait_for("result")
            cpu_end = server.cpu_seconds()
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    arrivals = [sub for r in results.values() for sub in r["arrivals"]]
    failed = sum(r["failed"] for r in results.values())
    failures = [f for r in results.values() for f in r["failures"]]
    earliest = [min((sub[k] for sub in arrivals if sub[k]), default=0.0) for k in range(tokens)]
    lags = [sub[k] - earliest[k] for sub in arrivals for k in range(tokens) if sub[k]]
    delivered = len(lags) + (subscribers - failed)  # deltas, plus the done of each complete subscriber
    first_token = min((t for t in earliest if t), default=None)
    delivery_cpu = cpu_end - cpu_attached
    return {
        "subscribers": subscribers,
        "tokens": tokens,
        "model": model,
        "load_processes": len(procs),
        "failed_subscribers": failed,
        "failures": failures,
        "events_delivered": delivered,
        "server_cpu_delivery_s": round(delivery_cpu, 4),
        "server_cpu_per_event_us": round(delivery_cpu / delivered * 1e6, 2) if delivered else None,
        "server_cpu_attach_per_subscriber_us": round((cpu_attached - cpu_start) / subscribers * 1e6, 1),
        "lag_p50_ms": _ms(percentile(lags, 50)),
        "lag_p99_ms": _ms(percentile(lags, 99)),
        "lag_max_ms": _ms(max(lags) if lags else None),
        "lag_max_by_token_ms": [_ms(max((sub[k] - earliest[k] for sub in arrivals if sub[k]), default=0.0))
                                for k in range(tokens)],
        "token_times_ms": [_ms(t - first_token) if t and first_token else None for t in earliest],
        "rss_idle_bytes": rss_idle,
        "rss_attached_bytes": rss_attached,
        "rss_peak_bytes": rss_peak,
        "rss_per_subscriber_bytes": round((max(rss_peak, rss_attached) - rss_idle) / subscribers),
        "attach_s": round(attached_at - posted, 3),
        #: every subscriber was attached before the first token (none had to replay)
        "attached_before_first_token": first_token is not None and attached_at < first_token,
        "load_cpu_s": round(sum(r["cpu_s"] for r in results.values()), 3),
        "server_pinned": server.pinned,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def run_fanout(levels: Sequence[int], *, tokens: int, workers: int, server_cores: set[int] | None,
               load_cores: set[int] | None, repeats: int = 1) -> dict[str, Any]:
    rows = []
    for subscribers in levels:
        runs = []
        for attempt in range(repeats):
            progress(f"fan-out: one flight of {tokens} tokens to {subscribers} subscribers"
                     + (f" (run {attempt + 1}/{repeats})" if repeats > 1 else ""))
            run = fanout_level(subscribers, tokens=tokens, workers=workers, server_cores=server_cores,
                               load_cores=load_cores)
            progress(f"  {subscribers - run['failed_subscribers']}/{subscribers} received every token, "
                     f"p99 lag {run['lag_p99_ms']} ms, {run['server_cpu_per_event_us']} us CPU per event")
            if not run["attached_before_first_token"]:
                progress("  note: some subscribers attached after the first token and replayed it")
            runs.append(run)
        # The run with the median p99 lag stands for the level; every run's figures are kept.
        ordered = sorted(runs, key=lambda r: r["lag_p99_ms"] if r["lag_p99_ms"] is not None else float("inf"))
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["runs"] = [{k: r[k] for k in ("failed_subscribers", "lag_p99_ms", "server_cpu_per_event_us",
                                          "rss_per_subscriber_bytes")} for r in runs]
        row["failed_subscribers_all_runs"] = sum(r["failed_subscribers"] for r in runs)
        rows.append(row)
    table = markdown_table(
        ["Subscribers", "Received every token", "Events delivered", "Server CPU per event", "Lag p50",
         "Lag p99", "Lag max", "Server RSS per subscriber", "Attach time"],
        [(r["subscribers"], f"{r['subscribers'] - r['failed_subscribers']}/{r['subscribers']}",
          r["events_delivered"], f"{r['server_cpu_per_event_us']} us", f"{r['lag_p50_ms']} ms",
          f"{r['lag_p99_ms']} ms", f"{r['lag_max_ms']} ms", f"{r['rss_per_subscriber_bytes'] / 1024:.1f} KiB",
          f"{r['attach_s'] * 1000:.0f} ms") for r in rows],
    )
    return {"rows": rows, "table": table, "ok": all(r["failed_subscribers_all_runs"] == 0 for r in rows)}


FANOUT_NOTE = (
    "One mock flight ({tokens} tokens, {itl} ms apart) to N SSE subscribers on 127.0.0.1, each checking "
    "every token's sequence number and text and the final message. Subscribers run in {workers} separate "
    "process(es){pinning}. Lag: a token's arrival at a subscriber minus its earliest arrival at any "
    "subscriber. CPU per event: server user+system CPU from the moment all subscribers were attached to "
    "the end, over deltas and done events delivered. RSS per subscriber: (server RSS with everyone "
    "attached, or its peak while streaming) minus idle, over N; a fresh server per run. "
    "{repeats} run(s) per level; the table shows the one with the median p99 lag."
)


# -- the systems compared ------------------------------------------------------------

FAKE_MODEL = "fake-model"
FAKE_KEY = "bench-key"
#: LiteLLM's proxy: where to find it, and how long it may take to start
LITELLM_READY_TIMEOUT_S = 90.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_read=60)
#: polling interval while waiting for a cancellation to show
POLL_S = 0.005
CANCEL_WAIT_S = 5.0
RSS_SAMPLE_S = 0.05


@dataclass(slots=True, kw_only=True)
class Target:
    """One column: a way of reaching the fake upstream."""

    name: str  # "direct", "gateway", "litellm"
    #: "openai": POST {base}/chat/completions; "dac": the gateway's thread API at {base}
    kind: str
    base: str
    proc: ServerProcess | None = None
    #: for "dac": the provider and model to name; model None means the mock mirroring the fake
    provider: str = "openai"
    model: str | None = FAKE_MODEL
    #: for "openai": the bearer token the column wants
    api_key: str = FAKE_KEY
    rss_idle: int | None = None
    rss_peak: dict[str, int] = field(default_factory=dict)

    @property
    def via_fake(self) -> bool:
        return self.kind == "openai" or self.model is not None


@dataclass(slots=True, kw_only=True)
class Stream:
    ok: bool
    ttft_s: float | None
    total_s: float
    text: str
    error: str | None = None


@dataclass(slots=True, kw_only=True)
class UpstreamTiming:
    ttft_ms: float
    itl_ms: float
    tokens: int

    def mock_model(self) -> str:
        return f"mock:ttft={self.ttft_ms:g},itl={self.itl_ms:g},n={self.tokens}"


class Bench:
    """The client side of sections 1-4 and 6, over one aiohttp session."""

    def __init__(self, *, session: aiohttp.ClientSession, targets: list[Target], fake_url: str, run_id: str) -> None:
        self.session = session
        self.targets = targets
        self.fake_url = fake_url
        self.run_id = run_id
        self.timing = UpstreamTiming(ttft_ms=0, itl_ms=0, tokens=1)
        self.section = "idle"

    async def set_upstream(self, *, ttft_ms: float, itl_ms: float, tokens: int) -> None:
        self.timing = UpstreamTiming(ttft_ms=ttft_ms, itl_ms=itl_ms, tokens=tokens)
        async with self.session.post(f"{self.fake_url}/config",
                                     json={"ttft_ms": ttft_ms, "itl_ms": itl_ms, "tokens": tokens}) as resp:
            resp.raise_for_status()

    async def fake_stats(self, last: int = 0) -> dict[str, Any]:
        params = {"last": str(last)} if last else {}
        async with self.session.get(f"{self.fake_url}/stats", params=params) as resp:
            return dict(await resp.json())

    async def upstream_calls(self, target: Target) -> int:
        """Calls that reached the upstream so far (the fake's count, or the gateway's for its mock)."""
        if target.via_fake:
            return int((await self.fake_stats(last=1))["calls"])
        async with self.session.get(f"{target.base}/metrics") as resp:
            text = await resp.text()
        return int(metric_sum(prometheus_samples(text), "dac_upstream_calls_total", provider="mock"))

    async def new_thread(self, target: Target) -> str:
        async with self.session.post(f"{target.base}/api/threads/", json={"title": "bench"},
                                     headers={"x-org-id": DEFAULT_ORG}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"creating a thread: HTTP {resp.status} {await resp.text()}")
            return str((await resp.json())["thread_id"])

    def _request(self, target: Target, content: str, *, stream: bool, thread: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
        if target.kind == "openai":
            body: dict[str, Any] = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": content}],
                                    "stream": stream}
            headers = {"Authorization": f"Bearer {target.api_key}"}
            if stream:
                headers["Accept"] = "text/event-stream"
            return f"{target.base}/chat/completions", body, headers
        assert thread is not None
        body = {"content": content, "provider": target.provider, "model": target.model or self.timing.mock_model()}
        headers = {"x-org-id": DEFAULT_ORG}
        if stream:
            headers["Accept"] = "text/event-stream"
        return f"{target.base}/api/threads/{thread}/messages", body, headers

    def open(self, target: Target, content: str, *, thread: str | None = None) -> Any:
        """A streaming request; use as ``async with``."""
        url, body, headers = self._request(target, content, stream=True, thread=thread)
        return self.session.post(url, json=body, headers=headers)

    async def stream(self, target: Target, content: str, *, thread: str | None = None) -> Stream:
        started = time.monotonic()
        ttft, text, ok, error = None, "", False, None
        async with self.open(target, content, thread=thread) as resp:
            if resp.status != 200:
                return Stream(ok=False, ttft_s=None, total_s=time.monotonic() - started, text="",
                              error=f"HTTP {resp.status} {(await resp.text())[:200]}")
            async for ev in sse_events(resp):
                if target.kind == "openai":
                    if ev.data == b"[DONE]":
                        ok = True
                        continue
                    chunk = ev.json()
                    if "error" in chunk:
                        error = str(chunk["error"])
                        continue
                    piece = (chunk["choices"][0].get("delta") or {}).get("content") if chunk.get("choices") else None
                    if piece:
                        text += piece
                        if ttft is None:
                            ttft = ev.at - started
                elif ev.event == "delta":
                    text += ev.json()["text"]
                    if ttft is None:
                        ttft = ev.at - started
                elif ev.event == "done":
                    ok = True
                elif ev.event == "error":
                    error = str(ev.json()["error"])
        return Stream(ok=ok and error is None, ttft_s=ttft, total_s=time.monotonic() - started, text=text, error=error)

    async def complete(self, target: Target, content: str, *, thread: str | None = None) -> tuple[bool, float]:
        url, body, headers = self._request(target, content, stream=False, thread=thread)
        started = time.monotonic()
        async with self.session.post(url, json=body, headers=headers) as resp:
            data = await resp.read()
            ok = resp.status == 200 and len(data) > 0
        return ok, time.monotonic() - started


def _rotate(items: list[Target], r: int) -> list[Target]:
    """Alternate which system goes first from round to round."""
    k = r % len(items)
    return items[k:] + items[:k]


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 3)


def _fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _median(values: list[float]) -> float | None:
    return percentile(values, 50)


# -- section 1: TTFT added over a direct call --------------------------------------

async def section_ttft(bench: Bench, *, rounds: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=50, itl_ms=10, tokens=20)
    ttfts: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    errors: dict[str, int] = {t.name: 0 for t in bench.targets}
    for r in range(rounds):
        for target in _rotate(bench.targets, r):
            thread = await bench.new_thread(target) if target.kind == "dac" else None
            content = f"TTFT {bench.run_id} round {r} via {target.name}"
            result = await bench.stream(target, content, thread=thread)
            complete = result.text == "".join(mock_answer(content, bench.timing.tokens))
            if result.ok and complete and result.ttft_s is not None:
                ttfts[target.name].append(result.ttft_s)
            else:
                errors[target.name] += 1
    base = _median(ttfts["direct"])
    cols = {}
    for t in bench.targets:
        med, p95 = _median(ttfts[t.name]), percentile(ttfts[t.name], 95)
        cols[t.name] = {"ttft_median_s": med, "ttft_p95_s": p95, "errors": errors[t.name],
                        "added_median_s": None if med is None or base is None else med - base,
                        "ratio_median": _ratio(med, base), "runs": len(ttfts[t.name])}
    rows = [
        ("TTFT median", *[_fmt_ms(cols[t.name]["ttft_median_s"]) for t in bench.targets]),
        ("TTFT p95", *[_fmt_ms(cols[t.name]["ttft_p95_s"]) for t in bench.targets]),
        ("added over direct (median)", *[
            "-" if t.name == "direct" else
            ("n/a" if cols[t.name]["added_median_s"] is None else f"{cols[t.name]['added_median_s'] * 1000:+.1f} ms")
            for t in bench.targets]),
        ("ratio to direct (median)", *[_fmt_ratio(cols[t.name]["ratio_median"]) for t in bench.targets]),
        ("runs failed or incomplete", *[str(errors[t.name]) for t in bench.targets]),
    ]
    return {"title": f"1. TTFT of one stream, {rounds} alternating runs (upstream: first token after 50 ms)",
            "note": "A new question every run, so nothing is served from a cache; the gateway column posts to "
                    "a fresh thread (made before the clock starts) with `Accept: text/event-stream`.",
            "columns": cols, "rows": rows}


# -- section 2: 50 identical streams ------------------------------------------------

IDENTICAL_STREAMS = 50


async def section_identical(bench: Bench, *, rounds: int) -> dict[str, Any]:
    bench.section = "load"
    await bench.set_upstream(ttft_ms=300, itl_ms=20, tokens=40)
    ttfts: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    calls: dict[str, list[int]] = {t.name: [] for t in bench.targets}
    bad: dict[str, int] = {t.name: 0 for t in bench.targets}
    for r in range(rounds):
        for target in _rotate(bench.targets, r):
            thread = await bench.new_thread(target) if target.kind == "dac" else None
            content = f"Identical {bench.run_id} round {r} via {target.name}"
            before = await bench.upstream_calls(target)
            results = await asyncio.gather(*(bench.stream(target, content, thread=thread)
                                              for _ in range(IDENTICAL_STREAMS)))
            calls[target.name].append(await bench.upstream_calls(target) - before)
            # Every client must get the whole answer the upstream gave for this question.
            expected = "".join(mock_answer(content, bench.timing.tokens))
            bad[target.name] += sum(1 for res in results if not res.ok or res.text != expected)
            ttfts[target.name].extend(res.ttft_s for res in results if res.ok and res.ttft_s is not None)
    bench.section = "idle"
    base = percentile(ttfts["direct"], 95)
    cols = {}
    for t in bench.targets:
        p95 = percentile(ttfts[t.name], 95)
        cols[t.name] = {"upstream_calls_per_round": calls[t.name], "ttft_p95_s": p95,
                        "ttft_median_s": _median(ttfts[t.name]), "ratio_p95": _ratio(p95, base),
                        "failed_streams": bad[t.name]}
    rows = [
        ("upstream calls per 50 streams", *[
            "/".join(str(c) for c in calls[t.name]) for t in bench.targets]),
        ("TTFT median", *[_fmt_ms(cols[t.name]["ttft_median_s"]) for t in bench.targets]),
        ("TTFT p95", *[_fmt_ms(cols[t.name]["ttft_p95_s"]) for t in bench.targets]),
        ("TTFT p95, ratio to direct", *[_fmt_ratio(cols[t.name]["ratio_p95"]) for t in bench.targets]),
        ("streams failed or incomplete", *[str(bad[t.name]) for t in bench.targets]),
    ]
    return {"title": f"2. {IDENTICAL_STREAMS} identical streams at once, {rounds} alternating round(s) "
                     "(upstream: 300 ms to the first token, 40 tokens 20 ms apart)",
            "columns": cols, "rows": rows}


# -- section 3: cancel latency ------------------------------------------------------

async def _cancel_once(bench: Bench, target: Target, content: str) -> tuple[float | None, str]:
    """Open a stream, take 3 tokens, close the socket; seconds until the upstream saw it close."""
    thread = await bench.new_thread(target) if target.kind == "dac" else None
    stream_id = None
    async with bench.open(target, content, thread=thread) as resp:
        if resp.status != 200:
            return None, f"HTTP {resp.status}"
        seen = 0
        async for ev in sse_events(resp):
            if ev.event == "meta":
                stream_id = ev.json()["stream_id"]
            elif ev.event == "delta" or (target.kind == "openai" and ev.data != b"[DONE]"
                                         and (ev.json().get("choices") or [{}])[0].get("delta", {}).get("content")):
                seen += 1
                if seen >= 3:
                    break
        closed = time.monotonic()
        resp.close()
    deadline = closed + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        if target.via_fake:
            for call in (await bench.fake_stats(last=50))["recent"]:
                if call["prompt"] == content and call["ended"] is not None:
                    return call["ended"] - closed, call["outcome"]
        else:  # the gateway's own mock: until the message reads cancelled
            async with bench.session.get(f"{target.base}/api/threads/{thread}",
                                         headers={"x-org-id": DEFAULT_ORG}) as r:
                messages = (await r.json())["messages"]
            message = next((m for m in messages if m["message_id"] == stream_id), None)
            if message is not None and message["status"] != "streaming":
                return time.monotonic() - closed, message["status"]
        await asyncio.sleep(POLL_S)
    return None, "not closed"


async def section_cancel(bench: Bench, *, trials: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=20, itl_ms=20, tokens=5000)
    lat: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    bad: dict[str, list[str]] = {t.name: [] for t in bench.targets}
    for r in range(trials):
        for target in _rotate(bench.targets, r):
            seconds, outcome = await _cancel_once(bench, target, f"Cancel {bench.run_id} trial {r} via {target.name}")
            if seconds is None or outcome not in ("disconnected", "cancelled"):
                bad[target.name].append(outcome)
            else:
                lat[target.name].append(seconds)
    base = _median(lat["direct"])
    cols = {t.name: {"median_s": _median(lat[t.name]), "max_s": max(lat[t.name], default=None),
                     "ratio_median": _ratio(_median(lat[t.name]), base), "failures": bad[t.name],
                     "measured": "client close -> upstream connection closed" if t.via_fake
                     else "client close -> message cancelled (gateway's mock provider)"}
            for t in bench.targets}
    rows = [
        ("client close -> upstream closed, median", *[_fmt_ms(cols[t.name]["median_s"]) for t in bench.targets]),
        ("... worst", *[_fmt_ms(cols[t.name]["max_s"]) for t in bench.targets]),
        ("... ratio to direct (median)", *[_fmt_ratio(cols[t.name]["ratio_median"]) for t in bench.targets]),
        ("trials not closed upstream", *[str(len(bad[t.name])) for t in bench.targets]),
    ]
    grace = os.environ.get("DAC_CANCEL_GRACE_MS", "50")
    return {"title": f"3. Cancel latency, {trials} alternating trial(s): the client closes its socket after 3 tokens",
            "note": f"Measured from the client's close to the moment the upstream saw its connection close "
                    f"(both on CLOCK_MONOTONIC). The gateway waits DAC_CANCEL_GRACE_MS ({grace} ms here) for "
                    f"another listener before it aborts the upstream call; the rest is noticing the close and "
                    f"closing the upstream socket."
                    + ("" if all(t.via_fake for t in bench.targets) else
                       " The gateway's column, whose mock has no socket, is measured until the message reads "
                       "`cancelled`."),
            "columns": cols, "rows": rows}


# -- section 4: throughput of distinct non-stream requests --------------------------

async def section_throughput(bench: Bench, *, requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=0, itl_ms=0, tokens=20)
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in bench.targets}
    for r in range(rounds):
        for target in _rotate(bench.targets, r):
            threads: list[str | None] = [None] * requests
            if target.kind == "dac":
                # One fresh thread per request, made before the clock starts: no history grows.
                sem = asyncio.Semaphore(concurrency)

                async def make(i: int) -> None:
                    async with sem:
                        threads[i] = await bench.new_thread(target)

                await asyncio.gather(*(make(i) for i in range(requests)))
            latencies: list[float] = []
            failed = 0
            queue_: asyncio.Queue[int] = asyncio.Queue()
            for i in range(requests):
                queue_.put_nowait(i)

            async def worker() -> None:
                nonlocal failed
                while not queue_.empty():
                    i = queue_.get_nowait()
                    ok, seconds = await bench.complete(
                        target, f"Throughput {bench.run_id} round {r} request {i}", thread=threads[i])
                    latencies.append(seconds)
                    failed += not ok

            cpu_before = target.proc.cpu_seconds() if target.proc else None
            bench.section = "load"
            started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.monotonic() - started
            bench.section = "idle"
            cpu = target.proc.cpu_seconds() - cpu_before if target.proc and cpu_before is not None else None
            runs[target.name].append({"elapsed_s": elapsed, "rps": (requests - failed) / elapsed, "failed": failed,
                                      "latency_p50_s": _median(latencies), "latency_p95_s": percentile(latencies, 95),
                                      "server_cpu_per_request_s": None if cpu is None else cpu / requests})
    def best(name: str, key: str) -> float | None:
        values = [run[key] for run in runs[name] if run[key] is not None]
        return _median(values) if values else None

    base = best("direct", "rps")
    cols = {t.name: {"runs": runs[t.name], "rps": best(t.name, "rps"), "ratio_rps": _ratio(best(t.name, "rps"), base),
                     "latency_p95_s": best(t.name, "latency_p95_s"),
                     "server_cpu_per_request_s": best(t.name, "server_cpu_per_request_s"),
                     "failed": sum(run["failed"] for run in runs[t.name])}
            for t in bench.targets}
    rows = [
        ("requests per second", *[f"{cols[t.name]['rps']:.0f}" if cols[t.name]["rps"] else "n/a" for t in bench.targets]),
        ("... ratio to direct", *[_fmt_ratio(cols[t.name]["ratio_rps"]) for t in bench.targets]),
        ("latency p95", *[_fmt_ms(cols[t.name]["latency_p95_s"]) for t in bench.targets]),
        ("server CPU per request", *[
            "-" if t.proc is None else _fmt_ms(cols[t.name]["server_cpu_per_request_s"], ) for t in bench.targets]),
        ("failed requests", *[str(cols[t.name]["failed"]) for t in bench.targets]),
    ]
    return {"title": f"4. Throughput: {requests} distinct non-stream requests, {concurrency} at a time, "
                     f"{rounds} alternating round(s) (upstream answers at once, 20 tokens)",
            "note": "The gateway column is the thread API: every request stores a user and an assistant message "
                    "in SQLite (one fresh thread per request, made before the clock starts) and streams from "
                    "the upstream. Server CPU is the server process's user+system time over the requests.",
            "columns": cols, "rows": rows}


# -- section 6: memory ------------------------------------------------------------------

def section_rss(targets: list[Target]) -> dict[str, Any]:
    servers = [t for t in targets if t.proc is not None]
    cols = {t.name: {"rss_idle_bytes": t.rss_idle, "rss_load_peak_bytes": t.rss_peak.get("load")} for t in servers}
    gateway = cols.get("gateway", {})

    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.1f} MiB"

    rows = [
        ("RSS idle (after one request)", *[mib(cols[t.name]["rss_idle_bytes"]) for t in servers]),
        ("RSS peak under load (sections 2 and 4)", *[mib(cols[t.name]["rss_load_peak_bytes"]) for t in servers]),
    ]
    if len(servers) > 1:
        rows.append(("... ratio to the gateway (under load)", *[
            _fmt_ratio(_ratio(cols[t.name]["rss_load_peak_bytes"], gateway.get("rss_load_peak_bytes")))
            for t in servers]))
    return {"title": "6. Server memory (resident set)", "columns": cols, "rows": rows,
            "headers": ["", *[t.name for t in servers]]}


# -- running it -----------------------------------------------------------------------

DEFAULT_LOAD_PROCESSES = 2


@dataclass(slots=True, kw_only=True)
class Plan:
    ttft_rounds: int
    identical_rounds: int
    cancel_trials: int
    throughput_requests: int
    throughput_concurrency: int
    throughput_rounds: int
    fanout_levels: tuple[int, ...]
    fanout_tokens: int
    fanout_repeats: int

    @classmethod
    def make(cls, *, quick: bool) -> Plan:
        if quick:
            return cls(ttft_rounds=5, identical_rounds=1, cancel_trials=2, throughput_requests=200,
                       throughput_concurrency=16, throughput_rounds=1, fanout_levels=QUICK_FANOUT_LEVELS,
                       fanout_tokens=QUICK_FANOUT_TOKENS, fanout_repeats=1)
        return cls(ttft_rounds=30, identical_rounds=3, cancel_trials=10, throughput_requests=2000,
                   throughput_concurrency=32, throughput_rounds=2, fanout_levels=DEFAULT_FANOUT_LEVELS,
                   fanout_tokens=FANOUT_TOKENS, fanout_repeats=3)


def find_litellm(choice: str) -> list[str] | None:
    """The command that starts LiteLLM's proxy, or None when it is not installed (or not wanted)."""
    if choice == "off":
        return None
    if choice != "auto":
        return [choice]
    found = shutil.which("litellm")
    if found:
        return [found]
    if importlib.util.find_spec("litellm") is not None:
        return [sys.executable, "-m", "litellm.proxy.proxy_cli"]
    return None


def start_litellm(command: list[str], fake_url: str, cores: set[int] | None) -> tuple[ServerProcess, str]:
    """LiteLLM's proxy routing ``fake-model`` to the fake upstream; returns it and its master key."""
    master_key = "sk-bench-" + secrets.token_hex(16)
    proc = ServerProcess(
        command=[*command, "--host", "127.0.0.1", "--port", "{port}", "--config", "CONFIG"],
        ready_path="/health/liveliness", cores=cores, ready_timeout_s=LITELLM_READY_TIMEOUT_S,
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
             "LITELLM_MASTER_KEY": master_key},
    )
    config = proc.workdir / "litellm.yaml"
    # JSON is YAML: one model routed to the fake upstream on the loopback.
    config.write_bytes(orjson.dumps({
        "model_list": [{"model_name": FAKE_MODEL, "litellm_params": {
            "model": f"openai/{FAKE_MODEL}", "api_base": f"{fake_url}/v1", "api_key": FAKE_KEY}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }))
    proc.command = [str(config) if part == "CONFIG" else part for part in proc.command]
    return proc.start(), master_key


async def _probe_gateway(session: aiohttp.ClientSession, gateway: Target) -> None:
    """Use the gateway's OpenAI-compatible provider if it has one; else its mock mirrors the fake."""
    async with session.post(f"{gateway.base}/api/threads/", json={}, headers={"x-org-id": DEFAULT_ORG}) as resp:
        thread = (await resp.json())["thread_id"]
    async with session.post(f"{gateway.base}/api/threads/{thread}/messages",
                            json={"content": "probe", "provider": "openai", "model": FAKE_MODEL},
                            headers={"x-org-id": DEFAULT_ORG}) as resp:
        if resp.status == 200:
            return
        detail = await resp.text()
    progress(f"the gateway has no working 'openai' provider ({detail[:160]}); "
             "its column uses the built-in mock with the fake's timings")
    gateway.provider, gateway.model = "mock", None


async def run_side_by_side(targets: list[Target], fake_url: str, plan: Plan, sections: set[int]) -> dict[int, dict[str, Any]]:
    connector = aiohttp.TCPConnector(limit=0)
    out: dict[int, dict[str, Any]] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        bench = Bench(session=session, targets=targets, fake_url=fake_url, run_id=uuid.uuid4().hex[:8])
        gateway = next(t for t in targets if t.name == "gateway")
        await bench.set_upstream(ttft_ms=0, itl_ms=0, tokens=5)
        await _probe_gateway(session, gateway)
        # Warm up every column, then take the idle memory.
        for target in targets:
            thread = await bench.new_thread(target) if target.kind == "dac" else None
            await bench.stream(target, f"warm-up {bench.run_id}", thread=thread)
            await bench.complete(target, f"warm-up 2 {bench.run_id}", thread=thread)
        await asyncio.sleep(0.5)
        for target in targets:
            if target.proc is not None:
                target.rss_idle = target.proc.rss_bytes()

        async def sample() -> None:
            while True:
                for target in targets:
                    if target.proc is not None:
                        rss = target.proc.rss_bytes()
                        target.rss_peak[bench.section] = max(rss, target.rss_peak.get(bench.section, 0))
                await asyncio.sleep(RSS_SAMPLE_S)

        sampler = asyncio.ensure_future(sample())
        try:
            if 1 in sections:
                progress(f"section 1: TTFT of one stream, {plan.ttft_rounds} rounds")
                out[1] = await section_ttft(bench, rounds=plan.ttft_rounds)
            if 2 in sections:
                progress(f"section 2: {IDENTICAL_STREAMS} identical streams, {plan.identical_rounds} round(s)")
                out[2] = await section_identical(bench, rounds=plan.identical_rounds)
            if 3 in sections:
                progress(f"section 3: cancel latency, {plan.cancel_trials} trial(s)")
                out[3] = await section_cancel(bench, trials=plan.cancel_trials)
            if 4 in sections:
                progress(f"section 4: throughput, {plan.throughput_requests} requests x {plan.throughput_rounds}")
                out[4] = await section_throughput(bench, requests=plan.throughput_requests,
                                                  concurrency=plan.throughput_concurrency,
                                                  rounds=plan.throughput_rounds)
        finally:
            sampler.cancel()
        if 6 in sections:
            out[6] = section_rss(targets)
        for section in out.values():
            section.setdefault("headers", ["", *[t.name for t in targets]])
            section["gateway_upstream"] = "fake (openai provider)" if gateway.via_fake else "built-in mock"
    return out


def parse_args(argv: list[str] | None, *, fanout_only: bool = False) -> argparse.Namespace:
    prog = "tools/bench_fanout.py" if fanout_only else "tools/bench.py"
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Fan-out of one mock flight to many SSE subscribers." if fanout_only else
        "Side-by-side benchmarks: a direct call, the gateway and (if installed) LiteLLM's proxy, "
        "against the same fake OpenAI-compatible upstream on 127.0.0.1."))
    parser.add_argument("--quick", action="store_true", help="a short run (smaller counts)")
    if not fanout_only:
        parser.add_argument("--sections", default="1,2,3,4,5,6",
                            help="comma-separated sections: 1 ttft, 2 identical, 3 cancel, 4 throughput, "
                                 "5 fan-out, 6 memory (default all)")
        parser.add_argument("--litellm", default="auto",
                            help="LiteLLM's proxy: auto (use it if installed), off, or the command to run")
    parser.add_argument("--subscribers", default=None,
                        help="fan-out levels, comma-separated (default 100,500,1000; --quick: 50,200)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens of the fan-out flight")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fan-out runs per level; the one with the median p99 lag is shown (default 3; --quick 1)")
    parser.add_argument("--load-processes", type=int, default=DEFAULT_LOAD_PROCESSES,
                        help=f"processes driving the fan-out subscribers (default {DEFAULT_LOAD_PROCESSES})")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load to different cores")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if fanout_only:
        args.sections, args.litellm = "5", "off"
    try:
        args.sections = {int(s) for s in args.sections.split(",") if s.strip()}
        levels = tuple(int(s) for s in args.subscribers.split(",")) if args.subscribers else None
    except ValueError:
        parser.error("--sections and --subscribers take comma-separated whole numbers")
    if not args.sections or not args.sections <= {1, 2, 3, 4, 5, 6}:
        parser.error("--sections takes numbers from 1 to 6")
    plan = Plan.make(quick=args.quick)
    if levels:
        if min(levels) < 1:
            parser.error("--subscribers must be positive")
        plan.fanout_levels = levels
    if args.tokens:
        plan.fanout_tokens = args.tokens
    if args.repeats:
        plan.fanout_repeats = args.repeats
    if args.load_processes < 1:
        parser.error("--load-processes must be at least 1")
    args.plan = plan
    return args


def render(report: dict[str, Any]) -> str:
    parts = [f"# Benchmarks ({'quick' if report['quick'] else 'full'} run)", "", report["setup"], ""]
    for key in sorted(report["sections"], key=int):
        section = report["sections"][key]
        parts += [f"## {section['title']}", ""]
        if "note" in section:
            parts += [section["note"], ""]
        parts += [section["table"] if "table" in section else markdown_table(section["headers"], section["rows"]), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None, *, fanout_only: bool = False) -> int:
    args = parse_args(argv, fanout_only=fanout_only)
    plan: Plan = args.plan
    server_cores, load_cores = (None, None) if args.no_pin else cpu_split()
    pinned = pin(0, load_cores)
    raise_open_files(max(plan.fanout_levels) * 2 + 1024)
    litellm_cmd = find_litellm(args.litellm)
    report: dict[str, Any] = {
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "server_cores": sorted(server_cores or []),
                    "load_cores": sorted(load_cores or []), "pinned": pinned, "python": sys.version.split()[0]},
        "litellm": "not installed" if litellm_cmd is None and args.litellm == "auto" else
                   ("off" if litellm_cmd is None else " ".join(litellm_cmd)),
        "sections": {},
    }
    setup = [f"{os.cpu_count()} CPU(s); " + (
        f"server pinned to core(s) {sorted(server_cores or [])}, load and fake upstream to {sorted(load_cores or [])}"
        if pinned else "not pinned (fewer than 2 cores allowed, or --no-pin)") + "."]
    failed = False
    side = args.sections - {5}
    if side:
        litellm_proc = None
        with ServerProcess(command=[sys.executable, "-m", "tools.fake_openai", "--port", "{port}"],
                           ready_path="/v1/models", cores=load_cores) as fake, \
             ServerProcess(cores=server_cores, env={"OPENAI_BASE_URL": f"{fake.url}/v1",
                                                    "OPENAI_API_KEY": FAKE_KEY}) as gateway:
            targets = [Target(name="direct", kind="openai", base=f"{fake.url}/v1"),
                       Target(name="gateway", kind="dac", base=gateway.url, proc=gateway)]
            if litellm_cmd is not None:
                progress(f"starting LiteLLM's proxy: {' '.join(litellm_cmd)}")
                try:
                    litellm_proc, master_key = start_litellm(litellm_cmd, fake.url, server_cores)
                    targets.append(Target(name="litellm", kind="openai", base=f"{litellm_proc.url}/v1",
                                          proc=litellm_proc, api_key=master_key))
                except RuntimeError as exc:
                    progress(f"LiteLLM's proxy did not start, left out: {exc}")
                    report["litellm"] = f"failed to start ({str(exc).splitlines()[0]}; see above)"
            try:
                results = uvloop.run(run_side_by_side(targets, fake.url, plan, side))
            finally:
                if litellm_proc is not None:
                    litellm_proc.stop()
        via_fake = targets[1].via_fake
        route = ("its openai provider" if via_fake else
                 "its built-in mock with the same timings (this gateway has no openai provider)")
        setup.append(f"Upstream: tools/fake_openai.py in its own process (OpenAI chat.completions wire format); "
                     f"the gateway reaches it through {route}; LiteLLM: {report['litellm']}.")
        for key, section in results.items():
            section["table"] = markdown_table(section["headers"], section["rows"])
            report["sections"][str(key)] = section
        # A broken run fails the benchmark where it is ours (a third-party column only reports).
        for key, field_ in ((1, "errors"), (2, "failed_streams"), (3, "failures"), (4, "failed")):
            columns = results.get(key, {}).get("columns", {})
            failed |= any(columns.get(name, {}).get(field_) for name in ("direct", "gateway"))
    if 5 in args.sections:
        fan = run_fanout(plan.fanout_levels, tokens=plan.fanout_tokens, workers=args.load_processes,
                         server_cores=server_cores, load_cores=load_cores, repeats=plan.fanout_repeats)
        fan["title"] = (f"5. Fan-out of one flight to {', '.join(map(str, plan.fanout_levels))} SSE subscribers "
                        f"(gateway only)")
        fan["note"] = FANOUT_NOTE.format(tokens=plan.fanout_tokens, itl=FANOUT_ITL_MS, workers=args.load_processes,
                                         pinning=" pinned apart from the server" if pinned else "",
                                         repeats=plan.fanout_repeats)
        report["sections"]["5"] = fan
        failed |= not fan["ok"]
    report["setup"] = " ".join(setup)
    print(render(report))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        progress(f"JSON written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
