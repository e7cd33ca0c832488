#!/usr/bin/env python3
"""Several gateway instances behind nginx, against one Redis and one PostgreSQL.

    .venv/bin/python tools/cluster.py [--instances 3] [--port 8000] [--redis URL] [--database URL]

starts the instances (``python -m server`` on free ports, each with
``DAC_REDIS_URL`` and ``DAC_DATABASE_URL``), then Debian's nginx (``/usr/sbin/nginx``)
with ``tools/deploy/nginx.conf`` rewritten for those ports, its prefix in a
temporary folder, and prints the URL to use. Ctrl-C stops everything. The
defaults are the local services (``redis://127.0.0.1:6379/0``,
``postgresql://postgres@127.0.0.1:5432/test?schema=dac_cluster``). ``make cluster``
runs it.

The tests and ``tools/bench_cluster.py`` use :class:`Cluster` from here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["NGINX", "Cluster", "Instance", "free_port", "wait_port"]

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "tools" / "deploy" / "nginx.conf"
NGINX = os.environ.get("DAC_NGINX", "/usr/sbin/nginx")
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/test?schema=dac_cluster"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, timeout: float) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


@dataclass
class Instance:
    port: int
    proc: asyncio.subprocess.Process
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _drain(self) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode(errors="replace"):
            self.output.append(line)


class Cluster:
    """``instances`` gateways and nginx in front of them; ``url`` is nginx's."""

    def __init__(self, *, instances: int = 3, env: dict[str, str], workdir: Path, port: int = 0,
                 args: tuple[str, ...] = ()) -> None:
        self.count = instances
        self.env = env
        self.workdir = workdir
        self.port = port or free_port()
        self.args = args
        self.instances: list[Instance] = []
        self.nginx: asyncio.subprocess.Process | None = None
        self._drains: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start_instance(self, port: int | None = None) -> Instance:
        """Start one ``python -m server`` and wait for its listening line."""
        port = port or free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "--port", str(port), *self.args, cwd=ROOT,
            env={**os.environ, **self.env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        instance = Instance(port, proc)
        assert proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = (await proc.stdout.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError(f"instance on port {port} stopped:\n{''.join(instance.output)}")
                instance.output.append(line)
                if re.search(r"listening on http://", line):
                    break
        self._drains.append(asyncio.get_running_loop().create_task(instance._drain()))
        return instance

    def nginx_conf(self) -> str:
        conf = TEMPLATE.read_text()
        servers = "".join(f"        server 127.0.0.1:{i.port};\n" for i in self.instances)
        conf = re.sub(r"(    upstream dac \{\n)(?:        server [^\n]*\n)+", lambda m: m.group(1) + servers, conf)
        conf = conf.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{self.port};")
        if os.geteuid() == 0:  # nginx's workers would otherwise run as nobody, outside the prefix's folder
            conf = "user root;\n" + conf
        return conf

    async def start(self) -> None:
        ports = [free_port() for _ in range(self.count)]
        self.instances = list(await asyncio.gather(*(self.start_instance(p) for p in ports)))
        await self.start_nginx()

    async def start_nginx(self) -> None:
        if not Path(NGINX).exists():
            raise RuntimeError(f"nginx not found at {NGINX}: apt-get install nginx")
        prefix = self.workdir / "nginx"
        for sub in ("tmp", "logs"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        (prefix / "nginx.conf").write_text(self.nginx_conf())
        self.nginx = await asyncio.create_subprocess_exec(
            NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_port(self.port, 10)
        except TimeoutError:
            err = b""
            if self.nginx.returncode is not None and self.nginx.stderr is not None:
                err = await self.nginx.stderr.read()
            raise RuntimeError(f"nginx did not listen on {self.port}: {err.decode(errors='replace')}") from None

    def kill(self, index: int) -> None:
        """``kill -9`` one instance."""
        self.instances[index].proc.kill()

    async def stop(self) -> None:
        if self.nginx is not None and self.nginx.returncode is None:
            self.nginx.send_signal(signal.SIGQUIT)
        for instance in self.instances:
            if instance.proc.returncode is None:
                instance.proc.send_signal(signal.SIGTERM)
        for proc in [i.proc for i in self.instances] + ([self.nginx] if self.nginx else []):
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._drains:
            task.cancel()


async def _main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="dac-cluster-"))
    env = {"DAC_REDIS_URL": args.redis, "DAC_DATABASE_URL": args.database}
    cluster = Cluster(instances=args.instances, env=env, workdir=workdir, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start()
        for i, instance in enumerate(cluster.instances):
            print(f"instance {i}: {instance.url}", flush=True)
        print(f"nginx config: {workdir / 'nginx' / 'nginx.conf'}", flush=True)
        print(f"DAC cluster listening on {cluster.url} ({args.instances} instances behind nginx)", flush=True)
        await stop.wait()
    finally:
        print("stopping the cluster", flush=True)
        await cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--port", type=int, default=8000, help="nginx's port (0: a free one)")
    parser.add_argument("--redis", default=os.environ.get("DAC_REDIS_URL") or DEFAULT_REDIS)
    parser.add_argument("--database", default=os.environ.get("DAC_DATABASE_URL") or DEFAULT_DATABASE)
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
