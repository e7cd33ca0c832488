"""Soak: chats kept busy for a while through failures, client drops and a crash, then
the store is checked for what a user would call lost, doubled or stuck.

``python tools/soak.py [--duration 300] [--chats 25] [--fail-rate 0.05] [--drop-rate 0.10]``

- ``--chats`` clients, each on its own thread, send one streamed message after another
  (``mock:ttft=..,itl=..,n=..``; a share ``--fail-rate`` asks the mock to fail mid-answer);
  a share ``--drop-rate`` of the clients close their connection after a few deltas.
- Halfway through, the server is killed with SIGKILL and started again on the same
  database and port; clients whose connection died retry once it is back.
- At the end the server stops (SIGTERM) and the SQLite file is read directly:

  - every user message a client saw accepted (its ``meta`` event) is there, once;
  - no answer is doubled: each user message has exactly one assistant message after it;
  - no message is left ``streaming``;
  - every ``complete`` answer equals the text its client received (when the client
    stayed to the end).

It prints a table (Check | Expected | Actual | Result) and the counts, and exits 1 on
any FAIL. ``--json`` prints the result as JSON instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import ServerProcess, markdown_table, progress
from tools.sse import sse_events

ORG = "org_soak"


@dataclass
class Sent:
    """One message a client sent, and what it saw."""

    chat: int
    content: str
    user_message_id: str | None = None
    stream_id: str | None = None
    text: str = ""
    outcome: str = "no_answer"  # done | error:<type> | dropped | connection_lost | refused:<status>


@dataclass
class Soak:
    args: argparse.Namespace
    server: ServerProcess
    rng: random.Random
    sent: list[Sent] = field(default_factory=list)
    up: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0

    async def wait_up(self, deadline: float) -> None:
        while not self.up.is_set() and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(1):
                    await self.up.wait()
            except TimeoutError:
                pass

    async def chat(self, http: aiohttp.ClientSession, number: int, deadline: float) -> None:
        url = self.server.url
        thread = None
        turn = 0
        while time.monotonic() < deadline:
            await self.wait_up(deadline)
            try:
                if thread is None:
                    async with http.post(f"{url}/api/threads/", json={"title": f"soak {number}"},
                                         headers={"x-org-id": ORG}) as resp:
                        thread = (await resp.json())["thread_id"]
                await self.turn(http, thread, number, turn)
            except (aiohttp.ClientError, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.05)  # the server is down: wait for it (wait_up) and go on
            turn += 1

    async def turn(self, http: aiohttp.ClientSession, thread: str, number: int, turn: int) -> None:
        args = self.args
        fail = self.rng.random() < args.fail_rate
        drop = self.rng.random() < args.drop_rate
        model = f"mock:ttft={args.ttft_ms},itl={args.itl_ms},n={args.tokens}" + (
            f",failat={self.rng.randrange(1, args.tokens)}" if fail else "")
        sent = Sent(chat=number, content=f"chat {number} turn {turn} {self.rng.random():.6f}")
        self.sent.append(sent)
        async with asyncio.timeout(60), http.post(
                f"{self.server.url}/api/threads/{thread}/messages", json={"content": sent.content, "model": model},
                headers={"x-org-id": ORG, "Accept": "text/event-stream"}) as resp:
            if resp.status != 200:
                sent.outcome = f"refused:{resp.status}"
                return
            deltas = 0
            sent.outcome = "connection_lost"
            try:
                async for ev in sse_events(resp):
                    if ev.event == "meta":
                        meta = ev.json()
                        sent.user_message_id, sent.stream_id = meta["user_message_id"], meta["stream_id"]
                    elif ev.event == "delta":
                        sent.text += ev.json()["text"]
                        deltas += 1
                        if drop and deltas >= 3:
                            sent.outcome = "dropped"
                            return  # leaving the block closes the connection
                    elif ev.event == "snapshot":
                        sent.text = ev.json()["text"]
                    elif ev.event == "done":
                        sent.outcome = "done"
                        sent.text = ev.json()["message"]["content"] if not sent.text else sent.text
                    elif ev.event == "error":
                        sent.outcome = "error:" + ev.json()["error"]["type"]
            except (aiohttp.ClientError, ConnectionError, asyncio.IncompleteReadError):
                sent.outcome = "connection_lost"
                raise

    async def crash(self, at: float) -> None:
        """SIGKILL the server at ``at`` (monotonic) and start it again on the same database."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        progress("soak: kill -9 of the server")
        self.up.clear()
        proc = self.server._proc
        assert proc is not None
        proc.kill()
        await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        await asyncio.get_running_loop().run_in_executor(None, self.server.start)
        self.restarts += 1
        progress("soak: server started again")
        self.up.set()


