"""A flight: one upstream call, its replay log, its listeners and its outcome.

The flight's leader task takes a provider slot, writes the turn's rows, pulls
chunks from the provider into the :class:`~server.eventlog.EventLog`, then
saves the outcome and closes the log. Listeners are counted; when the last
one leaves the flight is aborted after a grace.

Cancellation, as a timeline::

    listener A leaves ─┐
    listener B leaves ─┴─▶ listeners == 0 ─▶ grace (cancel_grace_s) ─▶ leader task cancelled
                                         ─▶ provider iterator closed (upstream socket closed)
                                         ─▶ message saved 'cancelled' with the text so far
    a listener joins during the grace ─▶ timer dropped, the flight carries on
    nobody attaches within attach_timeout_s (mode 3) ─▶ cancelled the same way
    upstream error ─▶ listeners get ``error``; the registry keeps it for error_ttl_s
    shutdown ─▶ listeners get a retryable ``error``; message saved 'interrupted'

Who writes what (everything runs on the event loop; no locks are needed as
long as these owners hold):

- ``listeners``, ``_idle_handle``, ``zero_since``, ``_promised``: only
  :meth:`add_listener`, :meth:`remove_listener`, :meth:`expect_attach` and
  :meth:`abort`.
- ``state``: ``RUNNING`` -> ``CANCELLING`` (:meth:`abort`) -> an end state
  (the leader task, at its end, in ``_settle``).
- ``forgotten``: the registry (its thread was deleted).
- everything else: only the leader task.

One clock per purpose: ``time.perf_counter`` for what is measured (TTFT, queue
wait, cancel latency), the injected monotonic ``clock`` for what expires
(result and error TTLs, attach promises), and the loop's timers for the grace.

A flight knows nothing of the registry that holds it: it is given the
settings, the store, the pacer, the metrics, a clock, and a callback that
runs once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import orjson

from .config import Settings
from .errors import BadRequest, GatewayError, LeaderLost, NoListeners, NotFound, ShuttingDown, StoreError, UpstreamError
from .eventlog import DeltaExtra, EventLog, FinishedLog, FlightLog, encode_event
from .metrics import Metrics, Outcome
from .pacer import Slots
from .providers import Chunk, FinishReason, Provider, ProviderRequest, ToolCallDelta, assemble_tool_calls
from .states import DropReason, FlightState, MessageStatus
from .store import ChatMessage, Message, Store, draft_turn, random_token

__all__ = ["Answer", "Clock", "Flight", "TurnRequest", "context_budget", "message_chars"]

log = logging.getLogger(__name__)

#: what a finished flight holds beside its texts (the objects, ids, message dicts), roughly
FLIGHT_OVERHEAD_BYTES = 4096

#: seconds on a monotonic scale; the registry's TTLs and the attach promises read it
Clock = Callable[[], float]


def context_budget(provider: Provider, model: str, settings: Settings) -> int:
    """Characters of conversation ``model`` takes: the providers file's (per model, then per
    provider), else the model's known window, else ``DAC_CONTEXT_CHARS``; 0: no budget."""
    return provider.context_budget(model) or settings.context_chars


def message_chars(message: ChatMessage) -> int:
    """The characters a message stands for in a context budget (parts counted as JSON)."""
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    return len(orjson.dumps(content)) if content else 0


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
    messages: list[ChatMessage] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: kept on both messages: the request's reason and scope
    meta: dict[str, Any] = field(default_factory=dict)
    #: the coalesce key; None means this request never shares its flight
    key: str | None = None
    #: skip a finished flight's result (``Cache-Control: no-cache``); still joins a running one
    no_cache: bool = False
    #: a finished answer may serve a later request with the same key; False where no such
    #: request may take it (a /v1 call its result-cache policy leaves out): it is not kept
    reusable: bool = True
    #: the leader streams its answer: ask the upstream for a stream. A leader that waits
    #: for the whole answer asks for it whole (one chunk: cheaper); a streaming client
    #: joining that flight then gets the text in one piece when it is ready.
    stream: bool = True
    #: content parts sent upstream beside ``content`` in the new user message (images...)
    attachments: list[dict[str, Any]] = field(default_factory=list)

    def new_message(self) -> ChatMessage:
        """The new user message as it goes upstream: its text, then its attachments."""
        if not self.attachments:
            return {"role": "user", "content": self.content}
        return {"role": "user", "content": [{"type": "text", "text": self.content}, *self.attachments]}


