"""The replay log of one flight: a bounded ring of encoded SSE events.

Deltas get absolute sequence numbers ``1, 2, 3, ...``. Each is encoded to SSE
bytes once, when appended, and every subscriber writes those same bytes. The
ring holds the newest ``capacity`` deltas; the text of every delta is kept
too (the whole answer is stored at the end anyway), so a subscriber whose
cursor fell behind the ring gets one ``snapshot`` event with the text so far
and carries on from the newest delta.

Two ways to read, neither with a per-subscriber queue, so a slow client costs
the others nothing:

- **By cursor** (:meth:`EventLog.read`, :meth:`EventLog.wait`): the next
  sequence number a subscriber wants plus a shared wake-up. Subscribers that
  replay or catch up read like this (``/v1`` by :meth:`EventLog.deltas`: it
  frames deltas its own way).
- **Pushed** (:meth:`EventLog.subscribe`): a subscriber at the live edge hands
  the log a :class:`Sink`, and the log writes new frames to every sink itself,
  with no task woken per subscriber; a sink with an :data:`Encoder` (``/v1``)
  is written what that makes of the deltas and the end instead of the frames. It does so in *passes* over the sinks:
  a pass writes each sink, as one write, every frame it has not been written
  yet. A pass starts on the loop turn after an append; a long one (more than
  :data:`PASS_STEP` sinks) yields to the loop between steps, so that what the
  leader appends meanwhile goes to the rest of the pass's sinks at once, and
  the sinks before get it from the next pass, which starts as soon as this
  one ends. Under load a write so carries several deltas, and no delta waits
  much longer than one pass. The subscriptions that the final frame ends
  end once the last pass is over: their handlers wake up after it, not
  between its steps, and :data:`PASS_STEP` of them a loop turn. A sink whose transport is paused (over its
  high-water mark) is written nothing: it leaves the push set and its
  subscriber falls back to its cursor and replays. While nothing is appended
  for ``ping_interval_s``, the log pushes a ``: ping`` comment to every sink.

A delta is one piece of output: answer text, and beside it, when the model
sent them, pieces of its reasoning, of a refusal or of tool calls
(:class:`DeltaExtra`). Its ``delta`` event's data is ``{"text": ...}`` plus
those fields only when present; a ``snapshot`` covers the answer text so far
and carries, when there are any, the whole reasoning and refusal so far and
every tool-call piece so far (in order, to be assembled like the deltas').

Invariants (the leader task is the only writer):

- ``last_seq`` is the sequence number of the newest delta (0 before any).
- delta ``s`` is in the ring iff ``first_seq <= s <= last_seq``; it lives in
  ``_slots[(s - 1) % capacity]``. The ring grows to ``capacity`` only as deltas
  arrive, so a short answer kept for the result TTL holds only its own frames.
- once ``closed`` (its ``final`` frame a ``done`` or ``error``) nothing is appended.
- a delta's frame, and the final frame, are encoded when first read: a reader
  that frames deltas its own way (``/v1``) costs no SSE encoding.
- a pushed sink's ``cursor`` is the next sequence number it has not been
  written; every frame before it was written to it exactly once, in order.
"""

from __future__ import annotations

import asyncio
import sys
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypedDict

import orjson

__all__ = ["PING", "Delta", "DeltaExtra", "Encoder", "EventLog", "FinishedLog", "FlightLog", "Sink", "encode_event"]

#: the keep-alive comment pushed to idle subscribers
PING = b": ping\n\n"
#: sinks written per step of a pass; the loop runs between steps (a write costs some microseconds)
PASS_STEP = 256


def encode_event(event: str | None, data: Any, id: int | None = None) -> bytes:
    """One SSE frame. ``data`` is JSON-encoded (orjson never emits newlines)."""
    head = b""
    if id is not None:
        head += b"id: %d\n" % id
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


class DeltaExtra(TypedDict, total=False):
    """What a delta carries beside the answer text; each field only when not empty."""

    #: a piece of the model's reasoning, to append to the pieces before
    reasoning: str
    #: a piece of a refusal, to append
    refusal: str
    #: tool-call pieces in OpenAI's shape (``index``; ``id``, ``type`` and
    #: ``function.name`` on the first piece of an index; ``function.arguments`` to append)
    tool_calls: Sequence[Mapping[str, object]]


class Delta(NamedTuple):
    """One delta as readers that frame their own events see it (:meth:`EventLog.deltas`)."""

    text: str
    extra: DeltaExtra | None


