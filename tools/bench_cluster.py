#!/usr/bin/env python3
"""Several instances, measured: the in-process hub against the Redis hub, and workers on one port.

    .venv/bin/python tools/bench_cluster.py [--quick] [--json FILE] [--redis URL] [--database URL]

One fake upstream (``tools/fake_openai.py``) in its own process serves every run.
Figures, each beside its target with PASS or FAIL:

1. TTFT added over a direct call to the fake: one stream at a time, in-process
   hub vs Redis hub, both on PostgreSQL (p50, p95); and 50 identical streams spread over 2 Redis
   instances: upstream calls and their TTFT p95 as a ratio to direct, the median over
   rounds after one request on each instance (the cold first round is shown apart).
2. Distinct non-stream requests per second: 1 worker in-process (SQLite, and
   PostgreSQL), 1 worker and 2 workers (``--workers 2``) on Redis and PostgreSQL;
   32 clients, each on threads of 4 turns (a thread that grew through the run
   would make later requests cost more). Beside each run, from /proc: the server's
   CPU per turn (all its processes), the CPU per turn of the rest of the stack
   (PostgreSQL backends of the server's connections, Redis, the fake, the load
   generator) and what processes outside the benchmark took. The 2-over-1 ratio
   is given in wall clock and from server CPU per turn (a core per worker), with
   the best ratio this machine's cores allow, since on 2 cores shared with
   PostgreSQL, Redis and the load generator the wall clock measures the machine.
3. Redis round trips per delivered delta, per instance (one flight led on A and
   mirrored on B, 100 deltas 10 ms apart; from Redis's command counts: EVALSHA for
   the leader, XREAD for the mirror).
4. Cancel latency across instances: the last client (on the other instance
   than the leader) closes -> the fake sees the upstream connection close.

The machine has few, shared cores: each figure is the median over its runs,
and the throughput runs share the cores with the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis.asyncio as aioredis

from tools.cluster import DEFAULT_REDIS, ROOT, Cluster, free_port, wait_port
from tools.sse import sse_events

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
H = {"x-org-id": "org_bench"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Fake:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.fake_openai", "--port", str(self.port), cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await wait_port(self.port, 20)

    async def config(self, http: aiohttp.ClientSession, **values: float) -> None:
        async with http.post(f"{self.url}/config", json=values) as resp:
            resp.raise_for_status()

    async def stats(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.url}/stats") as resp:
            return dict(await resp.json())

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            await self.proc.wait()


async def direct_ttft(http: aiohttp.ClientSession, fake: Fake, prompt: str) -> float:
    started = time.perf_counter()
    async with http.post(f"{fake.url}/v1/chat/completions", headers={"Authorization": "Bearer x"},
                         json={"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}) as r:
        async for line in r.content:
            if b'"content":"' in line and b'"content":""' not in line:
                ttft = time.perf_counter() - started
                await r.read()
                return ttft
    raise RuntimeError("no content from the fake")


async def gateway_ttft(http: aiohttp.ClientSession, url: str, thread: str, prompt: str) -> float:
    started = time.perf_counter()
    async with http.post(f"{url}/api/threads/{thread}/messages", headers={**H, "Accept": "text/event-stream"},
                         json={"content": prompt}) as resp:
        ttft = None
        async for event in sse_events(resp):
            if event.event == "delta" and ttft is None:
                ttft = time.perf_counter() - started
        if ttft is None:
            raise RuntimeError(f"no delta from {url}")
        return ttft


async def new_thread(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/api/threads/", json={}, headers=H) as resp:
        return str((await resp.json())["thread_id"])


def env_for(fake: Fake, *, redis: str | None, database: str | None, workdir: Path) -> dict[str, str]:
    env = {"OPENAI_BASE_URL": f"{fake.url}/v1", "OPENAI_API_KEY": "x", "DAC_DEFAULT_PROVIDER": "openai",
           "DAC_DEFAULT_MODEL": "fake-model", "DAC_AUTH": "header", "DAC_DB": str(workdir / f"{secrets.token_hex(3)}.db"),
           "DAC_REDIS_URL": redis or "", "DAC_DATABASE_URL": database or ""}
    if redis:
        env["DAC_REDIS_PREFIX"] = f"bench_{secrets.token_hex(3)}:"
    return env


async def ttft_added(args: argparse.Namespace, fake: Fake, http: aiohttp.ClientSession, workdir: Path,
                     report: dict[str, Any]) -> None:
    runs = 10 if args.quick else 40
    await fake.config(http, ttft_ms=50, itl_ms=5, tokens=8)
    added: dict[str, list[float]] = {"inprocess": [], "redis": []}
    clusters: dict[str, Cluster] = {}
    for name, redis in (("inprocess", None), ("redis", args.redis)):  # both on PostgreSQL: only the hub differs
        c = Cluster(instances=0, env=env_for(fake, redis=redis, database=args.database, workdir=workdir),
                    workdir=workdir)
        c.instances = [await c.start_instance()]
        clusters[name] = c
    try:
        threads = {n: await new_thread(http, c.instances[0].url) for n, c in clusters.items()}
        for i in range(runs):  # alternate, so both see the same noise
            d = await direct_ttft(http, fake, f"direct {i} {secrets.token_hex(3)}")
            for name, c in clusters.items():
                g = await gateway_ttft(http, c.instances[0].url, threads[name], f"{name} {i} {secrets.token_hex(3)}")
                added[name].append(g - d)
    finally:
        for c in clusters.values():
            await c.stop()
    for name, values in added.items():
        report[f"ttft_added_{name}_p50_ms"] = statistics.median(values) * 1000
        report[f"ttft_added_{name}_p95_ms"] = pct(values, 0.95) * 1000
    report["ttft_added_by_redis_p50_ms"] = report["ttft_added_redis_p50_ms"] - report["ttft_added_inprocess_p50_ms"]


async def fanout(args: argparse.Namespace, fake: Fake, http: aiohttp.ClientSession, workdir: Path,
                 report: dict[str, Any]) -> None:
    """50 identical streams spread over 2 instances, in rounds (a new prompt each), after one
    streamed request on each instance: the direct calls are measured warm, so are the instances.
    The first request of a fresh process pays its own start-up (connections to PostgreSQL and
    Redis, code paths run once); that is shown apart as ``fanout_cold_*``, not in the target."""
    await fake.config(http, ttft_ms=300, itl_ms=30, tokens=20)
    c = Cluster(instances=0, env=env_for(fake, redis=args.redis, database=args.database, workdir=workdir),
                workdir=workdir)
    c.instances = list(await asyncio.gather(c.start_instance(), c.start_instance()))
    rounds = 3 if args.quick else 5
    try:
        directs = [await direct_ttft(http, fake, f"fan direct {i}") for i in range(5 if args.quick else 10)]
        thread = await new_thread(http, c.instances[0].url)

        async def burst(warm: bool) -> tuple[int, float]:
            before = (await fake.stats(http))["calls"]
            prompt = f"fan {secrets.token_hex(4)}"
            ttfts = await asyncio.gather(*(gateway_ttft(http, c.instances[i % 2].url, thread, prompt)
                                           for i in range(50)))
            return (await fake.stats(http))["calls"] - before, pct(list(ttfts), 0.95) / pct(directs, 0.95)

        report["fanout_cold_upstream_calls"], report["fanout_cold_ttft_p95_ratio"] = await burst(False)
        for instance in c.instances:  # a streamed request of its own on each instance
            await gateway_ttft(http, instance.url, thread, f"fan warm-up {secrets.token_hex(4)}")
        results = [await burst(True) for _ in range(rounds)]
        report["fanout_upstream_calls"] = max(calls for calls, _ in results)
        report["fanout_ttft_p95_ratio"] = statistics.median(r for _, r in results)
        report["fanout_rounds"] = rounds
    finally:
        await c.stop()


#: turns per thread in the throughput runs: each client starts a new thread after this many
TURNS_PER_THREAD = 4


async def _client(s: aiohttp.ClientSession, url: str, k: int, stop_at: float) -> int:
    """Distinct non-stream requests one after the other until ``stop_at``, on threads of at most
    ``TURNS_PER_THREAD`` turns; how many answered 200.

    Every turn sends its thread's history upstream (read from the store), so on threads that
    grow through the run a request costs more the more requests came before it: a faster
    configuration would slow itself down, and a longer run would read lower. Short threads
    keep every request the same work."""
    done = n = 0
    thread = ""
    while time.perf_counter() < stop_at:
        if n % TURNS_PER_THREAD == 0:
            thread = await new_thread(s, url)
        n += 1
        async with s.post(f"{url}/api/threads/{thread}/messages", headers=H,
                          json={"content": f"{k} {n} {secrets.token_hex(3)}"}) as resp:
            await resp.read()
            done += resp.status == 200
    return done


def _tree_cpu_s(pid: int, *, children: bool = True) -> float:
    """utime + stime of ``pid`` and (``children``) its children (the workers of ``--workers N``), in seconds."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if children:
                pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def _client_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of the TCP connections that ``pid`` and its children hold to ``remote_port``."""
    inodes: set[str] = set()
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
            pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == remote_port and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _stack_cpu_s(fake: Fake, server_pid: int) -> float:
    """CPU seconds so far of the rest of the stack the server's turns need: the fake upstream,
    Redis, PostgreSQL's own processes (WAL writer and the like) and the PostgreSQL backends of
    the server's connections (found by their client port), not those of other clients."""
    total = _tree_cpu_s(fake.proc.pid) if fake.proc is not None else 0.0
    ports = _client_ports(server_pid, 5432)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ours = False
        if command.startswith(b"postgres: "):
            client = command.split(b"(", 1)[1].split(b")", 1)[0] if b"(" in command else b""
            ours = not client or (client.isdigit() and int(client) in ports)
        if ours or command.startswith((b"redis-server", b"/usr/bin/redis", b"/usr/lib/postgresql")):
            total += _tree_cpu_s(int(entry.name), children=False)  # the postmaster's are not all ours
    return total


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


