"""How much each section does: a full run, or ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass

from tools.bench.fanout import DEFAULT_FANOUT_LEVELS, FANOUT_TOKENS, QUICK_FANOUT_LEVELS, QUICK_FANOUT_TOKENS
from tools.bench.memory import Soak


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
    soak: Soak

    @classmethod
    def make(cls, *, quick: bool) -> Plan:
        if quick:
            return cls(ttft_rounds=10, identical_rounds=1, cancel_trials=3, throughput_requests=200,
                       throughput_concurrency=16, throughput_rounds=1, fanout_levels=QUICK_FANOUT_LEVELS,
                       fanout_tokens=QUICK_FANOUT_TOKENS, fanout_repeats=1,
                       soak=Soak(requests=300, warmup=40, ttl_s=0.5, margin_s=0.5))
        return cls(ttft_rounds=300, identical_rounds=3, cancel_trials=30, throughput_requests=2000,
                   throughput_concurrency=32, throughput_rounds=3, fanout_levels=DEFAULT_FANOUT_LEVELS,
                   fanout_tokens=FANOUT_TOKENS, fanout_repeats=1, soak=Soak(requests=10_000, warmup=200, ttl_s=2.0))
