"""Nothing lost, nothing hidden: checkpoints, a failed final write, an unwritable database,
and answers cut at DAC_MAX_ANSWER_CHARS."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.providers.mock import mock_answer
from server.sqlite_store import SQLiteStore
from tools.sse import sse_events

from .fake_upstream import wait_until
from .helpers import ScriptedProvider, collect, registry, text_of, within
from .test_main import ROOT, new_thread, start_server


def scripted_body(content: str) -> dict[str, Any]:
    return {"content": content, "provider": "scripted", "model": "scripted"}


def row(db: str | Path, message_id: str) -> tuple[str, str, int]:
    with sqlite3.connect(db) as conn:
        found = conn.execute("SELECT status, content, deltas FROM messages WHERE message_id = ?",
                             (message_id,)).fetchone()
    assert found is not None, message_id
    return str(found[0]), str(found[1]), int(found[2])


async def on_writer(store: SQLiteStore, sql: str) -> None:
    """Run ``sql`` on the store's own writer connection (its thread), between group commits."""
    conn = store._conn
    assert conn is not None
    await store._call(lambda: conn.execute(sql))


async def test_the_text_is_checkpointed_to_the_row_while_it_streams(gateway_factory, tmp_path) -> None:
    scripted = ScriptedProvider()
    db = str(tmp_path / "cp.db")
    gw = await gateway_factory(providers=registry(scripted), db_path=db, checkpoint_deltas=10, checkpoint_s=0)
    tid = await gw.new_thread()
    async with gw.open_stream(tid, scripted_body("checkpoint me")) as resp:
        call = await scripted.next_call()
        events = sse_events(resp)
        meta = await within(anext(events), 5, "the meta event")
        stream_id = meta.json()["stream_id"]
        call.send(*(f"t{i} " for i in range(25)))
        await wait_until(lambda: row(db, stream_id)[2] >= 20, "the checkpoint of 20 deltas", timeout=5)
        status, content, deltas = row(db, stream_id)
        assert status == "streaming"
        assert content.startswith("".join(f"t{i} " for i in range(deltas))) and deltas >= 20
        call.finish()
        rest = [ev async for ev in events]
    assert rest[-1].event == "done"
    assert row(db, stream_id) == ("complete", "".join(f"t{i} " for i in range(25)), 25)


async def test_a_disk_that_fills_during_the_answer_is_a_store_error_and_nothing_is_cached(
        gateway_factory, tmp_path) -> None:
    """The database may not grow (SQLite's max_page_count on the store's own writer, the
    way a full disk refuses pages) while a long answer streams: the client gets a
    retryable ``store_error`` instead of ``done``, /readyz says the store cannot write, and
    the same question asked again is answered afresh, not from the cache."""
    scripted = ScriptedProvider()
    db = str(tmp_path / "full.db")
    gw = await gateway_factory(providers=registry(scripted), db_path=db, checkpoint_s=0, checkpoint_deltas=0)
    tid = await gw.new_thread()
    big = "x" * 2000
    async with gw.open_stream(tid, scripted_body("fill the disk")) as resp:
        call = await scripted.next_call()
        events = sse_events(resp)
        first = await within(anext(events), 5, "the meta event")
        assert first.event == "meta"
        with sqlite3.connect(db) as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        await on_writer(gw.store, f"PRAGMA max_page_count = {pages}")
        call.send(*([big] * 200))
        call.finish()
        rest = await within(collect_rest(events), 10, "the end of the stream")
    assert rest[-1].event == "error", [e.event for e in rest[-3:]]
    error = rest[-1].json()["error"]
    assert error["type"] == "store_error" and error["retryable"] is True, error
    async with gw.session.get(f"{gw.url}/readyz") as ready:
        assert ready.status == 503 and (await ready.json())["status"] == "store_unwritable"

    await on_writer(gw.store, "PRAGMA max_page_count = 1073741823")  # room again
    async with gw.session.get(f"{gw.url}/readyz") as ready:
        assert ready.status == 200, await ready.text()
    again = asyncio.create_task(gw.post(tid, scripted_body("fill the disk")))
    call = await scripted.next_call()  # a new upstream call: the unsaved answer was not kept
    call.send("saved this time")
    call.finish()
    status, body = await within(again, 5, "the repeated question")
    assert status == 200 and body["coalesce"] == "leader", body
    assert body["message"]["content"] == "saved this time"
    assert len(scripted.calls) == 2


