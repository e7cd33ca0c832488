"""The turn service: the life of one chat request, the same for every HTTP surface.

Both surfaces (``/api`` and ``/v1``) parse their own wire format into a
:class:`~server.flight.TurnRequest`, then hand it here. This module decides
and does the rest, with no HTTP in it:

- **the coalesce policy** (:meth:`TurnService.turn`): which requests share a
  flight. A turn on a thread is keyed by org, thread, provider, model, the new
  user message and any sampling parameters, whichever surface sent it; a
  stateless ``/v1`` call by its whole conversation; an ``Idempotency-Key`` by
  org, surface and key, and the same key sent again with another thread or
  body within the result TTL is refused (422);
- **the lease** (:meth:`TurnService.lease`, :meth:`TurnService.attach`): the
  request joins or leads a flight, is counted as a listener until it leaves,
  and its request record is written once, on the way out, however it ends;
- **holding the status line** (:meth:`Lease.hold`): bounded by one keep-alive
  interval on every surface, so an error before the answer starts leaves with
  its own status;
- **what a subscriber reads** (:meth:`Lease.stream`, :meth:`Lease.deltas`,
  :meth:`TurnService.stored_frames`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Any, Protocol

import orjson

from .config import Settings
from .errors import BadRequest, GatewayError, IdempotencyKeyReused
from .eventlog import Delta, Encoder, Sink, encode_event
from .flight import Flight, TurnRequest, context_budget, message_chars
from .metrics import Metrics, RequestRecord
from .providers import Provider
from .registry import FlightRegistry
from .states import DropReason, MessageStatus, Role
from .store import ChatMessage, Message, Store, random_token

#: the token a Stop call handed to other instances carries when the org stops the whole answer
#: (a listener's token is URL-safe base64: never this)
EVERY_LISTENER = "*"

__all__ = ["EVERY_LISTENER", "EventStream", "Lease", "Surface", "TurnService", "Until", "coalesce_key"]


class Surface(StrEnum):
    """Where a request came in; an ``Idempotency-Key`` is scoped to it."""

    API = "api"
    V1 = "v1"


def coalesce_key(*parts: str) -> str:
    """sha1 over the parts, separated so that no two part lists collide."""
    digest = hashlib.sha1()
    for part in parts:
        encoded = part.encode()
        digest.update(b"%d:" % len(encoded))
        digest.update(encoded)
    return digest.hexdigest()


def _digest(value: Any) -> str:
    """A stable hash of a JSON value (keys sorted); empty for an empty value."""
    if not value:
        return ""
    return hashlib.sha1(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


class EventStream(Sink, Protocol):
    """A subscriber's SSE connection: awaited writes for replay, pushes at the live edge."""

    async def write(self, data: bytes) -> None:
        """Write and wait until the transport takes it; a client that takes nothing for
        the send timeout is dropped (``TimeoutError``)."""


class Until(StrEnum):
    """What a surface holds its status line for (at most one keep-alive interval)."""

    #: the turn is accepted: its rows are written, so the stream can name stored messages (/api)
    ACCEPTED = "accepted"
    #: the first output (answer text, reasoning, a tool call...), so an upstream refusal
    #: before it keeps its status (/v1)
    FIRST_TEXT = "first_text"


