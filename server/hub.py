"""Flights and the hub: one upstream call per coalesce key, shared by every listener.

A :class:`Flight` owns the leader task that pulls chunks from the provider
into its :class:`~server.eventlog.EventLog`, the count of listeners attached to
it, and its outcome. The :class:`Hub` maps coalesce keys to flights: a request
whose key has a running flight joins it (``follower``); one whose key has a
finished flight within the result TTL gets its result (``cache``), or its
error within the error TTL; otherwise it starts a new flight (``leader``).

Cancellation, as a timeline::

    listener A leaves ─┐
    listener B leaves ─┴─▶ listeners == 0 ─▶ grace (cancel_grace_s) ─▶ leader task cancelled
                                         ─▶ provider iterator closed (upstream socket closed)
                                         ─▶ message saved 'cancelled' with the text so far
    a listener joins during the grace ─▶ timer dropped, the flight carries on
    nobody attaches within attach_timeout_s (mode 3) ─▶ cancelled the same way
    upstream error ─▶ listeners get ``error``; the flight answers joiners for error_ttl_s
    shutdown ─▶ listeners get a retryable ``error``; message saved 'interrupted'

Who writes what (everything runs on the event loop; no locks are needed as
long as these owners hold):

- ``Hub._flights``, ``Hub._streams``, ``Hub._cache``: only Hub methods. A
  flight is removed by identity (``if self._flights.get(key) is flight``), so a
  finished flight never evicts its successor under the same key.
- ``Flight.listeners``, ``Flight._idle_handle``, ``Flight.zero_since``: only
  ``add_listener``/``remove_listener``/``_abort``.
- ``Flight.state``: ``running`` -> ``cancelling`` (``_abort``) -> one of
  ``done``/``error``/``cancelled`` (the leader task, at its end). Only a
  ``running`` flight is joinable as a follower.
- everything else on a flight: only its leader task.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .errors import GatewayError, NoListeners, NotFound, ShuttingDown, UpstreamError
from .eventlog import EventLog, encode_event
from .metrics import Metrics
from .pacer import Pacer
from .providers import Provider, ProviderRequest
from .store import Store, draft_turn

__all__ = ["Flight", "Hub", "TurnRequest"]

log = logging.getLogger(__name__)

RUNNING, CANCELLING, DONE, ERROR, CANCELLED = "running", "cancelling", "done", "error", "cancelled"


@dataclass(slots=True, kw_only=True)
class TurnRequest:
    """A validated request for one answer."""

    org_id: str
    #: the thread gaining the turn; None for a stateless call (/v1 without x-thread-id)
    thread_id: str | None
    #: the new user message
    content: str
    provider: Provider
    model: str
    #: the conversation to send; None means the thread's history plus ``content``
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: kept on both messages: the request's reason and scope
    meta: dict[str, Any] = field(default_factory=dict)
    #: the coalesce key; None means this request never shares its flight
    key: str | None = None
    #: skip a finished flight's result (``Cache-Control: no-cache``); still joins a running one
    no_cache: bool = False


class Flight:
    def __init__(self, hub: Hub, turn: TurnRequest) -> None:
        self.hub = hub
        self.turn = turn
        self.key = turn.key
        self.log = EventLog(capacity=hub.settings.ring_size)
        self.state = RUNNING
        self.ready = asyncio.Event()  # the turn's rows are written, or the flight failed before
        self.finished = asyncio.Event()  # outcome known, log closed
        # Ids and times are fixed at once, so a stream can be named (202, stream_url)
        # and attached to while the flight still waits for a provider slot.
        self.user_message, self._draft = draft_turn(
            thread_id=turn.thread_id, content=turn.content, provider=turn.provider.name,
            model=turn.model, meta=dict(turn.meta))
        self.stream_id: str = self._draft["message_id"]
        #: the assistant message once its row exists (at once when stateless); final at the end
        self.message: dict[str, Any] | None = None
        #: promises to mode-3 clients not attached yet: their attach token -> deadline (monotonic)
        self._promised: dict[str, float] = {}
        self.forgotten = False  # its thread was deleted: keep nothing once it ends
        self.error: GatewayError | None = None
        self.usage: dict[str, Any] | None = None
        self.extra_meta: dict[str, Any] = {}
        self.listeners = 0
        self.zero_since: float | None = None
        self.cancel_reason: str | None = None
        self.queue_wait_s: float | None = None
        self.ttft_s: float | None = None
        self.called_upstream = False
        self.upstream_started: float | None = None  # perf_counter when the provider was asked
        self.created = time.perf_counter()
        self.finished_at: float | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None  # Hub._finished/_remove only
        self.task: asyncio.Task[None] | None = None

    # -- listeners -------------------------------------------------------

    def add_listener(self, *, attach: str | None = None) -> None:
        """Count a listener; ``attach`` is the token of the stream_url it opened, if any."""
        if attach is not None:
            self._promised.pop(attach, None)
        self.listeners += 1
        self.hub.metrics.active_listeners.inc()
        self.zero_since = None
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def remove_listener(self) -> None:
        self.listeners -= 1
        self.hub.metrics.active_listeners.dec()
        if self.listeners == 0 and self.state == RUNNING:
            now = time.monotonic()
            self._promised = {t: d for t, d in self._promised.items() if d > now}
            if self._promised:  # a client given the stream_url may still come
                self._arm_idle(max(self._promised.values()) - now, "attach_timeout")
            else:
                self._arm_idle(self.hub.settings.cancel_grace_s, "no_listeners")

    def expect_attach(self) -> str:
        """Promise a client (mode 3) its stream for a while; returns the token its
        stream_url carries, so its attach (and no other) settles the promise."""
        timeout = self.hub.settings.attach_timeout_s
        token = secrets.token_urlsafe(9)
        self._promised[token] = time.monotonic() + timeout
        if self.listeners == 0 and self.state == RUNNING:
            self._arm_idle(timeout, "attach_timeout")
        return token

    def _arm_idle(self, delay: float, reason: str) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if reason == "no_listeners":
            self.zero_since = time.perf_counter()
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._abort, reason)

    def _abort(self, reason: str) -> None:
        self._idle_handle = None
        if self.state != RUNNING or self.task is None:
            return
        if reason != "shutdown" and self.listeners > 0:
            return
        if self.zero_since is None:
            self.zero_since = time.perf_counter()
        self.state = CANCELLING
        self.cancel_reason = reason
        self.task.cancel()

    # -- reading ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    async def frames(self, cursor: int = 1) -> AsyncIterator[bytes]:
        """SSE bytes for a subscriber from delta ``cursor`` on, ending with done/error."""
        log_ = self.log
        while True:
            chunks, cursor, finished = log_.read(cursor)
            if chunks:
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if finished:
                return
            await log_.wait(cursor)

    async def result(self) -> dict[str, Any]:
        """The final assistant message; raises the flight's error."""
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        assert self.message is not None
        return self.message


