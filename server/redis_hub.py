"""Flights on Redis: the :class:`~server.registry.FlightRegistry` that several instances share.

Every instance keeps its local flights in the in-process :class:`~server.hub.Hub`
maps (so local fan-out, replay, snapshots and ``Last-Event-ID`` are the hub's),
and this registry adds what makes the instances act as one:

- **Leadership.** ``submit`` runs one script on the flight's ``lead`` key:
  ``SET NX PX`` with the value ``running|S|I`` (``S`` the stream id, ``I`` the
  instance). The winner runs the flight; the value is its fencing token: the
  lease is renewed (every quarter lease) and the log appended to only by scripts
  that first check that the key still holds it, so a leader that lost its lease
  can neither renew nor write.
- **The log.** The leader's deltas go to its local log as always and to a Redis
  Stream: what was appended in one loop turn leaves in one script call (one round
  trip); while a call is out, what arrives waits for the next one. While no other
  instance holds the flight, the entries wait up to ``QUIET_FLUSH_S`` and leave
  together (the end at once); an instance that starts holding it says so on
  ``ctl``, and what waits leaves at once.
- **Mirrors.** Every other instance that has a client for the flight runs one
  reader (``XREAD BLOCK``) that appends the stream to a local
  :class:`MirrorFlight`, whose log serves its clients. Redis work grows with the
  instances, not with the clients.
- **Holders.** An instance holds a flight while it has listeners (or a mode-3
  promise) for it. A mirror reports only the changes between holding and not
  (``HSET`` in the flight's ``holders`` hash and a message on the leader's
  ``ctl`` channel), so a burst of clients costs no Redis call beyond the first.
  The leader adds the other holders to its own listeners (:meth:`Flight.set_remote`)
  and aborts upstream once none is left for the grace. At each renewal it reads
  the hash again and, when only other instances hold the flight, drops those
  whose heartbeat (``inst:I``) has lapsed.
- **Outcomes.** The end is the log's last entry, written by the same script that
  turns ``lead`` into ``done|S|I`` for the result TTL or ``failed|S|I`` for the
  error TTL. Any instance answers an identical request from there (``cache``),
  rebuilding the answer from the stream. An outcome no request may take (a
  cancelled flight, an answer that is not ``reusable`` or larger than
  ``DAC_CACHE_MAX_BYTES``, a failure to save the answer) deletes ``lead``
  instead, and the flight's other keys then stay only for the lease, for the
  mirrors still reading the log; nothing answers from it, as in one process.
- **Leader loss.** A mirror whose stream stays quiet looks at ``lead`` every
  quarter lease; once it no longer holds the leader's token and the stream has
  no end, the leader is gone: the mirror's clients get a retryable
  ``leader_lost`` and the row is marked ``interrupted`` with the text that reached
  the log, by a conditional update (:meth:`Store.interrupt_turn`) that only one
  instance wins. A flight nobody else mirrors is found by the sweep instead: its
  row names this instance as owner, and rows whose owner's heartbeat stays gone
  are marked the same way (:mod:`server.redis_sweep`). The leader's own writes to
  its row are fenced by that owner (:attr:`Flight.owner`).
- **Across instances.** A Stop call for a listener held elsewhere is handed over
  on ``Pstops``; a deleted thread is announced on ``Pthreads``.
- **Redis down.** A leader whose append or renewal fails cuts its upstream and
  ends with a retryable ``registry_unavailable`` (its row is saved as ``error``);
  a mirror whose read fails ends its clients the same way; a request that cannot
  reach Redis gets 503. redis-py reconnects on the next command; the ``ctl``
  subscription and the heartbeat retry on their own.

Keys (``P`` the prefix, ``k`` the coalesce key, or the stream id for a flight
that is never shared; ``{k}`` is a hash tag, so a flight's keys share one
Redis Cluster slot; the scripts touch only keys of that slot)::

    P{k}:lead          string  running|S|I (PX lease) · done|S|I (PX result TTL) · failed|S|I (PX error TTL)
    P{k}:S:meta        hash    turn: the request and the drafted rows, for mirrors and resumes
    P{k}:S:log         stream  k=a (rows written) · k=t d=TEXT (a delta) · k=d d=MESSAGE · k=e d=ERROR
    P{k}:S:holders     hash    instance -> 1|0
    Pstream:S          string  k (find a flight by its stream id)
    Pinst:I            string  instance heartbeat (PX lease)
    Pctl:I             channel "S I2 1|0[ stop]" to the leader instance I
    Pthreads           channel "I thread org": instance I deleted that thread (every instance listens)
    Pstops             channel "I S token org": a Stop call instance I got for a listener it does not hold

Every key expires: the flight's after the lease plus the longer TTL, renewed
while it runs (after the lease alone once it ended with ``lead`` deleted).

Who writes what: ``lead``, ``log`` and ``meta`` only the leader (through the
scripts); ``holders`` each instance its own field; the local maps as in the
hub (everything on the event loop).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from .config import Settings
from .errors import GatewayError, LeaderLost, RegistryUnavailable, ShuttingDown, UpstreamError
from .eventlog import DeltaExtra, EventLog
from .flight import Clock, Flight, TurnRequest
from .hub import Hub
from .limits import OrgLimits
from .metrics import Metrics
from .pacer import Slots
from .providers import Provider
from .redis_pacer import RedisPacer
from .redis_sweep import Sweeper
from .registry import RegistryOpenError
from .states import DropReason, FlightState, MessageStatus, Role
from .store import Message, Store

__all__ = ["MirrorFlight", "RedisHub", "RegistryOpenError", "connect"]

log = logging.getLogger(__name__)

#: entries one mirror read takes at most
READ_COUNT = 1000
#: entries one append script carries at most (the rest go in the next call)
APPEND_BATCH = 512
#: while no other instance holds a flight, its entries reach the stream at most this late, many
#: in one call (an instance that starts holding it says so on ctl and gets them at once)
QUIET_FLUSH_S = 0.05
#: flights whose ctl messages are kept until this instance learns it leads them (the oldest go)
EARLY_CTL = 64

# KEYS[1] lead. ARGV: base "P{k}:", value "running|S|I", lease ms, no_cache, turn JSON, instance,
# ctl prefix, keep ms. Returns {value} when this call leads, else {current value, its turn, its log
# entries when it has ended}. A running flight found here is held by the caller's instance at once (the
# holders hash, made here, expires even if the leader never renews it).
_LEAD = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local state, s, inst = string.match(cur, '^(%a+)|([^|]+)|(.+)$')
  local base = ARGV[1] .. s
  if state == 'running' then
    redis.call('HSET', base .. ':holders', ARGV[6], '1')
    redis.call('PEXPIRE', base .. ':holders', ARGV[8], 'NX')
    redis.call('PUBLISH', ARGV[7] .. inst, s .. ' ' .. ARGV[6] .. ' 1')
    return {cur, redis.call('HGET', base .. ':meta', 'turn')}
  end
  if not (state == 'done' and ARGV[4] == '1') then
    local turn = redis.call('HGET', base .. ':meta', 'turn')
    if turn then
      return {cur, turn, redis.call('XRANGE', base .. ':log', '-', '+')}
    end
  end
end
local s = string.match(ARGV[2], '^running|([^|]+)|')
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', ARGV[1] .. s .. ':meta', 'turn', ARGV[5])
redis.call('PEXPIRE', ARGV[1] .. s .. ':meta', ARGV[8])
return {ARGV[2]}
"""

