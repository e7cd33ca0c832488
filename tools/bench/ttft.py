"""Section 1: the TTFT of one stream, and the time the gateway adds to a direct call."""

from __future__ import annotations

from typing import Any

from server.providers.mock import mock_answer
from tools._common import percentile
from tools.bench.harness import Bench, fmt_ms, fmt_ratio, median, ratio


async def section_ttft(bench: Bench, *, rounds: int) -> dict[str, Any]:
    await bench.set_upstream(ttft_ms=50, itl_ms=10, tokens=20)
    ttfts: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    errors: dict[str, int] = {t.name: 0 for t in bench.targets}
    for r, target in bench.alternating(rounds):
        content = f"TTFT {bench.run_id} round {r} via {target.name}"
        result = await bench.stream(target, content, thread=await bench.thread_for(target))
        complete = result.text == "".join(mock_answer(content, bench.timing.tokens))
        if result.ok and complete and result.ttft_s is not None:
            ttfts[target.name].append(result.ttft_s)
        else:
            errors[target.name] += 1
    base = median(ttfts["direct"])
    cols = {}
    for t in bench.targets:
        med, p95 = median(ttfts[t.name]), percentile(ttfts[t.name], 95)
        cols[t.name] = {"ttft_median_s": med, "ttft_p95_s": p95, "errors": errors[t.name],
                        "added_median_s": None if med is None or base is None else med - base,
                        "ratio_median": ratio(med, base), "runs": len(ttfts[t.name])}
    return {"title": f"1. TTFT of one stream, {rounds} alternating runs (upstream: first token after 50 ms)",
            "note": "A new question every run, so nothing is served from a cache; the gateway column posts to "
                    "a fresh thread (made before the clock starts) with `Accept: text/event-stream`.",
            "columns": cols, "rows": _rows(bench, cols)}


def _rows(bench: Bench, cols: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    def added(name: str) -> str:
        seconds = cols[name]["added_median_s"]
        return "-" if name == "direct" else ("n/a" if seconds is None else f"{seconds * 1000:+.1f} ms")

    return [
        ("TTFT median", *[fmt_ms(cols[t.name]["ttft_median_s"]) for t in bench.targets]),
        ("TTFT p95", *[fmt_ms(cols[t.name]["ttft_p95_s"]) for t in bench.targets]),
        ("added over direct (median)", *[added(t.name) for t in bench.targets]),
        ("ratio to direct (median)", *[fmt_ratio(cols[t.name]["ratio_median"]) for t in bench.targets]),
        ("runs failed or incomplete", *[str(cols[t.name]["errors"]) for t in bench.targets]),
    ]
