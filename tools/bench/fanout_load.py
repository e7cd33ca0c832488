"""The load side of the fan-out benchmark: one process holding thousands of SSE subscribers.

Each subscriber is a raw :class:`asyncio.Protocol` on its own connection to
the gateway, in one uvloop loop per process. On arrival it only keeps the
bytes and the time they came (``time.monotonic()``, the clock every process
here shares), so that ten thousand subscribers at 20 tokens a second fit on
one core. Once the flight has ended, the process decodes every subscriber's
HTTP chunks and SSE events and checks them: every token once, in order, with
its text, then ``done`` with the whole answer.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import os
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, cast

import uvloop

from tools._common import pin, raise_open_files
from tools.sse import EventDecoder, SseEvent

#: the end of a chunked HTTP body (an SSE chunk of the gateway's ends ``\n\n\r\n``, never like this)
END = b"0\r\n\r\n"
#: failures listed per load process (the rest are only counted)
MAX_LISTED_FAILURES = 10


@dataclass(slots=True, kw_only=True)
class FanoutJob:
    host: str
    port: int
    #: the stream_url, a path with its query
    path: str
    tokens: list[str]
    #: connections a process opens at once (the server's listen backlog is 128 for all of them)
    connect_concurrency: int
    #: how long the process waits for its subscribers before it gives up on the rest
    timeout_s: float


@dataclass(slots=True)
class TokenCheck:
    """One subscriber's check of the flight: every token once, in order, with its text, then the answer."""

    tokens: list[str]
    #: per token, the time it arrived (0.0: not yet)
    arrivals: list[float]
    problems: list[str] = field(default_factory=list)
    next_seq: int = 1
    done: bool = False

    def take(self, ev: SseEvent) -> None:
        if ev.event == "delta":
            seq = ev.id
            if seq != self.next_seq or seq > len(self.tokens):
                self.problems.append(f"delta {seq} where {self.next_seq} was due")
            elif ev.json()["text"] != self.tokens[seq - 1]:
                self.problems.append(f"wrong text in delta {seq}")
            else:
                self.arrivals[seq - 1] = ev.at
                self.next_seq += 1
        elif ev.event == "done":
            self.done = ev.json()["message"]["content"] == "".join(self.tokens)
            if not self.done:
                self.problems.append("done with a different text")
        elif ev.event == "snapshot":
            self.problems.append("fell behind the ring (snapshot)")
        elif ev.event == "error":
            self.problems.append(f"error event {ev.data[:200]!r}")

    def finish(self) -> list[str]:
        """Every problem, the missing tokens and a missing end included."""
        missing = sum(1 for t in self.arrivals if not t)
        if missing:
            self.problems.append(f"{missing} of {len(self.tokens)} deltas missing")
        if not self.done and not self.problems:
            self.problems.append("no done event")
        return self.problems


def decode_response(chunks: list[bytes], times: list[float], check: TokenCheck) -> None:
    """Feed ``check`` the SSE events of a chunked HTTP response received as ``chunks`` at ``times``;
    each event is stamped with the time of the read that completed it."""
    raw = b"".join(chunks)
    ends = list(itertools.accumulate(len(c) for c in chunks))
    head_end = raw.find(b"\r\n\r\n")
    if not raw.startswith(b"HTTP/1.1 200") or head_end < 0:
        status_line = raw.split(b"\r\n", 1)[0][:80]
        check.problems.append(f"status line {status_line!r}")
        return
    decoder, pos = EventDecoder(), head_end + 4
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            check.problems.append("the response was cut")
            return
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            return
        start, stop = eol + 2, eol + 2 + size
        if stop > len(raw):
            check.problems.append("the response was cut inside a chunk")
            return
        for ev in decoder.feed(raw[start:stop], times[bisect.bisect_left(ends, stop)]):
            check.take(ev)
        pos = stop + 2