# KEYS[1] lead, KEYS[2] log, and with the end the flight's other keys (meta, holders). ARGV: fence,
# keep ms (of every key after the lead), end value ('' none, '-' delete), end ms, then kind, data
# pairs. 0 (nothing written) when the lead is no longer the fence's.
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 5, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '*', 'k', ARGV[i], 'd', ARGV[i + 1])
end
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
if ARGV[3] == '-' then
  redis.call('DEL', KEYS[1])
elseif ARGV[3] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return 1
"""

# KEYS: lead, meta, log, holders. ARGV: fence, lease ms, keep ms. The holders hash, or false
# (nil) when the lease is no longer the fence's.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
local h = redis.call('HGETALL', KEYS[4])
table.insert(h, 1, 'ok')
return h
"""

# KEYS[1] lead. ARGV: base, S. {current lead value or '', turn} of the flight S, or false.
_FIND = """
local turn = redis.call('HGET', ARGV[1] .. ARGV[2] .. ':meta', 'turn')
if not turn then return false end
return {redis.call('GET', KEYS[1]) or '', turn}
"""


def connect(settings: Settings) -> aioredis.Redis:
    """A client for ``DAC_REDIS_URL``: no retries (a failure is reported, not hidden), timeouts
    above the longest blocking read."""
    assert settings.redis_url is not None
    lease = settings.redis_lease_s
    return aioredis.Redis.from_url(
        settings.redis_url, protocol=2, socket_connect_timeout=min(2.0, lease),
        socket_timeout=lease + 1.0, retry=Retry(NoBackoff(), 0), health_check_interval=0)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(fields: Any) -> tuple[str, str]:
    """An entry's kind and data, from a parsed reply (a dict) or a script's (a flat list)."""
    if not isinstance(fields, dict):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return _decode(fields[b"k"]), _decode(fields[b"d"])


@dataclass(eq=False)
class _Led:
    """A flight this instance leads: its keys, its fencing token, the other holders."""

    flight: Flight
    lead: str
    base: str  # P{k}:S
    fence: str
    holders: dict[str, bool] = field(default_factory=dict)
    queue: list[str] = field(default_factory=list)
    end: tuple[str, int, str, str] | None = None  # lead value, its ms, kind, data
    ended: bool = False
    flushing: asyncio.Task[None] | None = None
    scheduled: asyncio.Handle | None = None
    quiet: bool = False  # ``scheduled`` is the quiet flush's timer
    renewing: asyncio.Task[None] | None = None


