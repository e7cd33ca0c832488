"""How much each section does: a full run, or ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass

from tools.bench.fanout import DEFAULT_FANOUT_LEVELS, FANOUT_TOKENS, QUICK_FANOUT_LEVELS, QUICK_FANOUT_TOKENS


@dataclass(slots=True, kw_only=True)
class Plan:
    ttft_rounds: int
    identical_rounds: int
    cancel_trials: int
    throughput_requests: int
    throughput_concurrency: int
    throughput_rounds: int
    fanout_levels: tuple[int, ...]
    fanout_tokens: int
    fanout_repeats: int

    @classmethod
    def make(cls, *, quick: bool) -> Plan:
        if quick:
            return cls(ttft_rounds=5, identical_rounds=1, cancel_trials=2, throughput_requests=200,
                       throughput_concurrency=16, throughput_rounds=1, fanout_levels=QUICK_FANOUT_LEVELS,
                       fanout_tokens=QUICK_FANOUT_TOKENS, fanout_repeats=1)
        return cls(ttft_rounds=30, identical_rounds=3, cancel_trials=10, throughput_requests=2000,
                   throughput_concurrency=32, throughput_rounds=2, fanout_levels=DEFAULT_FANOUT_LEVELS,
                   fanout_tokens=FANOUT_TOKENS, fanout_repeats=3)
