"""``python -m server``: run the gateway.

Settings come from the environment (README.md lists them); ``--host``,
``--port`` and ``--db`` override ``DAC_HOST``, ``DAC_PORT`` and ``DAC_DB``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvloop

from .app import serve
from .config import Settings
from .providers import ProviderConfigError
from .store import StoreOpenError, StoreUnwritable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description="Run the DAC gateway.")
    parser.add_argument("--host", help="listen address (DAC_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any free one (DAC_PORT, default 8000)")
    parser.add_argument("--db", help="SQLite file (DAC_DB, default ./data/dac.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changes = {k: v for k, v in (("host", args.host), ("port", args.port), ("db_path", args.db)) if v is not None}
    settings = settings.with_(**changes)
    try:
        uvloop.run(serve(settings))
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    except StoreUnwritable as exc:  # like a port it cannot listen on: the place, not the setting
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ProviderConfigError, StoreOpenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
