"""The measurement tools, each run the way the README documents it, in short form.

The gateway runs as ``python -m server`` in a child process on a free
127.0.0.1 port with a fresh database (``tools._common.ServerProcess``); the
tools run as their own processes against it. Only outcomes that do not depend
on the machine's speed are asserted: counts, texts, statuses, the shape of the
output and exit codes. The timing figures are the tools' business.
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
import pstats
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.providers.mock import mock_answer
from tools._common import ServerProcess, free_port, http_open
from tools.fake_openai import FakeConfig, make_app

from .helpers import within

ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
#: a tool that runs longer than this has hung
TOOL_TIMEOUT_S = 180


def run(args: list[str], *, env: dict[str, str] | None = None, shell: bool = False,
        timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args if not shell else " ".join(args), cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, shell=shell, stdin=subprocess.DEVNULL)


def api(base: str, method: str, path: str, body: Any = None, *, org: str = "org_demo") -> tuple[int, Any]:
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"x-org-id": org,
                                     "Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with http_open(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as proc:
        yield proc


# -- sse_ttft.mjs -------------------------------------------------------------------


def sse_ttft(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return run([NODE, "sse_ttft.mjs", *args], env=env, timeout=60)


@needs_node
def test_sse_ttft_times_one_stream_and_reports_it_as_one_json_line(server: ServerProcess) -> None:
    out = sse_ttft("--base", server.url, "--content", "Measure me", "--model", "mock:ttft=50,itl=5,n=12")
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    assert out.stdout.count("\n") == 1
    assert {"ttft_ms", "total_ms", "deltas", "bytes", "status", "coalesce"} <= set(line)
    assert (line["status"], line["http"], line["coalesce"], line["deltas"]) == ("complete", 200, "leader", 12)
    assert 0 < line["ttft_ms"] <= line["total_ms"]
    assert line["bytes"] > 0
    assert line["text_chars"] == len("".join(mock_answer("Measure me", 12)))
    # No --thread: it made one, and the turn is stored there.
    status, thread = api(server.url, "GET", f"/api/threads/{line['thread_id']}")
    assert status == 200
    assert [(m["role"], m["status"]) for m in thread["messages"]] == [("user", "complete"), ("assistant", "complete")]
    assert thread["messages"][1]["message_id"] == line["stream_id"]


@needs_node
def test_sse_ttft_opens_a_given_stream_url(server: ServerProcess) -> None:
    status, thread = api(server.url, "POST", "/api/threads/", {})
    status, accepted = api(server.url, "POST", f"/api/threads/{thread['thread_id']}/messages",
                           {"content": "Later", "stream": True, "model": "mock:ttft=100,itl=5,n=7"})
    assert status == 202
    out = sse_ttft("--base", server.url, "--stream-url", accepted["stream_url"])
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    assert (line["status"], line["deltas"], line["stream_id"]) == ("complete", 7, accepted["stream_id"])
    assert line["text_chars"] == len("".join(mock_answer("Later", 7)))


@needs_node
def test_sse_ttft_cancel_closes_the_stream_and_sees_the_message_cancelled(server: ServerProcess) -> None:
    out = sse_ttft("--base", server.url, "--content", "Cancel me", "--model", "mock:ttft=20,itl=20,n=1000",
                   "--cancel-after-ms", "300")
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    assert line["status"] == "cancelled"
    assert line["cancel_ms"] >= 295  # Node timers may fire a fraction of a millisecond early
    assert 0 < line["deltas"] < 1000
    assert line["cancel_confirm_ms"] is not None, "the server never showed the message as cancelled"
    status, thread = api(server.url, "GET", f"/api/threads/{line['thread_id']}")
    assistant = thread["messages"][1]
    assert assistant["status"] == "cancelled"
    assert len(assistant["content"]) >= line["text_chars"] > 0


@needs_node
def test_sse_ttft_runs_under_xargs_from_the_environment_sharing_one_flight(server: ServerProcess) -> None:
    status, thread = api(server.url, "POST", "/api/threads/", {"title": "xargs"}, org="org_x")
    assert status == 201
    env = {"BASE": server.url, "THREAD": thread["thread_id"], "ORG": "org_x", "MODEL": "mock:ttft=400,itl=5,n=8",
           "CONTENT": "Shared question"}
    out = run(["seq", "3", "|", "xargs", "-n1", "-P3", NODE or "node", "sse_ttft.mjs"], env=env, shell=True)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(raw) for raw in out.stdout.splitlines()]
    assert len(lines) == 3
    assert {ln["status"] for ln in lines} == {"complete"}
    assert {ln["deltas"] for ln in lines} == {8}
    assert len({ln["stream_id"] for ln in lines}) == 1, "the three streams did not share one answer"
    assert sorted(ln["coalesce"] for ln in lines).count("leader") == 1
    status, stored = api(server.url, "GET", f"/api/threads/{thread['thread_id']}", org="org_x")
    assert len(stored["messages"]) == 2


@needs_node
def test_sse_ttft_exits_non_zero_with_the_reason_on_errors(server: ServerProcess) -> None:
    out = sse_ttft("--base", server.url, "--provider", "nope")
    assert out.returncode == 1
    assert "HTTP 400" in out.stderr and "unknown provider" in out.stderr
    assert out.stdout == ""
    out = sse_ttft("--base", server.url, "--stream-url", "/api/streams/msg_missing")
    assert out.returncode == 1
    assert "HTTP 404" in out.stderr
    out = sse_ttft("--base", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "sse_ttft:" in out.stderr
    out = sse_ttft("--frobnicate")
    assert out.returncode == 2
    assert "unknown argument" in out.stderr


# -- tools/validate.py --------------------------------------------------------------


def validate(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = run([sys.executable, "tools/validate.py", *args], env=env)
    return out, json.loads(out.stdout) if out.stdout.strip().startswith("{") else None


def test_validate_quick_runs_every_check_and_the_burst_passes() -> None:
    out, report = validate("--serve", "--quick", "--duration", "2", "--json")
    assert report is not None, out.stderr
    assert {r["check"] for r in report["results"]} == {"burst", "cache", "fanout", "cancel", "chats"}
    for result in report["results"]:
        assert set(result) == {"check", "name", "target", "actual", "passed", "value"}
    burst = {r["name"]: r for r in report["results"] if r["check"] == "burst"}
    assert all(r["passed"] for r in burst.values()), burst
    assert burst["Burst: provider calls"]["value"] == 1
    assert burst["Burst: messages stored"]["value"] == 2
    cache = next(r for r in report["results"] if r["check"] == "cache")
    assert cache["passed"], cache
    assert report["details"]["burst"]["roles_from_responses"]["leader"] == 1
    assert all(t["status"] == "cancelled" for t in report["details"]["cancel"])
    assert report["details"]["chats"]["turns"] >= 25
    # The exit code follows the table: non-zero exactly when something failed.
    failed = [r["name"] for r in report["results"] if r["passed"] is False]
    assert report["pass"] is (not failed)
    assert out.returncode == (1 if failed else 0), failed


def test_validate_fails_the_burst_when_the_server_does_not_coalesce() -> None:
    out, report = validate("--serve", "--only", "burst", "--model", "mock:ttft=20,itl=2,n=5", "--json",
                           env={"COALESCE_ENABLED": "0"})
    assert out.returncode == 1, out.stderr
    rows = {r["name"]: r for r in report["results"]}
    assert rows["Burst: provider calls"]["value"] == 50
    assert rows["Burst: provider calls"]["passed"] is False
    assert rows["Burst: messages stored"]["value"] == 100
    assert rows["Burst: coalesce ratio"]["passed"] is False
    assert report["pass"] is False


def test_validate_prints_the_targets_table() -> None:
    out, _ = validate("--serve", "--only", "burst,cache", "--model", "mock:ttft=20,itl=2,n=5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| Check" in out.stdout and "| Target" in out.stdout and "| Result" in out.stdout
    assert out.stdout.count("| PASS") == 6
    assert "burst: 50 identical requests" in out.stderr  # progress goes to stderr


def test_validate_says_when_it_cannot_reach_the_server() -> None:
    out, _ = validate("--base", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 2
    assert "cannot run against" in out.stderr


# -- python -m tools.bench and tools/bench_fanout.py ------------------------------------


#: every figure the report checks against a target (the fan-out level of --quick is 200)
BENCH_CHECKS = {
    "ttft_added_v1_p50_ms", "ttft_added_v1_p95_ms", "ttft_added_api_p50_ms",
    "identical_upstream_calls_v1", "identical_upstream_calls_api",
    "close_to_upstream_close_v1_p95_ms", "close_to_upstream_close_api_p95_ms", "stop_to_upstream_close_api_p95_ms",
    "rps_v1_ratio_to_direct", "rps_api",
    "fanout_200_complete", "fanout_200_lag_p99_ms", "fanout_200_cpu_per_event_us",
    "fanout_200_rss_per_subscriber_kib",
    "rss_idle_mb", "rss_return_mb",
}
OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


def test_bench_quick_reports_every_figure_beside_its_target(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    out = run([sys.executable, "-m", "tools.bench", "--quick", "--json", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(path.read_text())
    assert set(report["sections"]) == {"1", "2", "3", "4", "5", "6"}
    checks = {c["key"]: c for c in report["checks"]}
    assert set(checks) == BENCH_CHECKS
    for c in checks.values():
        assert c["value"] is not None, c
        assert c["verdict"] == ("PASS" if OPS[c["op"]](c["value"], c["limit"]) else "FAIL"), c
        # The Markdown has the figure on one row with what was measured, its target and the verdict.
        assert f"| {c['measured']}" in out.stdout and f"| {c['target']}" in out.stdout, c
        assert any(c["figure"] in line and c["verdict"] in line for line in out.stdout.splitlines()), c
    assert report["pass"] is all(c["verdict"] == "PASS" for c in checks.values())
    # What does not depend on the machine's speed: coalescing, and every subscriber getting every token.
    assert checks["identical_upstream_calls_v1"]["value"] == checks["identical_upstream_calls_api"]["value"] == 1
    assert checks["fanout_200_complete"]["value"] == 200
    assert report["sections"]["2"]["columns"]["direct"]["upstream_calls_per_round"] == [50]
    # Sane values: times positive and bounded, rates and memory plausible.
    for key in ("ttft_added_v1_p50_ms", "ttft_added_v1_p95_ms", "ttft_added_api_p50_ms"):
        assert -50 < checks[key]["value"] < 1000
    for key in ("close_to_upstream_close_v1_p95_ms", "close_to_upstream_close_api_p95_ms",
                "stop_to_upstream_close_api_p95_ms", "fanout_200_lag_p99_ms"):
        assert 0 <= checks[key]["value"] < 5000
    assert checks["close_to_upstream_close_api_p95_ms"]["value"] >= 50  # the grace (DAC_CANCEL_GRACE_MS) is kept
    assert 0 < checks["rps_v1_ratio_to_direct"]["value"] < 10 and checks["rps_api"]["value"] > 0
    assert checks["fanout_200_cpu_per_event_us"]["value"] > 0
    assert 10 < checks["rss_idle_mb"]["value"] < 1000 and checks["rss_return_mb"]["value"] < 1000
    soak = report["sections"]["6"]["soak"]
    assert soak["failed"] == 0 and soak["cached_after_ttl"] == 0 < soak["cached_after_requests"]
    # The floor, a bare aiohttp proxy, answers every run in full too; the gateway's own share is
    # its figure minus the floor's.
    ttft = report["sections"]["1"]["columns"]
    assert ttft["floor"]["runs"] > 0 and ttft["floor"]["errors"] == 0
    assert ttft["v1"]["added_median_over_floor_s"] == pytest.approx(
        ttft["v1"]["added_median_s"] - ttft["floor"]["added_median_s"])
    assert report["sections"]["4"]["columns"]["floor"]["rps"] > 0
    assert "aiohttp proxy (floor)" in out.stdout
    for key, field_ in (("1", "errors"), ("4", "failed")):
        assert all(col[field_] == 0 for col in report["sections"][key]["columns"].values())
    assert all(not col["failures"] for how in ("close", "stop") for col in
               report["sections"]["3"]["columns"][how].values())


@pytest.mark.parametrize("surface", ["v1", "api"])
def test_profile_throughput_names_the_frames_of_the_profiled_requests(tmp_path: Path, surface: str) -> None:
    prof = tmp_path / "gateway.prof"
    out = run([sys.executable, "tools/profile_throughput.py", "--surface", surface, "--requests", "40",
               "--top", "5", "--out", str(prof)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"40 distinct non-stream requests through {surface}, 32 at a time (0 failed)" in out.stdout
    for title in ("own CPU time", "cumulative CPU time"):
        table = out.stdout.split(f"## Top 5 frames by {title}")[1].split("```")[1].strip().splitlines()
        assert table[0].split() == ["ncalls", "tottime", "percall", "cumtime", "percall", "filename:lineno(function)"]
        assert len(table) == 6
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    handler = "chat_completions" if surface == "v1" else "post_message"
    assert any(func[2] == handler for func in stats)
    if surface == "v1":  # the profiled requests alone, not the 300 of the warm-up: one model lookup each
        assert [v[1] for func, v in stats.items() if func[2] == "_resolve_model"] == [40]


def test_bench_fanout_checks_every_token_of_every_subscriber(tmp_path: Path) -> None:
    path = tmp_path / "fanout.json"
    out = run([sys.executable, "tools/bench_fanout.py", "--fanout-levels", "40", "--tokens", "10",
               "--load-processes", "2", "--json", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr
    section = json.loads(path.read_text())["sections"]["5"]
    rows = section["rows"]
    assert [r["subscribers"] for r in rows] == [40]
    for row in rows:
        assert row["failed_subscribers"] == 0, row["failures"]
        assert row["events_delivered"] == row["subscribers"] * 11
        assert row["load_processes"] == 2
        assert row["lag_measured_from"] == "schedule"
        assert row["attached_before_first_token"] is True  # the upstream held the answer until then
        share = row["server_kernel_share"]  # None when the run took less than a clock tick
        assert share is None or 0.0 <= share <= 1.0
    assert {c["key"] for c in section["checks"]} == {
        "fanout_40_complete", "fanout_40_lag_p99_ms", "fanout_40_cpu_per_event_us", "fanout_40_rss_per_subscriber_kib"}
    assert "| Subscribers" in out.stdout and "of which in the kernel" in out.stdout


# -- tools/fake_openai.py ---------------------------------------------------------------


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free 127.0.0.1 port, run as the fake runs (a client that leaves cancels its
    handler); yields its base URL."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_fake_openai_speaks_the_chat_completions_wire_format() -> None:
    from openai import AsyncOpenAI, AuthenticationError

    app = make_app(FakeConfig(ttft_ms=0, itl_ms=0, tokens=6))
    async with serving(app) as base:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="k")
        stream = await within(client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hello"}], stream=True,
            stream_options={"include_usage": True}))
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert pieces == mock_answer("Hello", 6)
        assert usage is not None and usage.completion_tokens == 6
        whole = await within(client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hello"}]))
        assert whole.choices[0].message.content == "".join(mock_answer("Hello", 6))
        with pytest.raises(AuthenticationError):
            await within(AsyncOpenAI(base_url=f"{base}/v1", api_key="k").with_options(
                default_headers={"Authorization": ""}).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]))
        # A client that leaves mid-stream shows as 'disconnected' in /stats.
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/config", json={"itl_ms": 50, "tokens": 1000}) as resp:
                assert resp.status == 200
            async with session.post(f"{base}/v1/chat/completions", headers={"Authorization": "Bearer k"},
                                    json={"model": "m", "stream": True,
                                          "messages": [{"role": "user", "content": "leave early"}]}) as resp:
                await within(resp.content.readline())
                resp.close()

            async def disconnected() -> dict[str, Any]:
                while True:
                    async with session.get(f"{base}/stats") as r:
                        stats = await r.json()
                    call = next(c for c in stats["recent"] if c["prompt"] == "leave early")
                    if call["ended"] is not None:
                        return call
                    await asyncio.sleep(0.01)

            call = await within(disconnected(), what="the fake to see the client leave")
            assert call["outcome"] == "disconnected"
            async with session.get(f"{base}/stats") as r:
                assert (await r.json())["calls"] == 3  # the refused call never started


async def test_fake_openai_holds_calls_until_released() -> None:
    app = make_app(FakeConfig(ttft_ms=0, itl_ms=0, tokens=3))
    async with serving(app) as base:
        async with aiohttp.ClientSession() as session:
            async def post(path: str, body: dict[str, Any]) -> Any:
                async with session.post(f"{base}{path}", json=body, headers={"Authorization": "Bearer k"}) as r:
                    return await r.json()

            async def stats() -> dict[str, Any]:
                async with session.get(f"{base}/stats") as r:
                    return dict(await r.json())

            await within(post("/config", {"hold": True, "ttft_ms": 5}))
            held = asyncio.ensure_future(post("/v1/chat/completions", {
                "model": "m", "messages": [{"role": "user", "content": "wait for it"}]}))

            async def open_call() -> None:
                while (await stats())["open"] != 1:
                    await asyncio.sleep(0.01)

            await within(open_call(), what="the call to reach the fake")
            assert not held.done() and (await within(stats()))["recent"][0]["first_due"] is None
            released = (await within(post("/release", {})))["released"]
            answer = await within(held, what="the held call to answer")
            assert answer["choices"][0]["message"]["content"] == "".join(mock_answer("wait for it", 3))
            call = (await within(stats()))["recent"][0]
            assert call["first_due"] >= released + 0.005  # its schedule starts at the release
            assert (await within(post("/config", {})))["hold"] is False
