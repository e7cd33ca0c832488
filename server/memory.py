"""Handing the C heap's free memory back to the system once the server goes quiet.

glibc's ``malloc`` keeps what the process freed for its next allocations: the
memory of a burst of requests (aiohttp's buffers, SQLite's pages in the store's
threads) stays resident after they are gone, where nothing will reuse it until
the next burst. :class:`HeapTrim` calls ``malloc_trim(0)`` on a quiet tick.

What it watches is the flight registry: the flights ever registered (led here,
or mirrored from another instance), those whose task runs now, and those it
holds (running, or kept for the result TTL). A tick is quiet when no flight
runs and none was registered since the tick before; it trims once after the
start-up, after flights came and went, and after answers left the result
cache. While flights keep coming it does not trim; requests that make no
flight (cache hits, reading threads) are not watched.

The trim runs in a worker thread (``ctypes`` lets the GIL go), one at a time:
it walks the heap, holding each malloc arena's lock while it trims it (a few
milliseconds for a heap of some hundred MB), and the loop goes on meanwhile.
On a C library without ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

__all__ = ["HeapTrim", "malloc_trim"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError, TypeError):  # no such function; no CDLL(None) (Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


#: glibc's ``malloc_trim``, or None where the C library has none
malloc_trim = _find_malloc_trim()


class HeapTrim:
    """Every ``every_s`` seconds, trim the heap if the server is quiet and something was freed
    (see the module's docstring).

    ``registered()`` counts the flights ever registered, ``running()`` those whose task
    runs now, ``held()`` those the registry holds.
    """

    def __init__(self, *, every_s: float, registered: Callable[[], int], running: Callable[[], int],
                 held: Callable[[], int], trim: Callable[[int], int] | None = malloc_trim) -> None:
        self._every_s = every_s
        self._registered, self._running, self._held = registered, running, held
        self._trim = trim
        self._seen = (registered(), held())
        #: something was freed since the last trim (the start-up's own garbage, at first):
        #: the next quiet tick trims
        self._dirty = True
        self._handle: asyncio.TimerHandle | None = None
        #: the trim under way in its thread
        self._trimming: asyncio.Future[int] | None = None
        #: trims started (read by the tests)
        self.trims = 0

    def start(self) -> None:
        if self._trim is not None and self._every_s > 0 and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._every_s, self._on_timer)

    def stop(self) -> None:
        """No more ticks; a trim under way ends in its thread."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _on_timer(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self._every_s, self._on_timer)
        self.check()

    def check(self) -> asyncio.Future[int] | None:
        """One tick: start a trim if it is due; returns it (None: none started)."""
        registered, held = self._registered(), self._held()
        seen_registered, seen_held = self._seen
        self._seen = (registered, held)
        if registered != seen_registered or self._running():
            self._dirty = True  # busy: wait for a tick with nothing new
            return None
        if not (self._dirty or held != seen_held) or self._trim is None:
            return None  # nothing freed since the last trim
        if self._trimming is not None:
            self._dirty = True  # one is under way: the next quiet tick trims again
            return None
        self._dirty = False
        self.trims += 1
        trimming = self._trimming = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        trimming.add_done_callback(self._trimmed)
        return trimming

    def _trimmed(self, _: asyncio.Future[int]) -> None:
        self._trimming = None
