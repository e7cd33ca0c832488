#!/usr/bin/env python3
"""Side-by-side benchmarks of the gateway.

    tools/bench.py [--quick] [--sections 1,2,3,4,5,6] [--json FILE]
    tools/bench_fanout.py [--subscribers 100,500,1000]      # section 5 alone

PLACEHOLDER
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson

from server.providers.mock import mock_answer
from tools._common import (
    DEFAULT_ORG,
    ServerProcess,
    cpu_split,
    markdown_table,
    percentile,
    pin,
    progress,
    raise_open_files,
)

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


def _parse_frame(frame: bytes) -> tuple[str, int | None, bytes]:
    event, eid, data = "message", None, b""
    for line in frame.split(b"\n"):
        if line.startswith(b"data: "):
            data = line[6:]
        elif line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"id: "):
            eid = int(line[4:])
    return event, eid, data


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
                    buffer = b""
                    async for chunk in resp.content.iter_any():
                        now = monotonic()
                        buffer += chunk
                        while (end := buffer.find(b"\n\n")) >= 0:
                            frame, buffer = buffer[:end], buffer[end + 2:]
                            event, seq, data = _parse_frame(frame)
                            if event == "delta":
                                assert seq is not None
                                if not 1 <= seq <= n or mine[seq - 1]:
                                    problems.append(f"unexpected or repeated delta {seq}")
                                elif orjson.loads(data)["text"] != tokens[seq - 1]:
                                    problems.append(f"wrong text in delta {seq}")
                                else:
                                    mine[seq - 1] = now
                            elif event == "meta":
                                if holding:
                                    holding = False
                                    gate.release()
                                    attach()
                            elif event == "done":
                                done = orjson.loads(data)["message"]["content"] == full_text
                                if not done:
                                    problems.append("done with a different text")
                            elif event == "snapshot":
                                problems.append("fell behind the ring (snapshot)")
                            elif event == "error":
                                problems.append(f"error event {data[:200]!r}")
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
    import uvloop

    pin(0, cores)
    raise_open_files(count + 256)
    uvloop.run(_subscribe_all(index, count, inbox, outbox))


def _post_json(url: str, body: dict[str, Any], *, org: str, accept: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=orjson.dumps(body), method="POST",
        headers={"Content-Type": "application/json", "Accept": accept, "x-org-id": org},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
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
               load_cores: set[int] | None) -> dict[str, Any]:
    rows = []
    for subscribers in levels:
        progress(f"fan-out: one flight of {tokens} tokens to {subscribers} subscribers")
        row = fanout_level(subscribers, tokens=tokens, workers=workers, server_cores=server_cores,
                           load_cores=load_cores)
        progress(f"  {subscribers - row['failed_subscribers']}/{subscribers} received every token, "
                 f"p99 lag {row['lag_p99_ms']} ms, {row['server_cpu_per_event_us']} us CPU per event")
        if not row["attached_before_first_token"]:
            progress("  note: some subscribers attached after the first token and replayed it")
        rows.append(row)
    table = markdown_table(
        ["Subscribers", "Received every token", "Events delivered", "Server CPU per event", "Lag p50",
         "Lag p99", "Lag max", "Server RSS per subscriber", "Attach time"],
        [(r["subscribers"], f"{r['subscribers'] - r['failed_subscribers']}/{r['subscribers']}",
          r["events_delivered"], f"{r['server_cpu_per_event_us']} us", f"{r['lag_p50_ms']} ms",
          f"{r['lag_p99_ms']} ms", f"{r['lag_max_ms']} ms", f"{r['rss_per_subscriber_bytes'] / 1024:.1f} KiB",
          f"{r['attach_s'] * 1000:.0f} ms") for r in rows],
    )
    return {"rows": rows, "table": table, "ok": all(r["failed_subscribers"] == 0 for r in rows)}


FANOUT_NOTE = (
    "One mock flight ({tokens} tokens, {itl} ms apart) to N SSE subscribers on 127.0.0.1, each checking "
    "every token's sequence number and text and the final message. Subscribers run in {workers} separate "
    "process(es){pinning}. Lag: a token's arrival at a subscriber minus its earliest arrival at any "
    "subscriber. CPU per event: server user+system CPU from the moment all subscribers were attached to "
    "the end, over deltas and done events delivered. RSS per subscriber: (server RSS with everyone "
    "attached, or its peak while streaming) minus idle, over N; a fresh server per level."
)