class Lease:
    """One client's hold on a flight: a counted listener from submit until it leaves.

    Created by :meth:`TurnService.lease` or :meth:`TurnService.attach`, which
    write its request record when the ``async with`` block ends.
    """

    # one per listener, ten thousand on a flight: no dict
    __slots__ = ("_hold_s", "_out", "_service", "answer", "flight", "role", "started", "stopped", "token", "ttft_s")

    def __init__(self, flight: Flight, role: Role, *, hold_s: float, started: float,
                 token: str | None = None, answer: bool = True) -> None:
        self.flight = flight
        self.role = role
        self._hold_s = hold_s
        #: perf_counter when the request arrived
        self.started = started
        #: names this listener for its Stop call (a mode-3 client's attach token, or a new one)
        self.token = token or random_token(9)
        #: from the request's arrival to the first answer text handed to the client
        self.ttft_s: float | None = None
        #: this lease hands a chat answer to its client (counted by outcome when it ends)
        self.answer = answer
        #: the client said it stops: its stream ends and it no longer holds the flight
        self.stopped = False
        self._out: Sink | None = None
        #: the service that releases it (:meth:`release`): a lease of :meth:`TurnService.attach`'s
        self._service: TurnService | None = None

    def release(self, exc: BaseException | None) -> None:
        """Uncount this listener and record its request, once (a lease of
        :meth:`TurnService.attach`, whose block handed it over or ended); ``exc``: how its
        stream ended (None: it was written to its end)."""
        service, self._service = self._service, None
        if service is not None:
            service._released(self, route="streams", mode="sse", exc=exc)

    async def hold(self, until: Until) -> None:
        """Hold the status line until ``until`` or the flight's end, for at most one
        keep-alive interval (the same bound on every surface).

        Raises the flight's error when it failed before that point, so the client
        gets it as a status (404, 429, 502, 503...) rather than inside a stream.
        After the bound the stream starts anyway and pings while it waits.
        """
        flight = self.flight
        try:
            async with asyncio.timeout(self._hold_s):
                if until is Until.FIRST_TEXT:
                    await flight.log.wait(1)
                else:
                    await flight.accepted()
        except TimeoutError:
            pass
        error = flight.error_before(text=until is Until.FIRST_TEXT)
        if error is not None:
            raise error

    def meta_frame(self, **extra: str) -> bytes:
        """The ``meta`` event that opens an ``/api`` stream."""
        flight = self.flight
        return encode_event("meta", {
            "stream_id": flight.stream_id,
            "thread_id": flight.turn.thread_id,
            "user_message_id": flight.user_message["message_id"],
            "coalesce": self.role,
            "provider": flight.turn.provider.name,
            "model": flight.turn.model,
            **extra,
        })

    async def stream(self, out: EventStream, *, meta: bytes, cursor: int = 1) -> None:
        """Write ``meta``, replay from delta ``cursor``, then let the log push the rest.

        Replay is awaited writes (a slow client is dropped after the send timeout);
        at the live edge the subscriber hands ``out`` to the log and sleeps until
        the end, a fall-back (its transport paused: replay again from its cursor)
        or a stop.
        """
        log_ = self.flight.log
        await out.write(meta)
        del meta  # held by no one while the stream lasts
        try:
            while not self.stopped:
                chunks, after, finished = log_.read(cursor)
                self._saw_text(after)
                cursor = after
                if chunks:
                    await out.write(b"".join(chunks))
                    if finished:
                        return
                    continue
                # the live edge: subscribe in the same step as the read, so nothing slips between
                del chunks  # empty: not held while the log pushes
                self._out = out
                ended = await log_.subscribe(out, cursor)
                self._out = None
                self._pushed(cursor, ended)
                if ended is None or ended < 0:
                    return
                cursor = ended
        finally:
            self._out = None
            log_.unsubscribe(out)

    async def push(self, out: Sink, encode: Encoder, cursor: int) -> int | None:
        """At the live edge, have the log write ``out`` itself, each delta from ``cursor`` on
        as ``encode`` frames it (``/v1``'s chunks), the end included; returns when that
        ends: None once the end was written, else the cursor to read on from (``out``
        fell behind: nothing from there was written to it; or -1, stopped)."""
        log_ = self.flight.log
        self._out = out
        try:
            ended = await log_.subscribe(out, cursor, encode)
        finally:
            self._out = None
            log_.unsubscribe(out)
        self._pushed(cursor, ended)
        return ended

    def _pushed(self, cursor: int, ended: int | None) -> None:
        """The log pushed deltas ``cursor`` to ``ended`` (the end, if None): note the TTFT
        when the first answer text was among them."""
        first_seq = self.flight.first_text_seq
        if (self.ttft_s is None and first_seq is not None and cursor <= first_seq
                and (ended is None or ended > first_seq)):
            first = self.flight.first_text_at  # the first answer text was pushed to it
            if first is not None:
                self.ttft_s = max(0.0, first - self.started)

    def stop(self) -> None:
        """End this listener's stream where it is; it no longer holds the flight."""
        self.stopped = True
        if self._out is not None:
            self.flight.log.stop(self._out)

    def _saw_text(self, cursor: int) -> None:
        """The client has been handed every delta before ``cursor``: note its TTFT once
        that includes the first answer text."""
        first = self.flight.first_text_seq
        if self.ttft_s is None and first is not None and cursor > first:
            self.ttft_s = time.perf_counter() - self.started

    def take(self, cursor: int) -> tuple[list[Delta], int, bool]:
        """The deltas from ``cursor`` on, as :meth:`deltas` hands them out, without an
        iterator: ``(deltas, new cursor, finished)``; wait with ``flight.log.wait``."""
        deltas, cursor, finished = self.flight.log.deltas(cursor)
        self._saw_text(cursor)
        return deltas, cursor, finished

    async def deltas(self) -> AsyncIterator[tuple[list[Delta], bool]]:
        """Every delta, batched as they arrive: ``(deltas, finished)``; for surfaces that
        frame deltas their own way. Nothing is ever replaced by a snapshot."""
        log_ = self.flight.log
        cursor = 1
        while True:
            deltas, cursor, finished = log_.deltas(cursor)
            self._saw_text(cursor)
            yield deltas, finished
            if finished:
                return
            await log_.wait(cursor)

    async def result(self) -> Message:
        """The final assistant message; raises the flight's error."""
        return await self.flight.result()