async def collect_rest(events: Any) -> list[Any]:
    return [ev async for ev in events]


async def test_an_answer_is_cut_at_max_answer_chars_with_finish_reason_length(gateway_factory) -> None:
    gw = await gateway_factory(max_answer_chars=50)
    tid = await gw.new_thread()
    status, body = await gw.post(tid, {"content": "long one", "model": "mock:ttft=0,itl=0,n=200"})
    assert status == 200, body
    message = body["message"]
    full = "".join(mock_answer("long one", 200))
    assert message["status"] == "complete" and message["content"] == full[:50]
    assert message["meta"]["finish_reason"] == "length"
    assert (await gw.thread(tid))["messages"][1]["content"] == full[:50]
    async with gw.open_stream(tid, {"content": "streamed", "model": "mock:ttft=0,itl=0,n=200"}) as resp:
        events = await collect(resp)
    assert text_of(events) == "".join(mock_answer("streamed", 200))[:50]
    assert events[-1].json()["message"]["meta"]["finish_reason"] == "length"
    async with gw.session.post(f"{gw.url}/v1/chat/completions", headers=gw.h(), json={
            "model": "mock/mock:ttft=0,itl=0,n=200", "messages": [{"role": "user", "content": "v1"}]}) as resp:
        completion = await resp.json()
    assert completion["choices"][0]["finish_reason"] == "length"
    assert len(completion["choices"][0]["message"]["content"]) == 50


async def test_kill_9_after_50_delivered_deltas_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    db = tmp_path / "kill.db"
    env = {"DAC_CHECKPOINT_DELTAS": "10", "DAC_CHECKPOINT_S": "0"}
    proc, url = await start_server(db, env=env)
    received = ""
    try:
        async with aiohttp.ClientSession() as http:
            tid = await new_thread(http, url)
            async with http.post(f"{url}/api/threads/{tid}/messages",
                                 headers={"x-org-id": "org_a", "Accept": "text/event-stream"},
                                 json={"content": "crash", "model": "mock:ttft=0,itl=20,n=400"}) as resp:
                deltas = 0

                async def read() -> str:
                    nonlocal deltas, received
                    stream_id = ""
                    async for ev in sse_events(resp):
                        if ev.event == "meta":
                            stream_id = ev.json()["stream_id"]
                        elif ev.event == "delta":
                            received += ev.json()["text"]
                            deltas += 1
                            if deltas == 50:
                                proc.kill()  # SIGKILL: no handler runs, nothing is flushed
                                return stream_id
                    raise AssertionError("the stream ended before 50 deltas")

                stream_id = await within(read(), 20, "50 deltas")
        await within(proc.wait(), 10, "the process to die")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    status, content, kept = row(db, stream_id)
    tokens = mock_answer("crash", 400)
    assert status == "streaming"  # as the process left it
    assert kept >= 40 and content == "".join(tokens[:kept]), (kept, len(content))
    assert received.startswith(content) or content.startswith(received)

    proc, url = await start_server(db)  # a restart marks it interrupted, the text kept
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/threads/{tid}", headers={"x-org-id": "org_a"}) as resp:
                answer = (await resp.json())["messages"][1]
        assert answer["status"] == "interrupted" and answer["content"] == content
    finally:
        proc.kill()
        await proc.wait()


async def test_a_read_only_database_stops_the_start_with_status_1_naming_dac_db() -> None:
    """A database file the process may read but not write. As root every file is writable,
    so then the server runs as ``nobody`` on a file that root owns."""
    folder = Path(tempfile.mkdtemp(prefix="dac-ro-"))
    try:
        db = folder / "ro.db"
        store = SQLiteStore(str(db))
        await store.open()
        await store.close()
        for leftover in folder.glob("ro.db-*"):
            leftover.unlink()
        db.chmod(0o444)
        folder.chmod(0o755)  # nobody may not create the -wal file beside it either
        as_nobody = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root: needs setpriv (util-linux) to start the server as nobody")
            as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *as_nobody, sys.executable, "-m", "server", "--port", "0", "--db", str(db), cwd=ROOT,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "DAC_SECRET": "s" * 32},  # the DB alone is checked
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await within(proc.communicate(), 10, "the process to stop")
        took = time.perf_counter() - started
        assert proc.returncode == 1, out
        assert b"DAC_DB" in out and str(db).encode() in out and b"listening" not in out, out
        assert took < 5, took
    finally:
        for path in folder.glob("*"):
            path.unlink()
        folder.rmdir()


