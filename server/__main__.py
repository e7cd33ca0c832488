"""``python -m server``: run the gateway.

Settings come from the environment (README.md lists them); ``--host``,
``--port`` and ``--db`` override ``DAC_HOST``, ``DAC_PORT`` and ``DAC_DB``.
``python -m server keys create|list|revoke`` manages API keys (:mod:`server.keys_cli`).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvloop

from . import keys_cli
from .app import serve
from .auth import AuthSetupError
from .config import Settings, is_loopback
from .providers import ProviderConfigError
from .store import StoreOpenError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description="Run the DAC gateway.")
    parser.add_argument("--host", help="listen address (DAC_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any free one (DAC_PORT, default 8000)")
    parser.add_argument("--db", help="SQLite file (DAC_DB, default ./data/dac.db)")
    keys_cli.add_parser(parser.add_subparsers(dest="command", metavar="{keys}"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changes = {k: v for k, v in (("host", args.host), ("port", args.port), ("db_path", args.db)) if v is not None}
    settings = settings.with_(**changes)
    if args.command == "keys":
        try:
            return uvloop.run(keys_cli.run(settings, args))
        except StoreOpenError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if settings.auth == "header" and not is_loopback(settings.host):
        print(f"warning: DAC_AUTH=header on {settings.host}: every caller that can reach this address may name "
              "any org in x-org-id; only run it so behind a proxy that authenticates and sets that header",
              file=sys.stderr, flush=True)
    try:
        uvloop.run(serve(settings, greet=keys_cli.greet(settings)))
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    except (ProviderConfigError, StoreOpenError, AuthSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
