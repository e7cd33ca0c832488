"""Who is calling: API keys and the org each stands for, and signed stream URLs.

- **Modes** (``DAC_AUTH``): ``keys`` (the default) takes the org from an API
  key sent as ``Authorization: Bearer``; ``header`` trusts ``x-org-id``, for a
  gateway behind a proxy that authenticates.
- **Keys** are ``dac_`` and 43 URL-safe characters (256 random bits). The store
  keeps only their sha256 (:func:`hash_key`), with the key's id, org and name.
  Keys given in ``DAC_API_KEYS`` (comma-separated) are never stored: each is
  its own org, ``key_`` and the first 16 hex digits of its sha256.
- **The key ring** (:class:`KeyRing`) answers the org of a key from memory: a
  verdict read from the store (found, or not) is kept for ``DAC_KEY_CACHE_TTL_S``
  seconds, so a request costs one hash and one dict lookup, and a key revoked
  by another process stops working within that time. A verdict past half its
  time is read again beside the request that used it, so a key in steady use
  never waits for the store; only a key unseen for the whole time does.
- **Stream tokens** (:class:`StreamTokens`) make a ``stream_url`` a
  capability that EventSource can open with no header:
  ``EXPIRY.NONCE.ORG.SIGNATURE``, where ``EXPIRY`` is a Unix time,
  ``NONCE`` names the listener (its Stop call and its attach promise), ``ORG``
  is base64url, and ``SIGNATURE`` is the base64url HMAC-SHA256, under the
  server's secret, of the stream id, the org, the expiry and the nonce. A
  token is good for one stream until its expiry; anything else is refused.
- **The secret** comes from ``DAC_SECRET``, or from the file ``secret`` beside
  the SQLite file (``./data/secret`` by default), created once with mode 0600.
  Instances that share streams must share it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .config import Settings
from .store import Store

__all__ = [
    "Auth",
    "AuthMode",
    "AuthSetupError",
    "KeyRing",
    "StreamTokens",
    "env_key_org",
    "hash_key",
    "load_secret",
    "new_key",
    "secret_path",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "dac_"
#: verdicts kept by the key ring at most (least recently used dropped first)
KEY_CACHE_ENTRIES = 10_000
SECRET_FILE = "secret"


class AuthMode(StrEnum):
    KEYS = "keys"
    HEADER = "header"


class AuthSetupError(RuntimeError):
    """The secret cannot be read or created; the message names the setting to fix."""


def new_key() -> str:
    """A new API key: ``dac_`` and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What the store keeps of a key: its sha256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def env_key_org(key: str) -> str:
    """The org of a key given in ``DAC_API_KEYS``: ``key_`` and 16 hex digits of its sha256."""
    return "key_" + hash_key(key)[:16]