def _present(extra: DeltaExtra | None) -> DeltaExtra | None:
    """``extra`` without its empty fields; None when nothing is left."""
    if not extra:
        return None
    kept = DeltaExtra()
    if reasoning := extra.get("reasoning"):
        kept["reasoning"] = reasoning
    if refusal := extra.get("refusal"):
        kept["refusal"] = refusal
    if tool_calls := extra.get("tool_calls"):
        kept["tool_calls"] = list(tool_calls)
    return kept or None


class Sink(Protocol):
    """Where the log pushes a subscriber's frames (an HTTP response's transport)."""

    def push(self, data: bytes) -> bool:
        """Write ``data`` now, without waiting. Return False, having written nothing,
        when the transport is paused over its high-water mark or gone."""


#: how a surface that frames deltas its own way (``/v1``) has its sink written: the bytes
#: of every delta from a cursor on, and of the end when the log is closed (b"" for none)
Encoder = Callable[[int], bytes]


class _Pushed:
    """A pushed subscription: its sink (None once it ended), the sink's next unwritten seq,
    how its subscriber waits, and its encoder (None: the log's own frames)."""

    __slots__ = ("cursor", "encode", "ended", "sink")

    def __init__(self, sink: Sink, cursor: int, ended: asyncio.Future[int | None],
                 encode: Encoder | None = None) -> None:
        self.sink: Sink | None = sink
        self.cursor = cursor
        self.ended = ended
        self.encode = encode


