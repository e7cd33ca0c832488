"""The targets of the performance report: each figure beside its target, with PASS or FAIL.

A section measures; :class:`Check` says what one figure must be. A figure
that could not be measured (``None``) fails. Speed targets are machine
dependent: the report states them, the exit code does not follow them unless
``--strict`` is given.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tools._common import markdown_table

__all__ = ["Check", "as_added_ms", "as_count", "as_kib", "as_mb", "as_ms", "as_rate", "as_times", "as_us",
           "targets_table"]

_OPS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "<=": ("≤", operator.le), ">=": ("≥", operator.ge), "==": ("=", operator.eq),
}


#: how each unit prints (a value already in that unit)
as_ms = "{:.2f} ms".format
as_added_ms = "{:+.2f} ms".format
as_us = "{:.2f} µs".format
as_rate = "{:,.0f}/s".format
as_times = "{:.2f}×".format
as_kib = "{:.1f} KiB".format
as_mb = "{:.1f} MB".format
as_count = "{:,.0f}".format


@dataclass(slots=True, kw_only=True)
class Check:
    """One figure and its target: ``value op limit`` (values in the unit ``fmt`` prints)."""

    section: int
    key: str
    figure: str
    value: float | None
    op: str
    limit: float
    fmt: Callable[[float], str] = as_count
    #: what was measured, where the value alone does not say it ("9,998 of 10,000")
    measured: str | None = None

    @property
    def passed(self) -> bool:
        return self.value is not None and _OPS[self.op][1](self.value, self.limit)

    def as_dict(self) -> dict[str, Any]:
        symbol = _OPS[self.op][0]
        measured = self.measured or ("not measured" if self.value is None else self.fmt(self.value))
        return {"section": self.section, "key": self.key, "figure": self.figure,
                "value": None if self.value is None else round(self.value, 4),
                "op": self.op, "limit": self.limit, "measured": measured,
                "target": f"{symbol} {self.fmt(self.limit)}", "verdict": "PASS" if self.passed else "FAIL"}


def targets_table(checks: list[dict[str, Any]]) -> str:
    """The Markdown table of every checked figure: figure, measured, target, verdict."""
    return markdown_table(["§", "Figure", "Measured", "Target", "Verdict"],
                          [(c["section"], c["figure"], c["measured"], c["target"], c["verdict"]) for c in checks])
