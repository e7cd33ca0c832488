"""The process: ``python -m server`` starts on the given port and shuts down cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

from tools.sse import sse_events

from .engines import PostgresServer
from .helpers import closed_port, within

ROOT = Path(__file__).resolve().parent.parent


async def start_server(db: Path, *args: str, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--port", "0", "--db", str(db), *args,
        cwd=ROOT, env={**os.environ, "DAC_AUTH": "header", **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = ""  # log lines (a migration applied, say) may come first

    async def listening() -> re.Match[str] | None:
        nonlocal seen
        while line := (await proc.stdout.readline()).decode():  # type: ignore[union-attr]
            seen += line
            if match := re.search(r"listening on (http://\S+)", line):
                return match
        return None

    match = await within(listening(), 20, "the listening line")
    assert match, seen
    return proc, match.group(1)


async def new_thread(http: aiohttp.ClientSession, url: str, org: str = "org_a") -> str:
    """A new thread of ``org`` on the server at ``url``."""
    async with http.post(f"{url}/api/threads/", json={}, headers={"x-org-id": org}) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["thread_id"])


async def test_sigterm_tells_listeners_and_saves_the_turn(tmp_path: Path) -> None:
    db = tmp_path / "dac.db"
    proc, url = await start_server(db)
    try:
        async with aiohttp.ClientSession() as http:
            h = {"x-org-id": "org_a"}
            tid = await new_thread(http, url)
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


async def failed_start(env: dict[str, str]) -> tuple[int | None, bytes]:
    """Start ``python -m server`` with ``env`` added, expecting it to stop: its status and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--port", "0", cwd=ROOT, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await within(proc.communicate(), 20, "the process to stop")
    return proc.returncode, out


async def test_a_bad_setting_stops_the_start_with_its_name(tmp_path: Path) -> None:
    status, out = await failed_start({"COALESCE_ENABLED": "maybe", "DAC_DB": str(tmp_path / "x.db")})
    assert status == 2
    assert b"COALESCE_ENABLED must be 0 or 1" in out


async def assert_refused(setting: str, cases: list[tuple[str, bytes]], db: Path) -> None:
    """Each URL in ``setting`` stops the start within 10 s with status 2, naming the setting and
    saying ``expected``, never the URL's password."""
    for url, expected in cases:
        started = time.perf_counter()
        status, out = await failed_start({setting: url, "DAC_DB": str(db)})
        assert status == 2, out
        assert f"error: {setting}".encode() in out and expected in out, out
        assert b"s3cret" not in out and b"listening" not in out
        assert time.perf_counter() - started < 10


async def test_a_database_that_does_not_answer_stops_the_start_naming_the_setting(tmp_path: Path) -> None:
    await assert_refused("DAC_DATABASE_URL", [
        (f"postgresql://dac:s3cret@127.0.0.1:{closed_port()}/dac", b"cannot connect to PostgreSQL"),
        ("mysql://dac:s3cret@127.0.0.1/dac", b"must start with postgresql:// or postgres://"),
    ], tmp_path / "unused.db")
    assert not (tmp_path / "unused.db").exists()


async def test_the_gateway_runs_on_postgresql(tmp_path: Path, postgres: PostgresServer) -> None:
    schema = postgres.new_schema()
    url = postgres.url_for(schema)
    proc, base = await start_server(tmp_path / "unused.db", env={"DAC_DATABASE_URL": url})
    assert base.startswith("http://127.0.0.1:")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as resp:
                assert await resp.json() == {"status": "ready", "store": "postgresql", "registry": "inprocess"}
            h = {"x-org-id": "org_a"}
            async with http.post(f"{base}/api/threads/", json={}, headers=h) as resp:
                tid = (await resp.json())["thread_id"]
            async with http.post(f"{base}/api/threads/{tid}/messages", headers=h,
                                 json={"content": "hi", "model": "mock:ttft=0,itl=0,n=3"}) as resp:
                assert resp.status == 200, await resp.text()
        proc.send_signal(signal.SIGINT)
        assert await within(proc.wait(), 20, "the process to exit") == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not (tmp_path / "unused.db").exists()
    conn = await within(asyncpg.connect(postgres.url, timeout=5))
    try:
        rows = await conn.fetch(f'SELECT role, status FROM "{schema}".messages ORDER BY seq')
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("user", "complete"), ("assistant", "complete")]


async def test_a_redis_that_does_not_answer_stops_the_start_naming_the_setting(tmp_path: Path) -> None:
    await assert_refused("DAC_REDIS_URL", [
        (f"redis://:s3cret@127.0.0.1:{closed_port()}/0", b"cannot use Redis"),
        ("http://127.0.0.1:6379", b"must start with redis://"),
    ], tmp_path / "x.db")


async def test_workers_need_redis_and_say_why(tmp_path: Path) -> None:
    status, out = await failed_start({"DAC_WORKERS": "2", "DAC_DB": str(tmp_path / "x.db"), "DAC_REDIS_URL": ""})
    assert status == 2
    assert b"needs DAC_REDIS_URL" in out and b"listening" not in out