class _Leasing:
    """The ``async with`` of :meth:`TurnService.lease` (a class: this runs on every chat request)."""

    __slots__ = ("_lease", "_mode", "_route", "_service", "_started", "_turn")

    def __init__(self, service: TurnService, turn: TurnRequest, *, route: str, mode: str, started: float) -> None:
        self._service = service
        self._turn = turn
        self._route = route
        self._mode = mode
        self._started = started
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        service = self._service
        flight, role = await service.registry.submit(self._turn, listen=True)
        lease = self._lease = Lease(flight, role, hold_s=service.settings.ping_interval_s, started=self._started)
        service._held(lease)
        return lease

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        assert self._lease is not None
        self._service._released(self._lease, route=self._route, mode=self._mode, exc=exc)


class _Attaching:
    """The ``async with`` of :meth:`TurnService.attach` (a class, not a generator: a
    subscriber holds it for as long as its stream lasts, ten thousand of them on one flight)."""

    __slots__ = ("_handed_over", "_lease", "_org", "_service", "_started", "_stream_id", "_token")

    def __init__(self, service: TurnService, org_id: str, stream_id: str, *, token: str | None,
                 started: float) -> None:
        self._service = service
        self._org = org_id
        self._stream_id = stream_id
        self._token = token
        self._started = started
        self._lease: Lease | None = None
        self._handed_over = False

    @property
    def lease(self) -> Lease | None:
        """The listener's lease; None when this process holds no such flight for the org."""
        return self._lease

    async def __aenter__(self) -> _Attaching:
        service = self._service
        flight = await service.registry.stream(self._stream_id)
        if flight is not None and flight.turn.org_id == self._org:
            self._lease = service._attached(flight, self._token, self._started)
        return self

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None and (exc is not None or not self._handed_over):
            lease.release(exc)

    def hand_over(self) -> Lease:
        """Let the block end without releasing the lease (unless it ends by an exception):
        the caller calls :meth:`Lease.release` on what this returns once its stream has
        ended, with how it ended. Nothing of this object is held meanwhile (nor a bound
        method: the lease itself is handed over)."""
        assert self._lease is not None
        self._handed_over = True
        return self._lease


