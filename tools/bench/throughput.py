"""Section 4: throughput of distinct non-stream requests against an upstream that answers at
once, and the server's CPU per request.

Targets, the gateway on one core: ``/v1`` (stateless) at least 0.6 times the
direct call's rate; ``/api``, where every request persists its turn, at least
1,500 requests per second.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from tools._common import cores_busy_seconds, percentile
from tools.bench.harness import Bench, Target, broken, fmt_ms, fmt_ratio, median, ratio
from tools.bench.targets import Check, as_rate, as_times

V1_TARGET_RATIO = 0.6
API_TARGET_RPS = 1500.0


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


async def distinct_requests(bench: Bench, target: Target, r: int, *, requests: int,
                            concurrency: int) -> dict[str, Any]:
    """``requests`` distinct requests (round ``r``), ``concurrency`` at a time, to one column."""
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
    cores = target.proc.cores if target.proc and target.proc.pinned else None
    cores_before = cores_busy_seconds(cores) if cores else None
    load_before, load_cores = _load_cpu(bench), os.sched_getaffinity(0)
    load_cores_before = cores_busy_seconds(load_cores)
    bench.section = "load"
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    bench.section = "idle"
    cpu = target.proc.cpu_seconds() - cpu_before if target.proc and cpu_before is not None else None
    return {"elapsed_s": elapsed, "rps": (requests - failed) / elapsed, "failed": failed,
            "latency_p50_s": median(latencies), "latency_p95_s": percentile(latencies, 95),
            "server_cpu_per_request_s": None if cpu is None else cpu / requests,
            "server_busy": None if cpu is None else cpu / elapsed,
            "server_cores_busy": None if cores is None or cores_before is None else
            (cores_busy_seconds(cores) - cores_before) / elapsed / len(cores),
            "load_busy": (_load_cpu(bench) - load_before) / elapsed,
            "load_cores_busy": (cores_busy_seconds(load_cores) - load_cores_before) / elapsed / len(load_cores)}


def _load_cpu(bench: Bench) -> float:
    """CPU seconds used so far by the load side: this client and the fake upstream."""
    usage = os.times()
    return usage.user + usage.system + bench.fake.cpu_seconds()


async def section_throughput(bench: Bench, *, requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=0, itl_ms=0, tokens=20)
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in bench.targets}
    for r, target in bench.alternating(rounds):
        runs[target.name].append(await distinct_requests(bench, target, r, requests=requests, concurrency=concurrency))

    def best(name: str, key: str) -> float | None:
        values = [run[key] for run in runs[name] if run[key] is not None]
        return median(values) if values else None

    base = best("direct", "rps")
    cols = {t.name: {"runs": runs[t.name], "rps": best(t.name, "rps"), "ratio_rps": ratio(best(t.name, "rps"), base),
                     "latency_p95_s": best(t.name, "latency_p95_s"),
                     "server_cpu_per_request_s": best(t.name, "server_cpu_per_request_s"),
                     "load_busy": best(t.name, "load_busy"), "server_busy": best(t.name, "server_busy"),
                     "server_cores_busy": best(t.name, "server_cores_busy"),
                     "load_cores_busy": best(t.name, "load_cores_busy"),
                     "failed": sum(run["failed"] for run in runs[t.name])}
            for t in bench.targets}
    return {"title": f"4. Throughput: {requests} distinct non-stream requests, {concurrency} at a time, "
                     f"{rounds} alternating round(s) (upstream answers at once, 20 tokens)",
            "note": "`gateway /v1` is the stateless surface (nothing stored). `gateway /api` is the thread API: "
                    "every request stores a user and an assistant message in SQLite (one fresh thread per "
                    "request, made before the clock starts) and streams from the upstream. Server CPU is the "
                    "gateway process's user+system time over the requests. Server core busy: the gateway's CPU over "
                    "the run's time, and every process's (from /proc/stat): where the second is near 100% and the "
                    "first well below it, other processes on the machine took the core and the rate is theirs as "
                    "much as the gateway's. Load core busy: the client's and the fake upstream's CPU, and every "
                    "process's, the same way; near 100% the load side, not the column, sets the rate.",
            "columns": cols, "rows": _rows(bench.targets, cols), "checks": _checks(cols),
            "broken": broken(cols, "failed")}


def _checks(cols: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        Check(section=4, key="rps_v1_ratio_to_direct", figure="distinct non-stream requests/s, /v1 (stateless), "
              "ratio to direct", value=cols.get("v1", {}).get("ratio_rps"), op=">=", limit=V1_TARGET_RATIO,
              fmt=as_times).as_dict(),
        Check(section=4, key="rps_api", figure="distinct non-stream requests/s, /api (turns persisted)",
              value=cols.get("api", {}).get("rps"), op=">=", limit=API_TARGET_RPS, fmt=as_rate).as_dict(),
    ]


def _rows(targets: list[Target], cols: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    def busy(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    def cpu(t: Target) -> str:
        seconds = cols[t.name]["server_cpu_per_request_s"]
        return "-" if seconds is None else f"{seconds * 1e6:.0f} µs"

    def capacity(t: Target) -> str:
        seconds = cols[t.name]["server_cpu_per_request_s"]
        return "-" if not seconds else f"{1 / seconds:.0f}"

    return [
        ("requests per second", *[f"{cols[t.name]['rps']:.0f}" if cols[t.name]["rps"] else "n/a" for t in targets]),
        ("... ratio to direct", *[fmt_ratio(cols[t.name]["ratio_rps"]) for t in targets]),
        ("latency p95", *[fmt_ms(cols[t.name]["latency_p95_s"]) for t in targets]),
        ("server CPU per request", *[cpu(t) for t in targets]),
        ("... requests per second of a whole core at that cost", *[capacity(t) for t in targets]),
        ("server core busy: the gateway", *[busy(cols[t.name]["server_busy"]) for t in targets]),
        ("... every process on that core", *[busy(cols[t.name]["server_cores_busy"]) for t in targets]),
        ("load core busy: client + fake", *[busy(cols[t.name]["load_busy"]) for t in targets]),
        ("... every process on that core", *[busy(cols[t.name]["load_cores_busy"]) for t in targets]),
        ("failed requests", *[str(cols[t.name]["failed"]) for t in targets]),
    ]
