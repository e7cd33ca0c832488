"""Section 5: fan-out of one flight to many SSE subscribers, 1,000 and 10,000 by default.

One mock flight at 20 tokens a second; its subscribers are held by several
load processes (``multiprocessing``, spawned, a few thousand connections each:
:mod:`tools.bench.fanout_load`) pinned apart from the server, which runs alone
on its core, fresh for every run. Every subscriber's tokens are checked.

Targets, the gateway on one core: every subscriber receives every token in
order; p99 delivery lag at most 100 ms; at most 5 µs of server CPU per
delivered event; at most 10 KiB of server RSS per subscriber.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from server.providers.mock import mock_answer
from tools._common import (
    DEFAULT_ORG,
    ServerProcess,
    cores_busy_seconds,
    http_open,
    markdown_table,
    percentile,
    proc_cpu_split,
    progress,
    raise_open_files,
)
from tools.bench.fanout_load import FanoutJob, fanout_worker
from tools.bench.harness import FAKE_KEY, FAKE_MODEL
from tools.bench.targets import Check, as_count, as_kib, as_ms, as_us
from tools.client import GatewayClient

DEFAULT_FANOUT_LEVELS = (1000, 10000)
QUICK_FANOUT_LEVELS = (200,)
#: tokens of the flight, and the gap between them (20 tokens a second)
FANOUT_TOKENS = 50
QUICK_FANOUT_TOKENS = 10
FANOUT_ITL_MS = 50
#: connections opened at once by all load processes together (the server's listen backlog is 128)
FANOUT_CONNECT_TOTAL = 96
#: subscribers per load process when the count of processes is left to the benchmark
SUBSCRIBERS_PER_PROCESS = 2500
FANOUT_PROMPT = "Fan-out benchmark: what is DAC?"
#: a load process gives up on its subscribers after the flight's first token plus this long
FANOUT_LEVEL_TIMEOUT_S = 120.0
#: how much longer the main process waits for a load process's report
LOAD_GRACE_S = 60.0
#: how long the calls the main process makes to the server may take
CALL_TIMEOUT = aiohttp.ClientTimeout(total=60)
LAG_TARGET_P99_MS = 100.0
CPU_TARGET_US = 5.0
RSS_TARGET_KIB = 10.0

FANOUT_NOTE = (
    "One flight through the gateway's openai provider to N SSE subscribers on 127.0.0.1. The fake upstream "
    "holds its answer until every subscriber is attached, then sends {tokens} tokens {itl} ms apart on a fixed "
    "schedule. Each subscriber checks every token's sequence number, order and text and the final message. "
    "Subscribers are raw asyncio connections held by {workers} load process(es){pinning}. Lag: a token's "
    "arrival at a subscriber minus the time the upstream's schedule had it due (CLOCK_MONOTONIC, shared); "
    "spread: minus its earliest arrival at any subscriber. CPU per event: the gateway process's CPU clock from "
    "the moment all subscribers were attached to the end, over deltas and done events delivered. Server core "
    "busy: that CPU over that time, and every process's on the core (/proc/stat). Of which in the kernel: the "
    "gateway's system time over its user and system time (/proc/PID/stat). On loopback a write's delivery to "
    "the subscriber's socket (its TCP receive, the subscriber's wake-up) runs inside the gateway's write call, "
    "where a network would do it on the subscriber's machine: on a kernel that does not account softirq time "
    "apart (CONFIG_IRQ_TIME_ACCOUNTING off) it counts as the gateway's system time, else only in 'all'. "
    "RSS per subscriber: (server RSS with everyone attached, or its peak while streaming) minus idle, over N; "
    "a fresh server per run. Load core busy: the load processes' CPU while the flight streamed, over its "
    "duration. "
    "{repeats} run(s) per level; the table shows the one with the median p99 lag."
)

T = TypeVar("T")


def load_processes(subscribers: int, asked: int | None) -> int:
    """How many load processes hold ``subscribers``: as asked, else a few thousand each (2 to 8)."""
    return asked or min(8, max(2, math.ceil(subscribers / SUBSCRIBERS_PER_PROCESS)))


class LoadProcesses:
    """The load processes of one level, and the reports they send back; a context manager."""

    def __init__(self, subscribers: int, *, workers: int, cores: set[int] | None, server: ServerProcess) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.subscribers = subscribers
        self.server = server
        self.outbox = ctx.Queue()
        shares = [subscribers // workers + (1 if i < subscribers % workers else 0) for i in range(workers)]
        shares = [s for s in shares if s]
        self.inboxes = [ctx.Queue() for _ in shares]
        self.procs = [ctx.Process(target=fanout_worker, args=(i, share, cores, self.inboxes[i], self.outbox),
                                  daemon=True)
                      for i, share in enumerate(shares)]
        self.deadline = 0.0
        #: the server's peak memory, sampled while waiting
        self.rss_peak = 0
        #: reports received, by kind ("ready", "attached", "ended", "result") and process
        self.reports: dict[str, dict[int, Any]] = {}

    def __enter__(self) -> LoadProcesses:
        for p in self.procs:
            p.start()
        self.deadline = time.monotonic() + FANOUT_LEVEL_TIMEOUT_S + LOAD_GRACE_S
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def send(self, job: FanoutJob) -> None:
        for inbox in self.inboxes:
            inbox.put(job)

    def _between_reports(self, kind: str) -> None:
        """Sample the server's memory; give up on a level that has run out of time or lost a process."""
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"fan-out to {self.subscribers}: load processes did not report {kind!r}")
        if any(not p.is_alive() and p.exitcode for p in self.procs):
            raise RuntimeError(f"fan-out to {self.subscribers}: a load process died")
        self.rss_peak = max(self.rss_peak, self.server.rss_bytes())

    def wait_for(self, kind: str) -> dict[int, Any]:
        """Each load process's report of ``kind``, by process (a process may already have sent its
        next report: it is kept for the next call)."""
        got = self.reports.setdefault(kind, {})
        while len(got) < len(self.procs):
            try:
                what, index, value = self.outbox.get(timeout=0.02)
            except queue.Empty:
                self._between_reports(kind)
                continue
            self.reports.setdefault(what, {})[index] = value
        return self.reports.pop(kind)


