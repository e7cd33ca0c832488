"""Section 4: throughput of distinct non-stream requests against an upstream that answers at
once, and the server's CPU per request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tools._common import percentile
from tools.bench.harness import Bench, Target, fmt_ms, fmt_ratio, median, ratio


async def _threads(bench: Bench, target: Target, requests: int, concurrency: int) -> list[str | None]:
    """One fresh thread per request for a "dac" column, made before the clock starts: no history grows."""
    threads: list[str | None] = [None] * requests
    if target.kind == "dac":
        sem = asyncio.Semaphore(concurrency)

        async def make(i: int) -> None:
            async with sem:
                threads[i] = await bench.new_thread(target)

        await asyncio.gather(*(make(i) for i in range(requests)))
    return threads


async def _one_run(bench: Bench, target: Target, r: int, *, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` distinct requests, ``concurrency`` at a time, to one column."""
    threads = await _threads(bench, target, requests, concurrency)
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
    return {"elapsed_s": elapsed, "rps": (requests - failed) / elapsed, "failed": failed,
            "latency_p50_s": median(latencies), "latency_p95_s": percentile(latencies, 95),
            "server_cpu_per_request_s": None if cpu is None else cpu / requests}


async def section_throughput(bench: Bench, *, requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=0, itl_ms=0, tokens=20)
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in bench.targets}
    for r, target in bench.alternating(rounds):
        runs[target.name].append(await _one_run(bench, target, r, requests=requests, concurrency=concurrency))

    def best(name: str, key: str) -> float | None:
        values = [run[key] for run in runs[name] if run[key] is not None]
        return median(values) if values else None

    base = best("direct", "rps")
    cols = {t.name: {"runs": runs[t.name], "rps": best(t.name, "rps"), "ratio_rps": ratio(best(t.name, "rps"), base),
                     "latency_p95_s": best(t.name, "latency_p95_s"),
                     "server_cpu_per_request_s": best(t.name, "server_cpu_per_request_s"),
                     "failed": sum(run["failed"] for run in runs[t.name])}
            for t in bench.targets}
    rows = [
        ("requests per second", *[f"{cols[t.name]['rps']:.0f}" if cols[t.name]["rps"] else "n/a"
                                  for t in bench.targets]),
        ("... ratio to direct", *[fmt_ratio(cols[t.name]["ratio_rps"]) for t in bench.targets]),
        ("latency p95", *[fmt_ms(cols[t.name]["latency_p95_s"]) for t in bench.targets]),
        ("server CPU per request", *[
            "-" if t.proc is None else fmt_ms(cols[t.name]["server_cpu_per_request_s"]) for t in bench.targets]),
        ("failed requests", *[str(cols[t.name]["failed"]) for t in bench.targets]),
    ]
    return {"title": f"4. Throughput: {requests} distinct non-stream requests, {concurrency} at a time, "
                     f"{rounds} alternating round(s) (upstream answers at once, 20 tokens)",
            "note": "The gateway column is the thread API: every request stores a user and an assistant message "
                    "in SQLite (one fresh thread per request, made before the clock starts) and streams from "
                    "the upstream. Server CPU is the server process's user+system time over the requests.",
            "columns": cols, "rows": rows}
