"""The browser page, end to end: real headless Chromium against a real server.

The browser side lives in ``page.spec.mjs`` (Node, playwright-core driving
Debian's ``/usr/bin/chromium``). Each case here runs one of its tests by name
against a gateway started as its own process on a free 127.0.0.1 port.

Where Chromium, Node or ``node_modules/playwright-core`` is missing the cases
are skipped with the reason, except under CI (``CI`` set), where a missing
piece is a failure: ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = Path(__file__).with_name("page.spec.mjs")
CHROMIUM = Path(os.environ.get("CHROME_PATH", "/usr/bin/chromium"))
NODE = shutil.which("node")
START_TIMEOUT_S = 30.0
CASE_TIMEOUT_S = 240.0

CASES = [
    "a message is sent and its answer streams in",
    "two tabs asking the same thing share one provider call",
    "Stop leaves a cancelled message and closes the provider stream",
    "a dropped connection resumes without duplicated text",
    "text from the server is shown as text, never run",
    "a provider error is shown and the stream is not reopened",
    "tool calls and reasoning are shown as collapsed blocks",
    "the printed address opens the page with its key, once",
    "without a key the page asks for one",
]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    if NODE is None:
        return "no node on PATH (Node 20 or newer)"
    if not (ROOT / "node_modules" / "playwright-core").is_dir():
        return "no node_modules/playwright-core (run `npm ci` at the top of the repo)"
    return None


MISSING = _missing()


@pytest.fixture(scope="module")
def browser_ready() -> None:
    if MISSING is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run under CI: {MISSING}")
    pytest.skip(f"browser tests skipped: {MISSING}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    base: str
    log: Path
    db: Path
    #: the page's address with the first key, as the server printed it
    page_url: str


@pytest.fixture(scope="module")
def server(browser_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway process on 127.0.0.1 with API keys (the default), as ``make run`` starts it."""
    tmp = tmp_path_factory.mktemp("e2e")
    port = _free_port()
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAC_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--db", str(tmp / "dac.db")],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(base + "readyz", timeout=2) as res:
                    if res.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within {START_TIMEOUT_S}s:\n{log_path.read_text()}")
            time.sleep(0.1)
        page_url = None
        while page_url is None:  # printed right after the listening line
            page_url = next(iter(re.findall(r"(http://\S+/#key=\S+)", log_path.read_text())), None)
            if page_url is None and time.monotonic() > deadline:
                pytest.fail(f"the server printed no page address with a key:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield Server(base=base, log=log_path, db=tmp / "dac.db", page_url=page_url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("name", CASES)
def test_page(server: Server, name: str) -> None:
    base, log_path = server.base, server.log
    # the spec makes a key per org with `python -m server keys create`, on the server's database
    env = {"BASE_URL": base, "CHROME_PATH": str(CHROMIUM), "DAC_E2E_PAGE_URL": server.page_url,
           "DAC_E2E_PYTHON": sys.executable, "DAC_E2E_DB": str(server.db)}
    pattern = "^" + re.escape(name) + "$"
    try:
        run = subprocess.run(
            [NODE, "--test", "--test-reporter=tap", f"--test-name-pattern={pattern}", str(SPEC)],
            cwd=ROOT, env={**os.environ, **env},
            capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the browser test ran over {CASE_TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}")
    output = f"{run.stdout}\n{run.stderr}"
    if run.returncode != 0 or not re.search(r"^# pass 1$", run.stdout, re.M):
        server_log = log_path.read_text()[-4000:]
        pytest.fail(f"browser test failed (exit {run.returncode}):\n{output}\n--- server log (tail) ---\n{server_log}")
