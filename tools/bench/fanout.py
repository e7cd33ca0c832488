"""Section 5: fan-out of one mock flight to 100, 500 and 1000 SSE subscribers.

The subscribers run in separate load processes (``multiprocessing``, spawned)
and check every token of the flight; the server runs alone in its own process,
fresh for every run. Figures: how many subscribers received every token, the
server's CPU per delivered event, p50/p99/max delivery lag, and the server's
memory per subscriber.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import uvloop

from server.providers.mock import mock_answer
from tools._common import DEFAULT_ORG, ServerProcess, markdown_table, percentile, pin, progress, raise_open_files
from tools.client import GatewayClient
from tools.sse import SseEvent, sse_events

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
#: how long the calls the main process makes to the server may take
CALL_TIMEOUT = aiohttp.ClientTimeout(total=60)

FANOUT_NOTE = (
    "One mock flight ({tokens} tokens, {itl} ms apart) to N SSE subscribers on 127.0.0.1, each checking "
    "every token's sequence number and text and the final message. Subscribers run in {workers} separate "
    "process(es){pinning}. Lag: a token's arrival at a subscriber minus its earliest arrival at any "
    "subscriber. CPU per event: server user+system CPU from the moment all subscribers were attached to "
    "the end, over deltas and done events delivered. RSS per subscriber: (server RSS with everyone "
    "attached, or its peak while streaming) minus idle, over N; a fresh server per run. "
    "{repeats} run(s) per level; the table shows the one with the median p99 lag."
)

T = TypeVar("T")


@dataclass(slots=True, kw_only=True)
class FanoutJob:
    url: str
    org: str
    tokens: list[str]


# -- the load processes ---------------------------------------------------------------


@dataclass(slots=True)
class TokenCheck:
    """One subscriber's check of the flight: every token once, with its text, then the whole answer."""

    tokens: list[str]
    #: per token, the time it arrived (0.0: not yet)
    arrivals: list[float]
    problems: list[str] = field(default_factory=list)
    done: bool = False

    def take(self, ev: SseEvent) -> bool:
        """Check one event; True for the meta event (the subscriber is attached)."""
        if ev.event == "delta":
            seq = ev.id
            if seq is None or not 1 <= seq <= len(self.tokens) or self.arrivals[seq - 1]:
                self.problems.append(f"unexpected or repeated delta {seq}")
            elif ev.json()["text"] != self.tokens[seq - 1]:
                self.problems.append(f"wrong text in delta {seq}")
            else:
                self.arrivals[seq - 1] = ev.at
        elif ev.event == "done":
            self.done = ev.json()["message"]["content"] == "".join(self.tokens)
            if not self.done:
                self.problems.append("done with a different text")
        elif ev.event == "snapshot":
            self.problems.append("fell behind the ring (snapshot)")
        elif ev.event == "error":
            self.problems.append(f"error event {ev.data[:200]!r}")
        return ev.event == "meta"

    def finish(self) -> list[str]:
        """Every problem, the missing tokens and a missing end included."""
        missing = sum(1 for t in self.arrivals if not t)
        if missing:
            self.problems.append(f"{missing} of {len(self.tokens)} deltas missing")
        if not self.done and not self.problems:
            self.problems.append("no done event")
        return self.problems


class Subscribers:
    """One load process's ``count`` SSE subscribers to the job's stream."""

    def __init__(self, index: int, count: int, job: FanoutJob, session: aiohttp.ClientSession, outbox: Any) -> None:
        self.index, self.count, self.job, self.session, self.outbox = index, count, job, session, outbox
        self.gate = asyncio.Semaphore(FANOUT_CONNECT_CONCURRENCY)
        self.arrivals: list[list[float]] = [[0.0] * len(job.tokens) for _ in range(count)]
        self.failures: list[str] = []
        self.failed = 0
        self.attached = 0
        self.headers = {"x-org-id": job.org, "Accept": "text/event-stream"}

    def _attached(self) -> None:
        """One more subscriber attached (or given up): let the next one connect; report when all are."""
        self.gate.release()
        self.attached += 1
        if self.attached == self.count:
            self.outbox.put(("attached", self.index, time.monotonic()))

    async def subscribe(self, i: int) -> None:
        check = TokenCheck(self.job.tokens, self.arrivals[i])
        holding = True
        await self.gate.acquire()
        try:
            async with self.session.get(self.job.url, headers=self.headers) as resp:
                if resp.status != 200:
                    check.problems.append(f"HTTP {resp.status}")
                    return
                async for ev in sse_events(resp):
                    if check.take(ev) and holding:
                        holding = False
                        self._attached()
        except (aiohttp.ClientError, TimeoutError) as exc:
            check.problems.append(f"{exc.__class__.__name__}: {exc}")
        finally:
            if holding:
                self._attached()  # counted, so that the level is not held up by one broken subscriber
            problems = check.finish()
            if problems:
                self.failed += 1
                if len(self.failures) < MAX_LISTED_FAILURES:
                    self.failures.append(f"subscriber {self.index}.{i}: " + "; ".join(problems))

    async def run(self) -> dict[str, Any]:
        await asyncio.gather(*(self.subscribe(i) for i in range(self.count)))
        usage = os.times()
        return {"arrivals": self.arrivals, "failed": self.failed, "failures": self.failures,
                "cpu_s": usage.user + usage.system}


