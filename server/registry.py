"""The ``FlightRegistry`` seam: where flights are found by coalesce key and stream id.

:class:`~server.hub.Hub` is the in-process registry; a registry shared by
several instances (on Redis) implements the same protocol, mirroring remote
flights into local ones so that fan-out, replay and resume stay local.

Guarantees every implementation keeps:

- **One leader per key.** Of all :meth:`FlightRegistry.submit` calls with the
  same key while its flight runs, exactly one gets ``LEADER``; the others join
  that flight. ``submit`` decides and counts the listener in one step, with
  nothing able to slip in between (in-process: no await inside; shared: one
  atomic script on the shared state, and one decision per key at a time in
  each process).
- **Removal by identity.** A flight that ends never evicts a newer flight of
  the same key.
- **Kept results.** A ``DONE`` flight answers identical requests (``CACHE``)
  for the result TTL unless the request says ``no_cache``; a ``FAILED`` one
  answers with its error for the error TTL.
- **Counted listeners.** A flight is aborted only once it has had no listener
  (and no promised one) for the grace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .flight import Flight, TurnRequest
from .states import Role

__all__ = ["FlightRegistry", "RegistryOpenError"]


class RegistryOpenError(RuntimeError):
    """A shared registry (Redis) cannot be used at start; the message names the setting."""


class FlightRegistry(Protocol):
    @property
    def closing(self) -> bool:
        """True once :meth:`shutdown` began: ``submit`` then raises ``ShuttingDown``."""

    @property
    def engine(self) -> str:
        """Where flights are registered, as ``/readyz`` reports it: ``"inprocess"`` or ``"redis"``."""

    async def submit(self, turn: TurnRequest, *, listen: bool) -> tuple[Flight, Role]:
        """Join, lead, or take the result of the flight for ``turn``.

        With ``listen`` the caller is counted as a listener at once and must call
        ``remove_listener`` when it leaves. Atomic: the decision and the count
        are one step for every caller of the same key.
        """

    async def accept(self, turn: TurnRequest) -> tuple[Flight, Role, str | None]:
        """Mode 3: submit without listening; a running flight is promised to the caller
        until it attaches with the returned token (or the attach timeout passes)."""

    async def stream(self, stream_id: str) -> Flight | None:
        """The running or kept flight whose assistant message is ``stream_id`` (on a shared
        registry, a local mirror of another instance's flight)."""

    def forget_thread(self, thread_id: str) -> None:
        """Keep nothing of a deleted thread's flights once they end."""

    async def thread_deleted(self, org_id: str, thread_id: str) -> None:
        """The org deleted the thread through this instance: :meth:`forget_thread`, and on a
        shared registry tell the other instances, which forget its flights too and have
        their stores drop what they keep of it in memory (:meth:`Store.forget_thread`).
        Returns once the others were told (or telling them failed, which is logged)."""

    async def stop_elsewhere(self, org_id: str, stream_id: str, token: str) -> bool:
        """Hand a Stop call whose listener (or promised client) is not here to the other
        instances, whose :meth:`serve_stops` handler takes it; False when there are none
        (in-process). The caller does not learn whether one held it."""

    def serve_stops(self, stop: Callable[[str, str, str], Awaitable[bool]]) -> None:
        """Where the Stop calls other instances hand over go: ``stop(org_id, stream_id, token)``,
        called only for a flight this instance holds (leads or mirrors)."""

    async def shutdown(self, *, timeout: float = 10.0) -> None:
        """Refuse new flights, abort running ones, and wait for their turns to be saved."""