class _SharedLog(EventLog):
    """The leader's log: every delta also goes to the flight's Redis stream."""

    def __init__(self, *, capacity: int, ping_interval_s: float | None, publish: Callable[[str, str], None]) -> None:
        super().__init__(capacity=capacity, ping_interval_s=ping_interval_s)
        self._publish = publish

    def append(self, text: str, extra: DeltaExtra | None = None) -> int:
        seq = super().append(text, extra)
        if extra:  # reasoning, refusals, tool calls: the delta whole, as JSON
            self._publish("x", orjson.dumps({"text": text, "extra": extra}).decode())
        else:
            self._publish("t", text)
        return seq


class MirrorFlight(Flight):
    """A flight another instance leads, mirrored here: its log is filled from the Redis stream.

    Its listeners and promises are counted as for any flight; what reaches
    Redis is only whether this instance holds it or not (see :class:`RedisHub`).
    It has no leader task: it ends with the entry that ends the stream, or
    with ``leader_lost``, ``registry_unavailable`` or ``shutting_down``.
    """

    def __init__(self, turn: TurnRequest, *, hub: RedisHub, drafts: tuple[Message, Message], base: str,
                 lead: str, fence: str, held: bool) -> None:
        super().__init__(turn, settings=hub.settings, store=hub.store, pacer=hub.pacer, metrics=hub.metrics,
                         clock=hub.clock, on_end=hub.mirror_ended, drafts=drafts)
        self._hub = hub
        self.base = base
        self.lead_key = lead
        self.fence = fence
        #: what Redis was last told: does this instance hold the flight
        self.held = held
        self.want: tuple[bool, bool] | None = None  # (held, stopped) not sent yet
        self.reporting: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None

    # -- holding: only the changes reach Redis ---------------------------------

    def _holding(self) -> bool:
        return self.running and (self.listeners - self.stopping > 0 or self._live_promises())

    def _sync(self, *, stopped: bool = False) -> None:
        holding = self._holding()
        if holding != self.held:
            self.held = holding
            self._hub.report(self, holding, stopped=stopped)

    def add_listener(self, *, attach: str | None = None) -> None:
        super().add_listener(attach=attach)
        self._sync()

    def remove_listener(self, *, stopped: bool = False) -> None:
        super().remove_listener(stopped=stopped)
        self._sync()  # at once: the leader applies the grace

    def expect_attach(self) -> str:
        token = super().expect_attach()
        self._sync()
        return token

    def stop_listener(self, token: str, *, attached: bool) -> bool:
        known = super().stop_listener(token, attached=attached)
        self._sync(stopped=True)
        return known

    def abort(self, reason: DropReason) -> None:
        """The local timers' end: this instance no longer holds the flight (the leader
        decides); at shutdown the mirror's clients are told and it ends."""
        self._idle_handle = None
        if reason is DropReason.SHUTDOWN:
            self.cut(ShuttingDown("the server shut down before the answer was complete"))
            return
        self._sync(stopped=reason is DropReason.CLIENT_STOP)

    # -- the stream's entries --------------------------------------------------

    def apply(self, kind: str, data: str) -> bool:
        """One entry of the leader's stream; True once it ended the flight."""
        if self.finished.is_set():
            return True
        if kind == "t":
            if self.first_text_at is None:
                self.first_text_at = time.perf_counter()
            self.log.append(data)
        elif kind == "x":
            delta = orjson.loads(data)
            if delta["text"] and self.first_text_at is None:
                self.first_text_at = time.perf_counter()
            self.log.append(delta["text"], delta["extra"])
        elif kind == "a":
            self._accept()
        elif kind == "d":
            self.message = orjson.loads(data)
            self._settle(MessageStatus.COMPLETE, None)
            return True
        elif kind == "e":
            end = orjson.loads(data)
            body = end["error"]
            cls = UpstreamError if end.get("upstream") else GatewayError
            error = cls(body["message"], type=body["type"], status=end.get("status", 500),
                        retryable=body.get("retryable", False), retry_after=body.get("retry_after"))
            self.message = end.get("message")
            self._settle(MessageStatus(end.get("outcome", MessageStatus.ERROR)), error)
            return True
        return False

    def cut(self, error: GatewayError) -> None:
        """End the mirror here with ``error`` (its leader or Redis is gone, or this instance stops)."""
        if self.finished.is_set():
            return
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
        if self.message is not None:
            self.message = {**self.message, "status": MessageStatus.INTERRUPTED, "content": self.log.text()}
        self._settle(MessageStatus.INTERRUPTED, error)


