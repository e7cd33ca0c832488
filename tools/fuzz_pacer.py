"""Fuzz the provider slots shared on Redis: two instances' pacers, many callers, random timing.

``python -m tools.fuzz_pacer [--seeds 20] [--calls 600] [--fail] [--redis-url redis://127.0.0.1:6379/0]``

Each seed runs ``--calls`` calls of one provider (limit 3) through two
:class:`~server.redis_pacer.RedisPacer` s on their own connections, as two
instances would. The calls pick an instance and one of three orgs at random,
hold their slot 0-50 ms, and have queue timeouts of 50 ms to 2 s; a third are
cancelled at a random moment (their client went away); some take their slot
ahead, as a new flight's leader does. Every script call is delayed at random
before and after Redis runs it, so the replies of the two connections of an
instance come in every order. With ``--fail``, 3% of the polls fail: half
before Redis ran them, half after (the answer lost).

The lease is 30 s, far longer than a run: a slot or a queue place left to
someone who no longer waits would still be there at the end. Checked:

- the calls inside a slot, and the slots held on Redis, never exceed the limit;
- every call ends (served, 503 for its queue timeout or for Redis, or cancelled);
- at the end, Redis holds no slot, no waiter and no org queue, and neither
  instance holds any waiter or poller.

It prints a line per seed and exits 1 when any seed broke a check. The suite
runs a short form (``tests/test_redis_pacer.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import redis_pacer
from server.errors import QueueFull, RegistryUnavailable
from server.redis_pacer import RedisPacer
from tools._common import progress

PROVIDER = "prov"
LIMIT = 3
LEASE_S = 30.0
ORGS = ("a", "b", "c")
QUEUE_TIMEOUTS_S = (0.05, 0.1, 0.2, 0.4, 2.0)


@dataclass
class Report:
    seed: int
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("served", "queue_full", "redis_failed", "cancelled", "taken_ahead", "polls_failed"), 0))
    most_inside: int = 0
    most_held_on_redis: int = 0
    left_on_redis: dict[str, int] = field(default_factory=dict)
    left_here: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def broken(self) -> list[str]:
        found = list(self.errors)
        if self.most_inside > LIMIT:
            found.append(f"{self.most_inside} calls ran inside a slot at once (limit {LIMIT})")
        if self.most_held_on_redis > LIMIT:
            found.append(f"{self.most_held_on_redis} slots held on Redis at once (limit {LIMIT})")
        found += [f"{n} {what} left on Redis" for what, n in self.left_on_redis.items() if n]
        found += self.left_here
        return found

    def line(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.outcomes.items())
        verdict = "ok" if not self.broken else "BROKEN: " + "; ".join(self.broken)
        return (f"seed {self.seed}: {counts}; most inside {self.most_inside}, most held on Redis "
                f"{self.most_held_on_redis}: {verdict}")


def _shaken(script: Any, rnd: random.Random, report: Report, fail: bool) -> Any:
    """``script`` (a pacer's registered script) with random delays around Redis, and failures."""

    async def call(*, keys: list[str], args: list[Any]) -> Any:
        if rnd.random() < 0.5:
            await asyncio.sleep(rnd.uniform(0, 0.03))
        if fail and rnd.random() < 0.03:
            report.outcomes["polls_failed"] += 1
            if rnd.random() < 0.5:
                await script(keys=keys, args=args)  # Redis ran it; its answer is lost
            raise RedisConnectionError("injected: connection reset")
        got = await script(keys=keys, args=args)
        if rnd.random() < 0.2:
            await asyncio.sleep(rnd.uniform(0, 0.03))
        return got

    return call


async def run(seed: int, *, calls: int, fail: bool, redis_url: str, prefix: str | None = None) -> Report:
    """One seed (see the module); Redis keys under a prefix of its own, deleted at the end."""
    rnd = random.Random(seed)
    report = Report(seed)
    prefix = prefix or f"dac_fuzz_{secrets.token_hex(4)}:"
    clients = [aioredis.Redis.from_url(redis_url, protocol=2) for _ in range(3)]
    admin = clients[2]
    pacers = [RedisPacer(c, prefix=prefix, lease_s=LEASE_S, queue_timeout_s=1.0) for c in clients[:2]]
    for pacer in pacers:
        pacer._queue = _shaken(pacer._queue, rnd, report, fail)  # type: ignore[method-assign]
        pacer._leave = _shaken(pacer._leave, rnd, report, False)  # type: ignore[method-assign]
    key = pacers[0].key(PROVIDER)
    inside = 0
    sampling = True

    async def one_call() -> None:
        nonlocal inside
        pacer = rnd.choice(pacers)
        if rnd.random() < 0.1:
            ahead = pacer.ahead(PROVIDER, LIMIT)
            if ahead is not None:
                reply = await admin.execute_command(*ahead.command)
                report.outcomes["taken_ahead"] += bool(reply)
                pacer.taken(ahead, reply, use=rnd.random() < 0.8)
        if rnd.random() < 0.3:  # its client goes away at a random moment (not between ahead and slot)
            asyncio.get_running_loop().call_later(rnd.uniform(0, 0.3), asyncio.current_task().cancel)
        pacer.queue_timeout_s = rnd.choice(QUEUE_TIMEOUTS_S)
        try:
            async with pacer.slot(PROVIDER, LIMIT, org=rnd.choice(ORGS)):
                inside += 1
                report.most_inside = max(report.most_inside, inside)
                try:
                    await asyncio.sleep(rnd.uniform(0, 0.05))
                finally:
                    inside -= 1
            report.outcomes["served"] += 1
        except QueueFull:
            report.outcomes["queue_full"] += 1
        except RegistryUnavailable:
            report.outcomes["redis_failed"] += 1
        except asyncio.CancelledError:
            report.outcomes["cancelled"] += 1

    async def sample() -> None:
        while sampling:
            report.most_held_on_redis = max(report.most_held_on_redis, await admin.zcard(key))
            await asyncio.sleep(0.005)

    try:
        await admin.script_load(redis_pacer._TAKE)  # slots taken ahead are an EVALSHA
        sampler = asyncio.ensure_future(sample())
        tasks = []
        for _ in range(calls):
            tasks.append(asyncio.ensure_future(one_call()))
            await asyncio.sleep(rnd.uniform(0, 0.01))
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*tasks, return_exceptions=True)
                while any(lane.poller is not None for p in pacers for lane in p._lanes.values()) \
                        or any(p._returning for p in pacers):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            report.errors.append(f"{sum(not t.done() for t in tasks)} calls, or a poll, did not end within 60 s")
        sampling = False
        await sampler
        report.left_on_redis = {
            "slots held": await admin.zcard(key),
            "waiters": await admin.zcard(f"{key}:waiting"),
            "org turns": await admin.llen(f"{key}:orgs"),
            "org queues": len(await admin.keys(f"{key}:q:*")),
        }
        for n, pacer in enumerate(pacers):
            for name, lane in pacer._lanes.items():
                state = {"running": lane.running, "waiting": lane.waiting, "waiters": len(lane.waiters),
                         "kept": len(lane.kept), "leaving": len(lane.leaving), "fresh": len(lane.fresh)}
                report.left_here += [f"instance {n}, {name}: {v} {k} left" for k, v in state.items() if v]
    finally:
        keys = await admin.keys(f"{prefix}*")
        if keys:
            await admin.delete(*keys)
        for client in clients:
            await client.aclose()
    return report


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds (runs), from --first")
    parser.add_argument("--first", type=int, default=1, help="the first seed")
    parser.add_argument("--calls", type=int, default=600, help="calls per seed")
    parser.add_argument("--fail", action="store_true", help="3%% of the polls fail (before or after Redis ran them)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    broken = 0
    for seed in range(args.first, args.first + args.seeds):
        progress(f"seed {seed}: {args.calls} calls{' with failing polls' if args.fail else ''} ...")
        report = await run(seed, calls=args.calls, fail=args.fail, redis_url=args.redis_url)
        print(report.line(), flush=True)
        broken += bool(report.broken)
    print(f"{args.seeds - broken} of {args.seeds} seeds kept every check", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