def check_store(db: str, sent: list[Sent]) -> tuple[list[tuple[str, str, str, bool]], dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT message_id, thread_id, role, content, status FROM messages ORDER BY seq").fetchall()
    by_id = Counter(r[0] for r in rows)
    statuses = Counter(r[4] for r in rows if r[2] == "assistant")
    index = {r[0]: i for i, r in enumerate(rows)}
    accepted = [s for s in sent if s.user_message_id is not None]
    lost = [s for s in accepted if by_id[s.user_message_id or ""] != 1]
    # each user message has exactly one assistant message after it in its thread
    doubled = 0
    by_thread: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        by_thread.setdefault(r[1], []).append(r)
    for thread_rows in by_thread.values():
        for before, after in zip(thread_rows, thread_rows[1:], strict=False):
            if before[2] == after[2]:
                doubled += 1
        if thread_rows and thread_rows[-1][2] == "user":
            doubled += 1  # a question with no answer row
    contents = Counter(r[3] for r in rows if r[2] == "user")
    repeated = sum(n - 1 for n in contents.values() if n > 1)
    streaming = statuses.get("streaming", 0)
    finished = [s for s in accepted if s.outcome == "done" and s.stream_id in index]
    mismatched = [s for s in finished
                  if rows[index[s.stream_id or ""]][4] != "complete" or rows[index[s.stream_id or ""]][3] != s.text]
    checks = [
        ("every accepted user message present once", "0 lost", f"{len(lost)} lost", not lost),
        ("no answer duplicated", "0", str(doubled + repeated), doubled + repeated == 0),
        ("nothing left streaming", "0", str(streaming), streaming == 0),
        ("complete answers equal what clients received", "0 differ",
         f"{len(mismatched)} differ of {len(finished)}", not mismatched and bool(finished)),
    ]
    outcomes = Counter(s.outcome.split(":")[0] for s in sent)
    counts = {"requests": len(sent), "accepted": len(accepted), "rows": len(rows),
              "outcomes": dict(outcomes), "assistant_statuses": dict(statuses),
              "errors": dict(Counter(s.outcome for s in sent if s.outcome.startswith("error")))}
    return checks, counts


async def run(args: argparse.Namespace) -> tuple[list[tuple[str, str, str, bool]], dict[str, Any]]:
    env = {"DAC_CHECKPOINT_DELTAS": "5", "DAC_CANCEL_GRACE_MS": "20"}
    with ServerProcess(env=env) as server:
        soak = Soak(args=args, server=server, rng=random.Random(args.seed))
        soak.up.set()
        started = time.monotonic()
        deadline = started + args.duration
        progress(f"soak: {args.chats} chats for {args.duration:g}s on {server.url} (seed {args.seed})")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.chats * 2)) as http:
            crash = asyncio.create_task(soak.crash(started + args.duration * args.kill_at))
            await asyncio.gather(*(soak.chat(http, i, deadline) for i in range(args.chats)))
            await crash
        status = server.stop()
        progress(f"soak: server stopped (status {status}); checking the store")
        checks, counts = check_store(server.db, soak.sent)
        counts["restarts"] = soak.restarts
        counts["duration_s"] = round(time.monotonic() - started, 1)
        return checks, counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--chats", type=int, default=25)
    p.add_argument("--fail-rate", type=float, default=0.05, help="share of answers the mock cuts mid-way")
    p.add_argument("--drop-rate", type=float, default=0.10, help="share of clients that leave mid-answer")
    p.add_argument("--kill-at", type=float, default=0.5, help="when to kill -9 the server, as a share of the run")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--ttft-ms", type=int, default=100)
    p.add_argument("--itl-ms", type=int, default=20)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checks, counts = asyncio.run(run(args))
    ok = all(passed for *_, passed in checks)
    if args.json:
        print(json.dumps({"ok": ok, "seed": args.seed, "counts": counts,
                          "checks": [{"check": c, "expected": e, "actual": a, "pass": p} for c, e, a, p in checks]}))
    else:
        print(markdown_table(["Check", "Expected", "Actual", "Result"],
                             [(c, e, a, "PASS" if p else "FAIL") for c, e, a, p in checks]))
        print()
        print(markdown_table(["Count", "Value"], [(k, json.dumps(v)) for k, v in counts.items()]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