class Answer:
    """What an answer holds beside its text, gathered chunk by chunk, for the message's meta."""

    __slots__ = ("finish_reason", "_reasoning", "_refusal", "_tool_calls")

    def __init__(self) -> None:
        self.finish_reason: FinishReason | None = None
        self._reasoning: list[str] = []
        self._refusal: list[str] = []
        self._tool_calls: list[ToolCallDelta] = []

    def add(self, chunk: Chunk) -> DeltaExtra | None:
        """Keep what ``chunk`` carries beside the text; returns it as the log's delta extra."""
        if not (chunk.reasoning or chunk.refusal or chunk.tool_calls):
            return None
        extra = DeltaExtra()
        if chunk.reasoning:
            self._reasoning.append(chunk.reasoning)
            extra["reasoning"] = chunk.reasoning
        if chunk.refusal:
            self._refusal.append(chunk.refusal)
            extra["refusal"] = chunk.refusal
        if chunk.tool_calls:
            self._tool_calls += chunk.tool_calls
            extra["tool_calls"] = chunk.tool_calls
        return extra

    def meta(self) -> dict[str, Any]:
        """``reasoning``, ``refusal``, ``tool_calls`` (whole) and ``finish_reason``, those present."""
        meta: dict[str, Any] = {}
        if self._reasoning:
            meta["reasoning"] = "".join(self._reasoning)
        if self._refusal:
            meta["refusal"] = "".join(self._refusal)
        if self._tool_calls:
            meta["tool_calls"] = assemble_tool_calls(self._tool_calls)
        if self.finish_reason is not None:
            meta["finish_reason"] = self.finish_reason
        return meta