async def _subscribe_all(index: int, count: int, inbox: Any, outbox: Any) -> None:
    """One load process: ``count`` SSE subscribers to the job's stream, each checking every token."""
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=FANOUT_LEVEL_TIMEOUT_S, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        outbox.put(("ready", index, None))
        job: FanoutJob = await loop.run_in_executor(None, inbox.get)
        result = await Subscribers(index, count, job, session, outbox).run()
        outbox.put(("result", index, result))


def _fanout_worker(index: int, count: int, cores: set[int] | None, inbox: Any, outbox: Any) -> None:
    pin(0, cores)
    raise_open_files(count + 256)
    uvloop.run(_subscribe_all(index, count, inbox, outbox))


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
        self.procs = [ctx.Process(target=_fanout_worker, args=(i, share, cores, self.inboxes[i], self.outbox),
                                  daemon=True)
                      for i, share in enumerate(shares)]
        self.deadline = 0.0
        #: the server's peak memory, sampled while waiting
        self.rss_peak = 0

    def __enter__(self) -> LoadProcesses:
        for p in self.procs:
            p.start()
        self.deadline = time.monotonic() + FANOUT_LEVEL_TIMEOUT_S
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
        """Each load process's report of ``kind``, by process."""
        got: dict[int, Any] = {}
        while len(got) < len(self.procs):
            try:
                what, index, value = self.outbox.get(timeout=0.02)
            except queue.Empty:
                self._between_reports(kind)
                continue
            if what != kind:
                raise RuntimeError(f"fan-out: expected {kind!r} from load process {index}, got {what!r}")
            got[index] = value
        return got


# -- one level ----------------------------------------------------------------------------


def _call(server: ServerProcess, org: str, call: Callable[[GatewayClient], Awaitable[T]]) -> T:
    """One call to the server through the shared client (this process has no event loop of its own)."""
    async def go() -> T:
        async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as session:
            return await call(GatewayClient(session, server.url, org=org))
    return asyncio.run(go())


async def _warm_up(gw: GatewayClient) -> None:
    """One small flight end to end, so that first-use costs are not counted."""
    thread = await gw.new_thread("bench")
    async with gw.open_stream(thread, {"content": "warm-up", "model": "mock:ttft=0,itl=0,n=5"}) as resp:
        await resp.read()


@dataclass(slots=True, kw_only=True)
class Measured:
    """What one level measured, before the figures are worked out."""

    subscribers: int
    tokens: int
    model: str
    load_processes: int
    results: dict[int, Any]
    rss_idle: int
    rss_attached: int
    rss_peak: int
    cpu_start: float
    cpu_attached: float
    cpu_end: float
    posted: float
    attached_at: float
    server_pinned: bool


