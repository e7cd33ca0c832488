"""Shared parts of the measurement tools.

- :class:`ServerProcess`: the gateway as ``python -m server`` in a child
  process on a free 127.0.0.1 port with a fresh SQLite file, so the load and
  the server never share an interpreter and the server's CPU and memory can be
  read from ``/proc``.
- :func:`markdown_table`, :func:`progress`, :func:`prometheus_samples` and the
  ``/proc`` readers.

Times are ``time.monotonic()`` seconds (``CLOCK_MONOTONIC``): one clock for
every process on the machine, so arrival times taken in different load
processes, and the fake upstream's timestamps, can be compared directly.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import percentile

__all__ = [
    "DEFAULT_ORG",
    "ROOT",
    "Samples",
    "ServerProcess",
    "cores_busy_seconds",
    "cpu_split",
    "free_port",
    "http_open",
    "markdown_table",
    "metric_sum",
    "ms",
    "percentile",
    "pin",
    "proc_cpu_seconds",
    "proc_cpu_split",
    "proc_rss_bytes",
    "progress",
    "prometheus_samples",
    "raise_open_files",
]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ORG = "org_demo"
#: how long a started server may take to answer /readyz
DEFAULT_READY_TIMEOUT_S = 30.0
#: how long a stopped server may take to save its turns and exit before it is killed
DEFAULT_STOP_TIMEOUT_S = 15.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Linux encodes a process's CPU clock as ~pid << 3 | 2 (CPUCLOCK_SCHED, whole process)
_CPUCLOCK_SCHED = 2
#: plain HTTP to 127.0.0.1: never through a proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_open(request: str | urllib.request.Request, *, timeout: float = 60.0) -> Any:
    """``urlopen`` without proxies, for the few blocking calls the tools make to local servers."""
    return _OPENER.open(request, timeout=timeout)


def progress(message: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_open_files(want: int) -> int:
    """Raise this process's soft open-files limit towards ``want`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds that process ``pid`` (all its threads) has used so far.

    Read from the process's CPU-time clock (nanosecond resolution), the id
    that ``clock_getcpuclockid(3)`` would return; ``/proc/PID/stat`` (in
    clock ticks, usually 10 ms) where that clock is not available.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far (``/proc/PID/stat``, in clock
    ticks, usually 10 ms). System time includes what the kernel did inside its system calls;
    on a kernel without ``CONFIG_IRQ_TIME_ACCOUNTING``, also the softirq work they ran, such as
    delivering its loopback writes to the receiving socket."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def cores_busy_seconds(cores: set[int]) -> float:
    """CPU seconds that every process together has used so far on ``cores`` (``/proc/stat``,
    in clock ticks): beside one process's own CPU, how much of its cores others took."""
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / _CLOCK_TICKS


def proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_split(count: int | None = None) -> tuple[set[int] | None, set[int] | None]:
    """Cores for (server, load): disjoint halves when there are at least two, else (None, None)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if count is not None:
        cores = cores[:count]
    if len(cores) < 2:
        return None, None
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def pin(pid: int, cores: set[int] | None) -> bool:
    """Pin ``pid`` (0 = this process) to ``cores``; False where the machine does not allow it."""
    if not cores:
        return False
    try:
        os.sched_setaffinity(pid, cores)
    except (AttributeError, OSError):
        return False
    return True


class ServerProcess:
    """A server in a child process on a free 127.0.0.1 port; a context manager.

    By default the gateway, ``python -m server``, with a fresh database and
    ``DAC_AUTH=header`` (callers name their org in ``x-org-id``);
    ``command`` runs something else (``{port}`` in it is replaced), ready when
    ``ready_path`` answers 200.
    """

    def __init__(
        self,
        *,
        command: Sequence[str] | None = None,
        ready_path: str = "/readyz",
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        db: str | None = None,
        cores: set[int] | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="dac-tools-")
        self.port = port or free_port()
        self.db = db or str(Path(self._tmp.name) / "dac.db")
        self.url = f"http://127.0.0.1:{self.port}"
        gateway = command is None
        if command is None:
            command = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "{port}", "--db", self.db]
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.ready_path = ready_path
        # the gateway on loopback for measurements trusts x-org-id (DAC_AUTH=header) unless told otherwise
        self.env = {**os.environ, **({"DAC_AUTH": "header"} if gateway else {}), **(env or {})}
        self.cores = cores
        self.pinned = False
        self.ready_timeout_s = ready_timeout_s
        self.log_path = Path(self._tmp.name) / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def workdir(self) -> Path:
        """A temporary folder that lives as long as this object (config files go here)."""
        return Path(self._tmp.name)

    @property
    def pid(self) -> int:
        assert self._proc is not None, "server not started"
        return self._proc.pid

    def start(self) -> ServerProcess:
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        self.pinned = pin(self._proc.pid, self.cores)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with http_open(f"{self.url}{self.ready_path}", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{' '.join(self.command[:3])} did not get ready in "
                                   f"{self.ready_timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return proc_rss_bytes(self.pid)

    def stop(self) -> int | None:
        """SIGTERM (the server saves its turns), then SIGKILL if it takes too long."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DEFAULT_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return None if proc is None else proc.returncode

    def __enter__(self) -> ServerProcess:
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


# -- metrics ------------------------------------------------------------------

#: ``/metrics`` samples: {(sample name, sorted labels): value}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def prometheus_samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric_sum(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
               **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


# -- output -------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ms(seconds: float | None, digits: int = 0) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.{digits}f} ms"