#: Idempotency-Keys remembered at most (the oldest forgotten first)
IDEMPOTENCY_KEYS = 100_000


class TurnService:
    def __init__(self, *, settings: Settings, registry: FlightRegistry, store: Store, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self._clock = clock
        #: the leases streaming now, by token, for their Stop call
        self._leases: dict[str, Lease] = {}
        #: coalesce key of an Idempotency-Key -> (what it was sent with, until when that is held)
        self._idempotency: OrderedDict[str, tuple[str, float]] = OrderedDict()
        registry.serve_stops(self._stop_handed_over)

    # -- the coalesce policy ------------------------------------------------

    def turn(
        self,
        *,
        surface: Surface,
        org_id: str,
        thread_id: str | None,
        content: str,
        provider: Provider,
        model: str,
        streaming: bool,
        messages: list[ChatMessage] | None = None,
        params: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        shareable: bool = True,
        idempotency_key: str | None = None,
        no_cache: bool = False,
        reusable: bool = True,
        attachments: list[dict[str, Any]] | None = None,
    ) -> TurnRequest:
        """The request for one answer, with its coalesce key.

        ``shareable`` False (tools, attachments) means never coalesced and never
        cached; ``no_cache`` skips a finished result but still joins a running flight;
        ``reusable`` False: no later request may take the finished result, so it is not kept.
        ``attachments``: content parts beside the text of the new user message
        (images...); the key hashes them. Raises BadRequest naming a part the
        provider cannot take.
        """
        params = params or {}
        attachments = attachments or []
        if messages is not None:
            provider.check_content(messages)
        provider.check_parts(attachments, "attachments")
        s = self.settings
        budget = context_budget(provider, model, s)
        if budget:
            fixed = [m for m in messages or () if m.get("role") in ("system", "developer")]
            alone = sum(map(message_chars, fixed)) + (message_chars(messages[-1]) if messages else len(content))
            if alone > budget:
                raise BadRequest(f"the message is longer than the context budget of {model!r} "
                                 f"({alone} characters, at most {budget})", param="content")
        key = None
        if idempotency_key:
            request = coalesce_key(thread_id or "", provider.name, model, content, _digest(messages),
                                   _digest(params), _digest(meta), _digest(attachments))
            self._check_idempotency(coalesce_key("idem", surface, org_id, idempotency_key), request)
        if shareable and s.coalesce_enabled and (s.stream_fanout_enabled or not streaming):
            if idempotency_key:
                # the request's own hash too: once the key is forgotten, another body starts its own flight
                key = coalesce_key("idem", surface, org_id, idempotency_key, request)
            elif thread_id is not None:
                key = coalesce_key("turn", org_id, thread_id, provider.name, model, content, _digest(params),
                                   *([_digest(attachments)] if attachments else []))
            else:
                key = coalesce_key("call", org_id, provider.name, model, _digest(messages), _digest(params))
        return TurnRequest(org_id=org_id, thread_id=thread_id, content=content, provider=provider, model=model,
                           messages=messages, params=params, meta=meta or {}, key=key,
                           no_cache=no_cache or not shareable, reusable=reusable, stream=streaming,
                           attachments=attachments)

    def _check_idempotency(self, key: str, request: str) -> None:
        """Remember what an Idempotency-Key came with, for the result TTL after its last use;
        the key sent with anything else meanwhile is refused (422), as Stripe does."""
        now = self._clock()
        while self._idempotency:
            oldest_key, (_, until) = next(iter(self._idempotency.items()))
            if until > now and len(self._idempotency) < IDEMPOTENCY_KEYS:
                break
            del self._idempotency[oldest_key]
        known = self._idempotency.get(key)
        if known is not None and known[0] != request:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was sent with another thread or body; use a new key for a new request",
                param="Idempotency-Key")
        self._idempotency[key] = (request, now + self.settings.result_ttl_s)
        self._idempotency.move_to_end(key)

    # -- leases -----------------------------------------------------------------

    def lease(self, turn: TurnRequest, *, route: str, mode: str, started: float) -> _Leasing:
        """Join or lead the flight for ``turn`` as a listener, for the ``async with`` block.

        ``started`` is the request's arrival (``time.perf_counter()``).
        """
        return _Leasing(self, turn, route=route, mode=mode, started=started)

    def attach(self, org_id: str, stream_id: str, *, token: str | None, started: float) -> _Attaching:
        """Listen to a running or kept flight (``GET /api/streams``) for the ``async with``
        block; its ``lease`` is None when this process holds no flight of that id for the org.
        The block may hand the lease over (``hand_over``) to be released when its stream ends."""
        return _Attaching(self, org_id, stream_id, token=token, started=started)

    def _attached(self, flight: Flight, token: str | None, started: float) -> Lease:
        """A new listener to ``flight``, counted and held until :meth:`_released`."""
        role = Role.CACHE if not flight.running else (Role.LEADER if flight.listeners == 0 else Role.FOLLOWER)
        # the first attach of a stream_url hands its 202's answer over: that is the chat answer
        answer = token is not None and flight.promised(token)
        flight.add_listener(attach=token)
        if token is not None and token in self._leases:
            token = None  # a second connection with one stream_url gets its own token
        lease = Lease(flight, role, hold_s=self.settings.ping_interval_s, started=started, token=token,
                      answer=answer)
        lease._service = self
        self._held(lease)
        return lease

    def _held(self, lease: Lease) -> None:
        self._leases[lease.token] = lease
        lease.flight.issue(lease.token)

    def _released(self, lease: Lease, *, route: str, mode: str, exc: BaseException | None) -> None:
        """The block of :meth:`_held`'s lease ended, with ``exc`` or not: uncount, record."""
        flight = lease.flight
        error: str | None = None
        left = False
        if exc is None:
            if flight.error is not None and flight.finished.is_set():
                error = flight.error.type  # told to the client inside its stream
        elif isinstance(exc, GatewayError):
            error = exc.type
        elif isinstance(exc, asyncio.CancelledError | ConnectionResetError | TimeoutError):
            # the client left (its handler is cancelled, idle or not; or a write found the
            # connection gone), or took nothing for the send timeout and was dropped
            left = True
            if isinstance(exc, TimeoutError):
                self.metrics.dropped(DropReason.SLOW_CLIENT)
        del self._leases[lease.token]
        flight.remove_listener(stopped=lease.stopped)
        left = left or lease.stopped
        chat = route != "streams"
        self.metrics.record(RequestRecord(
            route=route, org=flight.turn.org_id, mode=mode, coalesce=lease.role if chat else None,
            latency_s=time.perf_counter() - lease.started, ttft_s=lease.ttft_s, error=error,
            client_left=left, answer=lease.answer,
            queue_wait_s=flight.queue_wait_s if chat and lease.role is Role.LEADER else None,
        ))

    async def stop(self, org_id: str, stream_id: str, token: str, *, hand_over: bool = True) -> bool:
        """A client stops on purpose: end the stream of the listener ``token`` names (or
        drop the promise of a mode-3 client not attached yet). When it was the last one
        holding the flight, the upstream is aborted at once, with no grace.

        A listener this instance does not hold is another instance's (behind a load
        balancer the Stop call may reach any): with ``hand_over`` the call goes to the
        others (:meth:`FlightRegistry.stop_elsewhere`). False when the org has no such
        stream, or no such listener here and no other instance to ask.
        """
        if token == EVERY_LISTENER:
            return await self.stop_flight(org_id, stream_id, hand_over=hand_over)
        flight = await self.registry.stream(stream_id)
        if flight is None or flight.turn.org_id != org_id:
            return False
        lease = self._leases.get(token)
        if lease is not None and lease.flight is flight:
            _stop_lease(flight, token, lease)
            return True
        if flight.stop_listener(token, attached=False):
            return True
        return hand_over and await self.registry.stop_elsewhere(org_id, stream_id, token)

    async def stop_flight(self, org_id: str, stream_id: str, *, hand_over: bool = True) -> bool:
        """The org stops the answer itself (a Stop call with its key, no listener's token):
        every listener's stream ends and every promised client's promise is dropped, here
        and (with ``hand_over``) on the other instances, so the upstream is aborted at once.
        False when the org has no such stream."""
        flight = await self.registry.stream(stream_id)
        if flight is None or flight.turn.org_id != org_id:
            # a finished one: nothing left to stop (the registry was asked already)
            return await self.store.get_answer(org_id, stream_id) is not None
        for token, lease in list(self._leases.items()):
            if lease.flight is flight:
                _stop_lease(flight, token, lease)
        flight.stop_all()
        if hand_over:
            await self.registry.stop_elsewhere(org_id, stream_id, EVERY_LISTENER)
        return True

    async def _stop_handed_over(self, org_id: str, stream_id: str, token: str) -> bool:
        """A Stop call another instance handed over: taken here or nowhere."""
        return await self.stop(org_id, stream_id, token, hand_over=False)

    async def accept(self, turn: TurnRequest) -> tuple[Flight, Role, str | None]:
        """Mode 3: start or join without listening; returns ``(flight, role, attach token)``.

        A failure the registry already holds (within the error TTL) is raised, so
        it leaves with its status instead of a 202.
        """
        started = time.perf_counter()
        flight, role, token = await self.registry.accept(turn)
        known = None if flight.running else flight.error
        # its answer is counted when its stream is first attached; a failure known now is that answer
        self.metrics.record(RequestRecord(route="messages", org=turn.org_id, mode="accepted", coalesce=role,
                                          latency_s=time.perf_counter() - started,
                                          error=known.type if known else None, answer=known is not None))
        if known is not None:
            raise known
        return flight, role, token

    async def has_stream(self, org_id: str, stream_id: str) -> bool:
        """Whether the org has that stream: a flight here, or a stored answer."""
        flight = await self.registry.stream(stream_id)
        if flight is not None and flight.turn.org_id == org_id:
            return True
        return await self.store.get_answer(org_id, stream_id) is not None

    # -- what is stored -------------------------------------------------------------

    async def stored_frames(self, org_id: str, stream_id: str) -> list[bytes] | None:
        """The ``meta`` and final frames of a finished answer, from the store; None if unknown."""
        found = await self.store.get_answer(org_id, stream_id)
        if found is None:
            return None
        message, user_message_id, deltas = found
        meta = encode_event("meta", {
            "stream_id": stream_id, "thread_id": message["thread_id"], "user_message_id": user_message_id,
            "coalesce": Role.CACHE, "provider": message["provider"], "model": message["model"],
        })
        status = message["status"]
        if status is MessageStatus.COMPLETE:
            return [meta, encode_event("done", {"message": message}, deltas + 1)]
        error = message["meta"].get("error") or {
            "type": "cancelled" if status is MessageStatus.CANCELLED else "interrupted",
            "message": f"this answer ended {status}"
            + (" (the server restarted)" if status is not MessageStatus.CANCELLED else ""),
            "retryable": True,
        }
        return [meta, encode_event("error", {"error": error})]

    async def delete_thread(self, org_id: str, thread_id: str) -> bool:
        """Delete a thread; its flights keep nothing once they end."""
        if not await self.store.delete_thread(org_id, thread_id):
            return False
        await self.registry.thread_deleted(org_id, thread_id)
        return True


def _stop_lease(flight: Flight, token: str, lease: Lease) -> None:
    """End the stream of a listener held here, said to stop on purpose (once)."""
    if not lease.stopped:
        flight.stop_listener(token, attached=True)
        lease.stop()
