"""Section 3: how soon the upstream hears that a client left.

Two ways to leave, each measured at the fake upstream, which records when
each of its connections closed (``time.monotonic()``, the clock every process
here shares):

- **client close**: the client closes its socket after 3 tokens; the gateway
  waits ``DAC_CANCEL_GRACE_MS`` for another listener before it aborts the
  upstream call. Target: within 300 ms at p95 (API.md's promise).
- **Stop**: the client calls ``DELETE`` on the ``stop_url`` of its stream's
  ``meta`` event after 3 tokens, its connection still open; as the last
  listener, the upstream is aborted at once. Target: within 20 ms at p95, from
  the call to the upstream socket closing. ``/api`` only.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from tools._common import percentile
from tools.bench.harness import Bench, Target, broken, fmt_ms, fmt_ratio, median, openai_text, ratio
from tools.bench.targets import Check, as_ms
from tools.sse import SseEvent, sse_events

#: polling interval while waiting for a cancellation to show
POLL_S = 0.005
CANCEL_WAIT_S = 5.0
TOKENS_BEFORE_LEAVING = 3
CLOSE_TARGET_P95_MS = 300.0
STOP_TARGET_P95_MS = 20.0


def _is_text(target: Target, ev: SseEvent) -> bool:
    if target.openai_wire:
        return ev.data != b"[DONE]" and bool(openai_text(ev.json()))
    return ev.event == "delta"


async def _leave_once(bench: Bench, target: Target, content: str, *, stop: bool) -> tuple[float | None, str]:
    """Open a stream, take 3 tokens, then close the socket (or call Stop); seconds until the
    upstream saw its connection close, and how the call ended."""
    thread = await bench.thread_for(target)
    meta: dict[str, Any] = {}
    async with bench.open(target, content, thread=thread) as resp:
        if resp.status != 200:
            return None, f"HTTP {resp.status}"
        seen = 0
        async for ev in sse_events(resp):
            if ev.event == "meta":
                meta = ev.json()
            elif _is_text(target, ev):
                seen += 1
                if seen >= TOKENS_BEFORE_LEAVING:
                    break
        left = time.monotonic()
        if not stop:
            resp.close()
        elif (status := await _stop(bench, target, meta.get("stop_url"))) != 204:
            return None, f"Stop answered {status}"
        # With Stop, the stream's connection stays open until the upstream has closed.
        return await _until_closed(bench, target, content, thread, meta.get("stream_id"), left)


async def _stop(bench: Bench, target: Target, stop_url: str | None) -> int:
    if not stop_url:
        return 0
    async with bench.session.delete(target.base + stop_url, headers=bench.gateway(target).headers()) as resp:
        return resp.status


async def _until_closed(bench: Bench, target: Target, content: str, thread: str | None, stream_id: str | None,
                        left: float) -> tuple[float | None, str]:
    deadline = left + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        if target.via_fake:
            for call in (await bench.fake_stats(last=50))["recent"]:
                if call["prompt"] == content and call["ended"] is not None:
                    return call["ended"] - left, call["outcome"]
        elif thread is not None:  # the gateway's own mock: until the message reads cancelled
            messages = (await bench.gateway(target).thread(thread))["messages"]
            message = next((m for m in messages if m["message_id"] == stream_id), None)
            if message is not None and message["status"] != "streaming":
                return time.monotonic() - left, message["status"]
        else:
            return None, "no upstream socket to watch (the gateway's mock, stateless)"
        await asyncio.sleep(POLL_S)
    return None, "not closed"


async def _trials(bench: Bench, targets: list[Target], trials: int, *, stop: bool) -> dict[str, dict[str, Any]]:
    lat: dict[str, list[float]] = {t.name: [] for t in targets}
    bad: dict[str, list[str]] = {t.name: [] for t in targets}
    how = "stop" if stop else "close"
    for r, target in bench.alternating(trials, targets):
        content = f"Cancel {bench.run_id} {how} {r} via {target.name}"
        seconds, outcome = await _leave_once(bench, target, content, stop=stop)
        if seconds is None or outcome not in ("disconnected", "cancelled"):
            bad[target.name].append(outcome)
        else:
            lat[target.name].append(seconds)
    return {t.name: {"median_s": median(lat[t.name]), "p95_s": percentile(lat[t.name], 95),
                     "max_s": max(lat[t.name], default=None), "failures": bad[t.name],
                     "measured": "upstream connection closed" if t.via_fake
                     else "message cancelled (gateway's mock provider)"} for t in targets}


async def section_cancel(bench: Bench, *, trials: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=20, itl_ms=20, tokens=5000)
    close = await _trials(bench, bench.targets, trials, stop=False)
    api = [t for t in bench.targets if t.kind == "dac"]
    stop = await _trials(bench, api, trials, stop=True)
    base = close["direct"]["median_s"]
    for col in close.values():
        col["ratio_median"] = ratio(col["median_s"], base)
    checks = [Check(section=3, key=f"close_to_upstream_close_{t.name}_p95_ms",
                    figure=f"client close → upstream closed (grace included), {t.label}, p95",
                    value=_ms(close[t.name]["p95_s"]), op="<=", limit=CLOSE_TARGET_P95_MS, fmt=as_ms).as_dict()
              for t in bench.targets if t.gateway]
    checks += [Check(section=3, key=f"stop_to_upstream_close_{t.name}_p95_ms",
                     figure=f"Stop (DELETE) → upstream closed, {t.label}, p95",
                     value=_ms(stop[t.name]["p95_s"]), op="<=", limit=STOP_TARGET_P95_MS, fmt=as_ms).as_dict()
               for t in api]
    grace = os.environ.get("DAC_CANCEL_GRACE_MS", "50")
    return {"title": f"3. Leaving a stream after {TOKENS_BEFORE_LEAVING} tokens, {trials} alternating trial(s): "
                     "client close, and Stop",
            "note": f"Measured from the client's close (or its `DELETE` call) to the moment the upstream saw its "
                    f"connection close (both on CLOCK_MONOTONIC). On a close, the gateway waits "
                    f"DAC_CANCEL_GRACE_MS ({grace} ms here) for another listener before it aborts the upstream "
                    f"call; a Stop of the last listener aborts at once. The stream's own connection stays open "
                    f"through a Stop."
                    + ("" if all(t.via_fake for t in bench.targets) else
                       " The gateway's /api column, whose mock has no socket, is measured until the message reads "
                       "`cancelled`."),
            "columns": {"close": close, "stop": stop}, "rows": _rows(bench.targets, close, stop),
            "checks": checks, "broken": broken(close, "failures") or broken(stop, "failures")}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _rows(targets: list[Target], close: dict[str, Any], stop: dict[str, Any]) -> list[tuple[str, ...]]:
    def stopped(name: str, key: str) -> str:
        return fmt_ms(stop[name][key]) if name in stop else "-"

    return [
        ("client close → upstream closed, p50", *[fmt_ms(close[t.name]["median_s"]) for t in targets]),
        ("... p95", *[fmt_ms(close[t.name]["p95_s"]) for t in targets]),
        ("... worst", *[fmt_ms(close[t.name]["max_s"]) for t in targets]),
        ("... ratio to direct (p50)", *[fmt_ratio(close[t.name]["ratio_median"]) for t in targets]),
        ("Stop (DELETE) → upstream closed, p50", *[stopped(t.name, "median_s") for t in targets]),
        ("... p95", *[stopped(t.name, "p95_s") for t in targets]),
        ("... worst", *[stopped(t.name, "max_s") for t in targets]),
        ("trials not closed upstream", *[str(len(close[t.name]["failures"]) + len(stop.get(t.name, {}).get(
            "failures", []))) for t in targets]),
    ]