class Subscriber(asyncio.Protocol):
    """One SSE subscriber: sends its GET, then only keeps what arrives and when."""

    __slots__ = ("attached", "chunks", "crowd", "ended", "error", "times", "transport")

    def __init__(self, crowd: Crowd) -> None:
        self.crowd = crowd
        self.chunks: list[bytes] = []
        self.times: list[float] = []
        self.attached = False
        self.ended = False
        self.error: str | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of it
        self.transport.write(self.crowd.request)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.times.append(time.monotonic())
        if not self.attached:
            head = b"".join(self.chunks)
            if b"\r\n\r\n" in head and not head.startswith(b"HTTP/1.1 200"):
                self.end("not 200")
                return
            if b"event: meta" not in head:
                return
            self.attached = True
            self.crowd.settled(self)
        if data.endswith(END) or (len(data) < len(END) and b"".join(self.chunks[-2:]).endswith(END)):
            self.end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.end(f"connection lost ({exc})")

    def end(self, error: str | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        if self.transport is not None:
            self.transport.close()
        self.crowd.ended(self)


class Crowd:
    """One load process's ``count`` subscribers: connect them, report when all are attached and
    when all have ended, then check what each received and report that."""

    def __init__(self, index: int, count: int, job: FanoutJob, outbox: Any) -> None:
        self.index, self.count, self.job, self.outbox = index, count, job, outbox
        self.request = (f"GET {job.path} HTTP/1.1\r\nHost: {job.host}:{job.port}\r\n"
                        f"Accept: text/event-stream\r\n\r\n").encode()
        self.subscribers: list[Subscriber] = []
        self._waiting: dict[Subscriber, asyncio.Future[None]] = {}
        self._settled = 0
        self._ended = 0
        self.all_ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.marks: dict[str, tuple[float, float]] = {}

    def _mark(self, name: str) -> None:
        usage = os.times()
        self.marks[name] = (time.monotonic(), usage.user + usage.system)

    def settled(self, sub: Subscriber) -> None:
        """``sub`` is attached (or gave up before it was): let the next one connect."""
        waiting = self._waiting.pop(sub, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        self._settled += 1
        if self._settled == self.count:
            self._mark("attached")
            self.outbox.put(("attached", self.index, self.marks["attached"][0]))

    def ended(self, sub: Subscriber) -> None:
        if not sub.attached:
            self.settled(sub)
        self._ended += 1
        if self._ended == self.count and not self.all_ended.done():
            self._mark("ended")
            self.all_ended.set_result(None)

    async def _connect(self, gate: asyncio.Semaphore) -> None:
        """Connect one subscriber once the gate lets it, and hold the gate until it is attached."""
        loop = asyncio.get_running_loop()
        sub = Subscriber(self)
        self.subscribers.append(sub)
        async with gate:
            settled = self._waiting[sub] = loop.create_future()
            try:
                await loop.create_connection(lambda: sub, self.job.host, self.job.port)
            except OSError as exc:
                sub.end(f"connect: {exc}")
            await settled

    async def run(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(self.job.connect_concurrency)
        try:
            async with asyncio.timeout(self.job.timeout_s):
                await asyncio.gather(*(self._connect(gate) for _ in range(self.count)))
                await self.all_ended
        except TimeoutError:
            self._mark("ended")
            for sub in self.subscribers:
                sub.end("timed out")
        self.outbox.put(("ended", self.index, self.marks["ended"][0]))  # before the checks, which take a while
        return self.results()

    def results(self) -> dict[str, Any]:
        """Every subscriber checked; the arrival times of every token, subscriber by subscriber."""
        tokens = self.job.tokens
        n = len(tokens)
        arrivals = array("d", bytes(8 * n * self.count))
        failed, failures = 0, []
        for i, sub in enumerate(self.subscribers):
            check = TokenCheck(tokens, [0.0] * n)
            decode_response(sub.chunks, sub.times, check)
            sub.chunks, sub.times = [], []
            problems = check.finish() + ([sub.error] if sub.error else [])
            if problems:
                failed += 1
                if len(failures) < MAX_LISTED_FAILURES:
                    failures.append(f"subscriber {self.index}.{i}: " + "; ".join(problems))
            arrivals[i * n:(i + 1) * n] = array("d", check.arrivals)
        (_, attached_cpu), (ended_t, ended_cpu) = (self.marks.get(k, (0.0, 0.0)) for k in ("attached", "ended"))
        usage = os.times()
        return {"arrivals": arrivals, "count": self.count, "failed": failed, "failures": failures,
                "ended_at": ended_t, "delivery_cpu_s": ended_cpu - attached_cpu,
                "cpu_s": usage.user + usage.system}


async def subscribe_all(index: int, count: int, inbox: Any, outbox: Any) -> None:
    """One load process: wait for the job, hold ``count`` subscribers, send back what they got."""
    loop = asyncio.get_running_loop()
    outbox.put(("ready", index, None))
    job: FanoutJob = await loop.run_in_executor(None, inbox.get)
    result = await Crowd(index, count, job, outbox).run()
    outbox.put(("result", index, result))


def fanout_worker(index: int, count: int, cores: set[int] | None, inbox: Any, outbox: Any) -> None:
    """The body of a load process (spawned): pinned to the load cores, its fd limit raised."""
    pin(0, cores)
    raise_open_files(count + 256)
    uvloop.run(subscribe_all(index, count, inbox, outbox))
