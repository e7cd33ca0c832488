"""Section 1: the TTFT of one stream, and the time the gateway adds to a direct call.

Targets: on ``/v1`` (stateless) at most +0.5 ms at p50 and +1.0 ms at p95; on
``/api`` with a thread at most +0.8 ms at p50. "Added" is the column's
percentile minus the direct call's, from runs that alternate between the
columns round by round.
"""

from __future__ import annotations

from typing import Any

from server.providers.mock import mock_answer
from tools._common import percentile
from tools.bench.harness import FLOOR, Bench, Target, broken, fmt_ms, fmt_ratio, ratio
from tools.bench.targets import Check, as_added_ms

#: the fake upstream's timing for this section: only the first token matters
TTFT_UPSTREAM = {"ttft_ms": 20, "itl_ms": 1, "tokens": 5}
#: (column, percentile, most milliseconds added over direct)
TTFT_TARGETS = (("v1", 50, 0.5), ("v1", 95, 1.0), ("api", 50, 0.8))


async def section_ttft(bench: Bench, *, rounds: int) -> dict[str, Any]:
    await bench.set_upstream(**TTFT_UPSTREAM)
    ttfts: dict[str, list[float]] = {t.name: [] for t in bench.targets}
    legs: dict[str, list[tuple[float, float]]] = {t.name: [] for t in bench.targets}
    errors: dict[str, int] = {t.name: 0 for t in bench.targets}
    # Every thread first: a thread made just before its request would warm the gateway for it,
    # where every other column's request finds its server idle since the last round.
    threads = {(r, t.name): await bench.thread_for(t) for r, t in bench.alternating(rounds)}
    for r, target in bench.alternating(rounds):
        content = f"TTFT {bench.run_id} round {r} via {target.name}"
        result = await bench.stream(target, content, thread=threads[r, target.name])
        complete = result.text == "".join(mock_answer(content, bench.timing.tokens))
        if result.ok and complete and result.ttft_s is not None:
            ttfts[target.name].append(result.ttft_s)
            if target.via_fake:
                legs[target.name] += await _legs(bench, content, result.started, result.started + result.ttft_s)
        else:
            errors[target.name] += 1
    cols = _columns(bench.targets, ttfts, errors)
    for name, pairs in legs.items():
        cols[name]["to_upstream_p50_s"] = percentile([p[0] for p in pairs], 50)
        cols[name]["from_upstream_p50_s"] = percentile([p[1] for p in pairs], 50)
    return {"title": f"1. TTFT of one stream, {rounds} alternating runs per column "
                     f"(upstream: first token after {TTFT_UPSTREAM['ttft_ms']} ms)",
            "note": "A new question every run, so nothing is served from a cache. `gateway /v1` is the "
                    "stateless OpenAI-compatible surface; `gateway /api` posts to a fresh thread (every run's made "
                    "before the first run starts) with `Accept: text/event-stream`. TTFT runs from the request to the "
                    "first piece of text; added = the column's percentile minus direct's. The two legs come from the "
                    "fake's record of each call (same CLOCK_MONOTONIC): from sending the request to the upstream "
                    "call starting, and from the upstream's first token being due to the client reading it. "
                    "The floor column is a bare aiohttp proxy on the gateway's core (tools/bare_proxy.py): what "
                    "it adds over direct, any aiohttp hop adds on this machine; the rows 'of which the "
                    "gateway's own' take it away from the gateway's figures.",
            "columns": cols, "rows": _rows(bench.targets, cols), "checks": _checks(cols),
            "broken": broken(cols, "errors")}


async def _legs(bench: Bench, content: str, sent: float, first: float) -> list[tuple[float, float]]:
    """The two legs of one TTFT, from the fake's record of the call: request sent -> upstream call
    started, and first token due at the upstream -> first text at the client."""
    calls = [c for c in (await bench.fake_stats(last=5))["recent"] if c["prompt"] == content]
    if len(calls) != 1 or calls[0]["first_due"] is None:
        return []
    return [(calls[0]["started"] - sent, first - calls[0]["first_due"])]


def _columns(targets: list[Target], ttfts: dict[str, list[float]], errors: dict[str, int]) -> dict[str, Any]:
    base = {p: percentile(ttfts["direct"], p) for p in (50, 95)}
    cols = {}
    for t in targets:
        mine = {p: percentile(ttfts[t.name], p) for p in (50, 95)}
        added = {p: None if mine[p] is None or base[p] is None else mine[p] - base[p] for p in (50, 95)}
        cols[t.name] = {"ttft_median_s": mine[50], "ttft_p95_s": mine[95], "errors": errors[t.name],
                        "added_median_s": added[50], "added_p95_s": added[95],
                        "ratio_median": ratio(mine[50], base[50]), "runs": len(ttfts[t.name])}
    floor = cols.get(FLOOR)
    for t in targets:
        if floor is not None and t.gateway:
            for key in ("added_median_s", "added_p95_s"):
                mine_, floor_ = cols[t.name][key], floor[key]
                cols[t.name][f"{key[:-2]}_over_floor_s"] = (None if mine_ is None or floor_ is None
                                                            else mine_ - floor_)
    return cols


def _checks(cols: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for name, p, limit in TTFT_TARGETS:
        added = cols.get(name, {}).get("added_median_s" if p == 50 else "added_p95_s")
        surface = "/v1 (stateless)" if name == "v1" else "/api (thread)"
        checks.append(Check(section=1, key=f"ttft_added_{name}_p{p}_ms", figure=f"TTFT added over direct, "
                            f"{surface}, p{p}", value=None if added is None else added * 1000, op="<=",
                            limit=limit, fmt=as_added_ms).as_dict())
    return checks


def _leg(col: dict[str, Any], key: str) -> str:
    seconds = col.get(key)
    return "n/a" if seconds is None else f"{seconds * 1000:.2f} ms"


def _rows(targets: list[Target], cols: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    def added(name: str, key: str) -> str:
        seconds = cols[name][key]
        return "-" if name == "direct" else ("n/a" if seconds is None else f"{seconds * 1000:+.2f} ms")

    def over_floor(name: str, key: str) -> str:
        seconds = cols[name].get(key)
        return "-" if seconds is None else f"{seconds * 1000:+.2f} ms"

    floor_rows = [
        ("... of which the gateway's own (over the floor), p50",
         *[over_floor(t.name, "added_median_over_floor_s") for t in targets]),
        ("... of which the gateway's own (over the floor), p95",
         *[over_floor(t.name, "added_p95_over_floor_s") for t in targets]),
    ] if FLOOR in cols else []
    return [
        ("TTFT p50", *[fmt_ms(cols[t.name]["ttft_median_s"]) for t in targets]),
        ("TTFT p95", *[fmt_ms(cols[t.name]["ttft_p95_s"]) for t in targets]),
        ("added over direct, p50", *[added(t.name, "added_median_s") for t in targets]),
        ("added over direct, p95", *[added(t.name, "added_p95_s") for t in targets]),
        *floor_rows,
        ("ratio to direct (p50)", *[fmt_ratio(cols[t.name]["ratio_median"]) for t in targets]),
        ("request → upstream call started, p50", *[_leg(cols[t.name], "to_upstream_p50_s") for t in targets]),
        ("upstream's first token → client, p50", *[_leg(cols[t.name], "from_upstream_p50_s") for t in targets]),
        ("runs failed or incomplete", *[str(cols[t.name]["errors"]) for t in targets]),
    ]
