"""Bounded memory, measured on a real server process: RSS from /proc while the result
cache is full of long answers.

The suite's short form: a 6 MiB cache and 20 answers of 70,000 tokens (more than the cache
holds, so it lets answers go). The long form is ``MEMORY_CACHE_MIB=8 MEMORY_ANSWERS=40 MEMORY_TOKENS=100000``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp

from .helpers import within
from .test_main import new_thread, start_server

CACHE_MAX_BYTES = int(os.environ.get("MEMORY_CACHE_MIB", "6")) * 1024 * 1024
ANSWERS = int(os.environ.get("MEMORY_ANSWERS", "20"))
TOKENS = int(os.environ.get("MEMORY_TOKENS", "70000"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_long_answers_beyond_the_cache_limit_keep_rss_growth_under_3x_that_limit(tmp_path: Path) -> None:
    proc, url = await start_server(tmp_path / "mem.db", env={"DAC_CACHE_MAX_BYTES": str(CACHE_MAX_BYTES)})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            h = {"x-org-id": "org_mem"}

            async def ask(content: str, tokens: int) -> int:
                tid = await new_thread(http, url, "org_mem")
                async with http.post(f"{url}/api/threads/{tid}/messages", headers=h, json={
                        "content": content, "model": f"mock:ttft=0,itl=0,n={tokens}"}) as resp:
                    assert resp.status == 200, await resp.text()
                    return len((await resp.json())["message"]["content"])

            for i in range(3):  # warm up: imports, pools, the first answers' structures
                await within(ask(f"warm {i}", 1000), 30, "a warm-up answer")
            baseline = rss_bytes(proc.pid)
            peak = baseline
            sizes = []
            for i in range(ANSWERS):
                sizes.append(await within(ask(f"long answer {i}", TOKENS), 60, f"answer {i}"))
                peak = max(peak, rss_bytes(proc.pid))
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.text()
        growth = peak - baseline
        cached = next(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("dac_cache_bytes "))
        print(f"\nRSS: baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, growth "
              f"{growth / 2**20:.1f} MiB ({growth / CACHE_MAX_BYTES:.2f}x the {CACHE_MAX_BYTES / 2**20:.0f} MiB "
              f"cache limit); cache holds {cached / 2**20:.1f} MiB; answers of {min(sizes)}-{max(sizes)} chars")
        assert all(size > 5 * TOKENS for size in sizes)
        assert sum(sizes) > 1.25 * CACHE_MAX_BYTES  # the cache had to let answers go
        assert cached <= CACHE_MAX_BYTES
        assert growth < 3 * CACHE_MAX_BYTES, f"RSS grew {growth / 2**20:.1f} MiB"
        proc.send_signal(signal.SIGTERM)
        assert await within(proc.wait(), 20, "the process to exit") == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
