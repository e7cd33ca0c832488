"""The process: ``python -m server`` starts on the given port and shuts down cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp

from tools.sse import sse_events

from .helpers import within

ROOT = Path(__file__).resolve().parent.parent


async def start_server(db: Path, *args: str, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--port", "0", "--db", str(db), *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    line = (await within(proc.stdout.readline(), 20, "the listening line")).decode()
    match = re.search(r"listening on (http://\S+)", line)
    assert match, line
    return proc, match.group(1)


async def test_sigterm_tells_listeners_and_saves_the_turn(tmp_path: Path) -> None:
    db = tmp_path / "dac.db"
    proc, url = await start_server(db)
    try:
        async with aiohttp.ClientSession() as http:
            h = {"x-org-id": "org_a"}
            async with http.post(f"{url}/api/threads/", json={}, headers=h) as resp:
                tid = (await resp.json())["thread_id"]
            async with http.post(f"{url}/api/threads/{tid}/messages", headers={**h, "Accept": "text/event-stream"},
                                 json={"content": "long", "model": "mock:ttft=0,itl=100,n=200"}) as resp:
                events = []

                async def read() -> None:
                    async for ev in sse_events(resp):
                        events.append(ev)
                        if sum(e.event == "delta" for e in events) == 2:
                            proc.send_signal(signal.SIGTERM)

                await within(read(), 20, "the stream to end after SIGTERM")
        assert events[-1].event == "error", events
        assert events[-1].json()["error"]["type"] == "shutting_down"
        assert events[-1].json()["error"]["retryable"] is True
        assert await within(proc.wait(), 20, "the process to exit") == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT role, status, content FROM messages ORDER BY seq").fetchall()
    assert [r[:2] for r in rows] == [("user", "complete"), ("assistant", "interrupted")]
    assert rows[1][2].strip() != ""  # the text received before the shutdown is kept


async def test_port_and_settings_from_the_environment(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=ROOT,
        env={**os.environ, "DAC_PORT": "0", "DAC_DB": str(tmp_path / "env.db"), "DAC_HOST": "127.0.0.1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    line = (await within(proc.stdout.readline(), 20, "the listening line")).decode()
    try:
        assert "http://127.0.0.1:" in line and str(tmp_path / "env.db") in line
    finally:
        proc.send_signal(signal.SIGINT)
        assert await within(proc.wait(), 20) == 0
    assert (tmp_path / "env.db").exists()


async def test_a_bad_setting_stops_the_start_with_its_name(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=ROOT,
        env={**os.environ, "COALESCE_ENABLED": "maybe", "DAC_DB": str(tmp_path / "x.db")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await within(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"COALESCE_ENABLED must be 0 or 1" in out
