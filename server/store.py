"""The ``Store`` seam: threads and messages, whatever the database.

:class:`Store` is the protocol every backend implements (SQLite in
:mod:`server.sqlite_store`, PostgreSQL in :mod:`server.pg_store`), and this
module holds the types it speaks in and the rules they share. The flight and
the HTTP layer use only this protocol; ``app.py`` picks the implementation.

The guarantees every implementation gives, and one behavioural suite checks:

- **Scoped by org.** Every call takes the ``org_id``; another org's thread or
  message is indistinguishable from a missing one (``None``, ``False``, empty).
- **A turn is atomic.** :meth:`Store.begin_turn` writes the user message and the
  ``streaming`` assistant message together or not at all; :meth:`Store.finish_turn`
  then updates the assistant row once, with its final status and text.
- **Read your writes.** A read that starts after a write returned sees it.
- **Nothing stays streaming.** With one writer per database, :meth:`Store.open`
  marks any row left ``streaming`` by a process that died as ``interrupted``.
  With several instances on one database (a registry on Redis) the open leaves
  them alone: each ``streaming`` row names its **owner** (the instance streaming
  it), and the instances sweep the rows whose owner is gone
  (:meth:`Store.streaming_owners`, :meth:`Store.streaming_answers`,
  :meth:`Store.interrupt_turn`; see :mod:`server.redis_sweep`).
- **Fenced writes.** A row's ``checkpoint`` and ``finish_turn`` that name its
  owner apply only while the row is still ``streaming`` and that owner's: a
  leader that lost its lease (a stale leader) cannot overwrite what another
  instance wrote.
- **One order.** Messages come back oldest first, in the order their turns were
  written (a turn's two rows side by side); threads newest first.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol, TypedDict

import orjson

from .states import MessageStatus

__all__ = [
    "MESSAGE_COLUMNS",
    "ApiKey",
    "ChatMessage",
    "Message",
    "Store",
    "StoreClosed",
    "StoreOpenError",
    "StoreUnwritable",
    "StoredAnswer",
    "Thread",
    "conversation",
    "draft_turn",
    "epoch_seconds",
    "iso_time",
    "message_from_row",
    "new_id",
    "random_bytes",
    "random_token",
    "now_iso",
]

#: one message of a conversation as a provider takes it: ``{"role", "content", ...}``
ChatMessage = dict[str, Any]


class Thread(TypedDict):
    thread_id: str
    title: str
    created_at: str


class Message(TypedDict):
    """A stored message, as the contract's ``Message`` renders it."""

    message_id: str
    #: None for a stateless /v1 answer, which has no thread
    thread_id: str | None
    role: Literal["user", "assistant"]
    content: str
    status: MessageStatus
    provider: str | None
    model: str | None
    created_at: str
    usage: dict[str, Any] | None
    #: the request's reason and scope, and what a provider returned beside the text
    meta: dict[str, Any]


class ApiKey(TypedDict):
    """An API key as it is listed: never the key itself, which is stored only as its hash."""

    key_id: str
    org_id: str
    name: str
    created_at: str
    #: None while the key is in use
    revoked_at: str | None


class StoredAnswer(NamedTuple):
    """An assistant message with what a late subscriber needs to replay its end."""

    message: Message
    #: the user message it answers
    user_message_id: str | None
    #: stream events the answer took (its ``done`` event's id is this plus one)
    deltas: int


class StoreOpenError(RuntimeError):
    """:meth:`Store.open` cannot use the database; the message names the setting to fix."""


class StoreUnwritable(StoreOpenError):
    """:meth:`Store.open` can read the database but not write it (a read-only file)."""


class StoreClosed(RuntimeError):
    """A call on a store that is not open: before :meth:`Store.open`, or once :meth:`Store.close` began."""


