"""TTFT the gateway's /v1 surface adds over calling an OpenAI-compatible upstream directly.

The same official ``openai`` client streams the same prompts two ways, in
alternating order run by run: straight to a fake upstream, and through the
gateway. Each side runs in its own process (fake, gateway, this client), all
on 127.0.0.1. TTFT is the time from ``create()`` to the first content chunk.
The fake is the test suite's (``python -m tests.fake_upstream``) when it is
there, else a minimal one in this file (``--fake own``).

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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TTFT_MS = 50.0
DEFAULT_ITL_MS = 5.0
DEFAULT_TOKENS = 10
DEFAULT_RUNS = 100
DEFAULT_WARMUP = 5
START_TIMEOUT_S = 20.0
LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
CALLS = re.compile(r"fake upstream: (\d+) calls")


# -- the fake upstream (its own process) ---------------------------------------------


def fake_app(*, ttft_ms: float, itl_ms: float, n: int) -> web.Application:
    """OpenAI's streaming chat completions: role chunk, content chunks, finish, usage, [DONE]."""
    app = web.Application()
    calls = 0

    def frame(data: Any) -> bytes:
        return b"data: " + orjson.dumps(data) + b"\n\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        body = await request.json()
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body["model"], "system_fingerprint": None}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return frame({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish}]})

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": ""}))
        await asyncio.sleep(ttft_ms / 1000)
        for i in range(n):
            if i and itl_ms:
                await asyncio.sleep(itl_ms / 1000)
            await resp.write(chunk({"content": f" token{i}" if i else "token0"}))
        await resp.write(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(frame({**base, "choices": [],
                                    "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app.router.add_post("/v1/chat/completions", completions)
    app["calls"] = lambda: calls
    return app


async def serve_fake(args: argparse.Namespace) -> None:
    app = fake_app(ttft_ms=args.ttft, itl_ms=args.itl, n=args.tokens)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"fake upstream listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(f"fake upstream: {app['calls']()} calls", flush=True)
    await runner.cleanup()


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
    if args.fake == "shared":
        return [sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--api-key", "",
                "--ttft-ms", str(args.ttft), "--itl-ms", str(args.itl), "--tokens", str(args.tokens)]
    return [sys.executable, str(Path(__file__).resolve()), "--serve-fake", "--ttft", str(args.ttft),
            "--itl", str(args.itl), "--tokens", str(args.tokens)]


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

    print(f"fake={args.fake} upstream={args.upstream} concurrency={args.concurrency} runs={args.runs} "
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
            gw_env = {**env, "DAC_DB": str(Path(tmp) / "bench.db"), "DAC_PORT": "0"}
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
    adapter = (ROOT / "server" / "providers" / "openai.py").is_file()
    parser.add_argument("--upstream", choices=("openai", "mock"), default="openai" if adapter else "mock",
                        help="what the gateway calls: its openai provider pointed at the fake, or its mock")
    parser.add_argument("--fake", choices=("shared", "own"),
                        default="shared" if (ROOT / "tests" / "fake_upstream.py").is_file() else "own",
                        help="the test suite's fake upstream, or the minimal one in this file")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--ttft", type=float, default=DEFAULT_TTFT_MS, help="fake's first-token delay, ms")
    parser.add_argument("--itl", type=float, default=DEFAULT_ITL_MS, help="fake's gap between tokens, ms")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(serve_fake(args) if args.serve_fake else bench(args))


if __name__ == "__main__":
    main()