async def throughput(args: argparse.Namespace, fake: Fake, http: aiohttp.ClientSession, workdir: Path,
                     report: dict[str, Any]) -> None:
    """Distinct non-stream turns per second, 32 clients, each on threads of at most
    ``TURNS_PER_THREAD`` turns. The 1- and 2-worker runs on Redis + PostgreSQL alternate
    (``rounds`` each) and the figure is their median, so that both see the same neighbours.
    Beside each: the server's CPU per turn (all its processes) and the share of a core the
    load generator used, to tell a server bound by its cores from one that waits."""
    await fake.config(http, ttft_ms=0, itl_ms=0, tokens=8)
    seconds = 3.0 if args.quick else 8.0
    rounds = 1 if args.quick else 3
    plan = [("1_worker_inprocess", None, None, 1), ("1_worker_inprocess_pg", None, args.database, 1)]
    plan += [("1_worker_redis_pg", args.redis, args.database, 1), ("2_workers_redis_pg", args.redis, args.database, 2)] \
        * rounds
    runs: dict[str, list[tuple[float, float, float]]] = {}
    for name, redis, database, workers in plan:
        env = env_for(fake, redis=redis, database=database, workdir=workdir)
        c = Cluster(instances=0, env=env, workdir=workdir, args=("--workers", str(workers)) if workers > 1 else ())
        c.instances = [await c.start_instance()]
        try:
            await asyncio.sleep(1.0 if workers > 1 else 0.2)  # every worker listening
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
                url = c.instances[0].url
                pid = c.instances[0].proc.pid
                cpu, own, machine, stack = _tree_cpu_s(pid), os.times(), _machine_busy(), _stack_cpu_s(fake, pid)
                started = time.perf_counter()
                done = sum(await asyncio.gather(*(_client(s, url, k, started + seconds) for k in range(32))))
                elapsed = time.perf_counter() - started
                cpu, mine = _tree_cpu_s(pid) - cpu, os.times()
                load = (mine.user + mine.system - own.user - own.system) / elapsed
                busy = [a - b for a, b in zip(_machine_busy(), machine, strict=True)]
                stack = _stack_cpu_s(fake, pid) - stack
                others = busy[0] / busy[1] * (os.cpu_count() or 1) - (cpu + stack) / elapsed - load
                runs.setdefault(name, []).append((done / elapsed, cpu / max(done, 1) * 1000, load, cpu / elapsed,
                                                  others, (stack + load * elapsed) / max(done, 1) * 1000))
        finally:
            await c.stop()
    for name, values in runs.items():
        report[f"rps_{name}"] = statistics.median(v[0] for v in values)
        report[f"server_cpu_ms_per_turn_{name}"] = statistics.median(v[1] for v in values)
        report[f"load_generator_cores_{name}"] = statistics.median(v[2] for v in values)
        report[f"server_cores_{name}"] = statistics.median(v[3] for v in values)
        report[f"outside_processes_cores_{name}"] = statistics.median(v[4] for v in values)
        report[f"stack_cpu_ms_per_turn_{name}"] = statistics.median(v[5] for v in values)
    report["rps_2_over_1_workers"] = report["rps_2_workers_redis_pg"] / report["rps_1_worker_redis_pg"]
    report["throughput_rounds"] = rounds
    # From CPU time: what the server's processes need per turn, 1 worker and 2, and what the rest
    # of the stack (PostgreSQL, Redis, the fake upstream, the load generator) needs beside it.
    one, two = report["server_cpu_ms_per_turn_1_worker_redis_pg"], report["server_cpu_ms_per_turn_2_workers_redis_pg"]
    rest = report["stack_cpu_ms_per_turn_1_worker_redis_pg"]
    cores = os.cpu_count() or 1
    # 2 workers with a core each, the stack on other cores: the server's own scaling
    report["rps_2_over_1_workers_cpu_time"] = 2 * one / two
    # the best 2 workers can do over 1 on this machine's cores, shared with the stack
    best_one = min(1000 / one, cores * 1000 / (one + rest))
    best_two = min(min(2, cores) * 1000 / two, cores * 1000 / (two + rest))
    report["rps_2_over_1_workers_bound_here"] = best_two / best_one
    report["cores"] = cores