def fanout_level(subscribers: int, *, tokens: int, workers: int, server_cores: set[int] | None,
                 load_cores: set[int] | None) -> dict[str, Any]:
    """One flight to ``subscribers`` SSE clients, on a fresh server; every token checked."""
    org = DEFAULT_ORG
    ttft_ms = FANOUT_TTFT_BASE_MS + FANOUT_TTFT_PER_SUBSCRIBER_MS * subscribers
    model = f"mock:ttft={ttft_ms},itl={FANOUT_ITL_MS},n={tokens}"
    body = {"content": FANOUT_PROMPT, "model": model, "stream": True}
    raise_open_files(subscribers * 2 + 512)  # the server inherits it
    with ServerProcess(cores=server_cores) as server:
        _call(server, org, _warm_up)
        with LoadProcesses(subscribers, workers=workers, cores=load_cores, server=server) as load:
            load.wait_for("ready")
            thread = _call(server, org, lambda gw: gw.new_thread("bench"))
            time.sleep(0.2)
            rss_idle = server.rss_bytes()
            cpu_start = server.cpu_seconds()
            _, accepted = _call(server, org, lambda gw: gw.post(thread, body, headers={"Accept": "application/json"}))
            posted = time.monotonic()
            load.send(FanoutJob(url=server.url + accepted["stream_url"], org=org,
                                tokens=mock_answer(FANOUT_PROMPT, tokens)))
            attached_at = max(load.wait_for("attached").values())
            cpu_attached = server.cpu_seconds()
            rss_attached = load.rss_peak = server.rss_bytes()
            results = load.wait_for("result")
            cpu_end = server.cpu_seconds()
    return _figures(Measured(
        subscribers=subscribers, tokens=tokens, model=model, load_processes=len(load.procs), results=results,
        rss_idle=rss_idle, rss_attached=rss_attached, rss_peak=load.rss_peak, cpu_start=cpu_start,
        cpu_attached=cpu_attached, cpu_end=cpu_end, posted=posted, attached_at=attached_at,
        server_pinned=server.pinned))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _figures(m: Measured) -> dict[str, Any]:
    results, tokens, subscribers = m.results.values(), m.tokens, m.subscribers
    arrivals = [sub for r in results for sub in r["arrivals"]]
    failed = sum(r["failed"] for r in results)
    earliest = [min((sub[k] for sub in arrivals if sub[k]), default=0.0) for k in range(tokens)]
    lags = [sub[k] - earliest[k] for sub in arrivals for k in range(tokens) if sub[k]]
    delivered = len(lags) + (subscribers - failed)  # deltas, plus the done of each complete subscriber
    first_token = min((t for t in earliest if t), default=None)
    delivery_cpu = m.cpu_end - m.cpu_attached
    return {
        "subscribers": subscribers,
        "tokens": tokens,
        "model": m.model,
        "load_processes": m.load_processes,
        "failed_subscribers": failed,
        "failures": [f for r in results for f in r["failures"]],
        "events_delivered": delivered,
        "server_cpu_delivery_s": round(delivery_cpu, 4),
        "server_cpu_per_event_us": round(delivery_cpu / delivered * 1e6, 2) if delivered else None,
        "server_cpu_attach_per_subscriber_us": round((m.cpu_attached - m.cpu_start) / subscribers * 1e6, 1),
        "lag_p50_ms": _ms(percentile(lags, 50)),
        "lag_p99_ms": _ms(percentile(lags, 99)),
        "lag_max_ms": _ms(max(lags) if lags else None),
        "lag_max_by_token_ms": [_ms(max((sub[k] - earliest[k] for sub in arrivals if sub[k]), default=0.0))
                                for k in range(tokens)],
        "token_times_ms": [_ms(t - first_token) if t and first_token else None for t in earliest],
        "rss_idle_bytes": m.rss_idle,
        "rss_attached_bytes": m.rss_attached,
        "rss_peak_bytes": m.rss_peak,
        "rss_per_subscriber_bytes": round((max(m.rss_peak, m.rss_attached) - m.rss_idle) / subscribers),
        "attach_s": round(m.attached_at - m.posted, 3),
        #: every subscriber was attached before the first token (none had to replay)
        "attached_before_first_token": first_token is not None and m.attached_at < first_token,
        "load_cpu_s": round(sum(r["cpu_s"] for r in results), 3),
        "server_pinned": m.server_pinned,
    }


# -- every level ------------------------------------------------------------------------------


def _level(subscribers: int, *, tokens: int, workers: int, server_cores: set[int] | None,
           load_cores: set[int] | None, repeats: int) -> dict[str, Any]:
    """``repeats`` runs of one level; the run with the median p99 lag stands for it, every run's figures kept."""
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
    ordered = sorted(runs, key=lambda r: r["lag_p99_ms"] if r["lag_p99_ms"] is not None else float("inf"))
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs"] = [{k: r[k] for k in ("failed_subscribers", "lag_p99_ms", "server_cpu_per_event_us",
                                      "rss_per_subscriber_bytes")} for r in runs]
    row["failed_subscribers_all_runs"] = sum(r["failed_subscribers"] for r in runs)
    return row


def run_fanout(levels: Sequence[int], *, tokens: int, workers: int, server_cores: set[int] | None,
               load_cores: set[int] | None, repeats: int = 1) -> dict[str, Any]:
    rows = [_level(subscribers, tokens=tokens, workers=workers, server_cores=server_cores, load_cores=load_cores,
                   repeats=repeats) for subscribers in levels]
    table = markdown_table(
        ["Subscribers", "Received every token", "Events delivered", "Server CPU per event", "Lag p50",
         "Lag p99", "Lag max", "Server RSS per subscriber", "Attach time"],
        [(r["subscribers"], f"{r['subscribers'] - r['failed_subscribers']}/{r['subscribers']}",
          r["events_delivered"], f"{r['server_cpu_per_event_us']} us", f"{r['lag_p50_ms']} ms",
          f"{r['lag_p99_ms']} ms", f"{r['lag_max_ms']} ms", f"{r['rss_per_subscriber_bytes'] / 1024:.1f} KiB",
          f"{r['attach_s'] * 1000:.0f} ms") for r in rows],
    )
    return {"rows": rows, "table": table, "ok": all(r["failed_subscribers_all_runs"] == 0 for r in rows)}
