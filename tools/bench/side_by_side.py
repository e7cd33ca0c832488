"""Sections 1-4 and 6: the columns side by side against one fake upstream in its own process.

Columns: ``direct`` (the client calls the fake itself), ``gateway /v1`` and
``gateway /api`` (one gateway process, both surfaces), ``aiohttp proxy (floor)``
(``tools/bare_proxy.py``: the least an aiohttp hop costs here, pinned to the
gateway's core) and ``litellm`` where LiteLLM's proxy is installed. Section 6 starts a gateway of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from typing import Any

import aiohttp
import orjson
import uvloop

from tools._common import ServerProcess, progress
from tools.bench.cancel import section_cancel
from tools.bench.harness import FAKE_KEY, FAKE_MODEL, FLOOR, REQUEST_TIMEOUT, Bench, Target
from tools.bench.identical import IDENTICAL_STREAMS, section_identical
from tools.bench.litellm_proxy import start_litellm
from tools.bench.memory import measure_memory, section_memory
from tools.bench.plan import Plan
from tools.bench.throughput import section_throughput
from tools.bench.ttft import section_ttft


async def _probe_gateway(bench: Bench) -> None:
    """Use the gateway's OpenAI-compatible provider if it has one; else its mock mirrors the fake."""
    columns = [t for t in bench.targets if t.gateway]
    client = bench.gateway(columns[0])
    thread = await client.new_thread("bench")
    status, body = await client.post(thread, {"content": "probe", "provider": "openai", "model": FAKE_MODEL})
    if status == 200:
        return
    progress(f"the gateway has no working 'openai' provider ({orjson.dumps(body).decode()[:160]}); "
             "its columns use the built-in mock with the fake's timings")
    for column in columns:
        column.provider, column.model = "mock", None


async def _warm_up(bench: Bench) -> None:
    """One stream and one plain request through every column, then the idle memory."""
    for target in bench.targets:
        thread = await bench.thread_for(target)
        await bench.stream(target, f"warm-up {bench.run_id}", thread=thread)
        await bench.complete(target, f"warm-up 2 {bench.run_id}", thread=thread)
    await asyncio.sleep(0.5)
    for target in bench.targets:
        if target.proc is not None:
            target.rss_idle = target.proc.rss_bytes()


async def _run_sections(bench: Bench, plan: Plan, sections: set[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    if 1 in sections:
        progress(f"section 1: TTFT of one stream, {plan.ttft_rounds} rounds")
        out[1] = await section_ttft(bench, rounds=plan.ttft_rounds)
    if 2 in sections:
        progress(f"section 2: {IDENTICAL_STREAMS} identical streams, {plan.identical_rounds} round(s)")
        out[2] = await section_identical(bench, rounds=plan.identical_rounds)
    if 3 in sections:
        progress(f"section 3: cancel latency, {plan.cancel_trials} trial(s)")
        out[3] = await section_cancel(bench, trials=plan.cancel_trials)
    if 4 in sections:
        progress(f"section 4: throughput, {plan.throughput_requests} requests x {plan.throughput_rounds}")
        out[4] = await section_throughput(bench, requests=plan.throughput_requests,
                                          concurrency=plan.throughput_concurrency, rounds=plan.throughput_rounds)
    return out


async def run_side_by_side(targets: list[Target], fake: ServerProcess, plan: Plan,
                           sections: set[int]) -> dict[int, dict[str, Any]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        bench = Bench(session=session, targets=targets, fake=fake, run_id=uuid.uuid4().hex[:8])
        await bench.set_upstream(ttft_ms=0, itl_ms=0, tokens=5)
        await _probe_gateway(bench)
        await _warm_up(bench)
        sampler = asyncio.ensure_future(bench.sample_rss())
        try:
            out = await _run_sections(bench, plan, sections)
        finally:
            sampler.cancel()
    return out


def _columns(fake: ServerProcess, gateway: ServerProcess) -> list[Target]:
    return [Target(name="direct", kind="openai", base=f"{fake.url}/v1"),
            Target(name="v1", label="gateway /v1", kind="v1", base=gateway.url, proc=gateway),
            Target(name="api", label="gateway /api", kind="dac", base=gateway.url, proc=gateway)]


def side_by_side(plan: Plan, sections: set[int], *, litellm_cmd: list[str] | None, server_cores: set[int] | None,
                 load_cores: set[int] | None, report: dict[str, Any],
                 floor: bool = True) -> tuple[dict[int, dict[str, Any]], bool]:
    """Start the fake upstream, the gateway, the floor (``tools/bare_proxy.py``, with ``floor``) and
    (if wanted) LiteLLM's proxy, and run ``sections`` against them. Returns the sections and whether
    the gateway reached the fake."""
    litellm_proc = None
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(ServerProcess(command=[sys.executable, "-m", "tools.fake_openai", "--port", "{port}"],
                                                 ready_path="/v1/models", cores=load_cores))
        gateway = stack.enter_context(ServerProcess(cores=server_cores, env={"OPENAI_BASE_URL": f"{fake.url}/v1",
                                                                            "OPENAI_API_KEY": FAKE_KEY}))
        targets = _columns(fake, gateway)
        if floor:
            bare = stack.enter_context(ServerProcess(
                command=[sys.executable, "-m", "tools.bare_proxy", "--port", "{port}", "--upstream", f"{fake.url}/v1"],
                ready_path="/v1/models", cores=server_cores))
            targets.append(Target(name=FLOOR, label="aiohttp proxy (floor)", kind="openai", base=f"{bare.url}/v1",
                                  proc=bare))
        if litellm_cmd is not None:
            progress(f"starting LiteLLM's proxy: {' '.join(litellm_cmd)}")
            try:
                litellm_proc, master_key = start_litellm(litellm_cmd, fake.url, server_cores)
                targets.append(Target(name="litellm", kind="openai", base=f"{litellm_proc.url}/v1",
                                      proc=litellm_proc, api_key=master_key))
            except RuntimeError as exc:
                progress(f"LiteLLM's proxy did not start, left out: {exc}")
                report["litellm"] = f"failed to start ({str(exc).splitlines()[0]}; see above)"
        try:
            results = uvloop.run(run_side_by_side(targets, fake, plan, sections))
        finally:
            if litellm_proc is not None:
                litellm_proc.stop()
        if 6 in sections:
            soak = measure_memory(plan.soak, fake=fake, like=targets[2], server_cores=server_cores)
            results[6] = section_memory(targets, soak)
    for section in results.values():
        section.setdefault("headers", ["", *[t.label for t in targets]])
        section["gateway_upstream"] = "fake (openai provider)" if targets[2].via_fake else "built-in mock"
    return results, targets[2].via_fake