async def redis_costs(args: argparse.Namespace, fake: Fake, http: aiohttp.ClientSession, workdir: Path,
                      report: dict[str, Any]) -> None:
    tokens = 100
    await fake.config(http, ttft_ms=100, itl_ms=10, tokens=tokens)
    c = Cluster(instances=0, env=env_for(fake, redis=args.redis, database=args.database, workdir=workdir),
                workdir=workdir)
    c.instances = list(await asyncio.gather(c.start_instance(), c.start_instance()))
    r = aioredis.Redis.from_url(args.redis)
    try:
        a, b = c.instances
        thread = await new_thread(http, a.url)
        prompt = f"cost {secrets.token_hex(4)}"
        before = await r.info("commandstats")
        on_a = asyncio.ensure_future(gateway_ttft(http, a.url, thread, prompt))
        await asyncio.sleep(0.05)
        on_b = asyncio.ensure_future(gateway_ttft(http, b.url, thread, prompt))
        await asyncio.gather(on_a, on_b)
        after = await r.info("commandstats")

        def calls(stats: dict[str, Any], name: str) -> int:
            return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

        # Redis 7 counts the commands a script runs too: a leader's round trip is one EVALSHA (an
        # append, or a renewal); a mirror's is one XREAD (its GET of the lead comes only when quiet)
        leader = calls(after, "evalsha") - calls(before, "evalsha")
        mirror = sum(calls(after, n) - calls(before, n) for n in ("xread", "hset", "publish"))
        report["redis_round_trips_per_delta_leader"] = leader / tokens
        report["redis_round_trips_per_delta_mirror"] = mirror / tokens
    finally:
        await r.aclose()
        await c.stop()


