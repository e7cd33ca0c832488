"""Section 3: cancel latency. The client closes its socket after 3 tokens; the time until the
upstream saw its connection close (the fake's timestamps share ``CLOCK_MONOTONIC`` with the
client)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from tools.bench.harness import Bench, Target, fmt_ms, fmt_ratio, median, openai_text, ratio
from tools.sse import sse_events

#: polling interval while waiting for a cancellation to show
POLL_S = 0.005
CANCEL_WAIT_S = 5.0


async def _cancel_once(bench: Bench, target: Target, content: str) -> tuple[float | None, str]:
    """Open a stream, take 3 tokens, close the socket; seconds until the upstream saw it close."""
    thread = await bench.thread_for(target)
    stream_id = None
    async with bench.open(target, content, thread=thread) as resp:
        if resp.status != 200:
            return None, f"HTTP {resp.status}"
        seen = 0
        async for ev in sse_events(resp):
            if ev.event == "meta":
                stream_id = ev.json()["stream_id"]
            elif ev.event == "delta" or (target.kind == "openai" and ev.data != b"[DONE]"
                                         and openai_text(ev.json())):
                seen += 1
                if seen >= 3:
                    break
        closed = time.monotonic()
        resp.close()
    return await _until_closed(bench, target, content, thread, stream_id, closed)


async def _until_closed(bench: Bench, target: Target, content: str, thread: str | None, stream_id: str | None,
                        closed: float) -> tuple[float | None, str]:
    deadline = closed + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        if target.via_fake:
            for call in (await bench.fake_stats(last=50))["recent"]:
                if call["prompt"] == content and call["ended"] is not None:
                    return call["ended"] - closed, call["outcome"]
        else:  # the gateway's own mock: until the message reads cancelled
            assert thread is not None
            messages = (await bench.gateway(target).thread(thread))["messages"]
            message = next((m for m in messages if m["message_id"] == stream_id), None)
            if message is not None and message["status"] != "streaming":
                return time.monotonic() - closed, message["status"]
        await asyncio.sleep(POLL_S)
    return None, "not closed"


async def section_cancel(bench: Bench, *, trials: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=20, itl_ms=20, tokens=5000)
    lat: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    bad: dict[str, list[str]] = {t.name: [] for t in bench.targets}
    for r, target in bench.alternating(trials):
        seconds, outcome = await _cancel_once(bench, target, f"Cancel {bench.run_id} trial {r} via {target.name}")
        if seconds is None or outcome not in ("disconnected", "cancelled"):
            bad[target.name].append(outcome)
        else:
            lat[target.name].append(seconds)
    base = median(lat["direct"])
    cols = {t.name: {"median_s": median(lat[t.name]), "max_s": max(lat[t.name], default=None),
                     "ratio_median": ratio(median(lat[t.name]), base), "failures": bad[t.name],
                     "measured": "client close -> upstream connection closed" if t.via_fake
                     else "client close -> message cancelled (gateway's mock provider)"}
            for t in bench.targets}
    rows = [
        ("client close -> upstream closed, median", *[fmt_ms(cols[t.name]["median_s"]) for t in bench.targets]),
        ("... worst", *[fmt_ms(cols[t.name]["max_s"]) for t in bench.targets]),
        ("... ratio to direct (median)", *[fmt_ratio(cols[t.name]["ratio_median"]) for t in bench.targets]),
        ("trials not closed upstream", *[str(len(bad[t.name])) for t in bench.targets]),
    ]
    grace = os.environ.get("DAC_CANCEL_GRACE_MS", "50")
    return {"title": f"3. Cancel latency, {trials} alternating trial(s): the client closes its socket after 3 tokens",
            "note": f"Measured from the client's close to the moment the upstream saw its connection close "
                    f"(both on CLOCK_MONOTONIC). The gateway waits DAC_CANCEL_GRACE_MS ({grace} ms here) for "
                    f"another listener before it aborts the upstream call; the rest is noticing the close and "
                    f"closing the upstream socket."
                    + ("" if all(t.via_fake for t in bench.targets) else
                       " The gateway's column, whose mock has no socket, is measured until the message reads "
                       "`cancelled`."),
            "columns": cols, "rows": rows}