class Store(Protocol):
    """Threads and messages. Each method states what it promises beyond the module's rules."""

    @property
    def engine(self) -> str:
        """The database behind the store, as ``/readyz`` reports it: ``"sqlite"`` or ``"postgresql"``."""

    @property
    def is_open(self) -> bool:
        """True between a successful :meth:`open` and :meth:`close`."""

    async def open(self) -> None:
        """Create or migrate the schema, then mark rows left ``streaming`` as ``interrupted``.

        Raises :class:`StoreOpenError` when the database cannot be used; nothing is
        served before it returns.
        """

    async def close(self) -> None:
        """Release connections. Writes that returned are durable; a call made once this
        began fails with :class:`StoreClosed`."""

    async def create_thread(self, org_id: str, title: str) -> Thread: ...

    async def list_threads(self, org_id: str, *, limit: int = 200) -> list[Thread]:
        """The org's threads, newest first, at most ``limit``."""

    async def get_thread(self, org_id: str, thread_id: str) -> Thread | None: ...

    async def delete_thread(self, org_id: str, thread_id: str) -> bool:
        """Delete the thread and its messages in one transaction; False if it was not the org's."""

    async def messages(self, org_id: str, thread_id: str) -> list[Message]:
        """The thread's messages, oldest first (in the order their turns were written)."""

    async def messages_before(self, org_id: str, thread_id: str, *, limit: int,
                              before: str | None = None) -> list[Message] | None:
        """At most ``limit`` of the thread's messages, newest first, all older than the
        message ``before`` (None: from the newest). None when ``before`` is not a message
        of that thread."""

    async def count_threads(self, org_id: str) -> int:
        """How many threads the org keeps."""

    async def history(self, org_id: str, thread_id: str) -> list[ChatMessage]:
        """The conversation to send upstream, oldest first: completed answers and the
        questions they answer; failed, cancelled and interrupted turns are left out."""

    async def get_message(self, org_id: str, message_id: str) -> Message | None: ...

    async def get_answer(self, org_id: str, message_id: str) -> StoredAnswer | None:
        """An assistant message with the id of the user message it answers."""

    async def begin_turn(self, *, org_id: str, user: Message, assistant: Message,
                         owner: str | None = None) -> None:
        """Insert both drafts (see :func:`draft_turn`) in one transaction; the assistant row
        names ``owner``, the instance streaming it (None: a single writer).

        Raises ``LookupError`` and writes nothing when the thread is not the org's.
        """

    async def finish_turn(self, *, message_id: str, status: MessageStatus, content: str,
                          usage: dict[str, Any] | None, meta: dict[str, Any], deltas: int = 0,
                          owner: str | None = None) -> bool:
        """Update the assistant row once, atomically, with its final state.

        With ``owner`` the write is fenced: it applies only while the row is still
        ``streaming`` and ``owner``'s. False when it was refused (the row exists but
        another instance ended it); True otherwise (a deleted row takes nothing)."""

    async def interrupt_turn(self, *, message_id: str, content: str | None, deltas: int = 0) -> bool:
        """Mark the assistant row ``interrupted`` with ``content`` and ``deltas`` (``content``
        None: keep the text and count it has), only while it is still ``streaming``: one
        conditional update, so of several callers (the instances that saw its leader
        vanish) exactly one changes it. True for that one."""

    async def checkpoint(self, *, message_id: str, content: str, deltas: int, owner: str | None = None) -> bool:
        """Keep the text an answer has so far on its row while it is still ``streaming``
        (after a crash the row keeps it); a row that has ended is left as it is. With
        ``owner``, fenced as :meth:`finish_turn` is, with the same answer."""

    async def streaming_owners(self) -> list[str | None]:
        """The owners of the rows still ``streaming``, each once (None: rows that name none,
        written by a single writer). Every org's: this is the sweep's one query."""

    async def streaming_answers(self, owners: list[str | None]) -> list[str]:
        """The ids of the rows still ``streaming`` whose owner is one of ``owners``."""

    def forget_thread(self, org_id: str, thread_id: str) -> None:
        """Drop what is kept in memory of a thread another instance deleted."""

    @property
    def writable(self) -> bool:
        """False since a write failed for want of room or rights, until one succeeds."""

    async def check_writable(self) -> bool:
        """Try a small write now (for readiness while :attr:`writable` is False)."""

    async def count_messages(self, org_id: str, thread_id: str) -> int: ...

    # -- API keys: each belongs to one org; only its hash (hex sha256) is stored

    async def create_api_key(self, *, org_id: str, name: str, key_hash: str) -> ApiKey:
        """Store a new key's hash under a new ``key_id``."""

    async def list_api_keys(self, org_id: str | None = None) -> list[ApiKey]:
        """Every key (of ``org_id`` when given), revoked ones included, oldest first."""

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The key in use whose hash is ``key_hash``; None when unknown or revoked."""

    async def revoke_api_key(self, *, key_id: str, key_hash: str) -> ApiKey | None:
        """Revoke the key in use named by its id or its hash; None when there is none.
        A revoked key is kept (listed with its ``revoked_at``) and never found again."""


#: random bytes read from the system at once, then handed out in small pieces
_POOL_BYTES = 4096
_pool = b""
_pool_at = 0


def _forget_pool() -> None:
    global _pool, _pool_at
    _pool, _pool_at = b"", 0


# a worker forked from a process that read the pool must never hand out the same bytes
os.register_at_fork(after_in_child=_forget_pool)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the system's CSPRNG (``os.urandom``), read 4 KiB at a time: every
    id and token of a request costs no system call of its own."""
    global _pool, _pool_at
    if _pool_at + n > len(_pool):
        _pool, _pool_at = os.urandom(max(_POOL_BYTES, n)), 0
    start, _pool_at = _pool_at, _pool_at + n
    return _pool[start:_pool_at]


