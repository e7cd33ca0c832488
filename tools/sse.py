"""The one reader of ``text/event-stream`` responses that the tests and the tools share.

:func:`sse_events` yields an :class:`SseEvent` for every event of an aiohttp
response as it arrives: its name, its raw data, its ``id:`` and the
``time.monotonic()`` at which the bytes that completed it were read.
:class:`EventDecoder` does the same for bytes already in hand.

The field parsing is the gateway's own (:class:`server.providers.upstream.SSEDecoder`:
``data:`` lines joined by newlines, ``event:`` names, comments skipped, LF or
CRLF); this module adds the ``id:`` field, which the gateway's decoder has no
use for upstream but clients resume with (``Last-Event-ID``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from server.providers.upstream import SSEDecoder

__all__ = ["EventDecoder", "SseEvent", "sse_events"]


@dataclass(slots=True)
class SseEvent:
    event: str
    #: the data lines, joined by newlines, as sent
    data: bytes
    #: the event's own ``id:`` field (an integer), None where it has none
    id: int | None = None
    #: time.monotonic() when the bytes that completed the event were read
    at: float = 0.0

    def json(self) -> Any:
        return orjson.loads(self.data)


class EventDecoder:
    """Bytes in, :class:`SseEvent` out, across chunk boundaries."""

    __slots__ = ("_fields", "_partial", "_id")

    def __init__(self) -> None:
        self._fields = SSEDecoder()
        self._partial = b""
        self._id: int | None = None

    def feed(self, chunk: bytes, at: float = 0.0) -> list[SseEvent]:
        """The events that ``chunk`` completes, each stamped ``at``."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        events: list[SseEvent] = []
        for line in lines:
            if line.startswith(b"id:"):
                value = line[3:].rstrip(b"\r").removeprefix(b" ")
                self._id = int(value) if value else None
                continue
            # One whole line at a time, so that an event is known to end on this line.
            for name, data in self._fields.feed(line + b"\n"):
                events.append(SseEvent(name, data, self._id, at))
            if not line.rstrip(b"\r"):
                self._id = None
        return events


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """The events of an SSE response as they arrive, until the body ends."""
    decoder = EventDecoder()
    monotonic = time.monotonic
    async for chunk in resp.content.iter_any():
        for event in decoder.feed(chunk, monotonic()):
            yield event