class Flight:
    def __init__(self, turn: TurnRequest, *, settings: Settings, store: Store, pacer: Slots,
                 metrics: Metrics, clock: Clock, on_end: Callable[[Flight], None],
                 drafts: tuple[Message, Message] | None = None) -> None:
        self.turn = turn
        self.key = turn.key
        self._settings = settings
        self._store = store
        self._pacer = pacer
        self._metrics = metrics
        self._clock = clock
        self._on_end = on_end
        self.log: FlightLog = EventLog(capacity=settings.ring_size, ping_interval_s=settings.ping_interval_s)
        self.state = FlightState.RUNNING
        self.finished = asyncio.Event()  # outcome known, log closed
        self._accepted = asyncio.Event()  # ``message`` is set (the turn's rows exist), or the flight ended
        self._opening: asyncio.Future[None] | None = None  # the write of the turn's rows
        self._rows_settled = False  # its outcome is known (:meth:`_rows_written` ran): nothing to wait for
        self._rows_failed: GatewayError | None = None
        self._pulling = False
        # Ids and times are fixed at once, so a stream can be named (202, stream_url)
        # and attached to while the flight still waits for a provider slot.
        # ``drafts``: the rows another instance drafted (a mirror of its flight names the same ones).
        self.user_message, self._draft = drafts or draft_turn(
            thread_id=turn.thread_id, content=turn.content, provider=turn.provider.name,
            model=turn.model, meta=dict(turn.meta))
        self.stream_id: str = self._draft["message_id"]
        self.created_at: str = self._draft["created_at"]
        #: the assistant message once the turn is accepted (its rows written, or at once
        #: when stateless); final when the flight ends
        self.message: Message | None = None
        #: promises to mode-3 clients not attached yet: their attach token -> deadline (clock)
        self._promised: dict[str, float] = {}
        #: every token handed out for this flight; a Stop call must name one
        self._issued: set[str] = set()
        self.forgotten = False  # its thread was deleted: keep nothing once it ends
        #: the instance streaming the answer, named on its row (set by a registry shared by
        #: instances, before :meth:`start`); the row's later writes are fenced with it
        self.owner: str | None = None
        self.error: GatewayError | None = None
        self.usage: dict[str, Any] | None = None
        self.extra_meta: dict[str, Any] = {}
        self.listeners = 0
        #: instances other than this one holding the flight (a registry shared by instances sets it)
        self.remote = 0
        #: listeners that asked to stop and have not left yet (they no longer hold the flight)
        self.stopping = 0
        self.zero_since: float | None = None  # perf_counter when the count last reached zero
        self.cancel_reason: DropReason | None = None
        self.queue_wait_s: float | None = None
        #: what the answer holds beside its text: reasoning, refusal, tool calls, finish reason
        self.answer = Answer()
        self.ttft_s: float | None = None  # to the first answer text
        self.ttfb_s: float | None = None  # to the first output of any kind (reasoning, a tool call...)
        self.first_text_at: float | None = None  # perf_counter of the first delta with answer text
        self.first_text_seq: int | None = None  # its seq
        self.upstream_started: float | None = None  # perf_counter when the provider was asked
        self.finished_at: float | None = None  # clock
        self._idle_handle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self._chars = 0  # characters of answer text appended
        self.held_bytes = 0  # what it holds once kept (see :meth:`keep`)
        self._checkpointing: asyncio.Future[bool] | None = None  # the checkpoint being written
        self._checkpointed = 0  # the delta the last checkpoint covers
        self._checkpoint_at = time.monotonic()

    # -- listeners -------------------------------------------------------

    def add_listener(self, *, attach: str | None = None) -> None:
        """Count a listener; ``attach`` is the token of the stream_url it opened, if any."""
        if attach is not None:
            self._promised.pop(attach, None)
        self.listeners += 1
        self._metrics.listeners_attached += 1
        self.zero_since = None
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def remove_listener(self, *, stopped: bool = False) -> None:
        """Uncount a listener; ``stopped``: one that :meth:`stop_listener` counted out already."""
        self.listeners -= 1
        if stopped:
            self.stopping -= 1
        self._metrics.listeners_attached -= 1
        if self.listeners == 0 and self.running:
            now = self._clock()
            self._promised = {t: d for t, d in self._promised.items() if d > now}
            if self._promised:  # a client given the stream_url may still come
                self._arm_idle(max(self._promised.values()) - now, DropReason.ATTACH_TIMEOUT)
            else:
                self._arm_idle(self._settings.cancel_grace_s, DropReason.NO_LISTENERS)

    def set_remote(self, holders: int) -> None:
        """How many other instances hold the flight now (listeners or promises there).

        Their count joins the local one: the flight is aborted only once neither
        this instance nor any other has held it for the grace.
        """
        before, self.remote = self.remote, holders
        if holders > 0:
            if self._idle_handle is not None:
                self._idle_handle.cancel()
                self._idle_handle = None
                self.zero_since = None
        elif before > 0 and self.running and self.listeners - self.stopping == 0:
            now = self._clock()
            live = [deadline for deadline in self._promised.values() if deadline > now]
            if live:
                self._arm_idle(max(live) - now, DropReason.ATTACH_TIMEOUT)
            else:
                self._arm_idle(self._settings.cancel_grace_s, DropReason.NO_LISTENERS)

    def fail(self, error: GatewayError) -> None:
        """End the flight with ``error`` because what it runs on failed (its registry lost
        its shared state): the upstream is cut, listeners get the error, the row is saved."""
        if not self.running or self.task is None:
            return
        if self._rows_failed is None:
            self._rows_failed = error
        self.task.cancel()

    def issue(self, token: str) -> None:
        """Remember a token handed to a client (a stream_url's, a listener's stop_url)."""
        self._issued.add(token)

    def stop_listener(self, token: str, *, attached: bool) -> bool:
        """The client ``token`` names says it stops: a listener about to leave
        (``attached``), a mode-3 client that has not attached yet, or one that has
        just gone. When nobody else holds the flight it is aborted now, with no
        grace. False for a token this flight never issued."""
        if token not in self._issued:
            return False
        self._promised.pop(token, None)
        if attached:
            self.stopping += 1
        if self.listeners - self.stopping == 0 and not self._live_promises():
            self.abort(DropReason.CLIENT_STOP)
        return True

    def stop_all(self) -> None:
        """The org stops the answer itself: every promise is dropped, and when no listener
        holds the flight here but those already stopping (none came back during a grace)
        it is aborted now, unless another instance holds it."""
        self._promised.clear()
        if self.listeners - self.stopping == 0:
            self.abort(DropReason.CLIENT_STOP)

    def promised(self, token: str) -> bool:
        """Whether ``token`` names a stream_url promised and not attached yet."""
        return token in self._promised

    def _live_promises(self) -> bool:
        now = self._clock()
        return any(deadline > now for deadline in self._promised.values())

    def expect_attach(self) -> str:
        """Promise a client (mode 3) its stream for a while; returns the token its
        stream_url carries, so its attach (and no other) settles the promise."""
        timeout = self._settings.attach_timeout_s
        token = random_token(9)
        self._issued.add(token)
        self._promised[token] = self._clock() + timeout
        if self.listeners == 0 and self.running:
            self._arm_idle(timeout, DropReason.ATTACH_TIMEOUT)
        return token

    def _arm_idle(self, delay: float, reason: DropReason) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if reason is DropReason.NO_LISTENERS:
            self.zero_since = time.perf_counter()
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self.abort, reason)

    def abort(self, reason: DropReason) -> None:
        """Cancel the leader, unless a listener came back (shutdown cancels regardless)."""
        self._idle_handle = None
        if not self.running or self.task is None:
            return
        if reason is not DropReason.SHUTDOWN and self.listeners - self.stopping + self.remote > 0:
            return
        if self.zero_since is None:
            self.zero_since = time.perf_counter()
        self.state = FlightState.CANCELLING
        self.cancel_reason = reason
        self.task.cancel()

    # -- reading ---------------------------------------------------------

    @property
    def draft(self) -> Message:
        """The assistant row as drafted when the flight was created (``streaming``, no text)."""
        return self._draft

    @property
    def running(self) -> bool:
        return self.state is FlightState.RUNNING

    async def accepted(self) -> None:
        """Return once the turn is accepted (its rows written; at once when stateless)
        or the flight ended without that."""
        await self._accepted.wait()

    def error_before(self, *, text: bool) -> GatewayError | None:
        """The error of a flight that ended before its turn was accepted, or with
        ``text`` before any answer text: a status line can still say it."""
        if not self.finished.is_set():
            return None
        if self.message is None or (text and self.log.last_seq == 0):
            return self.error
        return None

    def fresh(self, ttl: float) -> bool:
        """Ended less than ``ttl`` seconds ago."""
        return self.finished_at is not None and self._clock() - self.finished_at < ttl

    async def result(self) -> Message:
        """The final assistant message; raises the flight's error."""
        await self.finished.wait()
        if self.error is not None:
            raise self.error
        assert self.message is not None
        return self.message

    def keep(self) -> int:
        """Hold the finished answer in the least memory (a result cache keeps it for its
        TTL); returns the bytes it then holds, what the cache counts."""
        if isinstance(self.log, EventLog) and self.log.closed:
            self.log = self.log.finished(self.message["content"] if self.message else None)
        held = self.log.size_bytes() if isinstance(self.log, FinishedLog) else len(self.log.text().encode())
        self.held_bytes = held + sys.getsizeof(self.turn.content) + FLIGHT_OVERHEAD_BYTES
        return self.held_bytes

    # -- the leader ------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start the leader task (once)."""
        assert self.task is None
        self.task = asyncio.get_running_loop().create_task(self._lead(), name=f"flight:{self.key}")
        self.task.add_done_callback(self._task_done)
        return self.task

    def _task_done(self, _: asyncio.Task[None]) -> None:
        if self.finished.is_set():
            return
        # Cancelled before its first step (shutdown in the same loop pass): ``_lead`` never
        # ran, so end the flight here; no row was written and no upstream asked.
        self._settle(MessageStatus.INTERRUPTED, ShuttingDown("the server shut down before the answer started"))

    async def _lead(self) -> None:
        provider = self.turn.provider
        status = MessageStatus.ERROR
        error: GatewayError | None = None
        cancelled = False
        self._metrics.flights_running += 1
        try:
            try:
                # The slot before the rows: a request the full queue turns away (503) or
                # whose clients leave while it waits was never accepted, and leaves no turn.
                async with self._pacer.slot(provider.name, provider.max_concurrency,
                                            org=self.turn.org_id) as waited:
                    self.queue_wait_s = waited
                    self._metrics.queue_wait.labels(provider.name).observe(waited)
                    messages = await self._conversation()
                    self._open_turn()  # the rows are written while the provider thinks
                    await self._pull(messages)
                    await self._turn_opened()  # an answer ends only once its rows exist
                status = MessageStatus.COMPLETE
            except asyncio.CancelledError:
                if self._rows_failed is not None and self.cancel_reason is None:
                    error = self._rows_failed  # the rows could not be written: the upstream was cut
                    if self.task is not None:
                        self.task.uncancel()
                else:
                    cancelled = True
                    status, error = self._cancelled_outcome()
            except GatewayError as exc:
                error = exc
            except Exception as exc:  # a bug or an adapter's unexpected failure: report, don't hang
                log.exception("flight %s failed", self.stream_id)
                error = UpstreamError(f"the provider call failed ({exc.__class__.__name__})")
            if self._opening is None and self.turn.thread_id is None:
                self._conclude(status, error)  # no rows: nothing to wait for, nothing to shield
            else:
                closing = asyncio.ensure_future(self._close_turn(status, error))
                try:
                    await asyncio.shield(closing)
                except asyncio.CancelledError:
                    await closing
                    raise
        finally:
            self._metrics.flights_running -= 1
        if cancelled:
            raise asyncio.CancelledError

    def _cancelled_outcome(self) -> tuple[MessageStatus, GatewayError]:
        if self.cancel_reason is DropReason.SHUTDOWN:
            return MessageStatus.INTERRUPTED, ShuttingDown("the server shut down before the answer was complete")
        late = " (nobody attached in time)" if self.cancel_reason is DropReason.ATTACH_TIMEOUT else ""
        return MessageStatus.CANCELLED, NoListeners("the request was cancelled: no client was listening" + late)

    async def _conversation(self) -> list[ChatMessage]:
        """What goes upstream: the request's own messages, or the thread's history (kept in
        memory by the store where it can) plus the new user message."""
        turn = self.turn
        if turn.messages is not None:
            return self._fit(turn.messages)
        if turn.thread_id is None:
            return [turn.new_message()]
        history = await self._store.history(turn.org_id, turn.thread_id)
        return self._fit([*history, turn.new_message()])

    def _fit(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The conversation within the context budget (characters; see :func:`context_budget`):
        the oldest turns are dropped first, system messages and the last message kept, and
        the turn's messages say so in their ``meta`` (``context_cut``). A conversation that
        cannot fit even so is a 400, before anything is written."""
        budget = context_budget(self.turn.provider, self.turn.model, self._settings)
        if not budget:
            return messages
        sizes = [message_chars(m) for m in messages]
        total = sum(sizes)
        if not budget or total <= budget:
            return messages
        keep = [True] * len(messages)
        dropped = 0
        for i in range(len(messages) - 1):
            if total <= budget and messages[i].get("role") == "user":
                break  # fits, and what is left starts with a question
            if messages[i].get("role") in ("system", "developer"):
                continue
            keep[i] = False
            total -= sizes[i]
            dropped += 1
        if total > budget:
            raise BadRequest(f"the conversation does not fit the model's context budget of {budget} characters "
                             "even with every earlier turn dropped", param="messages")
        cut = {"dropped_messages": dropped, "budget_chars": budget, "sent_chars": total}
        for meta in (self.user_message["meta"], self._draft["meta"], self.extra_meta):
            meta["context_cut"] = cut
        return [m for m, kept in zip(messages, keep, strict=True) if kept]

    def _open_turn(self) -> None:
        """Start writing the turn's rows (none when stateless: accepted at once).

        The write runs beside the upstream call. If it fails, the upstream is cut
        and the flight fails with the store's error; the write is one transaction,
        so nothing is half-written.
        """
        turn = self.turn
        if turn.thread_id is None:
            self._accept()
            return
        self._opening = asyncio.ensure_future(
            self._store.begin_turn(org_id=turn.org_id, user=self.user_message, assistant=self._draft,
                                   owner=self.owner))
        self._opening.add_done_callback(self._rows_written)

    def _rows_written(self, opening: asyncio.Future[None]) -> None:
        if opening.cancelled():
            return
        self._rows_settled = True
        exc = opening.exception()
        if exc is None:
            self._accept()
            return
        if isinstance(exc, LookupError):
            self._rows_failed = NotFound("thread not found (it was deleted)")
        else:
            log.error("could not write the turn of thread %s", self.turn.thread_id, exc_info=exc)
            self._rows_failed = StoreError(f"could not save the message ({exc.__class__.__name__}); try again")
        if self._pulling and self.task is not None:
            self.task.cancel()

    async def _turn_opened(self) -> None:
        """Wait for the turn's rows; raise what stopped them."""
        if self._opening is not None and not self._rows_settled:
            await asyncio.wait([self._opening])
        if self._rows_failed is not None:
            raise self._rows_failed

    def _accept(self) -> None:
        self.message = self._draft
        self._accepted.set()

    async def _pull(self, messages: list[ChatMessage]) -> None:
        turn = self.turn
        provider = turn.provider
        metrics = self._metrics
        gap = metrics.inter_chunk.labels(provider.name)
        pulled = 0  # output chunks, counted in dac_stream_deltas_total once the call ends
        request = ProviderRequest(model=turn.model, messages=messages, params=dict(turn.params), stream=turn.stream)
        started = last = self.upstream_started = time.perf_counter()
        stream = provider.stream(request)
        answer = self.answer
        self._pulling = True
        try:
            async with aclosing(stream):
                async for chunk in stream:
                    if chunk.has_output():
                        now = time.perf_counter()
                        first_output = first_text = False
                        if self.ttfb_s is None:
                            provider.answered = first_output = True
                            self.ttfb_s = now - started
                        if chunk.text:
                            if self.ttft_s is None:
                                first_text = True
                                self.first_text_at = now
                                self.first_text_seq = self.log.last_seq + 1
                                self.ttft_s = now - started
                            else:
                                gap.observe(now - last)
                            last = now
                        extra = answer.add(chunk) if chunk.reasoning or chunk.refusal or chunk.tool_calls else None
                        cut = self._append(chunk.text, extra)
                        pulled += 1
                        if first_text and turn.stream:
                            await self._first_text_out(first_output)
                        elif first_output or first_text:
                            self._count_first(first_output, first_text)
                        if cut:
                            answer.finish_reason = "length"
                            break
                    if chunk.finish_reason is not None:
                        answer.finish_reason = chunk.finish_reason
                    if chunk.usage:
                        self.usage = chunk.usage
                    if chunk.meta:
                        self.extra_meta.update(chunk.meta)
        finally:
            self._pulling = False
            if pulled:
                metrics.deltas.labels(provider.name).inc(pulled)
            if self.cancel_reason is not None and self.zero_since is not None:
                metrics.cancel_latency.labels(provider.name).observe(time.perf_counter() - self.zero_since)

    async def _first_text_out(self, output: bool) -> None:
        """A streamed answer's first text was just appended: the clients waiting for it (woken
        by the append) write it before this task counts it or parses the rest of what it read."""
        try:
            await asyncio.sleep(0)
        finally:
            self._count_first(output, True)

    def _count_first(self, output: bool, text: bool) -> None:
        """Count the time to the first output, and to the first text."""
        turn = self.turn
        if output:
            self._metrics.first_byte(turn.provider.name, turn.model, self.ttfb_s or 0.0)
        if text:
            self._metrics.first_token(turn.provider.name, turn.model, self.ttft_s or 0.0)

    def _append(self, text: str, extra: DeltaExtra | None) -> bool:
        """Append a delta, cut at ``DAC_MAX_ANSWER_CHARS``: True when the answer reached it
        (it then ends with finish_reason ``length``); checkpoint the text when due."""
        limit = self._settings.max_answer_chars
        cut = bool(limit) and self._chars + len(text) >= limit
        if cut:
            text = text[:limit - self._chars]
            self.extra_meta["finish_reason"] = "length"
        if text or extra:
            self.log.append(text, extra)
            self._chars += len(text)
        if self.turn.thread_id is not None:  # a stateless turn has no row to checkpoint
            self._checkpoint()
        return cut

    def _checkpoint(self) -> None:
        """Write the text so far to the row every ``DAC_CHECKPOINT_DELTAS`` deltas or
        ``DAC_CHECKPOINT_S`` seconds, one write at a time, beside the stream (never
        waited for): after a crash the row keeps what was delivered up to the last one."""
        s = self._settings
        if self.turn.thread_id is None or self.message is None or self._checkpointing is not None:
            return
        seq, now = self.log.last_seq, time.monotonic()
        if not ((s.checkpoint_deltas and seq - self._checkpointed >= s.checkpoint_deltas)
                or (s.checkpoint_s and now - self._checkpoint_at >= s.checkpoint_s)):
            return
        self._checkpointed, self._checkpoint_at = seq, now
        self._checkpointing = asyncio.ensure_future(
            self._store.checkpoint(message_id=self.stream_id, content=self.log.text(), deltas=seq,
                                   owner=self.owner))
        self._checkpointing.add_done_callback(self._checkpoint_done)

    def _checkpoint_done(self, writing: asyncio.Future[bool]) -> None:
        self._checkpointing = None
        if not writing.cancelled() and writing.exception() is not None:
            log.warning("could not checkpoint message %s: %s", self.stream_id, writing.exception())
        elif not writing.cancelled() and writing.result() is False and self._pulling:
            # the row ended while the answer still streams (not the final write overtaking
            # this one): another instance ended it, so this one is a stale leader
            self._refused("checkpoint")
            self.fail(LeaderLost("this instance lost the answer: another instance ended it (its row is "
                                 "no longer this instance's)"))
        elif self.running and self._pulling:
            self._checkpoint()  # deltas that came while it was written may be due already

    async def _close_turn(self, status: MessageStatus, error: GatewayError | None) -> None:
        """Save the outcome, then end the log: a client that sees ``done`` finds the row saved."""
        turn = self.turn
        if self._opening is not None and not self._rows_settled:
            await asyncio.wait([self._opening])  # the rows exist either way once it ends: record them
        if self.message is not None:
            meta = self._final_message(status, error)
            if turn.thread_id is not None:
                try:
                    saved = await self._store.finish_turn(message_id=self.stream_id, status=status,
                                                          content=self.message["content"], usage=self.usage,
                                                          meta=meta, deltas=self.log.last_seq, owner=self.owner)
                    if not saved:  # a stale leader: the row is another instance's word now
                        self._refused("finish")
                        if not isinstance(error, LeaderLost):
                            error = LeaderLost("this instance lost the answer: another instance ended it "
                                               "before it was saved; ask again")
                        status = MessageStatus.INTERRUPTED
                        self.message = {**self.message, "status": status}
                except Exception as exc:
                    log.error("could not save message %s: %s", self.stream_id, exc)
                    if error is None:  # the answer was whole but is not saved: say so, keep nothing
                        error = StoreError(f"the answer could not be saved ({exc.__class__.__name__}: {exc}); "
                                           "try again")
                        status = MessageStatus.ERROR
                        self.message = {**self.message, "status": status}
        self._count_and_settle(status, error)

    def _conclude(self, status: MessageStatus, error: GatewayError | None) -> None:
        """:meth:`_close_turn` of a turn without rows, in one step: nothing to wait for."""
        if self.message is not None:
            self._final_message(status, error)
        self._count_and_settle(status, error)

    def _final_message(self, status: MessageStatus, error: GatewayError | None) -> dict[str, Any]:
        """The assistant message as the flight ends; returns its meta."""
        assert self.message is not None
        meta = {**self.message["meta"], **self.extra_meta, **self.answer.meta()}
        if error is not None and status is MessageStatus.ERROR:
            meta["error"] = error.to_dict()
        self.message = {**self.message, "status": status, "content": self.log.text(),
                        "usage": self.usage, "meta": meta}
        return meta

    def _count_and_settle(self, status: MessageStatus, error: GatewayError | None) -> None:
        """Count the call, then :meth:`_settle`."""
        turn = self.turn
        provider = turn.provider.name
        if self.usage:
            self._metrics.token_usage(provider, self.usage)
        if self.upstream_started is not None:
            duration = time.perf_counter() - self.upstream_started
            self._metrics.upstream_finished(provider=provider, model=turn.model, outcome=Outcome.of(status),
                                            duration_s=duration, answered=self.ttfb_s is not None)
            if status is MessageStatus.COMPLETE and self.ttfb_s is not None and turn.stream:
                # a whole answer arrives at once: it has no time between its tokens
                self._metrics.time_per_output_token(provider, turn.model, duration_s=duration,
                                                    first_s=self.ttfb_s, usage=self.usage)
        if self.cancel_reason is not None:
            self._metrics.cancels.labels(provider, self.cancel_reason).inc()
        self._settle(status, error)

    def _refused(self, write: str) -> None:
        """A fenced write of this flight's row was refused: count it and say so."""
        self._metrics.refused_writes.labels(write).inc()
        log.warning("refused the %s write of message %s: its row is no longer streaming as %s's "
                    "(this instance lost the lead)", write, self.stream_id, self.owner)

    def _settle(self, status: MessageStatus, error: GatewayError | None) -> None:
        """Record the outcome and end the log with ``done`` or ``error``; every listener wakes,
        and the registry learns of the end, whatever closing the log does."""
        self.error = error
        self.finished_at = self._clock()
        try:
            # the final frame is encoded when a reader of frames first asks (/v1 never does)
            if error is None:
                self.state = FlightState.DONE
                message, seq = self.message, self.log.last_seq + 1
                self.log.close(lambda: encode_event("done", {"message": message}, seq))
            else:
                cancelled = status in (MessageStatus.CANCELLED, MessageStatus.INTERRUPTED)
                self.state = FlightState.CANCELLED if cancelled else FlightState.FAILED
                self.log.close(lambda: encode_event("error", {"error": error.to_dict()}))
        finally:
            self.finished.set()
            self._accepted.set()
            self._on_end(self)
