#!/usr/bin/env python3
"""Where the gateway's CPU goes under the throughput load of the performance report (section 4).

    .venv/bin/python tools/profile_throughput.py [--surface v1|api] [--requests 4000] [--top 15]
                                                 [--out FILE.prof]

Starts the fake upstream (answering at once, 20 tokens) and the gateway under
cProfile, with the profiler's clock the process's CPU time (other processes on
the machine do not move it), warms both up, then profiles only while
``--requests`` distinct non-stream requests run, 32 at a time, through
``/v1/chat/completions`` or a fresh thread each on ``/api``. Prints the top
frames by their own CPU time and by their cumulative time, and the CPU per
request; ``--out`` keeps the profile for ``python -m pstats``. The profiler
slows every Python call, so the figures are for comparing frames, not rates:
section 4 of ``python -m tools.bench`` gives those.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import uvloop

from tools._common import ServerProcess, cpu_split, progress

FAKE_KEY = "sk-fake"
CONCURRENCY = 32
WARM_UP = 300

#: runs the gateway's ``main`` under cProfile: SIGUSR1 starts the profile, SIGUSR2 ends it and
#: writes it to the file named by argv[1]
RUNNER = """
import cProfile, signal, sys, time
out = sys.argv.pop(1)
profile = cProfile.Profile(time.process_time)
def start(*_):
    profile.enable()
def stop(*_):
    profile.disable()
    profile.dump_stats(out + ".part")
    import os
    os.replace(out + ".part", out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
from server.__main__ import main
sys.exit(main())
"""


async def _load(url: str, surface: str, requests: int, tag: str) -> int:
    """``requests`` distinct non-stream requests, ``CONCURRENCY`` at a time; the failures."""
    headers = {"x-org-id": "org_profile"}
    failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        threads: list[str | None] = [None] * requests
        if surface == "api":
            for i in range(requests):
                async with session.post(f"{url}/api/threads/", json={"title": "profile"}, headers=headers) as resp:
                    threads[i] = (await resp.json())["thread_id"]
        queue = list(range(requests))

        async def worker() -> None:
            nonlocal failed
            while queue:
                i = queue.pop()
                content = f"profile {tag} request {i}"
                if surface == "v1":
                    target = f"{url}/v1/chat/completions"
                    body = {"model": "openai/fake-model", "messages": [{"role": "user", "content": content}]}
                else:
                    target = f"{url}/api/threads/{threads[i]}/messages"
                    body = {"content": content, "provider": "openai", "model": "fake-model"}
                async with session.post(target, json=body, headers=headers) as resp:
                    await resp.read()
                    failed += resp.status != 200

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), 600)
    return failed


def _signal_and_wait(pid: int, signum: int, out: Path | None = None) -> None:
    os.kill(pid, signum)
    if out is not None:
        deadline = time.monotonic() + 60
        while not out.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not write its profile within 60 s")
            time.sleep(0.05)
    else:
        time.sleep(0.2)  # the handler runs at the gateway's next bytecode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/profile_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--surface", choices=("v1", "api"), default="v1")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", help="keep the profile in this file")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.top < 1:
        parser.error("--requests and --top must be positive")
    server_cores, load_cores = cpu_split()
    with tempfile.TemporaryDirectory(prefix="dac-profile-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "gateway.prof"
        out.unlink(missing_ok=True)
        with ServerProcess(command=[sys.executable, "-m", "tools.fake_openai", "--port", "{port}",
                                    "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "20"],
                           ready_path="/v1/models", cores=load_cores) as fake, \
             ServerProcess(command=[sys.executable, "-c", RUNNER, str(out), "--host", "127.0.0.1",
                                    "--port", "{port}", "--db", str(Path(tmp) / "dac.db")],
                           env={"OPENAI_BASE_URL": f"{fake.url}/v1", "OPENAI_API_KEY": FAKE_KEY, "DAC_AUTH": "header"},
                           cores=server_cores) as gateway:
            progress(f"warming up: {WARM_UP} requests through {args.surface}")
            uvloop.run(_load(gateway.url, args.surface, WARM_UP, "warm-up"))
            _signal_and_wait(gateway.pid, signal.SIGUSR1)
            progress(f"profiling {args.requests} distinct non-stream requests through {args.surface}")
            cpu_before = gateway.cpu_seconds()
            failed = uvloop.run(_load(gateway.url, args.surface, args.requests, "profiled"))
            cpu = gateway.cpu_seconds() - cpu_before
            _signal_and_wait(gateway.pid, signal.SIGUSR2, out)
        stats = pstats.Stats(str(out), stream=(text := io.StringIO()))
        stats.strip_dirs()
        print(f"# Gateway profile: {args.requests} distinct non-stream requests through {args.surface}, "
              f"{CONCURRENCY} at a time ({failed} failed)\n")
        print(f"Server CPU per request under the profiler: {cpu / args.requests * 1e6:.0f} µs "
              "(the profiler's own cost included).\n")
        for key, title in (("tottime", "own CPU time"), ("cumulative", "cumulative CPU time")):
            text.seek(0)
            text.truncate()
            stats.sort_stats(key).print_stats(args.top)
            body = text.getvalue()
            start = body.find("   ncalls")
            print(f"## Top {args.top} frames by {title}\n\n```\n{body[start:].rstrip()}\n```\n")
        if args.out:
            progress(f"profile kept in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
