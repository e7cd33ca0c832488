"""``python -m server keys ...``: create, list and revoke API keys; and the first key of ``make run``.

The commands open the store the server's settings name (``DAC_DB``,
``DAC_DATABASE_URL``), beside a server that may be running: they keep no
cache and leave the answers it streams alone. A key is shown once, when it is
created, alone on the last line of the output; the store keeps only its hash.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

from aiohttp import web

from .app import build_store
from .appkeys import AUTH, STORE
from .auth import AuthMode, hash_key, new_key
from .config import Settings, is_loopback
from .routes._http import ORG_RE
from .store import ApiKey, Store

__all__ = ["DEMO_ORG", "add_parser", "greet", "run"]

#: the org of the first key that ``make run`` creates
DEMO_ORG = "org_demo"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list or revoke API keys",
                               description="API keys, in the store that DAC_DB or DAC_DATABASE_URL names.")
    keys.add_argument("--db", default=argparse.SUPPRESS, help="SQLite file (DAC_DB, default ./data/dac.db)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key for an org and print it (once)")
    create.add_argument("--org", required=True, help="the org the key stands for")
    create.add_argument("--name", default="", help="what the key is for, shown by `keys list`")
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--org", help="only this org's keys")
    revoke = actions.add_parser("revoke", help="revoke a key, named by its id or by the key itself")
    revoke.add_argument("key", metavar="KEY_ID_OR_KEY")


async def run(settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout,
              err: TextIO = sys.stderr) -> int:
    """One ``keys`` command; its exit status."""
    store = build_store(settings, server=False)
    await store.open()
    try:
        if args.action == "create":
            if not ORG_RE.match(args.org):
                print("error: --org must be 1-128 letters, digits or _.:@-", file=err)
                return 2
            key = new_key()
            made = await store.create_api_key(org_id=args.org, name=args.name, key_hash=hash_key(key))
            print(f"created {made['key_id']} for org {made['org_id']}"
                  + (f" ({made['name']})" if made["name"] else "")
                  + "; the key is shown only now:", file=out)
            print(key, file=out)
            return 0
        if args.action == "list":
            _table(await store.list_api_keys(args.org), out)
            return 0
        revoked = await store.revoke_api_key(key_id=args.key, key_hash=hash_key(args.key))
        if revoked is None:
            print(f"error: no key in use has the id or value {args.key!r}", file=err)
            return 1
        print(f"revoked {revoked['key_id']} of org {revoked['org_id']}; servers refuse it within "
              f"{settings.key_cache_ttl_s:g} s (DAC_KEY_CACHE_TTL_S)", file=out)
        return 0
    finally:
        await store.close()


def _table(keys: list[ApiKey], out: TextIO) -> None:
    rows = [("KEY_ID", "ORG", "NAME", "CREATED", "REVOKED")]
    rows += [(k["key_id"], k["org_id"], k["name"], k["created_at"], k["revoked_at"] or "-") for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)


async def _first_key(store: Store) -> str | None:
    """A key for the demo org when the store holds none in use; None when it does."""
    if any(k["revoked_at"] is None for k in await store.list_api_keys()):
        return None
    key = new_key()
    await store.create_api_key(org_id=DEMO_ORG, name="first key (make run)", key_hash=hash_key(key))
    return key


def greet(settings: Settings) -> Callable[[web.Application, str], Awaitable[None]]:
    """What ``python -m server`` says once it listens at ``url``: with keys, on a loopback
    address and no key yet, a first key for the demo org, in the page's address."""

    async def say(app: web.Application, url: str) -> None:
        auth = app[AUTH]
        if auth.mode is not AuthMode.KEYS:
            return
        key = None if auth.keys.has_env_keys or not is_loopback(settings.host) else await _first_key(app[STORE])
        if key is not None:
            print(f"created a first API key for org {DEMO_ORG}; open the page with it:\n  {url}/#key={key}",
                  flush=True)
        else:
            print(f"API keys required (DAC_AUTH=keys); make one with: python -m server keys create --org {DEMO_ORG}",
                  flush=True)

    return say
