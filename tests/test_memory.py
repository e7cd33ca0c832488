"""Bounded memory, measured on a real server process: RSS from /proc while the result
cache is full of long answers; and the C heap handed back once the server is quiet.

The suite's short form: a 6 MiB cache and 20 answers of 70,000 tokens (more than the cache
holds, so it lets answers go). The long form is ``MEMORY_CACHE_MIB=8 MEMORY_ANSWERS=40 MEMORY_TOKENS=100000``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from server.appkeys import HEAP_TRIM
from server.memory import HeapTrim, malloc_trim

from .conftest import GatewayFactory
from .helpers import ScriptedProvider, registry, within
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


# -- the heap handed back when quiet (server/memory.py) --------------------------------------

needs_malloc_trim = pytest.mark.skipif(malloc_trim is None, reason="this C library has no malloc_trim (not glibc)")


class Counts:
    """What a :class:`HeapTrim` looks at, set by the test; its trims counted."""

    def __init__(self) -> None:
        self.registered = self.running = self.held = 0
        self.trimmed = 0
        #: set to hold a trim in its thread until the test lets it go
        self.hold: threading.Event | None = None

    def trim(self, pad: int) -> int:
        assert pad == 0  # keep nothing beyond what is in use
        if self.hold is not None:
            assert self.hold.wait(10)
        self.trimmed += 1
        return 1

    def watcher(self) -> HeapTrim:
        return HeapTrim(every_s=3600, registered=lambda: self.registered, running=lambda: self.running,
                        held=lambda: self.held, trim=self.trim)


async def trimmed(heap: HeapTrim) -> bool:
    """One tick; True if it trimmed (the trim awaited)."""
    trimming = heap.check()
    if trimming is None:
        return False
    await within(trimming, 10, "the trim")
    return True


async def test_a_quiet_tick_after_work_trims_once_and_a_busy_one_never() -> None:
    counts = Counts()
    heap = counts.watcher()
    assert await trimmed(heap)  # what the start-up freed
    assert not await trimmed(heap)  # nothing happened since

    counts.registered, counts.held, counts.running = 3, 3, 1
    assert not await trimmed(heap)
    counts.registered = 5  # more came meanwhile
    assert not await trimmed(heap)
    counts.registered, counts.running = 6, 0  # the last one came, and all ended, in this tick
    assert not await trimmed(heap)  # never while flights come or run

    assert await trimmed(heap)  # the first tick with nothing new
    assert not await trimmed(heap)

    counts.held = 1  # two answers left the result cache
    assert await trimmed(heap)
    assert not await trimmed(heap)
    assert counts.trimmed == heap.trims == 3


async def test_a_flight_still_running_keeps_the_heap_as_it_is() -> None:
    counts = Counts()
    heap = counts.watcher()
    counts.registered = counts.held = counts.running = 1
    for _ in range(5):
        assert not await trimmed(heap)
    counts.running = 0
    assert await trimmed(heap)
    assert counts.trimmed == 1


async def test_a_trim_under_way_is_not_doubled_and_the_next_quiet_tick_trims_what_came_meanwhile() -> None:
    counts = Counts()
    heap = counts.watcher()
    counts.hold = threading.Event()
    first = heap.check()
    assert first is not None
    await asyncio.sleep(0.05)
    assert not first.done()  # the loop goes on while the heap is trimmed
    counts.held = 4  # answers left the cache meanwhile
    assert heap.check() is None  # one at a time
    counts.hold.set()
    await within(first, 10, "the first trim")
    assert await trimmed(heap)  # what left during the first is trimmed now
    assert counts.trimmed == 2


@needs_malloc_trim
def test_malloc_trim_hands_freed_heap_memory_back_to_the_system() -> None:
    """What the trim relies on: glibc keeps freed blocks resident until malloc_trim."""
    script = (
        "import ctypes, sys\n"
        "from server.memory import malloc_trim\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1])\n"
        "blocks = [libc.malloc(32 * 1024) for _ in range(3000)]\n"  # below the mmap threshold: on the heap
        "for b in blocks: ctypes.memset(b, 1, 32 * 1024)\n"
        "for b in blocks[:-1]: libc.free(b)\n"  # the last one holds the heap's top: no automatic trim
        "before = rss()\n"
        "malloc_trim(0)\n"
        "print(before, rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    before, after = (int(v) for v in out.stdout.split())
    assert before - after > 60 * 1024, out.stdout  # of the ~94 MiB freed, most went back (KiB)


@needs_malloc_trim
async def test_a_gateway_trims_when_its_flights_have_ended_and_when_answers_leave_its_cache(
        gateway_factory: GatewayFactory) -> None:
    provider = ScriptedProvider()
    # ticks by hand: the timer's first one is an hour away
    gw = await gateway_factory(providers=registry(provider), trim_idle_s=3600, result_ttl_s=0.3)
    heap = gw.app[HEAP_TRIM]
    assert await trimmed(heap)  # the start-up
    assert not await trimmed(heap)

    thread = await gw.new_thread()
    pending = asyncio.ensure_future(gw.post(thread, {"content": "hold it", "provider": "scripted"}))
    call = await within(provider.next_call(), 5, "the upstream call")
    assert not await trimmed(heap)  # a flight came
    assert not await trimmed(heap)  # and runs
    call.send("done")
    call.finish()
    status, _ = await within(pending, 5, "the answer")
    assert status == 200
    assert await trimmed(heap)  # ended: the first quiet tick
    assert not await trimmed(heap)

    # a flight that comes and goes between two ticks: the next tick sees it came, the one after trims
    other = await gw.new_thread()
    pending = asyncio.ensure_future(gw.post(other, {"content": "quick", "provider": "scripted"}))
    call = await within(provider.next_call(), 5, "the second call")
    call.send("fast")
    call.finish()
    assert (await within(pending, 5, "the second answer"))[0] == 200
    assert not await trimmed(heap)
    assert await trimmed(heap)

    kept = gw.hub.held
    assert kept == 2  # both answers, for the result TTL
    await within(_until(lambda: gw.hub.held < kept), 5, "the answers to leave the cache")
    assert await trimmed(heap)
    assert heap.trims == 4


@needs_malloc_trim
async def test_a_closed_gateway_trims_no_more(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(trim_idle_s=0.01)
    heap = gw.app[HEAP_TRIM]
    await within(_until(lambda: heap.trims >= 1), 5, "the trim after the start-up")
    await gw.close()
    trims = heap.trims
    heap._dirty = True  # were it still ticking, the next tick would trim
    await asyncio.sleep(0.1)
    assert heap.trims == trims


async def _until(done: Callable[[], bool]) -> None:
    while not done():
        await asyncio.sleep(0.01)