def random_token(nbytes: int) -> str:
    """URL-safe text of ``nbytes`` random bytes, as ``secrets.token_urlsafe`` makes it."""
    return base64.urlsafe_b64encode(random_bytes(nbytes)).rstrip(b"=").decode("ascii")


def new_id(prefix: str) -> str:
    """``prefix_`` and 32 hex digits: the milliseconds since 1970 (12 digits), then 80
    random bits. Ids made later sort later, so a database index takes new ids at its end
    rather than all over it."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{random_bytes(10).hex()}"


def iso_time(moment: datetime) -> str:
    """A time as messages and threads carry it: UTC, milliseconds, ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: the second :func:`now_iso` last wrote, and its text up to the seconds
_second: tuple[int, str] = (-1, "")


def now_iso() -> str:
    """Now as :func:`iso_time` writes it (the text of the second is made once a second)."""
    global _second
    now = time.time_ns()
    whole, nanos = divmod(now, 1_000_000_000)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{nanos // 1_000_000:03d}Z"


def epoch_seconds(moment: str) -> int:
    """The whole seconds since 1970 of a time as :func:`iso_time` writes it (one that
    :func:`now_iso` wrote this second is not parsed again)."""
    whole, text = _second
    if moment[:19] == text and moment[19:20] == ".":
        return whole
    return int(datetime.fromisoformat(moment).timestamp())


#: the columns :func:`message_from_row` reads, in its order
MESSAGE_COLUMNS = "message_id, thread_id, role, content, status, provider, model, created_at, usage, meta"


def message_from_row(row: Iterable[Any]) -> Message:
    """A stored message from a row that starts with :data:`MESSAGE_COLUMNS`: ``usage`` and
    ``meta`` as JSON text, ``created_at`` as contract text or a ``datetime``."""
    message_id, thread_id, role, content, status, provider, model, created_at, usage, meta = tuple(row)[:10]
    return {
        "message_id": message_id,
        "thread_id": thread_id,
        "role": role,
        "content": content,
        "status": MessageStatus(status),
        "provider": provider,
        "model": model,
        "created_at": created_at if isinstance(created_at, str) else iso_time(created_at),
        "usage": orjson.loads(usage) if usage else None,
        "meta": orjson.loads(meta) if meta else {},
    }


def conversation(messages: list[Message]) -> list[ChatMessage]:
    """The conversation a thread's messages (oldest first) send upstream, for :meth:`Store.history`.

    Completed answers and the questions they answer; a cancelled, failed or
    interrupted answer is left out, and so is the question it failed to answer.
    """
    convo: list[ChatMessage] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if m["status"] == MessageStatus.COMPLETE:
                convo.append({"role": "assistant", "content": m["content"]})
            continue
        answer = messages[i + 1] if i + 1 < len(messages) else None
        if answer is not None and answer["role"] == "assistant" and answer["status"] != MessageStatus.COMPLETE:
            continue
        convo.append({"role": "user", "content": m["content"]})
    return convo


def draft_turn(
    *, thread_id: str | None, content: str, provider: str, model: str, meta: dict[str, Any]
) -> tuple[Message, Message]:
    """The user message and the ``streaming`` assistant message of a new turn, not yet saved.

    Ids and times are fixed here, so a stream can be named before its rows exist.
    """
    created = now_iso()
    user: Message = {
        "message_id": new_id("msg"),
        "thread_id": thread_id,
        "role": "user",
        "content": content,
        "status": MessageStatus.COMPLETE,
        "provider": provider,
        "model": model,
        "created_at": created,
        "usage": None,
        "meta": meta,
    }
    assistant: Message = {**user, "message_id": new_id("msg"), "role": "assistant", "content": "",
                          "status": MessageStatus.STREAMING}
    return user, assistant