# -- one level ----------------------------------------------------------------------------


def _call(server: ServerProcess, org: str, call: Callable[[GatewayClient], Awaitable[T]]) -> T:
    """One call to the server through the shared client (this process has no event loop of its own)."""
    async def go() -> T:
        async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as session:
            return await call(GatewayClient(session, server.url, org=org))
    return asyncio.run(go())


def _fake(fake: ServerProcess, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A call to the fake upstream's control surface."""
    request = urllib.request.Request(f"{fake.url}{path}", data=None if body is None else orjson.dumps(body),
                                     method=method, headers={"Content-Type": "application/json"})
    with http_open(request, timeout=CALL_TIMEOUT.total or 60) as resp:
        return orjson.loads(resp.read())


async def _warm_up(gw: GatewayClient) -> None:
    """One small flight end to end, so that first-use costs are not counted."""
    thread = await gw.new_thread("bench")
    async with gw.open_stream(thread, {"content": "warm-up", "provider": "openai", "model": FAKE_MODEL}) as resp:
        await resp.read()


@dataclass(slots=True, kw_only=True)
class Measured:
    """What one level measured, before the figures are worked out."""

    subscribers: int
    tokens: int
    load_processes: int
    results: dict[int, Any]
    rss_idle: int
    rss_attached: int
    rss_peak: int
    cpu_start: float
    cpu_attached: float
    cpu_end: float
    #: CPU seconds every process used on the server's cores between the same two moments, and the time between
    cores_cpu: float | None
    #: the server's system CPU seconds between those moments, and its user and system CPU together
    #: (``/proc/PID/stat``, in clock ticks)
    sys_cpu: float
    ticked_cpu: float
    delivery_s: float
    posted: float
    attached_at: float
    #: when the fake upstream's schedule had the first token due, and the gap between tokens
    first_due: float | None
    itl_s: float
    server_pinned: bool


def _cores_cpu(server: ServerProcess) -> float | None:
    """CPU seconds used so far by every process on the server's cores (None when it is not pinned)."""
    return cores_busy_seconds(server.cores) if server.pinned and server.cores else None


def _job(server: ServerProcess, stream_url: str, tokens: int, processes: int) -> FanoutJob:
    where = urlsplit(server.url)
    return FanoutJob(host=where.hostname or "127.0.0.1", port=where.port or 80, path=stream_url,
                     tokens=mock_answer(FANOUT_PROMPT, tokens),
                     connect_concurrency=max(1, FANOUT_CONNECT_TOTAL // processes), timeout_s=FANOUT_LEVEL_TIMEOUT_S)


def fanout_level(subscribers: int, *, tokens: int, workers: int, fake: ServerProcess,
                 server_cores: set[int] | None, load_cores: set[int] | None) -> dict[str, Any]:
    """One flight to ``subscribers`` SSE clients, on a fresh server; every token checked.

    The fake upstream holds the flight's answer until every subscriber is attached."""
    org = DEFAULT_ORG
    body = {"content": FANOUT_PROMPT, "provider": "openai", "model": FAKE_MODEL, "stream": True}
    raise_open_files(subscribers * 2 + 512)  # the server inherits it
    env = {"OPENAI_BASE_URL": f"{fake.url}/v1", "OPENAI_API_KEY": FAKE_KEY}
    with ServerProcess(cores=server_cores, env=env) as server:
        _fake(fake, "POST", "/config", {"ttft_ms": 0, "itl_ms": 0, "tokens": 5, "hold": False})
        _call(server, org, _warm_up)
        with LoadProcesses(subscribers, workers=workers, cores=load_cores, server=server) as load:
            load.wait_for("ready")
            thread = _call(server, org, lambda gw: gw.new_thread("bench"))
            _fake(fake, "POST", "/config", {"ttft_ms": FANOUT_ITL_MS, "itl_ms": FANOUT_ITL_MS, "tokens": tokens, "hold": True})
            time.sleep(0.2)
            rss_idle, cpu_start = server.rss_bytes(), server.cpu_seconds()
            _, accepted = _call(server, org, lambda gw: gw.post(thread, body, headers={"Accept": "application/json"}))
            posted = time.monotonic()
            load.send(_job(server, accepted["stream_url"], tokens, len(load.procs)))
            attached_at = max(load.wait_for("attached").values())
            cpu_attached, cores_attached, since = server.cpu_seconds(), _cores_cpu(server), time.monotonic()
            split_attached = proc_cpu_split(server.pid)
            rss_attached = load.rss_peak = server.rss_bytes()
            _fake(fake, "POST", "/release", {})
            load.wait_for("ended")
            cpu_end, cores_end, until = server.cpu_seconds(), _cores_cpu(server), time.monotonic()
            split_end = proc_cpu_split(server.pid)
            results = load.wait_for("result")
    call = next((c for c in reversed(_fake(fake, "GET", "/stats?last=5")["recent"]) if c["prompt"] == FANOUT_PROMPT), {})
    return _figures(Measured(
        subscribers=subscribers, tokens=tokens, load_processes=len(load.procs), results=results,
        rss_idle=rss_idle, rss_attached=rss_attached, rss_peak=load.rss_peak, cpu_start=cpu_start,
        cpu_attached=cpu_attached, cpu_end=cpu_end, posted=posted, attached_at=attached_at,
        cores_cpu=None if cores_attached is None or cores_end is None else cores_end - cores_attached,
        delivery_s=until - since, sys_cpu=split_end[1] - split_attached[1],
        ticked_cpu=sum(split_end) - sum(split_attached),
        first_due=call.get("first_due"), itl_s=FANOUT_ITL_MS / 1000, server_pinned=server.pinned))


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _lags(m: Measured) -> tuple[list[float], list[list[float]], list[float], int]:
    """Every token's earliest arrival at any subscriber; each arrival's lag behind the upstream's
    schedule, token by token; each arrival's lag behind the earliest; and the subscribers counted."""
    tokens = m.tokens
    flat = [a for r in m.results.values() for a in r["arrivals"]]
    earliest = [min((a for a in flat[k::tokens] if a), default=0.0) for k in range(tokens)]
    due = earliest if m.first_due is None else [m.first_due + k * m.itl_s for k in range(tokens)]
    by_token = [[a - due[k] for a in flat[k::tokens] if a] for k in range(tokens)]
    spread = [a - earliest[i % tokens] for i, a in enumerate(flat) if a]
    return earliest, by_token, spread, len(flat) // tokens


def _figures(m: Measured) -> dict[str, Any]:
    results, subscribers = list(m.results.values()), m.subscribers
    earliest, by_token, spread, counted = _lags(m)
    lags = [lag for token in by_token for lag in token]
    failed = sum(r["failed"] for r in results) + subscribers - counted
    first_token = min((t for t in earliest if t), default=None)
    delivered = len(lags) + (subscribers - failed)  # deltas, plus the done of each complete subscriber
    delivery_cpu = m.cpu_end - m.cpu_attached
    # The load processes idle until the first token: their CPU from attached to ended is the streaming's.
    streamed = max((r["ended_at"] for r in results), default=0.0) - (first_token or 0.0)
    return {
        "subscribers": subscribers, "tokens": m.tokens, "load_processes": m.load_processes,
        "failed_subscribers": failed, "failures": [f for r in results for f in r["failures"]],
        "events_delivered": delivered,
        "server_cpu_delivery_s": round(delivery_cpu, 4),
        "server_cpu_per_event_us": round(delivery_cpu / delivered * 1e6, 2) if delivered else None,
        #: the share of that CPU the kernel spent in the server's system calls (its writes, with the
        #: loopback delivery to the subscriber's socket inside them)
        "server_kernel_share": round(m.sys_cpu / m.ticked_cpu, 3) if m.ticked_cpu > 0 else None,
        "server_cpu_attach_per_subscriber_us": round((m.cpu_attached - m.cpu_start) / subscribers * 1e6, 1),
        "lag_measured_from": "schedule" if m.first_due is not None else "earliest arrival",
        "lag_p50_ms": _ms(percentile(lags, 50)), "lag_p99_ms": _ms(percentile(lags, 99)),
        "lag_max_ms": _ms(max(lags) if lags else None),
        "lag_max_by_token_ms": [_ms(max(token, default=0.0)) for token in by_token],
        "spread_p99_ms": _ms(percentile(spread, 99)),
        "token_times_ms": [_ms(t - first_token) if t and first_token else None for t in earliest],
        "rss_idle_bytes": m.rss_idle, "rss_attached_bytes": m.rss_attached, "rss_peak_bytes": m.rss_peak,
        "rss_per_subscriber_bytes": round((max(m.rss_peak, m.rss_attached) - m.rss_idle) / subscribers),
        "attach_s": round(m.attached_at - m.posted, 3),
        #: every subscriber was attached before the first token (none had to replay)
        "attached_before_first_token": first_token is not None and m.attached_at < first_token,
        "load_cpu_s": round(sum(r["cpu_s"] for r in results), 3),
        "load_busy": round(sum(r["delivery_cpu_s"] for r in results) / streamed, 3) if streamed > 0 else None,
        "server_busy": round(delivery_cpu / m.delivery_s, 3),
        "server_core_busy_all": None if m.cores_cpu is None else round(m.cores_cpu / m.delivery_s, 3),
        "server_pinned": m.server_pinned,
    }


# -- every level ------------------------------------------------------------------------------


def _level(subscribers: int, *, tokens: int, workers: int, fake: ServerProcess, server_cores: set[int] | None,
           load_cores: set[int] | None, repeats: int) -> dict[str, Any]:
    """``repeats`` runs of one level; the run with the median p99 lag stands for it, every run's figures kept."""
    runs = []
    for attempt in range(repeats):
        progress(f"fan-out: one flight of {tokens} tokens to {subscribers} subscribers from {workers} load "
                 f"process(es)" + (f" (run {attempt + 1}/{repeats})" if repeats > 1 else ""))
        run = fanout_level(subscribers, tokens=tokens, workers=workers, fake=fake, server_cores=server_cores,
                           load_cores=load_cores)
        progress(f"  {subscribers - run['failed_subscribers']}/{subscribers} received every token, "
                 f"p99 lag {run['lag_p99_ms']} ms, {run['server_cpu_per_event_us']} us CPU per event, "
                 f"attached in {run['attach_s']} s")
        if not run["attached_before_first_token"]:
            progress("  note: some subscribers attached after the first token and replayed it")
        runs.append(run)
    ordered = sorted(runs, key=lambda r: r["lag_p99_ms"] if r["lag_p99_ms"] is not None else float("inf"))
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs"] = [{k: r[k] for k in ("failed_subscribers", "lag_p99_ms", "server_cpu_per_event_us",
                                      "rss_per_subscriber_bytes")} for r in runs]
    row["failed_subscribers_all_runs"] = sum(r["failed_subscribers"] for r in runs)
    return row


