"""Section 2: 50 identical streams at once: upstream calls, and TTFT p95 as a ratio to direct.

Target: through the gateway, on either surface, the 50 streams make one upstream call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.providers.mock import mock_answer
from tools._common import percentile
from tools.bench.harness import Bench, broken, fmt_ms, fmt_ratio, median, ratio
from tools.bench.targets import Check

IDENTICAL_STREAMS = 50


async def section_identical(bench: Bench, *, rounds: int) -> dict[str, Any]:
    bench.section = "load"
    await bench.set_upstream(ttft_ms=300, itl_ms=20, tokens=40)
    ttfts: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    calls: dict[str, list[int]] = {t.name: [] for t in bench.targets}
    bad: dict[str, int] = {t.name: 0 for t in bench.targets}
    for r, target in bench.alternating(rounds):
        thread = await bench.thread_for(target)
        content = f"Identical {bench.run_id} round {r} via {target.name}"
        before = await bench.upstream_calls(target)
        results = await asyncio.gather(*(bench.stream(target, content, thread=thread)
                                          for _ in range(IDENTICAL_STREAMS)))
        calls[target.name].append(await bench.upstream_calls(target) - before)
        # Every client must get the whole answer the upstream gave for this question.
        expected = "".join(mock_answer(content, bench.timing.tokens))
        bad[target.name] += sum(1 for res in results if not res.ok or res.text != expected)
        ttfts[target.name].extend(res.ttft_s for res in results if res.ok and res.ttft_s is not None)
    bench.section = "idle"
    base = percentile(ttfts["direct"], 95)
    cols = {}
    for t in bench.targets:
        p95 = percentile(ttfts[t.name], 95)
        cols[t.name] = {"upstream_calls_per_round": calls[t.name], "ttft_p95_s": p95,
                        "ttft_median_s": median(ttfts[t.name]), "ratio_p95": ratio(p95, base),
                        "failed_streams": bad[t.name]}
    checks = [Check(section=2, key=f"identical_upstream_calls_{t.name}",
                    figure=f"upstream calls per {IDENTICAL_STREAMS} identical streams, {t.label} (worst round)",
                    value=max(calls[t.name], default=None), op="==", limit=1).as_dict()
              for t in bench.targets if t.gateway]
    rows = [
        ("upstream calls per 50 streams", *[
            "/".join(str(c) for c in calls[t.name]) for t in bench.targets]),
        ("TTFT median", *[fmt_ms(cols[t.name]["ttft_median_s"]) for t in bench.targets]),
        ("TTFT p95", *[fmt_ms(cols[t.name]["ttft_p95_s"]) for t in bench.targets]),
        ("TTFT p95, ratio to direct", *[fmt_ratio(cols[t.name]["ratio_p95"]) for t in bench.targets]),
        ("streams failed or incomplete", *[str(bad[t.name]) for t in bench.targets]),
    ]
    return {"title": f"2. {IDENTICAL_STREAMS} identical streams at once, {rounds} alternating round(s) "
                     "(upstream: 300 ms to the first token, 40 tokens 20 ms apart)",
            "columns": cols, "rows": rows, "checks": checks, "broken": broken(cols, "failed_streams")}
