"""Handing the C heap's free memory back to the system once the server goes quiet.

glibc's ``malloc`` keeps what the process freed for its next allocations: the
memory of a burst of requests (aiohttp's buffers, SQLite's pages in the store's
threads) stays resident after they are gone, where nothing will reuse it until
the next burst. :class:`HeapTrim` calls ``malloc_trim(0)`` on a quiet tick: one
on which no flight runs and none has started since the tick before, after the
start-up, after some flights came and went, or after finished answers left the
result cache. Under steady load it never runs. A trim walks the heap: about a
millisecond for this server's heap after a burst, in the loop's thread.

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
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


#: glibc's ``malloc_trim``, or None where the C library has none
malloc_trim = _find_malloc_trim()


class HeapTrim:
    """Every ``every_s`` seconds, look whether the server is quiet and something was freed.

    ``activity()`` counts the flights ever started; ``held()`` is how many the
    registry holds (running or cached), so that an expiry shows; ``running()`` is
    how many run now.
    """

    def __init__(self, *, every_s: float, activity: Callable[[], int], held: Callable[[], int],
                 running: Callable[[], int], trim: Callable[[int], int] | None = malloc_trim) -> None:
        self._every_s = every_s
        self._activity, self._held, self._running = activity, held, running
        self._trim = trim
        self._seen = (activity(), held())
        #: something was freed since the last trim (the start-up's own garbage, at first):
        #: the next quiet tick trims
        self._dirty = True
        self._handle: asyncio.TimerHandle | None = None
        #: trims done (read by the tests)
        self.trims = 0

    def start(self) -> None:
        if self._trim is not None and self._every_s > 0 and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._every_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self._every_s, self._tick)
        started, held = self._activity(), self._held()
        seen_started, seen_held = self._seen
        self._seen = (started, held)
        if started != seen_started or self._running():
            self._dirty = True  # busy: wait for a tick with nothing new
            return
        if self._dirty or held != seen_held:
            self._dirty = False
            self.trim()

    def trim(self) -> None:
        assert self._trim is not None
        self.trims += 1
        self._trim(0)
