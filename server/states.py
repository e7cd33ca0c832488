"""The named states of flights, messages and listeners.

Each vocabulary is a ``StrEnum``: its members compare equal to (and serialise
as) the strings the HTTP contract and the database use, so a member can be
stored, rendered and labelled as it is.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DropReason", "FlightState", "MessageStatus", "Role"]


class FlightState(StrEnum):
    """A flight's life: ``RUNNING`` -> ``CANCELLING`` (an abort was asked) -> one end.

    Only a ``RUNNING`` flight takes followers; a ``DONE`` one answers identical
    requests for the result TTL, a ``FAILED`` one for the error TTL.
    """

    RUNNING = "running"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (FlightState.DONE, FlightState.FAILED, FlightState.CANCELLED)


class MessageStatus(StrEnum):
    """A stored message's ``status`` (the contract's ``Message.status``)."""

    COMPLETE = "complete"
    STREAMING = "streaming"
    CANCELLED = "cancelled"
    ERROR = "error"
    INTERRUPTED = "interrupted"


class DropReason(StrEnum):
    """Why a listener was let go, or why a flight lost all of them and was aborted."""

    #: the client took nothing for the send timeout
    SLOW_CLIENT = "slow_client"
    #: the last listener left and nobody came back within the grace
    NO_LISTENERS = "no_listeners"
    #: a mode-3 client was promised the stream and never opened it
    ATTACH_TIMEOUT = "attach_timeout"
    #: the server is shutting down
    SHUTDOWN = "shutdown"
    #: the client said it stops (``DELETE /api/streams/{id}``): no grace
    CLIENT_STOP = "client_stop"


class Role(StrEnum):
    """How a chat request was served (the ``coalesce`` field and header)."""

    #: it started the flight: the one upstream call
    LEADER = "leader"
    #: it joined a running flight
    FOLLOWER = "follower"
    #: it got a finished flight's result
    CACHE = "cache"