def _checks(row: dict[str, Any]) -> list[dict[str, Any]]:
    n = row["subscribers"]
    whole = n - max(r["failed_subscribers"] for r in row["runs"])  # in the worst run
    per_event, per_sub = row["server_cpu_per_event_us"], row["rss_per_subscriber_bytes"] / 1024
    return [
        Check(section=5, key=f"fanout_{n}_complete", figure=f"fan-out to {n:,}: subscribers that received every "
              "token in order (worst run)", value=whole, op=">=", limit=n, fmt=as_count,
              measured=f"{whole:,} of {n:,}").as_dict(),
        Check(section=5, key=f"fanout_{n}_lag_p99_ms", figure=f"fan-out to {n:,}: delivery lag, p99",
              value=row["lag_p99_ms"], op="<=", limit=LAG_TARGET_P99_MS, fmt=as_ms).as_dict(),
        Check(section=5, key=f"fanout_{n}_cpu_per_event_us", figure=f"fan-out to {n:,}: server CPU per delivered "
              "event", value=per_event, op="<=", limit=CPU_TARGET_US, fmt=as_us).as_dict(),
        Check(section=5, key=f"fanout_{n}_rss_per_subscriber_kib", figure=f"fan-out to {n:,}: server RSS per "
              "subscriber", value=per_sub, op="<=", limit=RSS_TARGET_KIB, fmt=as_kib).as_dict(),
    ]