async def cancel_latency(args: argparse.Namespace, fake: Fake, http: aiohttp.ClientSession, workdir: Path,
                         report: dict[str, Any]) -> None:
    await fake.config(http, ttft_ms=50, itl_ms=20, tokens=2000)
    c = Cluster(instances=0, env=env_for(fake, redis=args.redis, database=args.database, workdir=workdir),
                workdir=workdir)
    c.instances = list(await asyncio.gather(c.start_instance(), c.start_instance()))
    latencies = []
    try:
        a, b = c.instances
        for i in range(3 if args.quick else 8):
            thread = await new_thread(http, a.url)
            body = {"content": f"cancel {i} {secrets.token_hex(3)}"}
            sse = {**H, "Accept": "text/event-stream"}
            on_a = await http.post(f"{a.url}/api/threads/{thread}/messages", json=body, headers=sse)
            await on_a.content.readuntil(b"event: delta")
            on_b = await http.post(f"{b.url}/api/threads/{thread}/messages", json=body, headers=sse)
            await on_b.content.readuntil(b"event: delta")
            on_a.close()
            await asyncio.sleep(0.2)
            left = time.monotonic()
            on_b.close()
            ended = None
            async with asyncio.timeout(5):
                while ended is None:
                    await asyncio.sleep(0.01)
                    for call in (await fake.stats(http))["recent"]:
                        if call["prompt"] == body["content"] and call["ended"] is not None:
                            ended = call["ended"]
            latencies.append(ended - left)
    finally:
        await c.stop()
    report["cancel_across_instances_p50_ms"] = statistics.median(latencies) * 1000
    report["cancel_across_instances_max_ms"] = max(latencies) * 1000