async def test_the_history_sent_upstream_keeps_to_the_context_budget(gateway_factory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted), context_chars=80)
    tid = await gw.new_thread()
    for i in range(4):  # each turn: a 10-character question and a 19-character answer
        pending = asyncio.create_task(gw.post(tid, scripted_body(f"question {i}")))
        call = await scripted.next_call()
        call.send(f"answer number {i} ok.")
        call.finish()
        status, body = await within(pending, 5, f"turn {i}")
        assert status == 200, body
    sent = [m["content"] for m in scripted.calls[-1].request.messages]
    # 3 earlier turns (87 characters) and the question do not fit in 80: the oldest go first
    assert sent == ["question 1", "answer number 1 ok.", "question 2", "answer number 2 ok.", "question 3"], sent
    last = (await gw.thread(tid))["messages"][-2:]
    for message in last:
        assert message["meta"]["context_cut"]["dropped_messages"] == 2, message
        assert message["meta"]["context_cut"]["budget_chars"] == 80
    assert "context_cut" not in (await gw.thread(tid))["messages"][0]["meta"]

    status, body = await gw.post(tid, scripted_body("x" * 81))  # cannot fit even alone
    assert status == 400 and "context budget" in body["error"]["message"], body
    async with gw.session.post(f"{gw.url}/v1/chat/completions", headers=gw.h(), json={
            "model": "scripted/scripted", "messages": [{"role": "user", "content": "y" * 81}]}) as resp:
        assert resp.status == 400, await resp.text()
    assert len((await gw.thread(tid))["messages"]) == 8 and len(scripted.calls) == 4


def test_the_providers_file_sets_context_budgets(tmp_path) -> None:
    from server.config import Settings
    from server.providers.catalog import ProviderConfigError, resolve

    path = tmp_path / "providers.toml"
    path.write_text('[[providers]]\nname = "local"\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                    'context_chars = 5000\nmodel_context_chars = { small = 800 }\n')
    spec = next(r.spec for r in resolve(Settings.from_env({"DAC_PROVIDERS_FILE": str(path)})) if r.spec.name == "local")
    assert spec.context_chars == 5000 and dict(spec.model_context_chars) == {"small": 800}
    path.write_text('[[providers]]\nname = "local"\nkind = "openai"\nmodel_context_chars = { small = "big" }\n')
    try:
        resolve(Settings.from_env({"DAC_PROVIDERS_FILE": str(path)}))
    except ProviderConfigError as exc:
        assert "model_context_chars" in str(exc)
    else:
        raise AssertionError("a bad model_context_chars was accepted")


async def test_a_thread_pages_its_messages(gateway_factory) -> None:
    gw = await gateway_factory()
    tid = await gw.new_thread()
    for i in range(5):
        status, _ = await gw.post(tid, {"content": f"q{i}", "model": "mock:ttft=0,itl=0,n=2"})
        assert status == 200
    everything = (await gw.thread(tid))["messages"]
    assert len(everything) == 10 and "next_before" not in await gw.thread(tid)
    pages, before = [], None
    for _ in range(5):  # bounded: 3 pages expected
        params = {"limit": "4", **({"before": before} if before else {})}
        async with gw.session.get(f"{gw.url}/api/threads/{tid}", params=params, headers=gw.h()) as resp:
            page = await resp.json()
        pages.append(page["messages"])
        before = page.get("next_before")
        if before is None:
            break
    assert [len(p) for p in pages] == [4, 4, 2]
    assert [m for p in reversed(pages) for m in p] == everything  # oldest first within and across pages
    for params in ({"before": "msg_nope"}, {"limit": "٣"}, {"limit": "0"}):
        async with gw.session.get(f"{gw.url}/api/threads/{tid}", params=params, headers=gw.h()) as resp:
            assert resp.status == 400, params
