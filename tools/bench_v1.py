"""TTFT the gateway's /v1 surface adds over calling an OpenAI-compatible upstream directly.

The same official ``openai`` client streams the same prompts two ways, in
alternating order run by run: straight to a fake upstream, and through the
gateway. Each side runs in its own process (fake, gateway, this client), all
on 127.0.0.1. TTFT is the time from ``create()`` to the first content chunk.
The fake is the test suite's (``python -m tests.fake_upstream``).

- ``--upstream openai``: the gateway's ``openai`` provider points at the fake
  (``OPENAI_BASE_URL``), so the gateway path is client -> gateway -> fake.
- ``--upstream mock``: the gateway answers from its built-in mock with the
  fake's timing (``mock/mock:ttft=..,itl=..,n=..``): the gateway's own cost
  without its upstream hop.

With ``--concurrency C`` every run opens C identical streams at once: through
the gateway they share one upstream call, directly they make C.

    .venv/bin/python tools/bench_v1.py --runs 200 --concurrency 1
    .venv/bin/python tools/bench_v1.py --runs 100 --concurrency 20
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TTFT_MS = 50.0
DEFAULT_ITL_MS = 5.0
DEFAULT_TOKENS = 10
DEFAULT_RUNS = 100
DEFAULT_WARMUP = 5
START_TIMEOUT_S = 20.0
LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
CALLS = re.compile(r"fake upstream: (\d+) calls")


# -- processes ---------------------------------------------------------------------------


def start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start a process that announces ``listening on http://...``; returns it and the URL."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = LISTENING.search(line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd)} did not start")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, then what the process printed on its way out."""
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out or ""


def fake_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--api-key", "",
            "--ttft-ms", str(args.ttft), "--itl-ms", str(args.itl), "--tokens", str(args.tokens)]


# -- measuring ------------------------------------------------------------------------------


async def ttft(client: openai.AsyncOpenAI, model: str, prompt: str) -> float:
    started = time.perf_counter()
    stream = await client.chat.completions.create(model=model, stream=True,
                                                  messages=[{"role": "user", "content": prompt}])
    first: float | None = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream carried no text")
    return first


async def burst(client: openai.AsyncOpenAI, model: str, prompt: str, n: int) -> list[float]:
    return list(await asyncio.gather(*(ttft(client, model, prompt) for _ in range(n))))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


async def measure(args: argparse.Namespace, fake_url: str, gateway_url: str, model: str) -> dict[str, Any]:
    direct = openai.AsyncOpenAI(base_url=fake_url + "/v1", api_key="bench", max_retries=0)
    via = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="bench", max_retries=0)
    sides = {"direct": (direct, "bench-model"), "gateway": (via, model)}
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    paired: list[float] = []
    try:
        for run in range(args.warmup + args.runs):
            order = ["direct", "gateway"] if run % 2 == 0 else ["gateway", "direct"]
            means: dict[str, float] = {}
            for side in order:
                client, name = sides[side]
                prompt = f"bench run {run} {side} {uuid.uuid4().hex}"  # never a cache hit
                values = await burst(client, name, prompt, args.concurrency)
                means[side] = statistics.fmean(values)
                if run >= args.warmup:
                    samples[side].extend(values)
            if run >= args.warmup:
                paired.append(means["gateway"] - means["direct"])
    finally:
        await direct.close()
        await via.close()
    return {"samples": samples, "paired": paired}


def report(args: argparse.Namespace, result: dict[str, Any], calls: int | None) -> None:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:7.2f}"

    print(f"upstream={args.upstream} concurrency={args.concurrency} runs={args.runs} "
          f"ttft={args.ttft:g}ms itl={args.itl:g}ms tokens={args.tokens}")
    print(f"{'':18}{'p50 ms':>8}{'p95 ms':>8}")
    for side in ("direct", "gateway"):
        values = result["samples"][side]
        print(f"{side + ' TTFT':18}{ms(pct(values, 50))} {ms(pct(values, 95))}")
    paired = result["paired"]
    print(f"{'added (paired)':18}{ms(pct(paired, 50))} {ms(pct(paired, 95))}")
    streams = (args.warmup + args.runs) * args.concurrency
    via = f", {args.warmup + args.runs} expected from the gateway" if args.upstream == "openai" else ""
    print(f"fake upstream calls: {calls if calls is not None else '?'} "
          f"({streams} direct streams{via}; {streams} gateway streams)")


async def bench(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fake, fake_url = start(fake_command(args), env)
    calls: int | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gw_env = {**env, "DAC_DB": str(Path(tmp) / "bench.db"), "DAC_PORT": "0", "DAC_AUTH": "header"}
            if args.upstream == "openai":
                gw_env |= {"OPENAI_BASE_URL": fake_url + "/v1", "OPENAI_API_KEY": "bench"}
                model = "openai/bench-model"
            else:
                model = f"mock/mock:ttft={args.ttft:g},itl={args.itl:g},n={args.tokens}"
            gateway, gateway_url = start([sys.executable, "-m", "server"], gw_env)
            try:
                result = await measure(args, fake_url, gateway_url, model)
            finally:
                stop(gateway)
    finally:
        match = CALLS.search(stop(fake))
        calls = int(match.group(1)) if match else None
    report(args, result, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", choices=("openai", "mock"), default="openai",
                        help="what the gateway calls: its openai provider pointed at the fake, or its mock")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--ttft", type=float, default=DEFAULT_TTFT_MS, help="fake's first-token delay, ms")
    parser.add_argument("--itl", type=float, default=DEFAULT_ITL_MS, help="fake's gap between tokens, ms")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    args = parser.parse_args()
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
