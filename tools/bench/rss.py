"""Section 6: the servers' resident memory, idle and at its peak under the load of sections 2 and 4."""

from __future__ import annotations

from typing import Any

from tools.bench.harness import Target, fmt_ratio, ratio


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def section_rss(targets: list[Target]) -> dict[str, Any]:
    servers = [t for t in targets if t.proc is not None]
    cols = {t.name: {"rss_idle_bytes": t.rss_idle, "rss_load_peak_bytes": t.rss_peak.get("load")} for t in servers}
    gateway = cols.get("gateway", {})
    rows = [
        ("RSS idle (after one request)", *[_mib(cols[t.name]["rss_idle_bytes"]) for t in servers]),
        ("RSS peak under load (sections 2 and 4)", *[_mib(cols[t.name]["rss_load_peak_bytes"]) for t in servers]),
    ]
    if len(servers) > 1:
        rows.append(("... ratio to the gateway (under load)", *[
            fmt_ratio(ratio(cols[t.name]["rss_load_peak_bytes"], gateway.get("rss_load_peak_bytes")))
            for t in servers]))
    return {"title": "6. Server memory (resident set)", "columns": cols, "rows": rows,
            "headers": ["", *[t.name for t in servers]]}