def run_fanout(levels: Sequence[int], *, tokens: int, workers: int | None, server_cores: set[int] | None,
               load_cores: set[int] | None, repeats: int = 1) -> dict[str, Any]:
    with ServerProcess(command=[sys.executable, "-m", "tools.fake_openai", "--port", "{port}"],
                       ready_path="/v1/models", cores=load_cores) as fake:
        rows = [_level(subscribers, tokens=tokens, workers=load_processes(subscribers, workers), fake=fake,
                       server_cores=server_cores, load_cores=load_cores, repeats=repeats) for subscribers in levels]
    table = markdown_table(
        ["Subscribers", "Load processes", "Received every token", "Events delivered", "Server CPU per event",
         "... of which in the kernel", "Lag p50", "Lag p99", "Lag max", "Spread p99", "Server RSS per subscriber",
         "Attach time", "Server core busy: gateway / all", "Load core busy"],
        [(r["subscribers"], r["load_processes"], f"{r['subscribers'] - r['failed_subscribers']}/{r['subscribers']}",
          r["events_delivered"], f"{r['server_cpu_per_event_us']} µs", _share(r["server_kernel_share"]),
          f"{r['lag_p50_ms']} ms", f"{r['lag_p99_ms']} ms", f"{r['lag_max_ms']} ms", f"{r['spread_p99_ms']} ms",
          f"{r['rss_per_subscriber_bytes'] / 1024:.1f} KiB", f"{r['attach_s'] * 1000:.0f} ms",
          f"{_share(r['server_busy'])} / {_share(r['server_core_busy_all'])}", _share(r["load_busy"]))
         for r in rows],
    )
    return {"rows": rows, "table": table, "checks": [c for r in rows for c in _checks(r)],
            "ok": all(r["failed_subscribers_all_runs"] == 0 for r in rows)}