class FlightLog(Protocol):
    """What a flight's leader writes and its subscribers read: the log seam.

    Guarantees every implementation keeps:

    - **Order.** Deltas get ``1, 2, 3, ...`` in the order :meth:`append` was called,
      and every reader sees them in that order, each once.
    - **One end.** After :meth:`close` nothing is appended; the final frame is
      the last thing every reader gets.
    - **Replay.** A reader at any cursor gets every delta still held from there
      on; one the log no longer holds is covered by a single ``snapshot``.
    - **No lost wake-up.** :meth:`wait` returns as soon as something is at the
      cursor or the log is closed, even if that happened before it was called.
    """

    @property
    def last_seq(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def append(self, text: str, extra: DeltaExtra | None = None) -> int: ...

    def close(self, frame: bytes | Callable[[], bytes]) -> None: ...

    def text(self, upto: int | None = None) -> str: ...

    def extra(self, upto: int | None = None) -> DeltaExtra: ...

    def read(self, cursor: int) -> tuple[list[bytes], int, bool]: ...

    def texts(self, cursor: int) -> tuple[list[str], int, bool]: ...

    def deltas(self, cursor: int) -> tuple[list[Delta], int, bool]: ...

    async def wait(self, cursor: int) -> None: ...

    def subscribe(self, sink: Sink, cursor: int, encode: Encoder | None = None) -> asyncio.Future[int | None]: ...

    def unsubscribe(self, sink: Sink) -> None: ...

    def stop(self, sink: Sink) -> bool: ...


def _joined(extras: Mapping[int, DeltaExtra], upto: int | None) -> DeltaExtra:
    """What deltas ``1..upto`` carried beside the text, joined (see :meth:`EventLog.extra`)."""
    reasoning: list[str] = []
    refusal: list[str] = []
    tool_calls: list[Mapping[str, object]] = []
    for seq in sorted(extras):
        if upto is not None and seq > upto:
            break
        extra = extras[seq]
        reasoning.append(extra.get("reasoning", ""))
        refusal.append(extra.get("refusal", ""))
        tool_calls.extend(extra.get("tool_calls", ()))
    whole = _present(DeltaExtra(reasoning="".join(reasoning), refusal="".join(refusal), tool_calls=tool_calls))
    return whole or DeltaExtra()


def _end(ended: asyncio.Future[int | None], value: int | None) -> None:
    """End a pushed subscription, unless its subscriber is gone already (its handler was
    cancelled when its client left, before it could unsubscribe)."""
    if not ended.done():
        ended.set_result(value)


class _Texts:
    """Every delta's text, in little memory: deltas joined in blocks of :data:`BLOCK`, and
    where each delta ends (4 bytes a delta) instead of a string object per delta."""

    BLOCK = 256
    __slots__ = ("blocks", "ends", "tail")

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.tail: list[str] = []  # the deltas of the block being filled
        self.ends = array("I")  # ends[i]: where delta i + 1 ends in the whole text

    def append(self, text: str) -> None:
        self.ends.append((self.ends[-1] if self.ends else 0) + len(text))
        self.tail.append(text)
        if len(self.tail) == self.BLOCK:
            self.blocks.append("".join(self.tail))
            self.tail = []

    def upto(self, n: int) -> str:
        """The text of the first ``n`` deltas."""
        if n <= 0:
            return ""
        whole = "".join(self.blocks) + "".join(self.tail)
        return whole if n >= len(self.ends) else whole[:self.ends[n - 1]]

    def each(self, cursor: int, last: int) -> list[str]:
        """The text of each delta from ``cursor`` to ``last``, one string a delta."""
        out: list[str] = []
        size, ends, blocks = self.BLOCK, self.ends, self.blocks
        for i in range(cursor - 1, last):  # i: 0-based index of the delta
            b = i // size
            if b < len(blocks):
                base = ends[b * size - 1] if b else 0
                out.append(blocks[b][(ends[i - 1] if i else 0) - base:ends[i] - base])
            else:
                out.append(self.tail[i - b * size])
        return out

    def since(self, cursor: int, last: int) -> list[str]:
        """The texts of deltas ``cursor`` to ``last`` (a block's deltas as one piece)."""
        out: list[str] = []
        i, size, ends = cursor - 1, self.BLOCK, self.ends  # i: 0-based index of the next delta
        while i < last:
            b = i // size
            if b < len(self.blocks):
                block, base = self.blocks[b], (ends[b * size - 1] if b else 0)
                stop = min(last, (b + 1) * size)
                out.append(block[(ends[i - 1] if i else 0) - base:ends[stop - 1] - base])
                i = stop
            else:
                out.extend(self.tail[i - b * size:last - b * size])
                i = last
        return out


class EventLog:
    """The in-process :class:`FlightLog`: a ring of encoded frames and the texts."""

    def __init__(self, *, capacity: int, ping_interval_s: float | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.ping_interval_s = ping_interval_s
        #: the ring of delta frames, each encoded when first read (None until then)
        self._slots: list[bytes | None] = []
        self._parts = _Texts()
        #: what deltas carry beside the text, by seq (only those that carry something)
        self._extras: dict[int, DeltaExtra] = {}
        self.last_seq = 0
        self.closed = False
        self._final: bytes | None = None
        self._make_final: Callable[[], bytes] | None = None
        #: woken at each append and at the end; made only while a reader waits
        self._wakeup: asyncio.Event | None = None
        #: the pushed subscriptions by sink, and in the order passes write them (with some
        #: that ended, ``sink`` None, until the next pass leaves them out)
        self._pushed: dict[Sink, _Pushed] = {}
        self._order: list[_Pushed] = []
        self._ended_in_order = 0
        #: the index in ``_order`` of the next sink the pass under way writes; None between passes
        self._pass_next: int | None = None
        #: something was appended during the pass: another one follows it
        self._again = False
        #: subscriptions the pass wrote the final frame to: they end with it (their handlers
        #: wake up then, not between its steps)
        self._done: list[asyncio.Future[int | None]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._pushed_at = 0.0  # loop time of the last write to the sinks

    # -- writer side (the leader task) ------------------------------------

    def append(self, text: str, extra: DeltaExtra | None = None) -> int:
        """Add one delta: answer ``text`` (maybe empty) and what it carries beside it."""
        if self.closed:
            raise RuntimeError("append after the log was closed")
        seq = self.last_seq + 1
        if extra is not None and (extra := _present(extra)) is not None:
            self._extras[seq] = extra
        # its frame is encoded when first read: a surface that frames deltas its own way
        # (/v1) never reads one
        if len(self._slots) < self.capacity:
            self._slots.append(None)
        else:
            self._slots[(seq - 1) % self.capacity] = None
        self._parts.append(text)
        self.last_seq = seq
        if self._wakeup is not None:
            self._notify()
        if self._pushed:
            self._push_soon()
        return seq

    def _frame(self, seq: int) -> bytes:
        """The ``delta`` frame of ``seq`` (in the ring), encoded once."""
        index = (seq - 1) % self.capacity
        frame = self._slots[index]
        if frame is None:
            text = self._parts.each(seq, seq)[0]
            extra = self._extras.get(seq)
            frame = self._slots[index] = encode_event(
                "delta", {"text": text} if extra is None else {"text": text, **extra}, seq)
        return frame

    @property
    def final(self) -> bytes | None:
        """The ``done`` or ``error`` frame once the log is closed (None before)."""
        if self._final is None and self._make_final is not None:
            self._final, self._make_final = self._make_final(), None
        return self._final

    def close(self, frame: bytes | Callable[[], bytes]) -> None:
        """End the log with a ``done`` or ``error`` frame, or what makes it when first read
        (a surface with its own framing never reads it); later calls change nothing.

        The frame is pushed at once, and every pushed subscription ends.
        """
        if not self.closed:
            self.closed = True
            if isinstance(frame, bytes):
                self._final = frame
            else:
                self._make_final = frame
            self._notify()
            if self._pass_next is None:
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                self._flush()
            else:
                self._again = True

    def _notify(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    def finished(self, text: str | None = None) -> FinishedLog:
        """This closed log in the least memory (see :class:`FinishedLog`); ``text``: the
        whole text if the caller holds it already, so the two share one string."""
        final = self.final
        assert final is not None, "only a closed log can be compacted"
        whole = self.text() if text is None else text
        return FinishedLog(text=whole, ends=self._parts.ends, extras=self._extras, final=final,
                           capacity=self.capacity)

    # -- reader side (subscribers) ---------------------------------------

    @property
    def first_seq(self) -> int:
        return max(1, self.last_seq - self.capacity + 1)

    def text(self, upto: int | None = None) -> str:
        return self._parts.upto(self.last_seq if upto is None else upto)

    def extra(self, upto: int | None = None) -> DeltaExtra:
        """Everything deltas ``1..upto`` carried beside the text, joined: the whole reasoning
        and refusal so far, and every tool-call piece so far in order."""
        return _joined(self._extras, upto)

    def read(self, cursor: int) -> tuple[list[bytes], int, bool]:
        """Frames for a subscriber whose next wanted delta is ``cursor``.

        Returns ``(frames, new_cursor, finished)``; ``finished`` means the
        final frame is among ``frames`` and the subscriber is done.
        """
        frames: list[bytes] = []
        last = self.last_seq
        if cursor <= last:
            if cursor < self.first_seq:
                frames.append(encode_event("snapshot", {"text": self.text(last), **self.extra(last)}, last))
            else:
                frames.extend(map(self._frame, range(cursor, last + 1)))
            cursor = last + 1
        if self.closed:
            frames.append(self.final)  # type: ignore[arg-type]  # set once closed
            return frames, cursor, True
        return frames, cursor, False

    def texts(self, cursor: int) -> tuple[list[str], int, bool]:
        """Delta texts from ``cursor`` on, for readers that frame them their own way (/v1).

        Every text is kept, not only the ring's, so nothing is ever replaced by
        a snapshot. Returns ``(texts, new_cursor, finished)``; ``finished``
        means the log is closed and ``texts`` reach its end.
        """
        last = self.last_seq
        texts = self._parts.since(cursor, last) if cursor <= last else []
        return texts, max(cursor, last + 1), self.closed

    def deltas(self, cursor: int) -> tuple[list[Delta], int, bool]:
        """Deltas from ``cursor`` on, as :meth:`texts` gives texts, each with what it carries
        beside the text: readers that frame every delta their own way keep its chunking."""
        last = self.last_seq
        extras = self._extras
        deltas = [Delta(text, extras.get(seq)) for seq, text in enumerate(self._parts.each(cursor, last), cursor)]
        return deltas, max(cursor, last + 1), self.closed

    async def wait(self, cursor: int) -> None:
        """Return once there is something at ``cursor`` or the log is closed."""
        while cursor > self.last_seq and not self.closed:
            wakeup = self._wakeup
            if wakeup is None:
                wakeup = self._wakeup = asyncio.Event()
            await wakeup.wait()

    # -- pushed subscribers -------------------------------------------------

    def subscribe(self, sink: Sink, cursor: int, encode: Encoder | None = None) -> asyncio.Future[int | None]:
        """Push every frame from ``cursor`` on to ``sink``, from the next loop turn; with
        ``encode``, what it returns instead of the log's frames (``/v1``'s chunks).

        Call it at the live edge (``cursor`` is past the last frame read), in the
        same step as that read. The future ends the subscription: ``None`` once
        the final frame was written to the sink, or the cursor to replay from
        when the sink fell behind (nothing from there on was written to it) or
        was stopped (:meth:`stop`: -1).
        """
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[int | None] = loop.create_future()
        sub = _Pushed(sink, cursor, ended, encode)
        self._drop(self._pushed.get(sink))
        self._pushed[sink] = sub
        self._order.append(sub)  # a pass under way reaches it too: it joins the end
        if (self.last_seq >= cursor or self.closed) and self._pass_next is None:
            self._push_soon()
        if self._ping_handle is None and self.ping_interval_s:
            self._pushed_at = loop.time()
            self._ping_handle = loop.call_later(self.ping_interval_s, self._ping)
        return ended

    def unsubscribe(self, sink: Sink) -> None:
        """Stop pushing to ``sink`` (its client left, or its handler was cancelled);
        harmless if it is not pushed to."""
        self._drop(self._pushed.get(sink))

    def stop(self, sink: Sink) -> bool:
        """End ``sink``'s pushed subscription with -1 (its client asked to stop)."""
        sub = self._pushed.get(sink)
        if sub is None:
            return False
        self._drop(sub)
        _end(sub.ended, -1)
        return True

    def _drop(self, sub: _Pushed | None) -> None:
        """Push nothing more to ``sub``'s sink (passes skip it from now on)."""
        if sub is not None and sub.sink is not None:
            del self._pushed[sub.sink]
            sub.sink = None
            self._ended_in_order += 1
            if self._pass_next is None and self._ended_in_order > max(64, len(self._order) // 2):
                self._compact()  # subscribers come and go while nothing is appended

    def _compact(self) -> None:
        """Leave the ended subscriptions out of ``_order`` (never during a pass)."""
        self._order = [sub for sub in self._order if sub.sink is not None]
        self._ended_in_order = 0

    def _push_soon(self) -> None:
        """Have the sinks written from the next loop turn: a new pass, or another after this one."""
        if self._pass_next is not None:
            self._again = True
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """One step of a pass: write the next :data:`PASS_STEP` sinks of the pass what they
        have not been written yet; end what cannot go on. See the module's docstring."""
        self._flush_handle = None
        begin = self._pass_next
        if begin is None:  # a new pass
            if not self._pushed:  # every sink left since the pass was asked for
                self._order, self._ended_in_order = [], 0
                self._end_done()
                return
            if self._ended_in_order > len(self._order) // 2:
                self._compact()
            begin, self._again = 0, False
        self._pass_next = begin  # a pass is under way: nothing compacts ``_order`` meanwhile
        order = self._order
        stop = min(len(order), begin + PASS_STEP)
        last, closed = self.last_seq, self.closed
        common, data = -1, b""
        fallen: list[_Pushed] = []
        for sub in order[begin:stop]:
            sink = sub.sink
            if sink is None:
                continue  # it left, fell back or was stopped
            cursor = sub.cursor
            if sub.encode is not None:  # a surface's own framing: its own bytes
                common, data = -1, sub.encode(cursor)
            elif cursor != common:  # almost every sink shares one cursor: one join serves them
                common, data = cursor, b"".join(self.read(cursor)[0])
            if data:
                if not sink.push(data):
                    fallen.append(sub)
                    continue
                if cursor <= last:  # a cursor ahead of the log stays where it is
                    sub.cursor = last + 1
            if closed:
                self._drop(sub)
                self._done.append(sub.ended)
        self._fall_back(fallen)
        loop = asyncio.get_running_loop()
        if stop < len(order):
            self._pass_next = stop
            self._flush_handle = loop.call_soon(self._flush)
            return
        self._pass_next = None
        self._pushed_at = loop.time()
        if not self._pushed:
            self._order, self._ended_in_order = [], 0
        if self._again and self._pushed:
            self._flush_handle = loop.call_soon(self._flush)
            return
        if self._ping_handle is not None and (closed or not self._pushed):
            self._ping_handle.cancel()
            self._ping_handle = None
        self._end_done()

    def _end_done(self) -> None:
        """After the last pass of the log: the subscriptions it ended end now, :data:`PASS_STEP`
        a loop turn, as a pass writes them. Their handlers then finish their responses, and
        their clients, which have it all, close their connections: a step at a time, what
        the ones before held is freed while the next ones finish, rather than every
        subscriber's end being held at once."""
        if self._done:
            done, self._done = self._done[:PASS_STEP], self._done[PASS_STEP:]
            for ended in done:
                _end(ended, None)
            if self._done:
                asyncio.get_running_loop().call_soon(self._end_done)

    def _fall_back(self, fallen: list[_Pushed]) -> None:
        """End the pushed subscriptions of sinks that took nothing: each replays from its cursor."""
        for sub in fallen:
            self._drop(sub)
            _end(sub.ended, sub.cursor)

    def _ping(self) -> None:
        """Push a keep-alive comment to every sink if nothing was written for a while."""
        self._ping_handle = None
        if not self._pushed or self.closed or self.ping_interval_s is None:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._pushed_at
        if idle >= self.ping_interval_s:
            self._fall_back([sub for sink, sub in self._pushed.items() if not sink.push(PING)])
            self._pushed_at = loop.time()
            idle = 0.0
        if self._pushed:
            self._ping_handle = loop.call_later(self.ping_interval_s - idle, self._ping)


class FinishedLog:
    """A closed :class:`EventLog` kept for the result TTL, in the least memory: the whole
    text once and where each delta ends (4 bytes a delta), instead of a string per delta
    and a ring of frames. Readers see the same events: the frames of the newest
    ``capacity`` deltas are encoded again when read, older ones are one ``snapshot``."""

    def __init__(self, *, text: str, ends: array[int], extras: dict[int, DeltaExtra], final: bytes,
                 capacity: int) -> None:
        self._text = text
        self._ends = ends
        self._extras = extras
        self.final: bytes | None = final
        self.capacity = capacity

    @property
    def last_seq(self) -> int:
        return len(self._ends)

    @property
    def closed(self) -> bool:
        return True

    def size_bytes(self) -> int:
        """What it holds in memory, roughly: the text, the offsets and the final frame."""
        assert self.final is not None
        extras = sum(len(orjson.dumps(extra)) for extra in self._extras.values())
        return sys.getsizeof(self._text) + len(self._ends) * self._ends.itemsize + len(self.final) + extras + 256

    def append(self, text: str, extra: DeltaExtra | None = None) -> int:
        raise RuntimeError("append after the log was closed")

    def close(self, frame: bytes | Callable[[], bytes]) -> None:
        """Already closed: nothing changes."""

    def _start(self, seq: int) -> int:
        return self._ends[seq - 2] if seq > 1 else 0

    def text(self, upto: int | None = None) -> str:
        if upto is None or upto >= self.last_seq:
            return self._text
        return self._text[:self._ends[upto - 1]] if upto > 0 else ""

    def extra(self, upto: int | None = None) -> DeltaExtra:
        return _joined(self._extras, upto)

    def _delta(self, seq: int) -> str:
        return self._text[self._start(seq):self._ends[seq - 1]]

    def read(self, cursor: int) -> tuple[list[bytes], int, bool]:
        assert self.final is not None
        frames: list[bytes] = []
        last = self.last_seq
        if cursor <= last:
            if cursor < max(1, last - self.capacity + 1):
                frames.append(encode_event("snapshot", {"text": self._text, **self.extra(last)}, last))
            else:
                extras = self._extras
                frames.extend(encode_event("delta", {"text": self._delta(s), **extras.get(s, {})}, s)
                              for s in range(cursor, last + 1))
            cursor = last + 1
        frames.append(self.final)
        return frames, cursor, True

    def deltas(self, cursor: int) -> tuple[list[Delta], int, bool]:
        last, extras = self.last_seq, self._extras
        deltas = [Delta(self._delta(s), extras.get(s)) for s in range(cursor, last + 1)]
        return deltas, max(cursor, last + 1), True

    def texts(self, cursor: int) -> tuple[list[str], int, bool]:
        last = self.last_seq
        texts = [self._text[self._start(cursor):]] if cursor <= last else []
        return texts, max(cursor, last + 1), True

    async def wait(self, cursor: int) -> None:
        """Closed: there is never anything to wait for."""

    def subscribe(self, sink: Sink, cursor: int, encode: Encoder | None = None) -> asyncio.Future[int | None]:
        """Push the rest at once and end (readers normally finish by :meth:`read`)."""
        sink.push(b"".join(self.read(cursor)[0]) if encode is None else encode(cursor))
        ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        ended.set_result(None)
        return ended

    def unsubscribe(self, sink: Sink) -> None:
        """Nothing is pushed after :meth:`subscribe`."""

    def stop(self, sink: Sink) -> bool:
        return False