class Hub:
    def __init__(self, *, settings: Settings, store: Store, pacer: Pacer, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.pacer = pacer
        self.metrics = metrics
        self._flights: dict[str, Flight] = {}
        self._streams: dict[str, Flight] = {}
        self._cache: OrderedDict[int, Flight] = OrderedDict()  # finished 'done' flights, LRU
        self._cache_bytes = 0
        self._live: dict[asyncio.Task[None], Flight] = {}  # leader tasks not yet finished
        self.closing = False
        metrics.watch_cache(entries=lambda: len(self._cache), size_bytes=lambda: self._cache_bytes)

    # -- joining ---------------------------------------------------------

    def submit(self, turn: TurnRequest, *, listen: bool) -> tuple[Flight, str]:
        """Join or lead the flight for ``turn``; returns ``(flight, role)``.

        Synchronous on purpose: nothing can slip in between the lookup and the
        insertion. With ``listen`` the caller is counted as a listener at once
        and must call ``remove_listener`` when it leaves.
        """
        if self.closing:
            raise ShuttingDown("the server is shutting down; try again shortly")
        flight, role = self._lookup(turn), "follower"
        if flight is None:
            flight, role = self._start(turn), "leader"
        elif not flight.running:
            role = "cache"
            self._touch(flight)
        if listen:
            flight.add_listener()
        return flight, role

    def accept(self, turn: TurnRequest) -> tuple[Flight, str, str | None]:
        """Mode 3: join or lead without listening yet; returns ``(flight, role, attach token)``.

        A running flight is promised to the caller until it attaches with the token
        (or the attach timeout passes); a finished one needs no promise.
        """
        flight, role = self.submit(turn, listen=False)
        return flight, role, flight.expect_attach() if flight.running else None

    def _lookup(self, turn: TurnRequest) -> Flight | None:
        if turn.key is None:
            return None
        flight = self._flights.get(turn.key)
        if flight is None:
            return None
        if flight.state == RUNNING:
            return flight
        if flight.state == DONE and not turn.no_cache and self._fresh(flight, self.settings.result_ttl_s):
            return flight
        if flight.state == ERROR and self._fresh(flight, self.settings.error_ttl_s):
            return flight
        return None

    @staticmethod
    def _fresh(flight: Flight, ttl: float) -> bool:
        return flight.finished_at is not None and time.monotonic() - flight.finished_at < ttl

    def _start(self, turn: TurnRequest) -> Flight:
        flight = Flight(self, turn)
        if turn.key is not None:
            self._flights[turn.key] = flight
        task = asyncio.get_running_loop().create_task(self._lead(flight), name=f"flight:{turn.key}")
        flight.task = task
        self._streams[flight.stream_id] = flight
        self._live[task] = flight
        task.add_done_callback(lambda t: self._leader_done(t, flight))
        return flight

    def _leader_done(self, task: asyncio.Task[None], flight: Flight) -> None:
        self._live.pop(task, None)
        if flight.finished.is_set():
            return
        # Cancelled before its first step (shutdown in the same loop pass): ``_lead`` never
        # ran, so end the flight here; no row was written and no upstream asked.
        self._settle(flight, "interrupted", ShuttingDown("the server shut down before the answer started"))
        flight.ready.set()

    def stream(self, stream_id: str) -> Flight | None:
        return self._streams.get(stream_id)

    def forget_thread(self, thread_id: str) -> None:
        """Drop the flights of a deleted thread, so nothing answers from it.

        Running ones carry on for their listeners and are dropped when they finish.
        """
        for flight in [f for f in self._streams.values() if f.turn.thread_id == thread_id]:
            flight.forgotten = True
            if not flight.running:
                self._remove(flight)

    @property
    def active(self) -> int:
        return len(self._live)

    # -- the leader ------------------------------------------------------

    async def _lead(self, flight: Flight) -> None:
        turn = flight.turn
        provider = turn.provider
        status = "error"
        error: GatewayError | None = None
        cancelled = False
        self.metrics.active_flights.inc()
        try:
            try:
                # The slot before the rows: a request the full queue turns away (503) or
                # whose clients leave while it waits was never accepted, and leaves no turn.
                async with self.pacer.slot(provider.name, provider.max_concurrency) as waited:
                    flight.queue_wait_s = waited
                    self.metrics.queue_wait.labels(provider.name).observe(waited)
                    messages = await self._open_turn(flight)
                    await self._pull(flight, messages)
                status = "complete"
            except asyncio.CancelledError:
                cancelled = True
                if flight.cancel_reason == "shutdown":
                    status = "interrupted"
                    error = ShuttingDown("the server shut down before the answer was complete")
                else:
                    status = "cancelled"
                    error = NoListeners(
                        "the request was cancelled: no client was listening"
                        + (" (nobody attached in time)" if flight.cancel_reason == "attach_timeout" else "")
                    )
            except GatewayError as exc:
                error = exc
            except Exception as exc:  # a bug or an adapter's unexpected failure: report, don't hang
                log.exception("flight %s failed", flight.stream_id)
                error = UpstreamError(f"the provider call failed ({exc.__class__.__name__})")
            closing = asyncio.ensure_future(self._close_turn(flight, status, error))
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise
        finally:
            self.metrics.active_flights.dec()
            flight.ready.set()
        if cancelled:
            raise asyncio.CancelledError

    async def _open_turn(self, flight: Flight) -> list[dict[str, Any]]:
        """Write the turn's rows (nothing when stateless); returns the conversation."""
        turn = flight.turn
        if turn.thread_id is None:
            self._opened(flight)
            return turn.messages or [{"role": "user", "content": turn.content}]
        if turn.messages is not None:
            messages = turn.messages
        else:
            history = await self.store.history(turn.org_id, turn.thread_id)
            messages = [*history, {"role": "user", "content": turn.content}]
        insert = asyncio.ensure_future(
            self.store.begin_turn(org_id=turn.org_id, thread_id=turn.thread_id,
                                  content=turn.content, provider=turn.provider.name,
                                  model=turn.model, meta=dict(turn.meta),
                                  drafts=(flight.user_message, flight._draft))
        )
        try:
            await asyncio.shield(insert)
        except asyncio.CancelledError:
            await insert  # the rows exist either way: record them
            self._opened(flight)
            raise
        except LookupError:
            raise NotFound("thread not found (it was deleted)") from None
        except Exception as exc:
            log.exception("could not write the turn of thread %s", turn.thread_id)
            raise GatewayError(f"could not save the message ({exc.__class__.__name__})",
                               type="store_error") from None
        self._opened(flight)
        return messages

    def _opened(self, flight: Flight) -> None:
        flight.message = flight._draft
        flight.ready.set()

    async def _pull(self, flight: Flight, messages: list[dict[str, Any]]) -> None:
        turn = flight.turn
        provider = turn.provider
        metrics = self.metrics
        model_label = metrics.model_label(provider.name, turn.model)
        ttft = metrics.ttft.labels(provider.name, model_label)
        gap = metrics.inter_token.labels(provider.name)
        deltas = metrics.deltas.labels(provider.name)
        request = ProviderRequest(model=turn.model, messages=messages, params=dict(turn.params))
        flight.called_upstream = True
        started = last = flight.upstream_started = time.perf_counter()
        stream = provider.stream(request)
        try:
            async with aclosing(stream):
                async for chunk in stream:
                    if chunk.text:
                        now = time.perf_counter()
                        if flight.ttft_s is None:
                            flight.ttft_s = now - started
                            ttft.observe(flight.ttft_s)
                        else:
                            gap.observe(now - last)
                        last = now
                        flight.log.append(chunk.text)
                        deltas.inc()
                    if chunk.usage:
                        flight.usage = chunk.usage
                    if chunk.meta:
                        flight.extra_meta.update(chunk.meta)
        finally:
            if flight.cancel_reason is not None and flight.zero_since is not None:
                metrics.cancel_latency.labels(provider.name).observe(time.perf_counter() - flight.zero_since)

    async def _close_turn(self, flight: Flight, status: str, error: GatewayError | None) -> None:
        """Save the outcome, then end the log: a client that sees ``done`` finds the row saved."""
        turn = flight.turn
        provider = turn.provider.name
        if flight.message is not None:
            meta = {**flight.message["meta"], **flight.extra_meta}
            if error is not None and status == "error":
                meta["error"] = error.to_dict()
            flight.message = {**flight.message, "status": status, "content": flight.log.text(),
                              "usage": flight.usage, "meta": meta}
            if turn.thread_id is not None:
                try:
                    await self.store.finish_turn(message_id=flight.message["message_id"], status=status,
                                                 content=flight.message["content"],
                                                 usage=flight.usage, meta=meta,
                                                 deltas=flight.log.last_seq)
                except Exception:
                    log.exception("could not save message %s", flight.message["message_id"])
        if flight.usage:
            self.metrics.token_usage(provider, flight.usage)
        if flight.called_upstream and flight.upstream_started is not None:
            self.metrics.upstream_finished(
                provider=provider, model=turn.model,
                outcome={"complete": "complete", "error": "error"}.get(status, "cancelled"),
                duration_s=time.perf_counter() - flight.upstream_started)
        if flight.cancel_reason is not None:
            self.metrics.cancels.labels(provider, flight.cancel_reason).inc()
        self._settle(flight, status, error)

    def _settle(self, flight: Flight, status: str, error: GatewayError | None) -> None:
        """Record the outcome and end the log with ``done`` or ``error``; every listener wakes."""
        flight.error = error
        flight.finished_at = time.monotonic()
        if error is None:
            seq = flight.log.last_seq + 1
            flight.state = DONE
            flight.log.close(encode_event("done", {"message": flight.message}, seq), seq=seq)
        else:
            flight.state = CANCELLED if status in ("cancelled", "interrupted") else ERROR
            flight.log.close(encode_event("error", {"error": error.to_dict()}))
        flight.finished.set()
        self._finished(flight)

    # -- bookkeeping of finished flights -----------------------------------

    def _finished(self, flight: Flight) -> None:
        if flight.forgotten:
            ttl = 0.0
        elif flight.state == DONE:
            size = _answer_bytes(flight)
            if size > self.settings.cache_max_bytes:
                ttl = 0.0  # too large to keep: it must not push out what the cache holds
            else:
                ttl = self.settings.result_ttl_s
                self._cache[id(flight)] = flight
                self._cache_bytes += size
                self._evict()
        elif flight.state == ERROR or flight.message is None:
            # a failure answers joiners for the error TTL; so does a flight that ended
            # before its rows existed, for a client still holding its stream_url
            ttl = self.settings.error_ttl_s
        else:
            ttl = 0.0
        if ttl <= 0:
            self._remove(flight)
        else:
            flight._expiry = asyncio.get_running_loop().call_later(ttl, self._remove, flight)

    def _touch(self, flight: Flight) -> None:
        if id(flight) in self._cache:
            self._cache.move_to_end(id(flight))

    def _evict(self) -> None:
        s = self.settings
        while self._cache and (len(self._cache) > s.cache_max_entries or self._cache_bytes > s.cache_max_bytes):
            _, oldest = self._cache.popitem(last=False)
            self._cache_bytes -= _answer_bytes(oldest)
            self._remove(oldest)

    def _remove(self, flight: Flight) -> None:
        """Forget a finished flight; its timer goes too, so nothing keeps it alive."""
        if flight._expiry is not None:
            flight._expiry.cancel()
            flight._expiry = None
        if flight.key is not None and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if self._streams.get(flight.stream_id) is flight:
            del self._streams[flight.stream_id]
        if self._cache.pop(id(flight), None) is not None:
            self._cache_bytes -= _answer_bytes(flight)

    # -- shutdown ----------------------------------------------------------

    async def shutdown(self, *, timeout: float = 10.0) -> None:
        """Tell every listener, cancel every flight, and wait for their turns to be saved."""
        self.closing = True
        tasks = list(self._live)
        for flight in list(self._live.values()):
            flight._abort("shutdown")
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def _answer_bytes(flight: Flight) -> int:
    """What a kept flight counts against ``cache_max_bytes``: its answer's UTF-8 size."""
    return len(flight.message["content"].encode()) if flight.message else 0
