"""``python -m server``: run the gateway.

Settings come from the environment (README.md lists them); ``--host``,
``--port``, ``--db`` and ``--workers`` override ``DAC_HOST``, ``DAC_PORT``,
``DAC_DB`` and ``DAC_WORKERS``.
``python -m server keys create|list|revoke`` manages API keys (:mod:`server.keys_cli`).

With more than one worker this process supervises: it picks the port (a free
one for ``--port 0``), starts that many ``python -m server`` processes which
all listen on it with ``SO_REUSEPORT`` (the kernel spreads connections over
them), passes SIGINT/SIGTERM on, and stops them all when one of them stops.
Workers share flights only through Redis, so it refuses without ``DAC_REDIS_URL``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import uvloop

from . import keys_cli
from .app import serve
from .auth import AuthSetupError
from .config import Settings, is_loopback
from .providers import ProviderConfigError
from .registry import RegistryOpenError
from .store import StoreOpenError, StoreUnwritable

#: thresholds of CPython's cyclic garbage collector in a serving process. A request makes a
#: few hundred container objects, nearly all freed by reference counting at once; at the
#: default (700, 10, 10) the collector ran every few requests, walked the caches' long-lived
#: objects again and again, and took about a quarter of the server's CPU under load.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Collect what importing left, keep those objects out of every later collection
    (``gc.freeze``), and collect cycles less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description="Run the DAC gateway.")
    parser.add_argument("--host", help="listen address (DAC_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any free one (DAC_PORT, default 8000)")
    parser.add_argument("--db", help="SQLite file (DAC_DB, default ./data/dac.db)")
    parser.add_argument("--workers", type=int, help="processes serving the port (DAC_WORKERS, default 1); "
                        "more than one needs DAC_REDIS_URL")
    keys_cli.add_parser(parser.add_subparsers(dest="command", metavar="{keys}"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changes = {k: v for k, v in (("host", args.host), ("port", args.port), ("db_path", args.db),
                                 ("workers", args.workers)) if v is not None}
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
    if settings.workers > 1:
        if not settings.redis_url:
            print(f"error: --workers {settings.workers} (DAC_WORKERS) needs DAC_REDIS_URL: each worker is a process "
                  "of its own, and only a shared Redis lets them merge identical requests, count listeners and "
                  "resume streams across processes", file=sys.stderr)
            return 2
        return supervise(settings)
    tune_gc()
    try:
        uvloop.run(serve(settings, greet=keys_cli.greet(settings)))
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    except StoreUnwritable as exc:  # like a port it cannot listen on: the place, not the setting
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ProviderConfigError, StoreOpenError, AuthSetupError, RegistryOpenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes on one port; returns when they have stopped."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # holds the port until the workers listen
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 1
        port = probe.getsockname()[1]
        env = {**os.environ, "DAC_WORKERS": "1", "DAC_REUSE_PORT": "1", "DAC_HOST": settings.host,
               "DAC_PORT": str(port), "DAC_DB": settings.db_path}
        workers = [subprocess.Popen([sys.executable, "-m", "server"], env=env)
                   for _ in range(settings.workers)]
        print(f"DAC gateway: {settings.workers} workers on port {port}", flush=True)
        stopping = False

        def stop(signum: int, _: object) -> None:
            nonlocal stopping
            stopping = True
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signum)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        status = 0
        while any(worker.poll() is None for worker in workers):
            ended = [w for w in workers if w.returncode is not None]
            if ended and not stopping:  # one stopped on its own: stop the rest, report its status
                status = ended[0].returncode or 0
                stop(signal.SIGTERM, None)
            time.sleep(0.1)
    return status if not stopping else max((w.returncode or 0 for w in workers), default=0)


if __name__ == "__main__":
    sys.exit(main())