TARGETS = [
    ("ttft_added_by_redis_p50_ms", "Redis hub adds to TTFT p50", "<= 1 ms", lambda v: v <= 1.0),
    ("fanout_upstream_calls", "50 identical streams over 2 instances: upstream calls", "== 1", lambda v: v == 1),
    ("fanout_ttft_p95_ratio", "  their TTFT p95 / direct TTFT p95", "<= 1.05", lambda v: v <= 1.05),
    ("rps_2_over_1_workers", "2 workers / 1 worker distinct req/s (Redis+PG), wall clock", ">= 1.6",
     lambda v: v >= 1.6),
    ("rps_2_over_1_workers_cpu_time", "  the same from server CPU per turn (a core per worker)", ">= 1.6",
     lambda v: v >= 1.6),
    ("cancel_across_instances_max_ms", "cancel across instances (worst)", "< 300 ms", lambda v: v < 300),
]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="dac-bench-cluster-"))
    fake = Fake()
    await fake.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                         connector=aiohttp.TCPConnector(limit=200)) as http:
            sections = [ttft_added, fanout, redis_costs, cancel_latency]
            if not args.quick or args.throughput:
                sections.append(throughput)
            if args.only:
                wanted = args.only.split(",")
                sections = [f for f in (ttft_added, fanout, redis_costs, cancel_latency, throughput)
                            if f.__name__ in wanted]
            for section in sections:
                print(f"... {section.__name__}", file=sys.stderr, flush=True)
                await section(args, fake, http, workdir, report)
    finally:
        await fake.stop()
    return report


def render(report: dict[str, Any]) -> str:
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report.items()]
    lines += ["", "| check | target | actual | result |", "|---|---|---|---|"]
    for key, label, target, ok in TARGETS:
        if key in report:
            value = report[key]
            lines.append(f"| {label} | {target} | {value:.2f} | {'PASS' if ok(value) else 'FAIL'} |")
    if "rps_2_over_1_workers_bound_here" in report:
        r = report
        lines += ["", (
            f"Workers: a turn on Redis + PostgreSQL takes {r['server_cpu_ms_per_turn_1_worker_redis_pg']:.2f} ms of "
            f"server CPU with 1 worker and {r['server_cpu_ms_per_turn_2_workers_redis_pg']:.2f} ms with 2, and "
            f"{r['stack_cpu_ms_per_turn_1_worker_redis_pg']:.2f} ms more in PostgreSQL, Redis, the fake upstream and "
            f"the load generator, all on this machine's {r['cores']} cores (processes outside the benchmark took "
            f"{r['outside_processes_cores_1_worker_redis_pg']:.2f} cores meanwhile). Even with the machine to themselves, 2 workers could "
            f"give at most {r['rps_2_over_1_workers_bound_here']:.2f}x the turns of 1 on these cores, whatever the "
            "server does: "
            "the wall-clock ratio measures the machine. The CPU-time ratio is the server's own: 2 workers with a "
            "core each, the rest of the stack on other cores.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs; no throughput unless --throughput")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--only", help="comma-separated sections: ttft_added,fanout,redis_costs,cancel_latency,"
                        "throughput")
    parser.add_argument("--redis", default=os.environ.get("DAC_REDIS_URL") or DEFAULT_REDIS)
    parser.add_argument("--database", default=os.environ.get("DAC_DATABASE_URL") or
                        f"{DEFAULT_DATABASE}?schema=dac_bench_{secrets.token_hex(3)}")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
