"""The time to first token the gateway adds over calling the same upstream directly.

Three processes: the fake upstream (``python -m tests.fake_upstream``, fixed
first-token delay), the gateway (``python -m server``, its ``openai`` or
``anthropic`` provider pointed at the fake), and this client. Runs alternate
direct and through-the-gateway, swapping which goes first each round, so
drifts in machine load hit both sides alike.

- ``single``: one stream at a time.
- ``fifty``: 50 streams at once. Directly that is 50 upstream calls; through
  the gateway it is 50 identical requests sharing one upstream call.

TTFT is measured by the client: from sending the request to reading the
first piece of text (an OpenAI content delta, an Anthropic ``text_delta``,
a gateway ``delta`` event). Each gateway request goes to a new thread with a
new prompt, so nothing is answered from the finished-result cache.

    .venv/bin/python tools/bench_providers.py --rounds 200 --fifty-rounds 20 --ttft-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from tools.client import GatewayClient
from tools.sse import SseEvent, sse_events

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
ORG = "org_bench"
WARMUP_ROUNDS = 5


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


async def start(command: list[str], env: dict[str, str], pattern: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env={**os.environ, **env},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    match = re.search(pattern, line)
    if not match:
        proc.kill()
        raise SystemExit(f"{command[2]} did not start: {line!r}")
    return proc, match.group(1)


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    rest = await asyncio.wait_for(proc.stdout.read(), 30)
    await proc.wait()
    return rest.decode()


class Client:
    def __init__(self, http: aiohttp.ClientSession, *, fake: str, gateway: str, kind: str, tokens: int) -> None:
        self.http, self.fake, self.kind, self.tokens = http, fake, kind, tokens
        self.gateway = GatewayClient(http, gateway, org=ORG)
        self.prompts = 0

    def prompt(self) -> str:
        self.prompts += 1
        return f"benchmark prompt {self.prompts} {time.time_ns()}"

    async def direct(self, prompt: str) -> float:
        """TTFT of one streaming call straight to the fake."""
        messages = [{"role": "user", "content": prompt}]
        if self.kind == "anthropic":
            url, body = f"{self.fake}/v1/messages", {"model": "bench", "messages": messages, "max_tokens": 1024,
                                                     "stream": True}
            headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        else:
            url, body = f"{self.fake}/v1/chat/completions", {"model": "bench", "messages": messages, "stream": True,
                                                             "stream_options": {"include_usage": True}}
            headers = {"Authorization": f"Bearer {KEY}"}
        started = time.monotonic()
        async with self.http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            ttft = None
            async for ev in sse_events(resp):
                if ttft is None and _has_text(self.kind, ev):
                    ttft = ev.at - started
        assert ttft is not None
        return ttft

    async def thread(self) -> str:
        return await self.gateway.new_thread("bench")

    async def through(self, thread_id: str, prompt: str) -> float:
        """TTFT of one streaming request through the gateway."""
        started = time.monotonic()
        async with self.gateway.open_stream(thread_id,
                                            {"content": prompt, "provider": self.kind, "model": "bench"}) as resp:
            assert resp.status == 200, await resp.text()
            ttft = None
            async for ev in sse_events(resp):
                if ttft is None and ev.event == "delta":
                    ttft = ev.at - started
                if ev.event == "error":
                    raise SystemExit(f"the gateway answered an error: {ev.data.decode()}")
        assert ttft is not None
        return ttft


def _has_text(kind: str, ev: SseEvent) -> bool:
    """Whether an upstream event carries a piece of the answer (OpenAI's ``[DONE]`` does not)."""
    if not ev.data.startswith(b"{"):
        return False
    chunk = ev.json()
    if kind == "anthropic":
        return (chunk.get("delta") or {}).get("type") == "text_delta"
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


async def rounds(n: int, direct: Callable[[], Awaitable[list[float]]],
                 through: Callable[[], Awaitable[list[float]]]) -> tuple[list[float], list[float]]:
    d: list[float] = []
    g: list[float] = []
    for i in range(WARMUP_ROUNDS + n):
        first, second = (direct, through) if i % 2 == 0 else (through, direct)
        a = await first()
        b = await second()
        if i >= WARMUP_ROUNDS:
            (d, g)[0 if first is direct else 1].extend(a)
            (d, g)[1 if first is direct else 0].extend(b)
    return d, g


def report(name: str, direct: list[float], gateway: list[float]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "scenario": name, "samples": len(gateway),
        "direct_ms": {"p50": statistics.median(direct) * 1000, "p95": percentile(direct, 95) * 1000},
        "gateway_ms": {"p50": statistics.median(gateway) * 1000, "p95": percentile(gateway, 95) * 1000},
    }
    row["added_ms"] = {q: row["gateway_ms"][q] - row["direct_ms"][q] for q in ("p50", "p95")}
    return row


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("openai", "anthropic"), default="openai")
    parser.add_argument("--rounds", type=int, default=200, help="rounds of one stream each way")
    parser.add_argument("--fifty-rounds", type=int, default=20, help="rounds of 50 streams each way")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="the fake's first-token delay")
    parser.add_argument("--itl-ms", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    fake, fake_url = await start(
        [sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--api-key", KEY, "--ttft-ms",
         str(args.ttft_ms), "--itl-ms", str(args.itl_ms), "--tokens", str(args.tokens)],
        {}, r"listening on (http://\S+) ")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.kind.upper()
        env = {"DAC_PORT": "0", "DAC_DB": str(Path(tmp) / "bench.db"), "DAC_AUTH": "header", f"{prefix}_API_KEY": KEY,
               f"{prefix}_BASE_URL": fake_url if args.kind == "anthropic" else f"{fake_url}/v1"}
        gateway, gateway_url = await start([sys.executable, "-m", "server"], env, r"listening on (http://\S+) ")
        try:
            connector = aiohttp.TCPConnector(limit=200)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
                client = Client(http, fake=fake_url, gateway=gateway_url, kind=args.kind, tokens=args.tokens)

                async def direct_one() -> list[float]:
                    return [await client.direct(client.prompt())]

                async def through_one() -> list[float]:
                    return [await client.through(await client.thread(), client.prompt())]

                async def direct_fifty() -> list[float]:
                    return list(await asyncio.gather(*[client.direct(client.prompt()) for _ in range(50)]))

                async def through_fifty() -> list[float]:
                    tid, prompt = await client.thread(), client.prompt()
                    return list(await asyncio.gather(*[client.through(tid, prompt) for _ in range(50)]))

                rows = [report("single", *await rounds(args.rounds, direct_one, through_one)),
                        report("fifty", *await rounds(args.fifty_rounds, direct_fifty, through_fifty))]
        finally:
            await stop(gateway)
    fake_out = await stop(fake)
    calls = re.search(r"(\d+) calls", fake_out)
    if args.json:
        print(json.dumps({"kind": args.kind, "ttft_ms": args.ttft_ms, "rows": rows}, indent=2))
        return
    print(f"{args.kind} adapter, fake upstream first token {args.ttft_ms:g} ms, {args.tokens} tokens; "
          f"fake upstream calls: {calls.group(1) if calls else '?'}")
    print(f"{'scenario':<8} {'samples':>7}  {'direct p50':>10} {'p95':>7}  {'gateway p50':>11} {'p95':>7}  "
          f"{'added p50':>9} {'p95':>7}")
    for r in rows:
        print(f"{r['scenario']:<8} {r['samples']:>7}  {r['direct_ms']['p50']:>10.2f} {r['direct_ms']['p95']:>7.2f}  "
              f"{r['gateway_ms']['p50']:>11.2f} {r['gateway_ms']['p95']:>7.2f}  "
              f"{r['added_ms']['p50']:>9.2f} {r['added_ms']['p95']:>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
