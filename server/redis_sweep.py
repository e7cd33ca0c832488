"""The sweep: answers left ``streaming`` by an instance that is gone end ``interrupted``.

Instances that share a database through Redis do not mark every ``streaming``
row at start (other live instances are streaming some of them). Each such row
names its owner, the instance streaming it (:meth:`Store.begin_turn`), and
every instance runs this sweep once per lease:

1. one indexed query: the owners of the rows still ``streaming``
   (:meth:`Store.streaming_owners`; a partial index holds only those rows);
2. one Redis round trip: whether each owner's heartbeat (``Pinst:I``) is still
   there, beside this instance's own;
3. an owner missing at two sweeps in a row is gone: its rows are marked
   ``interrupted`` with the text that reached the flight's Redis log (or, when
   the log has expired, the text of the row's last checkpoint), each by one
   conditional update (:meth:`Store.interrupt_turn`), so of the instances
   sweeping at once exactly one writes it.

Why two sweeps: a Redis restarted empty, or a failover, loses every heartbeat
until the instances beat again (every quarter lease); an owner is judged only
when it stayed missing a whole sweep interval (a lease) later, and a round in
which this instance's own heartbeat is missing judges nobody. A row that names
no owner (written without Redis, or by an older version) is swept the same way.

So a leader killed with no listener elsewhere (nobody mirrors its flight, so no
mirror sees its lease lapse) has its row ``interrupted`` within about three
leases: its heartbeat lapses after one, and it must be missing at two sweeps.

Without Redis the database has one writer, which marks every ``streaming`` row
at its start instead (``recover``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .metrics import Metrics
from .store import Store

__all__ = ["Sweeper", "log_text"]

log = logging.getLogger(__name__)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def log_text(redis: aioredis.Redis, prefix: str, stream_id: str) -> tuple[str, int] | None:
    """The answer text in the Redis log of flight ``stream_id`` and its count of deltas;
    None when the log is gone (expired) or never had an entry."""
    key = await redis.get(f"{prefix}stream:{stream_id}")
    if key is None:
        return None
    entries: Any = await redis.xrange(f"{prefix}{{{_decode(key)}}}:{stream_id}:log")
    if not entries:
        return None
    parts: list[str] = []
    deltas = 0
    for _, fields in entries:
        kind, data = _decode(fields[b"k"]), _decode(fields[b"d"])
        if kind == "t":
            parts.append(data)
        elif kind == "x":
            parts.append(orjson.loads(data)["text"])
        else:
            continue
        deltas += 1
    return "".join(parts), deltas


class Sweeper:
    """The sweep of one instance (see the module's docstring)."""

    def __init__(self, *, redis: aioredis.Redis, store: Store, metrics: Metrics, prefix: str, instance: str,
                 interval_s: float) -> None:
        self.redis = redis
        self.store = store
        self.metrics = metrics
        self.prefix = prefix
        self.instance = instance
        self.interval_s = interval_s
        #: the owners missing at the last sweep
        self._missing: set[str | None] = set()

    async def run(self) -> None:
        """Sweep every ``interval_s`` until cancelled; a failed round is logged and skipped."""
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or the database not answering: the next round tries again
                log.warning("the sweep of answers left streaming failed: %s: %s", exc.__class__.__name__, exc)
            await asyncio.sleep(self.interval_s)

    async def sweep(self) -> list[str]:
        """One round: the ids of the answers it marked ``interrupted``."""
        owners = [o for o in await self.store.streaming_owners() if o != self.instance]
        if not owners:
            self._missing = set()
            return []
        named = [o for o in owners if o is not None]
        async with self.redis.pipeline(transaction=False) as pipe:
            for inst in (self.instance, *named):
                pipe.exists(f"{self.prefix}inst:{inst}")
            beats = await pipe.execute()
        if not beats[0]:  # this instance's own heartbeat is missing: Redis lost its keys, judge nobody
            self._missing = set()
            return []
        missing: set[str | None] = {o for o, up in zip(named, beats[1:], strict=True) if not up}
        if None in owners:
            missing.add(None)
        gone, self._missing = missing & self._missing, missing
        if not gone:
            return []
        swept = []
        for message_id in await self.store.streaming_answers(list(gone)):
            try:
                found = await log_text(self.redis, self.prefix, message_id)
            except RedisError:
                found = None
            text, deltas = found if found is not None else (None, 0)
            if await self.store.interrupt_turn(message_id=message_id, content=text, deltas=deltas):
                swept.append(message_id)
        if swept:
            self.metrics.swept.inc(len(swept))
            log.warning("marked %d answer(s) interrupted: the instance streaming them is gone (%s)",
                        len(swept), ", ".join(sorted(str(o) for o in gone)))
        return swept
