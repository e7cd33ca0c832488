"""Section 6: the gateway's resident memory, idle and after many distinct requests.

A gateway of its own, started with a short result TTL (``DAC_RESULT_TTL_S``)
and every finished answer kept for it (``DAC_V1_RESULT_CACHE=always``), takes a
warm-up of distinct requests on ``/v1`` and ``/api``; once the TTL has passed,
its RSS is the post-warm-up level. Then ``N`` more distinct requests (half on
each surface, every ``/api`` one on a thread of its own), and once the TTL
has passed again, RSS is read once more.

Targets: idle RSS after the warm-up at most 50 MB; after the ``N`` requests,
RSS back within 20 MB of the post-warm-up level. (MB = 10^6 bytes.) The
memory of the side-by-side gateway, idle and at its peak under sections 2
and 4, is shown beside them.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvloop

from tools._common import ServerProcess, markdown_table, metric_sum, progress
from tools.bench.harness import FAKE_KEY, REQUEST_TIMEOUT, Bench, Target, fmt_ratio, ratio
from tools.bench.targets import Check, as_mb
from tools.bench.throughput import distinct_requests

IDLE_TARGET_MB = 50.0
RETURN_TARGET_MB = 20.0
SOAK_CONCURRENCY = 32
MB = 1e6


@dataclass(slots=True, kw_only=True)
class Soak:
    requests: int
    warmup: int
    ttl_s: float
    #: how long past the TTL the memory is read (the expiry timers fire on the TTL)
    margin_s: float = 1.0


async def _measure(gateway: ServerProcess, fake: ServerProcess, like: Target, soak: Soak) -> dict[str, Any]:
    """RSS at start, after the warm-up and its TTL, at the peak of the soak, and after its TTL."""
    targets = [Target(name=name, kind=kind, base=gateway.url, proc=gateway, provider=like.provider,
                      model=like.model) for name, kind in (("v1", "v1"), ("api", "dac"))]
    out: dict[str, Any] = {"rss_start_bytes": gateway.rss_bytes()}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=REQUEST_TIMEOUT) as session:
        bench = Bench(session=session, targets=targets, fake=fake, run_id=uuid.uuid4().hex[:8])
        await bench.set_upstream(ttft_ms=0, itl_ms=0, tokens=20)

        async def requests(r: int, count: int) -> int:
            failed = 0
            for target, share in zip(targets, (count // 2, count - count // 2), strict=True):
                run = await distinct_requests(bench, target, r, requests=share, concurrency=SOAK_CONCURRENCY)
                failed += run["failed"]
            return failed

        out["warmup_failed"] = await requests(0, soak.warmup)
        await asyncio.sleep(soak.ttl_s + soak.margin_s)
        out["rss_warm_bytes"] = gateway.rss_bytes()
        sampler = asyncio.ensure_future(bench.sample_rss())
        try:
            out["failed"] = await requests(1, soak.requests)
        finally:
            sampler.cancel()
        out["rss_peak_bytes"] = max(targets[0].rss_peak.values())
        out["cached_after_requests"] = await _cached(bench, targets[0])
        await asyncio.sleep(soak.ttl_s + soak.margin_s)
        out["rss_after_ttl_bytes"] = gateway.rss_bytes()
        out["cached_after_ttl"] = await _cached(bench, targets[0])
    return out


async def _cached(bench: Bench, target: Target) -> int:
    """Finished answers the gateway keeps for the TTL (its ``dac_cache_entries`` gauge)."""
    return int(metric_sum(await bench.gateway(target).prometheus(), "dac_cache_entries"))


def measure_memory(soak: Soak, *, fake: ServerProcess, like: Target, server_cores: set[int] | None) -> dict[str, Any]:
    """The soak on a gateway of its own (the side-by-side gateway ``like`` says which upstream to name)."""
    progress(f"section 6: memory, {soak.warmup} warm-up and {soak.requests} distinct requests, "
             f"result TTL {soak.ttl_s:g} s")
    env = {"OPENAI_BASE_URL": f"{fake.url}/v1", "OPENAI_API_KEY": FAKE_KEY, "DAC_RESULT_TTL_S": f"{soak.ttl_s:g}",
           "DAC_V1_RESULT_CACHE": "always"}
    with ServerProcess(cores=server_cores, env=env) as gateway:
        measured = uvloop.run(_measure(gateway, fake, like, soak))
    measured.update(requests=soak.requests, warmup=soak.warmup, ttl_s=soak.ttl_s, margin_s=soak.margin_s)
    return measured


def section_memory(side: list[Target], soak: dict[str, Any]) -> dict[str, Any]:
    warm, after = soak["rss_warm_bytes"], soak["rss_after_ttl_bytes"]
    grown = (after - warm) / MB
    checks = [
        Check(section=6, key="rss_idle_mb", figure="gateway RSS idle, after the warm-up", value=warm / MB, op="<=",
              limit=IDLE_TARGET_MB, fmt=as_mb).as_dict(),
        Check(section=6, key="rss_return_mb", figure=f"gateway RSS after {soak['requests']:,} distinct requests "
              f"and the result TTL, over the post-warm-up level", value=grown, op="<=", limit=RETURN_TARGET_MB,
              fmt=as_mb).as_dict(),
    ]
    rows = [
        ("RSS at start", _mb(soak["rss_start_bytes"])),
        (f"RSS after {soak['warmup']} warm-up requests and the TTL (post-warm-up)", _mb(warm)),
        (f"RSS peak during {soak['requests']:,} distinct requests", _mb(soak["rss_peak_bytes"])),
        (f"RSS {soak['ttl_s'] + soak['margin_s']:g} s after them (TTL {soak['ttl_s']:g} s)", _mb(after)),
        ("... over the post-warm-up level", f"{grown:+.1f} MB"),
        ("answers cached: after the requests / after the TTL",
         f"{soak['cached_after_requests']} / {soak['cached_after_ttl']}"),
        ("failed requests", str(soak["failed"] + soak["warmup_failed"])),
    ]
    table = markdown_table(["", "gateway (own process, short TTL)"], rows)
    return {"title": "6. Server memory (resident set)", "soak": soak, "columns": _side_columns(side),
            "table": table + "\n\n" + _side_table(side), "checks": checks,
            "broken": bool(soak["failed"] or soak["warmup_failed"]),
            "note": f"A gateway of its own with DAC_RESULT_TTL_S={soak['ttl_s']:g}: warm-up, then "
                    f"{soak['requests']:,} distinct non-stream requests, half on /v1 and half on /api (each on a "
                    f"fresh thread), {SOAK_CONCURRENCY} at a time; RSS read {soak['margin_s']:g} s after the TTL. "
                    "The second table is the side-by-side gateway of sections 1-4. MB = 10^6 bytes."}


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MB:.1f} MB"


def _servers(side: list[Target]) -> list[Target]:
    """One column per server process (the gateway serves two columns)."""
    seen: dict[int, Target] = {}
    for t in side:
        if t.proc is not None and id(t.proc) not in seen:
            seen[id(t.proc)] = t
    return list(seen.values())


def _side_columns(side: list[Target]) -> dict[str, Any]:
    return {("gateway" if t.gateway else t.name): {"rss_idle_bytes": t.rss_idle,
                                                     "rss_load_peak_bytes": t.rss_peak.get("load")}
            for t in _servers(side)}


def _side_table(side: list[Target]) -> str:
    servers = _servers(side)
    cols = _side_columns(side)
    names = list(cols)
    rows = [
        ("RSS idle (after one request)", *[_mb(cols[n]["rss_idle_bytes"]) for n in names]),
        ("RSS peak under load (sections 2 and 4)", *[_mb(cols[n]["rss_load_peak_bytes"]) for n in names]),
    ]
    if len(servers) > 1:
        base = cols["gateway"]["rss_load_peak_bytes"]
        rows.append(("... ratio to the gateway (under load)",
                     *[fmt_ratio(ratio(cols[n]["rss_load_peak_bytes"], base)) for n in names]))
    return markdown_table(["side-by-side servers", *names], rows)