class RedisHub(Hub):
    """The shared :class:`~server.registry.FlightRegistry`: local maps as in :class:`Hub`, on Redis."""

    def __init__(self, *, settings: Settings, store: Store, pacer: Slots, metrics: Metrics,
                 providers: Callable[[str], Provider], redis: aioredis.Redis,
                 clock: Clock = time.monotonic, instance: str | None = None,
                 limits: OrgLimits | None = None) -> None:
        super().__init__(settings=settings, store=store, pacer=pacer, metrics=metrics, clock=clock, limits=limits)
        self.redis = redis
        self._providers = providers
        self.instance = instance or secrets.token_hex(6)
        self.prefix = settings.redis_prefix
        lease = settings.redis_lease_s
        self.lease_ms = int(lease * 1000)
        #: how often a leader renews, a mirror looks at the lead, an instance beats
        self.tick_s = lease / 4
        self.keep_ms = self.lease_ms + int(max(settings.result_ttl_s, settings.error_ttl_s) * 1000) + 1000
        self._lead_script = redis.register_script(_LEAD)
        self._append_script = redis.register_script(_APPEND)
        self._renew_script = redis.register_script(_RENEW)
        self._find_script = redis.register_script(_FIND)
        self._deciding: dict[str, asyncio.Future[None]] = {}
        self._led: dict[str, _Led] = {}  # stream id -> a flight this instance leads
        #: ctl messages about a flight not led here (yet): another instance may join the flight,
        #: and say so, before the answer that made this instance its leader is read here
        self._early: OrderedDict[str, list[str]] = OrderedDict()
        self._background: list[asyncio.Task[None]] = []
        self._flushes: set[asyncio.Task[None]] = set()  # appends in flight (the last ones at shutdown)
        self.ctl_ready = asyncio.Event()  # the ctl channel is subscribed (tests wait for it)
        #: takes the Stop calls other instances hand over (the turn service's, see serve_stops)
        self._stop_handler: Callable[[str, str, str], Awaitable[bool]] | None = None
        self._stops: set[asyncio.Future[bool]] = set()
        #: marks the answers of instances that are gone interrupted (see :mod:`server.redis_sweep`)
        self.sweeper = Sweeper(redis=redis, store=store, metrics=metrics, prefix=self.prefix, instance=self.instance,
                               interval_s=lease)

    @property
    def engine(self) -> str:
        return "redis"

    def _ctl(self, instance: str) -> str:
        return f"{self.prefix}ctl:{instance}"

    @property
    def _threads_channel(self) -> str:
        return f"{self.prefix}threads"

    @property
    def _stops_channel(self) -> str:
        return f"{self.prefix}stops"

    async def open(self) -> None:
        """Check that Redis answers (else :class:`RegistryOpenError`), then beat and listen."""
        try:
            async with asyncio.timeout(self.settings.redis_lease_s + 1):
                await self.redis.ping()
                await self._beat_once()
                await self._load_scripts()
        except (RedisError, OSError, TimeoutError) as exc:
            await self.redis.aclose()
            raise RegistryOpenError(f"DAC_REDIS_URL: cannot use Redis at {self.settings.redis} "
                                    f"({exc.__class__.__name__}: {exc})") from None
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._beat(), name="redis-heartbeat"),
                            loop.create_task(self._listen(), name="redis-ctl"),
                            loop.create_task(self.sweeper.run(), name="redis-sweep")]

    async def _load_scripts(self) -> None:
        """Load the scripts the pipelines run by EVALSHA (at start, and again after Redis lost them)."""
        scripts = [self._lead_script, self._append_script, self._renew_script, self._find_script]
        if isinstance(self.pacer, RedisPacer):
            scripts += self.pacer.scripts
        async with self.redis.pipeline(transaction=False) as pipe:
            for script in scripts:
                pipe.script_load(script.script)
            await pipe.execute()

    async def _piped(self, build: Callable[[Pipeline], object]) -> list[Any]:
        """The commands ``build`` puts in a pipeline, in one round trip. Scripts go by EVALSHA
        (redis-py's own script calls in a pipeline first ask ``SCRIPT EXISTS``: one more round
        trip); when Redis lost them (a restart) they are loaded and the whole pipeline sent again."""
        for attempt in (0, 1):
            async with self.redis.pipeline(transaction=False) as pipe:
                build(pipe)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                await self._load_scripts()
                continue
            break
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def close(self) -> None:
        """After :meth:`shutdown`: let the flights' last entries reach Redis, then disconnect."""
        await asyncio.sleep(0)  # the ends scheduled by the shutdown start their appends
        if self._flushes:
            await asyncio.wait(self._flushes, timeout=self.settings.redis_lease_s)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await self.redis.delete(f"{self.prefix}inst:{self.instance}")
        except RedisError:
            pass
        await self.redis.aclose()

    # -- joining -----------------------------------------------------------

    async def submit(self, turn: TurnRequest, *, listen: bool) -> tuple[Flight, Role]:
        if self._closing:
            raise ShuttingDown("the server is shutting down; try again shortly")
        while True:
            local = self._lookup(turn)
            if local is not None:
                return self.join(turn, listen=listen)
            pending = self._deciding.get(turn.key) if turn.key is not None else None
            if pending is None:
                break
            await asyncio.shield(pending)  # this instance is asking Redis for that key: take its answer
        key = turn.key
        decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key is not None:
            self._deciding[key] = decided
        try:
            flight, role = await self._decide(turn)
        finally:
            if key is not None:
                del self._deciding[key]
            decided.set_result(None)
        if listen:
            flight.add_listener()
        return flight, role

    async def accept(self, turn: TurnRequest) -> tuple[Flight, Role, str | None]:
        flight, role = await self.submit(turn, listen=False)
        return flight, role, flight.expect_attach() if flight.running else None

    async def _decide(self, turn: TurnRequest) -> tuple[Flight, Role]:
        """Lead, follow or take the result, as Redis says: one script, one round trip."""
        candidate = Flight(turn, settings=self.settings, store=self.store, pacer=self.pacer,
                           metrics=self.metrics, clock=self.clock, on_end=self._led_ended)
        s_id = candidate.stream_id
        k = turn.key or s_id
        base = f"{self.prefix}{{{k}}}:"
        lead = base + "lead"
        fence = f"running|{s_id}|{self.instance}"
        described = orjson.dumps({
            "org_id": turn.org_id, "thread_id": turn.thread_id, "content": turn.content,
            "provider": turn.provider.name, "model": turn.model, "key": turn.key, "reusable": turn.reusable,
            "user": candidate.user_message, "assistant": candidate.draft,
        })
        # a provider slot asked for in the same round trip: a new leader needs no other before its call
        ahead = self.pacer.ahead(turn.provider.name, turn.provider.max_concurrency) \
            if isinstance(self.pacer, RedisPacer) else None

        def build(pipe: Pipeline) -> None:
            # the decision, the pointer from the stream id (harmless if it loses), the slot
            pipe.evalsha(self._lead_script.sha, 1, lead, base, fence, self.lease_ms,
                         "1" if turn.no_cache else "0", described, self.instance, f"{self.prefix}ctl:", self.keep_ms)
            pipe.set(f"{self.prefix}stream:{s_id}", k, px=self.keep_ms)
            if ahead is not None:
                pipe.execute_command(*ahead.command)

        try:
            replies = await self._piped(build)
        except RedisError as exc:
            raise RegistryUnavailable(f"the flight registry (Redis) does not answer ({exc.__class__.__name__})") \
                from None
        answer = replies[0]
        current = _decode(answer[0])
        if ahead is not None:
            assert isinstance(self.pacer, RedisPacer)
            self.pacer.taken(ahead, replies[2], use=current == fence and not self._closing)
        if self._closing:
            raise ShuttingDown("the server is shutting down; try again shortly")
        if current == fence:
            self._lead(candidate, lead=lead, base=base + s_id, fence=fence)
            return candidate, Role.LEADER
        entries = answer[2] if len(answer) > 2 else None
        mirror = self._mirror(base, lead, current, _decode(answer[1]), entries, held=entries is None)
        if entries is not None and not mirror.finished.is_set():
            await self._lost(mirror)  # an outcome without its end: nothing to answer from
        return mirror, Role.FOLLOWER if mirror.running else Role.CACHE

    async def stream(self, stream_id: str) -> Flight | None:
        flight = self._streams.get(stream_id)
        if flight is not None or self._closing:
            return flight
        try:
            raw = await self.redis.get(f"{self.prefix}stream:{stream_id}")
            if raw is None:
                return None
            base = f"{self.prefix}{{{_decode(raw)}}}:"
            found = await self._find_script(keys=[base + "lead"], args=[base, stream_id])
            if not found:
                return None
            current, described = _decode(found[0]), _decode(found[1])
            entries = None
            if not current.startswith(f"running|{stream_id}|"):
                entries = await self.redis.xrange(f"{base}{stream_id}:log")
        except RedisError as exc:
            raise RegistryUnavailable(f"the flight registry (Redis) does not answer ({exc.__class__.__name__})") \
                from None
        flight = self._streams.get(stream_id)  # found meanwhile by another request
        if flight is not None:
            return flight
        mirror = self._mirror(base, base + "lead", current, described, entries, held=False)
        if entries is not None and not mirror.finished.is_set():
            await self._lost(mirror)  # its leader went without an end
        if mirror.state is FlightState.DONE and not mirror.turn.reusable:
            return None  # an answer no request may take: its log is left only for the mirrors reading it
        return mirror

    # -- leading -------------------------------------------------------------

    def _lead(self, flight: Flight, *, lead: str, base: str, fence: str) -> None:
        led = _Led(flight=flight, lead=lead, base=base, fence=fence)
        self._led[flight.stream_id] = led
        flight.owner = self.instance  # its row names this instance: the sweep and the fenced writes read it
        flight.log = _SharedLog(capacity=self.settings.ring_size, ping_interval_s=self.settings.ping_interval_s,
                                publish=lambda kind, data: self._publish(led, kind, data))
        self._register(flight, flight.start())
        for message in self._early.pop(flight.stream_id, ()):
            self._on_ctl(message)
        loop = asyncio.get_running_loop()
        led.renewing = loop.create_task(self._renew(led), name=f"renew:{flight.stream_id}")
        loop.create_task(self._announce_rows(led))

    async def _announce_rows(self, led: _Led) -> None:
        await led.flight.accepted()
        if led.flight.message is not None and not led.flight.finished.is_set():
            self._publish(led, "a", "")

    def _publish(self, led: _Led, kind: str, data: str) -> None:
        if led.ended:
            return
        led.queue += (kind, data)
        self._schedule(led)

    def _schedule(self, led: _Led, *, now: bool = False) -> None:
        """Have what is queued sent: in the next loop turn while another instance holds the
        flight (or ``now``), else within :data:`QUIET_FLUSH_S`, several deltas in one call."""
        if led.flushing is not None:
            return  # it sends what is queued before it ends
        urgent = now or any(led.holders.values())
        if led.scheduled is not None:
            if not urgent or not led.quiet:
                return
            led.scheduled.cancel()
        loop = asyncio.get_running_loop()
        led.quiet = not urgent
        led.scheduled = loop.call_soon(self._flush_soon, led) if urgent else \
            loop.call_later(QUIET_FLUSH_S, self._flush_soon, led)

    def _flush_soon(self, led: _Led) -> None:
        led.scheduled = None
        led.flushing = task = asyncio.get_running_loop().create_task(self._flush(led))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, led: _Led) -> None:
        """Send what was queued: every loop turn's entries in one script call, in order."""
        try:
            while led.queue or led.end is not None:
                batch, led.queue = led.queue[:2 * APPEND_BATCH], led.queue[2 * APPEND_BATCH:]
                end = ("", 0)
                if not led.queue and led.end is not None:
                    value, ms, kind, data = led.end
                    batch += (kind, data)
                    end, led.end = (value, ms), None
                if end[0]:
                    written = await self._append_end(led, end, batch)
                else:
                    written = await self._append_script(
                        keys=[led.lead, led.base + ":log"], args=[led.fence, self.keep_ms, "", 0, *batch])
                if not written:
                    led.queue.clear()
                    led.end = None
                    led.flight.fail(LeaderLost("this instance lost the lead of the answer (its lease lapsed)"))
                    return
        except RedisError as exc:
            led.queue.clear()
            led.end = None
            led.flight.fail(RegistryUnavailable(
                f"the flight registry (Redis) stopped answering mid-answer ({exc.__class__.__name__})"))
        finally:
            led.flushing = None

    async def _append_end(self, led: _Led, end: tuple[str, int], batch: list[str]) -> Any:
        """The last append: the outcome under ``lead``, and every key of the flight kept for the
        longer TTL; when the lead is deleted (no request may take the outcome), only for the
        lease: the time the mirrors still reading the log take to read its end."""
        keep = self.lease_ms if end[0] == "-" else self.keep_ms
        keys = [led.lead, led.base + ":log", led.base + ":meta", led.base + ":holders"]
        written, _ = await self._piped(lambda pipe: (
            pipe.evalsha(self._append_script.sha, len(keys), *keys, led.fence, keep, *end, *batch),
            pipe.pexpire(f"{self.prefix}stream:{led.flight.stream_id}", keep)))
        return written

    async def _renew(self, led: _Led) -> None:
        """Renew the lease every quarter lease while the flight runs, and count the other holders."""
        flight = led.flight
        lease_ms, keep_ms = self.lease_ms, self.keep_ms
        stream_key = f"{self.prefix}stream:{flight.stream_id}"
        while not flight.finished.is_set():
            try:
                async with asyncio.timeout(self.tick_s):
                    await flight.finished.wait()
                return
            except TimeoutError:
                pass
            try:
                held, _ = await self._piped(lambda pipe: (
                    pipe.evalsha(self._renew_script.sha, 4, led.lead, led.base + ":meta", led.base + ":log",
                                 led.base + ":holders", led.fence, lease_ms, keep_ms),
                    pipe.pexpire(stream_key, keep_ms)))
                if not held:
                    flight.fail(LeaderLost("this instance lost the lead of the answer (its lease lapsed)"))
                    return
                holders = {_decode(held[i]): held[i + 1] == b"1" for i in range(1, len(held), 2)}
                holders.pop(self.instance, None)
                others = [i for i, h in holders.items() if h]
                if others and flight.listeners - flight.stopping == 0:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for inst in others:
                            pipe.exists(f"{self.prefix}inst:{inst}")
                        alive = await pipe.execute()
                    for inst, up in zip(others, alive, strict=True):
                        if not up:
                            holders[inst] = False
            except RedisError as exc:
                flight.fail(RegistryUnavailable(
                    f"the flight registry (Redis) stopped answering mid-answer ({exc.__class__.__name__})"))
                return
            if not flight.finished.is_set():
                led.holders = holders
                flight.set_remote(sum(holders.values()))
                if led.queue and any(holders.values()):
                    self._schedule(led)

    def _led_ended(self, flight: Flight) -> None:
        """A flight this instance led ended: its outcome goes to the stream with the lead's new value."""
        self._finished(flight)
        led = self._led.pop(flight.stream_id, None)
        if led is None:
            return
        if led.renewing is not None:
            led.renewing.cancel()
        s_id = flight.stream_id
        ttl = self._kept_for(flight)  # as one process keeps it
        if flight.state is FlightState.DONE:
            kind, data = "d", orjson.dumps(flight.message).decode()
            value = f"done|{s_id}|{self.instance}" if ttl > 0 else "-"  # "-": nothing answers from it
        else:
            error = flight.error or GatewayError("the answer ended")
            outcome = MessageStatus.ERROR if flight.state is FlightState.FAILED else MessageStatus.CANCELLED
            if flight.message is not None:
                outcome = MessageStatus(flight.message["status"])
            kind = "e"
            data = orjson.dumps({"error": error.to_dict(), "status": error.status, "outcome": outcome,
                                 "upstream": isinstance(error, UpstreamError), "message": flight.message}).decode()
            value = f"failed|{s_id}|{self.instance}" if ttl > 0 else "-"
        led.end = (value, max(int(ttl * 1000), 1), kind, data)
        led.ended = True
        self._schedule(led, now=True)

    # -- mirroring ---------------------------------------------------------------

    def _mirror(self, base: str, lead: str, current: str, described: str, entries: list[Any] | None, *,
                held: bool) -> MirrorFlight:
        """A local flight for another instance's flight ``current`` (its lead value): filled
        from ``entries`` when it has ended, else by a reader."""
        about = orjson.loads(described)
        s_id = about["assistant"]["message_id"]
        turn = TurnRequest(org_id=about["org_id"], thread_id=about["thread_id"], content=about["content"],
                           provider=self._providers(about["provider"]), model=about["model"], key=about["key"],
                           reusable=about.get("reusable", True))
        mirror = MirrorFlight(turn, hub=self, drafts=(about["user"], about["assistant"]), base=base + s_id,
                              lead=lead, fence=current, held=held)
        if entries is not None:
            self._register(mirror, None)
            for _, fields in entries:
                if mirror.apply(*_entry(fields)):
                    break
            return mirror
        mirror.reader = asyncio.get_running_loop().create_task(self._read(mirror), name=f"mirror:{s_id}")
        self._register(mirror, mirror.reader)
        return mirror

    async def _read(self, mirror: MirrorFlight) -> None:
        """The one reader of a remote flight on this instance: its stream into the mirror's log."""
        log_key = mirror.base + ":log"
        last: bytes | str = "0-0"
        block_ms = max(1, int(self.tick_s * 1000))

        async def take(block: int | None) -> bool | None:
            """Apply what the stream has after ``last``: True at its end, None when it had nothing."""
            nonlocal last
            got: Any = await self.redis.xread({log_key: last}, count=READ_COUNT, block=block)  # RESP2: a list
            if not got:
                return None
            for _, entries in got:
                for entry_id, fields in entries:
                    last = entry_id
                    if mirror.apply(*_entry(fields)):
                        return True
            return False

        try:
            while not mirror.finished.is_set():
                ended = await take(block_ms)
                if ended:
                    return
                if ended is not None:
                    continue
                current = await self.redis.get(mirror.lead_key)
                if current is not None and _decode(current) == mirror.fence:
                    continue
                while (ended := await take(None)) is False:  # what it wrote before the lead changed
                    pass
                if ended:
                    return
                await self._lost(mirror)
                return
        except RedisError as exc:
            mirror.cut(RegistryUnavailable(
                f"the flight registry (Redis) stopped answering mid-answer ({exc.__class__.__name__})"))

    async def _lost(self, mirror: MirrorFlight) -> None:
        """The leader vanished: mark the row (one instance wins), then tell this instance's clients."""
        if mirror.turn.thread_id is not None:
            try:
                await self.store.interrupt_turn(message_id=mirror.stream_id, content=mirror.log.text(),
                                                deltas=mirror.log.last_seq)
            except Exception:
                log.exception("could not mark message %s interrupted", mirror.stream_id)
        mirror.cut(LeaderLost("the instance leading this answer stopped before it ended; ask again"))

    def mirror_ended(self, flight: Flight) -> None:
        self._finished(flight)

    def report(self, mirror: MirrorFlight, held: bool, *, stopped: bool = False) -> None:
        """Tell the leader (in order, the latest state only) whether this instance holds ``mirror``."""
        mirror.want = (held, stopped)
        if mirror.reporting is None:
            mirror.reporting = asyncio.get_running_loop().create_task(self._send_reports(mirror))

    async def _send_reports(self, mirror: MirrorFlight) -> None:
        leader = mirror.fence.rsplit("|", 1)[-1]
        try:
            while mirror.want is not None:
                (held, stopped), mirror.want = mirror.want, None
                if not leader:
                    continue
                flag = "1" if held else "0"
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(mirror.base + ":holders", self.instance, flag)
                    pipe.pexpire(mirror.base + ":holders", self.keep_ms, nx=True)  # made by this HSET
                    pipe.publish(self._ctl(leader),
                                 f"{mirror.stream_id} {self.instance} {flag}{' stop' if stopped else ''}")
                    await pipe.execute()
        except RedisError:
            log.warning("could not tell the leader of %s whether this instance holds it", mirror.stream_id)
        finally:
            mirror.reporting = None

    # -- the instance: heartbeat and control channel -----------------------------------

    async def _beat_once(self) -> None:
        await self.redis.set(f"{self.prefix}inst:{self.instance}", "1", px=self.lease_ms)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self._beat_once()
            except RedisError as exc:
                log.warning("instance heartbeat failed: %s", exc)

    async def _listen(self) -> None:
        """Follow this instance's ctl channel (other instances holding or leaving its flights)
        and the threads channel (threads deleted through other instances)."""
        channel = self._ctl(self.instance)
        threads, stops = self._threads_channel.encode(), self._stops_channel.encode()
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(channel, threads, stops)
                    self.ctl_ready.set()
                    while True:
                        message = await pubsub.get_message(timeout=self.tick_s)
                        if message is None:
                            continue
                        if message["channel"] == threads:
                            self._on_thread_deleted(_decode(message["data"]))
                        elif message["channel"] == stops:
                            self._on_stop(_decode(message["data"]))
                        else:
                            self._on_ctl(_decode(message["data"]))
                finally:
                    self.ctl_ready.clear()
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except RedisError as exc:
                log.warning("the ctl channel dropped (%s); subscribing again", exc)
                await asyncio.sleep(self.tick_s)

    async def thread_deleted(self, org_id: str, thread_id: str) -> None:
        self.forget_thread(thread_id)
        try:
            await self.redis.publish(self._threads_channel, f"{self.instance} {thread_id} {org_id}")
        except RedisError as exc:
            log.warning("could not tell the other instances that thread %s was deleted: %s", thread_id, exc)

    def serve_stops(self, stop: Callable[[str, str, str], Awaitable[bool]]) -> None:
        self._stop_handler = stop

    async def stop_elsewhere(self, org_id: str, stream_id: str, token: str) -> bool:
        try:
            await self.redis.publish(self._stops_channel, f"{self.instance} {stream_id} {token} {org_id}")
        except RedisError as exc:
            raise RegistryUnavailable(f"the flight registry (Redis) does not answer ({exc.__class__.__name__})") \
                from None
        return True

    def _on_stop(self, message: str) -> None:
        """A Stop call another instance got: ours to take if the flight is held here."""
        parts = message.split(" ", 3)
        if len(parts) < 4 or parts[0] == self.instance or parts[1] not in self._streams:
            return
        if self._stop_handler is None:
            return
        _, stream_id, token, org_id = parts
        task = asyncio.ensure_future(self._stop_handler(org_id, stream_id, token))
        self._stops.add(task)
        task.add_done_callback(self._stop_done)

    def _stop_done(self, task: asyncio.Future[bool]) -> None:
        self._stops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a Stop call handed over failed: %s", task.exception())

    def _on_thread_deleted(self, message: str) -> None:
        """Another instance deleted a thread: keep nothing of it here either."""
        parts = message.split(" ", 2)
        if len(parts) < 3 or parts[0] == self.instance:
            return
        _, thread_id, org_id = parts
        self.forget_thread(thread_id)
        self.store.forget_thread(org_id, thread_id)

    def _on_ctl(self, message: str) -> None:
        parts = message.split(" ")
        if len(parts) < 3:
            return
        led = self._led.get(parts[0])
        if led is None:
            self._early.setdefault(parts[0], []).append(message)
            while len(self._early) > EARLY_CTL:
                self._early.popitem(last=False)
            return
        flight = led.flight
        led.holders[parts[1]] = parts[2] == "1"
        flight.set_remote(sum(led.holders.values()))
        if led.queue and parts[2] == "1":
            self._schedule(led)  # what waited for a quiet flush, to the new holder at once
        if len(parts) > 3 and parts[3] == "stop" and flight.listeners - flight.stopping + flight.remote == 0:
            flight.abort(DropReason.CLIENT_STOP)