class KeyRing:
    """The org each key stands for: the store's keys and ``DAC_API_KEYS``'s.

    ``clock`` is monotonic seconds (a test's manual clock moves the cache's time).
    """

    def __init__(self, store: Store, *, env_keys: Iterable[str] = (), ttl_s: float,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = KEY_CACHE_ENTRIES) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._clock = clock
        self._max = max_entries
        self._env = {hash_key(k): env_key_org(k) for k in env_keys}
        #: key hash -> (org or None for "no such key in use", when the verdict expires)
        self._verdicts: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        #: the reads of verdicts past half their time, by key hash
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    @property
    def has_env_keys(self) -> bool:
        return bool(self._env)

    def env_org(self, key: str) -> str | None:
        """The org of a ``DAC_API_KEYS`` key; None for any other key."""
        return self._env_org(hash_key(key))

    def _env_org(self, digest: str) -> str | None:
        for known, org in self._env.items():
            if hmac.compare_digest(known, digest):
                return org
        return None

    async def org_for(self, key: str) -> str | None:
        """The org ``key`` stands for; None when it is unknown or revoked.

        Never trusts a verdict read more than the cache time ago; one past half of it
        is read again in the background, and the request does not wait for that.
        """
        digest = hash_key(key)
        if self._env:
            org = self._env_org(digest)
            if org is not None:
                return org
        now = self._clock()
        verdict = self._verdicts.get(digest)
        if verdict is not None and verdict[1] > now:
            self._verdicts.move_to_end(digest)
            if verdict[1] - now < self._ttl_s / 2 and digest not in self._refreshing:
                self._refreshing[digest] = asyncio.ensure_future(self._refresh(digest))
            return verdict[0]
        return await self._read(digest, now)

    async def _read(self, digest: str, now: float) -> str | None:
        """The store's verdict on a key, kept until ``now`` (before the read) plus the cache time."""
        found = await self._store.find_api_key(digest)
        org = found["org_id"] if found is not None else None
        self._verdicts[digest] = (org, now + self._ttl_s)
        self._verdicts.move_to_end(digest)
        while len(self._verdicts) > self._max:
            self._verdicts.popitem(last=False)
        return org

    async def _refresh(self, digest: str) -> None:
        try:
            await self._read(digest, self._clock())
        except Exception as exc:  # the verdict held expires as usual; the next request reads again
            log.warning("could not read API key %s… again: %s", digest[:8], exc)
        finally:
            del self._refreshing[digest]

    def forget(self, key_hash: str) -> None:
        """Drop what is known of a key (this process revoked it)."""
        self._verdicts.pop(key_hash, None)
        refreshing = self._refreshing.get(key_hash)
        if refreshing is not None:
            refreshing.cancel()  # it may have read the key before the revocation


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Sign and check the ``token`` of a stream URL (see the module's docstring).

    ``clock`` is wall-clock seconds: a token outlives a restart and crosses instances.
    """

    def __init__(self, secret: bytes, *, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._ttl_s = ttl_s
        self._clock = clock

    def _signature(self, stream_id: str, org_id: str, expiry: int, nonce: str) -> bytes:
        message = b"\0".join((b"dac-stream", stream_id.encode(), org_id.encode(), b"%d" % expiry, nonce.encode()))
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def sign(self, org_id: str, stream_id: str, nonce: str | None = None) -> str:
        """A token for ``stream_id`` of ``org_id``; ``nonce`` names one listener (none: any)."""
        expiry = int(self._clock() + self._ttl_s)
        nonce = nonce or ""
        signature = self._signature(stream_id, org_id, expiry, nonce)
        return f"{expiry}.{nonce}.{_b64(org_id.encode())}.{_b64(signature)}"

    def verify(self, token: str, stream_id: str) -> tuple[str, str | None] | None:
        """``(org, nonce)`` of a good token for ``stream_id``; None when it is malformed,
        signed for another stream or with another secret, altered, or expired."""
        parts = token.split(".")
        if len(parts) != 4 or not parts[0].isascii() or not parts[0].isdigit():
            return None
        expiry_text, nonce, org_text, signature_text = parts
        try:
            org_id = _unb64(org_text).decode()
            signature = _unb64(signature_text)
        except (binascii.Error, ValueError):
            return None
        expiry = int(expiry_text)
        if not hmac.compare_digest(signature, self._signature(stream_id, org_id, expiry, nonce)):
            return None
        if expiry < self._clock():
            return None
        return org_id, nonce or None


def secret_path(settings: Settings) -> Path:
    """Where the generated secret lives: ``secret`` beside the SQLite file (``./data/``)."""
    return Path(settings.db_path).parent / SECRET_FILE


def load_secret(settings: Settings) -> bytes:
    """``DAC_SECRET``, or the secret file (created once, mode 0600, by whichever process comes first)."""
    if settings.secret:
        return settings.secret.encode()
    path = secret_path(settings)
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            draft = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48) + "\n")
            try:
                os.link(draft, path)  # atomic: the first process's secret wins, whole
            except FileExistsError:
                pass
            finally:
                draft.unlink()
        value = path.read_text().strip()
    except OSError as exc:
        raise AuthSetupError(f"DAC_SECRET is unset and the secret file {path} cannot be used: {exc}") from None
    if not value:
        raise AuthSetupError(f"the secret file {path} is empty: delete it (a new one is made) or set DAC_SECRET")
    return value.encode()


@dataclass(frozen=True, slots=True)
class Auth:
    """What the routes ask about callers: the mode, the key ring and the stream tokens."""

    mode: AuthMode
    keys: KeyRing
    tokens: StreamTokens

    @classmethod
    def build(cls, settings: Settings, store: Store, *, secret: bytes,
              clock: Callable[[], float] = time.monotonic) -> Auth:
        env_keys = [k.strip() for k in settings.env.get("DAC_API_KEYS", "").split(",") if k.strip()]
        return cls(
            mode=AuthMode(settings.auth),
            keys=KeyRing(store, env_keys=env_keys, ttl_s=settings.key_cache_ttl_s, clock=clock),
            tokens=StreamTokens(secret, ttl_s=settings.stream_token_ttl_s),
        )
