"""The replay log of one flight: a bounded ring of encoded SSE events.

Deltas get absolute sequence numbers ``1, 2, 3, ...``. Each is encoded to SSE
bytes once, when appended, and every subscriber writes those same bytes. The
ring holds the newest ``capacity`` deltas; the text of every delta is kept
too (the whole answer is stored at the end anyway), so a subscriber whose
cursor fell behind the ring gets one ``snapshot`` event with the text so far
and carries on from the newest delta.

A subscriber is only a cursor (the next sequence number it wants) plus a
wake-up: there is no per-subscriber queue, so a slow client costs the others
nothing.

Invariants (the leader task is the only writer):

- ``last_seq`` is the sequence number of the newest delta (0 before any).
- delta ``s`` is in the ring iff ``first_seq <= s <= last_seq``; it lives in
  ``_slots[(s - 1) % capacity]``. The ring grows to ``capacity`` only as deltas
  arrive, so a short answer kept for the result TTL holds only its own frames.
- once ``final`` is set (a ``done`` or ``error`` frame) nothing is appended.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import orjson

__all__ = ["EventLog", "FlightLog", "encode_event"]


def encode_event(event: str | None, data: Any, id: int | None = None) -> bytes:
    """One SSE frame. ``data`` is JSON-encoded (orjson never emits newlines)."""
    head = b""
    if id is not None:
        head += b"id: %d\n" % id
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


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

    def append(self, text: str) -> int: ...

    def close(self, frame: bytes) -> None: ...

    def text(self, upto: int | None = None) -> str: ...

    def read(self, cursor: int) -> tuple[list[bytes], int, bool]: ...

    def texts(self, cursor: int) -> tuple[list[str], int, bool]: ...

    async def wait(self, cursor: int) -> None: ...


class EventLog:
    """The in-process :class:`FlightLog`: a ring of encoded frames and the texts."""

    def __init__(self, *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._slots: list[bytes] = []
        self._parts: list[str] = []
        self.last_seq = 0
        self.final: bytes | None = None
        self._wakeup = asyncio.Event()

    # -- writer side (the leader task) ------------------------------------

    def append(self, text: str) -> int:
        if self.final is not None:
            raise RuntimeError("append after the log was closed")
        seq = self.last_seq + 1
        frame = encode_event("delta", {"text": text}, seq)
        if len(self._slots) < self.capacity:
            self._slots.append(frame)
        else:
            self._slots[(seq - 1) % self.capacity] = frame
        self._parts.append(text)
        self.last_seq = seq
        self._notify()
        return seq

    def close(self, frame: bytes) -> None:
        """End the log with a ``done`` or ``error`` frame; later calls change nothing."""
        if self.final is None:
            self.final = frame
            self._notify()

    def _notify(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    # -- reader side (subscribers) ---------------------------------------

    @property
    def closed(self) -> bool:
        return self.final is not None

    @property
    def first_seq(self) -> int:
        return max(1, self.last_seq - self.capacity + 1)

    def text(self, upto: int | None = None) -> str:
        return "".join(self._parts if upto is None else self._parts[:upto])

    def read(self, cursor: int) -> tuple[list[bytes], int, bool]:
        """Frames for a subscriber whose next wanted delta is ``cursor``.

        Returns ``(frames, new_cursor, finished)``; ``finished`` means the
        final frame is among ``frames`` and the subscriber is done.
        """
        frames: list[bytes] = []
        last = self.last_seq
        if cursor <= last:
            if cursor < self.first_seq:
                frames.append(encode_event("snapshot", {"text": self.text(last)}, last))
            else:
                slots, cap = self._slots, self.capacity
                frames.extend(slots[(s - 1) % cap] for s in range(cursor, last + 1))
            cursor = last + 1
        if self.final is not None:
            frames.append(self.final)
            return frames, cursor, True
        return frames, cursor, False

    def texts(self, cursor: int) -> tuple[list[str], int, bool]:
        """Delta texts from ``cursor`` on, for readers that frame them their own way (/v1).

        Every text is kept, not only the ring's, so nothing is ever replaced by
        a snapshot. Returns ``(texts, new_cursor, finished)``; ``finished``
        means the log is closed and ``texts`` reach its end.
        """
        last = self.last_seq
        texts = self._parts[cursor - 1 : last] if cursor <= last else []
        return texts, max(cursor, last + 1), self.final is not None

    async def wait(self, cursor: int) -> None:
        """Return once there is something at ``cursor`` or the log is closed."""
        while cursor > self.last_seq and self.final is None:
            await self._wakeup.wait()
