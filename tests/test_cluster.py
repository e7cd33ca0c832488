"""Several instances as one gateway, with real processes: 3 instances behind nginx on a Redis of
their own (so it can be stopped and restarted) and the test PostgreSQL, against the fake upstream.

One cluster serves the whole module (tests run in file order; the ones that kill an instance or
stop Redis come last and put things back). Every await is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from server.redis_sweep import log_text
from tools.cluster import NGINX, Cluster, free_port, wait_port
from tools.sse import SseEvent, sse_events

from .engines import PostgresServer
from .fake_upstream import FakeCall, FakeUpstream, Script, wait_until
from .helpers import within
from .redis_engine import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORG = "org_cluster"
H = {"x-org-id": ORG}
LEASE_S = 1.0
SLOW = Script(n=60, interval_s=0.05)


def _require(what: str, found: bool, how: str) -> None:
    if found:
        return
    message = f"{what} is not installed: {how}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class OwnRedis:
    """A redis-server process on a free port, for the tests that stop and restart it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await wait_port(self.port, 10)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await within(self.proc.wait(), 5, "redis-server to stop")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.start() as f:
        yield f


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def own_redis(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> AsyncIterator[OwnRedis]:
    _require("redis-server", shutil.which("redis-server") is not None, "apt-get install redis-server")
    r = OwnRedis(tmp_path_factory.mktemp("redis"))
    await r.start()
    yield r
    await r.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def schema(postgres: PostgresServer) -> tuple[str, str]:
    name = postgres.new_schema()
    return name, postgres.url_for(name)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(fake: FakeUpstream, own_redis: OwnRedis, schema: tuple[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    _require("nginx", Path(NGINX).exists(), "apt-get install nginx")
    workdir = tmp_path_factory.mktemp("cluster")
    providers = workdir / "providers.toml"
    providers.write_text(f'[[providers]]\nname = "limited"\nkind = "openai"\nbase_url = "{fake.openai_url}"\n'
                         f'api_key_env = "OPENAI_API_KEY"\nmax_concurrency = 2\ndefault_model = "gpt-limited"\n')
    env = {**fake.env("openai"), "DAC_REDIS_URL": own_redis.url, "DAC_DATABASE_URL": schema[1],
           "DAC_REDIS_LEASE_MS": str(int(LEASE_S * 1000)), "DAC_PROVIDERS_FILE": str(providers),
           "DAC_DEFAULT_PROVIDER": "openai", "DAC_DEFAULT_MODEL": "gpt-test", "DAC_AUTH": "header",
           "DAC_ERROR_TTL_S": "5", "DAC_PING_INTERVAL_S": "1"}
    c = Cluster(instances=3, env=env, workdir=workdir)
    await within(c.start(), 60, "the cluster to start")
    yield c
    await within(c.stop(), 30, "the cluster to stop")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                     connector=aiohttp.TCPConnector(limit=200)) as s:
        yield s


async def new_thread(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/api/threads/", json={}, headers=H) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["thread_id"])


async def rows(schema: tuple[str, str], thread_id: str) -> list[tuple[str, str, str]]:
    conn = await within(asyncpg.connect(schema[1].split("?")[0], timeout=5))
    try:
        found = await conn.fetch(f'SELECT role, status, content FROM "{schema[0]}".messages '
                                 "WHERE thread_id = $1 ORDER BY seq", thread_id)
    finally:
        await conn.close()
    return [tuple(r) for r in found]  # type: ignore[misc]


async def listeners(http: aiohttp.ClientSession, cluster: Cluster) -> float:
    """Clients attached to flights, over every instance (their Prometheus gauges)."""
    total = 0.0
    for instance in cluster.instances:
        async with http.get(f"{instance.url}/metrics") as resp:
            text = await resp.text()
        total += sum(float(v) for v in re.findall(r"^dac_active_listeners (\S+)$", text, re.M))
    return total


async def read_all(resp: aiohttp.ClientResponse) -> list[SseEvent]:
    return [e async for e in sse_events(resp)]


async def next_call(fake: FakeUpstream, model: str) -> FakeCall:
    """The next call naming ``model`` (calls of other models before it are passed over)."""
    while True:
        call = await fake.next_call()
        if call.body.get("model") == model:
            return call


def text_of(events: list[SseEvent]) -> str:
    return "".join(e.json()["text"] for e in events if e.event == "delta")


async def test_sixty_identical_requests_over_three_instances_make_one_call(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession, schema: tuple[str, str]) -> None:
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=12, hold_first=True), model="gpt-burst")
    body = {"content": "one question for everyone", "model": "gpt-burst"}
    url = f"{cluster.url}/api/threads/{tid}/messages"
    before = len(fake.calls)

    async def as_json() -> str:
        async with http.post(url, json=body, headers=H) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["message"]["content"])

    async def as_sse() -> str:
        async with http.post(url, json=body, headers={**H, "Accept": "text/event-stream"}) as resp:
            assert resp.status == 200, await resp.text()
            events = await read_all(resp)
        assert events[-1].event == "done", events[-3:]
        assert text_of(events) == events[-1].json()["message"]["content"]
        return text_of(events)

    async def as_stream_url() -> str:
        async with http.post(url, json={**body, "stream": True}, headers={**H, "Accept": "application/json"}) as r:
            assert r.status == 202, await r.text()
            stream_url = (await r.json())["stream_url"]
        async with http.get(f"{cluster.url}{stream_url}") as resp:
            assert resp.status == 200, await resp.text()
            events = await read_all(resp)
        assert events[-1].event == "done", events[-3:]
        return text_of(events)

    clients = [asyncio.ensure_future(f()) for _ in range(20) for f in (as_json, as_sse, as_stream_url)]
    call = await next_call(fake, "gpt-burst")
    await wait_until(lambda: call.paused.is_set(), "the call to wait before its first token")
    baseline = 0.0
    try:
        async with asyncio.timeout(15):
            while (now := await listeners(http, cluster)) < 60 + baseline:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"only {now} of 60 clients attached") from None
    call.release()
    texts = await within(asyncio.gather(*clients), 30, "all 60 answers")
    assert len(fake.calls) - before == 1
    assert len(set(texts)) == 1 and texts[0].strip()
    assert [(r, s) for r, s, _ in await rows(schema, tid)] == [("user", "complete"), ("assistant", "complete")]
    assert (await rows(schema, tid))[1][2] == texts[0]
    # finished: every instance answers it from Redis (cache) with no call
    for instance in cluster.instances:
        async with http.post(f"{instance.url}/api/threads/{tid}/messages", json=body, headers=H) as resp:
            answer = await resp.json()
        assert (resp.status, answer["coalesce"], answer["message"]["content"]) == (200, "cache", texts[0])
    assert len(fake.calls) - before == 1


async def test_a_failure_is_the_same_error_on_another_instance(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    a, b, _ = cluster.instances
    tid = await new_thread(http, cluster.url)
    fake.script(Script(status=500, message="the fake is down"), model="gpt-down")
    body = {"content": "fails", "model": "gpt-down"}
    before = len(fake.calls)
    async with http.post(f"{a.url}/api/threads/{tid}/messages", json=body, headers=H) as resp:
        first = (resp.status, await resp.json())
    async with http.post(f"{b.url}/api/threads/{tid}/messages", json=body, headers=H) as resp:
        second = (resp.status, await resp.json())
    assert first[0] == 502 and first == second
    assert len(fake.calls) - before == 1
    await next_call(fake, "gpt-down")


async def test_the_upstream_closes_when_the_last_instance_lets_go(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    a, b, _ = cluster.instances
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=400, interval_s=0.02), model="gpt-long")
    body = {"content": "a long answer", "model": "gpt-long"}
    sse = {**H, "Accept": "text/event-stream"}
    on_a = await http.post(f"{a.url}/api/threads/{tid}/messages", json=body, headers=sse)
    call = await next_call(fake, "gpt-long")
    on_b = await http.post(f"{b.url}/api/threads/{tid}/messages", json=body, headers=sse)
    await within(on_b.content.readuntil(b"event: delta"), what="a delta on B")
    on_a.close()  # A's client leaves: B still holds the flight
    sent = call.tokens_sent
    await call.sent(sent + 40)  # the upstream goes on for 40 more tokens (0.8 s, well past the grace)
    assert call.outcome is None and call.connection.closed_at is None
    left = time.perf_counter()
    on_b.close()
    await within(call.connection.closed.wait(), 3, "the upstream connection to close")
    assert call.connection.closed_at is not None
    assert call.connection.closed_at - left < 0.3, call.connection.closed_at - left


async def test_a_stream_started_on_one_instance_resumes_on_another(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    a, _, c = cluster.instances
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=30, interval_s=0.02), model="gpt-resume")
    async with http.post(f"{a.url}/api/threads/{tid}/messages", json={"content": "resume", "model": "gpt-resume"},
                         headers={**H, "Accept": "text/event-stream"}) as on_a:
        events = sse_events(on_a)
        meta = await within(anext(events), what="the meta event")
        stream_id = meta.json()["stream_id"]
        seen = [e async for e in _until_id(events, 5)]
        async with http.get(f"{c.url}/api/streams/{stream_id}", headers={**H, "Last-Event-ID": "5"}) as on_c:
            assert on_c.status == 200
            resumed = await within(read_all(on_c), 20, "the resumed stream")
        rest = await within(_rest(events), 20, "the rest on A")
    whole = seen + rest
    assert [e.id for e in resumed if e.event == "delta"] == list(range(6, 31))
    assert text_of(seen[:5]) + text_of(resumed) == text_of(whole)
    assert resumed[-1].event == "done" and resumed[-1].json()["message"]["content"] == text_of(whole)


async def _rest(events: AsyncIterator[SseEvent]) -> list[SseEvent]:
    return [e async for e in events]


async def _until_id(events: AsyncIterator[SseEvent], last: int) -> AsyncIterator[SseEvent]:
    async for event in events:
        yield event
        if event.event == "delta" and event.id == last:
            return


async def cancels(http: aiohttp.ClientSession, url: str, reason: str) -> float:
    """The instance's ``dac_cancels_total`` for ``reason``, over its providers."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(float(v) for v in re.findall(rf'^dac_cancels_total{{[^}}]*reason="{reason}"[^}}]*}} (\S+)$', text, re.M))


async def test_stop_detaches_where_the_listener_is_and_the_last_one_aborts_the_leader_at_once(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    a, b, c = cluster.instances
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=400, interval_s=0.02), model="gpt-stop")
    body = {"content": "stop me across", "model": "gpt-stop"}
    sse = {**H, "Accept": "text/event-stream"}
    stopped_before = await cancels(http, a.url, "client_stop")
    idle_before = await cancels(http, a.url, "no_listeners")
    on_a = await http.post(f"{a.url}/api/threads/{tid}/messages", json=body, headers=sse)
    call = await next_call(fake, "gpt-stop")
    on_b = await http.post(f"{b.url}/api/threads/{tid}/messages", json=body, headers=sse)
    on_c = await http.post(f"{c.url}/api/threads/{tid}/messages", json=body, headers=sse)
    events_b, events_c = sse_events(on_b), sse_events(on_c)
    stop_b = (await within(anext(events_b), what="B's meta")).json()["stop_url"]
    stop_c = (await within(anext(events_c), what="C's meta")).json()["stop_url"]
    await within(anext(events_c), what="a delta on C")
    on_a.close()  # the leader's own client leaves: B and C still hold the flight
    async with http.delete(f"{c.url}{stop_b}") as resp:  # B's Stop reaches C (a load balancer's pick)
        assert resp.status == 204, await resp.text()
    await within(_rest(events_b), 5, "B's stopped stream to end")  # C handed it to B, which detached it
    sent = call.tokens_sent
    await call.sent(sent + 20)  # C still listens: the upstream goes on, well past the grace
    assert call.connection.closed_at is None
    stopped = time.perf_counter()
    async with http.delete(f"{c.url}{stop_c}") as resp:
        assert resp.status == 204, await resp.text()
    await within(call.connection.closed.wait(), 3, "the upstream connection to close")
    assert call.connection.closed_at is not None and call.connection.closed_at - stopped < 0.3
    await within(_rest(events_c), 5, "C's stopped stream to end")
    # the leader aborted on the Stop (no grace), not because its listeners went away
    async with asyncio.timeout(3):  # counted once its row is saved
        while await cancels(http, a.url, "client_stop") < stopped_before + 1:
            await asyncio.sleep(0.02)
    assert await cancels(http, a.url, "no_listeners") == idle_before


async def test_the_provider_limit_holds_across_instances(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=5, interval_s=0.04), model="gpt-limited")
    peak_before, fake.peak = fake.peak, 0
    urls = [i.url for i in cluster.instances]

    async def ask(n: int) -> int:
        async with http.post(f"{urls[n % 3]}/api/threads/{tid}/messages", headers=H,
                             json={"content": f"distinct {n}", "provider": "limited"}) as resp:
            if resp.status == 503:
                assert int(resp.headers["Retry-After"]) >= 1
            return resp.status

    statuses = await within(asyncio.gather(*(ask(n) for n in range(20))), 40, "20 distinct requests")
    assert fake.peak <= 2, fake.peak
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2
    fake.peak = max(peak_before, fake.peak)


async def test_a_killed_leader_is_lost_elsewhere_and_its_row_interrupted(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession, schema: tuple[str, str]) -> None:
    a, b, c = cluster.instances
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=400, interval_s=0.02), model="gpt-doomed")
    body = {"content": "the leader dies", "model": "gpt-doomed"}
    before = len(fake.calls)
    async with http.post(f"{a.url}/api/threads/{tid}/messages", json={**body, "stream": True},
                         headers={**H, "Accept": "application/json"}) as resp:
        stream_url = (await resp.json())["stream_url"]
    on_b = await http.get(f"{b.url}{stream_url}")
    on_c = await http.get(f"{c.url}{stream_url}")
    call = await next_call(fake, "gpt-doomed")
    await call.sent(10)
    await within(on_b.content.readuntil(b"id: 3\n"), what="deltas on B")
    cluster.kill(0)
    killed = time.monotonic()
    got_b, got_c = await within(asyncio.gather(read_all(on_b), read_all(on_c)), 10, "the listeners to end")
    for events in (got_b, got_c):
        assert events[-1].event == "error", events[-2:]
        error = events[-1].json()["error"]
        assert (error["type"], error["retryable"]) == ("leader_lost", True)
        assert events[-1].at - killed < LEASE_S * 1.5 + 0.5
    partial = text_of(got_c)
    async with asyncio.timeout(5):
        while (found := await rows(schema, tid))[1][1] == "streaming":
            await asyncio.sleep(0.05)
    assert found[1][1] == "interrupted" and found[1][2] == partial and partial
    # a new identical request is a new flight
    fake.script(Script(n=3), model="gpt-doomed")
    async with http.post(f"{b.url}/api/threads/{tid}/messages", json=body, headers=H) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["coalesce"] == "leader"
    assert len(fake.calls) - before == 2
    cluster.instances[0] = await within(cluster.start_instance(a.port), 30, "the instance to come back")


async def test_an_instance_that_starts_leaves_the_answers_streaming_elsewhere_alone(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession, schema: tuple[str, str]) -> None:
    a = cluster.instances[0]
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=6, hold_after=2), model="gpt-live")
    async with http.post(f"{a.url}/api/threads/{tid}/messages", json={"content": "still going", "model": "gpt-live"},
                         headers={**H, "Accept": "text/event-stream"}) as on_a:
        call = await next_call(fake, "gpt-live")
        await within(on_a.content.readuntil(b"id: 2\n"), what="two deltas on A")
        extra = await within(cluster.start_instance(), 30, "one more instance to start")
        try:
            # its start took nothing from A: the row A streams is still streaming
            assert [status for _, status, _ in await rows(schema, tid)] == ["complete", "streaming"]
            call.release()
            events = await within(read_all(on_a), 10, "the rest of the answer on A")
        finally:
            extra.proc.terminate()
            await within(extra.proc.wait(), 15, "the extra instance to stop")
    assert events[-1].event == "done", events[-2:]
    assert (await rows(schema, tid))[1][1:] == ("complete", events[-1].json()["message"]["content"])


async def test_a_killed_leader_with_no_listener_elsewhere_has_its_row_swept(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession, schema: tuple[str, str],
        own_redis: OwnRedis) -> None:
    a = cluster.instances[0]
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=400, interval_s=0.02), model="gpt-alone")
    on_a = await http.post(f"{a.url}/api/threads/{tid}/messages", json={"content": "alone", "model": "gpt-alone"},
                           headers={**H, "Accept": "text/event-stream"})
    events = sse_events(on_a)
    stream_id = (await within(anext(events), what="the meta event")).json()["stream_id"]
    seen = await within(_rest(_until_id(events, 5)), what="five deltas on A")
    await next_call(fake, "gpt-alone")
    cluster.kill(0)  # nobody else listens: no mirror sees its lease lapse
    killed = time.monotonic()
    on_a.close()
    try:
        async with asyncio.timeout(LEASE_S * 3 + 3):
            while (found := await rows(schema, tid))[1][1] == "streaming":
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"the row is still streaming {time.monotonic() - killed:.1f} s after the kill") from None
    swept_after = time.monotonic() - killed
    client = aioredis.Redis.from_url(own_redis.url, protocol=2)
    try:
        logged = await within(log_text(client, "dac:", stream_id), what="the flight's log")
    finally:
        await client.aclose()
    assert logged is not None
    assert found[1][1] == "interrupted" and found[1][2] == logged[0]
    # the log may lag what A's client was sent by the append in flight when A died
    kept, sent = found[1][2], text_of(seen)
    assert kept and (kept.startswith(sent) or sent.startswith(kept)), (kept, sent)
    # its heartbeat lapses (a lease), then two sweeps a lease apart see it gone (slack for a busy machine)
    assert swept_after < LEASE_S * 3 + 2, swept_after
    cluster.instances[0] = await within(cluster.start_instance(a.port), 30, "the instance to come back")


async def test_redis_restarted_while_idle_then_a_burst_makes_one_call(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession, own_redis: OwnRedis) -> None:
    await own_redis.stop()
    await own_redis.start()
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=5, hold_first=True), model="gpt-after")
    body = {"content": "after the restart", "model": "gpt-after"}
    before = len(fake.calls)

    async def ask(i: int) -> Any:
        async with http.post(f"{cluster.instances[i % 3].url}/api/threads/{tid}/messages", json=body,
                             headers=H) as resp:
            assert resp.status == 200, await resp.text()
            return (await resp.json())["message"]["content"]

    answers = [asyncio.ensure_future(ask(i)) for i in range(12)]
    call = await next_call(fake, "gpt-after")
    async with asyncio.timeout(10):
        while await listeners(http, cluster) < 12:
            await asyncio.sleep(0.05)
    call.release()
    texts = await within(asyncio.gather(*answers), 20, "the burst")
    assert len(set(texts)) == 1 and len(fake.calls) - before == 1


async def test_redis_down_mid_flight_ends_every_client_and_leaves_nothing_streaming(
        cluster: Cluster, fake: FakeUpstream, http: aiohttp.ClientSession, own_redis: OwnRedis,
        schema: tuple[str, str]) -> None:
    a, b, _ = cluster.instances
    tid = await new_thread(http, cluster.url)
    fake.script(Script(n=400, interval_s=0.02), model="gpt-nored")
    body = {"content": "redis goes away", "model": "gpt-nored"}
    sse = {**H, "Accept": "text/event-stream"}
    on_a = await http.post(f"{a.url}/api/threads/{tid}/messages", json=body, headers=sse)
    call = await next_call(fake, "gpt-nored")
    on_b = await http.post(f"{b.url}/api/threads/{tid}/messages", json=body, headers=sse)
    await within(on_b.content.readuntil(b"event: delta"), what="a delta on B")
    await own_redis.stop()
    try:
        got = await within(asyncio.gather(read_all(on_a), read_all(on_b)), 10, "both clients to end")
        for events in got:
            assert events[-1].event == "error", events[-2:]
            assert events[-1].json()["error"]["retryable"] is True
        await within(call.connection.closed.wait(), 5, "the upstream to be cut")
        async with asyncio.timeout(5):
            while any(status == "streaming" for _, status, _ in await rows(schema, tid)):
                await asyncio.sleep(0.05)
    finally:
        await own_redis.start()


async def test_two_workers_on_one_port_make_one_call(
        fake: FakeUpstream, redis_server: RedisServer, postgres: PostgresServer, tmp_path: Path) -> None:
    env = {**os.environ, **fake.env("openai"), "DAC_REDIS_URL": redis_server.url,
           "DAC_REDIS_PREFIX": redis_server.new_prefix(), "DAC_DATABASE_URL": postgres.new_url(),
           "DAC_DEFAULT_PROVIDER": "openai", "DAC_AUTH": "header"}
    # a session of its own: whatever happens, the supervisor and its workers are killed together
    # (an orphaned worker would hold the output pipe, and the wait for the supervisor with it)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--workers", "2", "--port", "0", cwd=Path(__file__).resolve().parent.parent, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    drain: asyncio.Future[None] | None = None
    try:
        lines: list[str] = []
        try:
            async with asyncio.timeout(30):
                while sum("listening on" in line for line in lines) < 2:
                    line = (await proc.stdout.readline()).decode()
                    assert line, "".join(lines)
                    lines.append(line)
        except TimeoutError:
            raise AssertionError("two workers did not listen within 30 s:\n" + "".join(lines)) from None
        url = re.search(r"listening on (http://\S+)", "".join(lines)).group(1)  # type: ignore[union-attr]

        async def keep_reading(out: asyncio.StreamReader) -> None:
            while line := await out.readline():
                lines.append(line.decode(errors="replace"))

        drain = asyncio.ensure_future(keep_reading(proc.stdout))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10, force_close=True)) as s:
            tid = await within(new_thread(s, url), 10, "a thread")
            fake.script(Script(n=8, interval_s=0.02), model="gpt-workers")
            before = len(fake.calls)

            async def ask() -> str:
                async with s.post(f"{url}/api/threads/{tid}/messages", headers=H,
                                  json={"content": "workers", "model": "gpt-workers"}) as resp:
                    assert resp.status == 200, await resp.text()
                    return str((await resp.json())["message"]["content"])

            texts = await within(asyncio.gather(*(ask() for _ in range(50))), 30, "50 requests")
        assert len(set(texts)) == 1 and len(fake.calls) - before == 1
        proc.terminate()
        try:
            await within(proc.wait(), 20, "the workers to stop")
        except AssertionError:
            raise AssertionError("the workers did not stop within 20 s of SIGTERM:\n" + "".join(lines)) from None
        assert proc.returncode == 0, "".join(lines)
    finally:
        if drain is not None:
            drain.cancel()
        with contextlib.suppress(ProcessLookupError):  # nothing left of it, after a clean stop
            os.killpg(proc.pid, signal.SIGKILL)
        await within(proc.wait(), 20, "the killed workers to go")


async def test_the_cluster_benchmark_runs_in_short(redis_server: RedisServer, postgres: PostgresServer,
                                                   tmp_path: Path) -> None:
    """The short form of tools/bench_cluster.py: Redis costs and cancel latency across two instances."""
    out = tmp_path / "bench.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "tools/bench_cluster.py", "--quick", "--only", "redis_costs,cancel_latency",
        "--json", str(out), "--redis", redis_server.url, "--database", postgres.new_url(),
        cwd=Path(__file__).resolve().parent.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    printed, _ = await within(proc.communicate(), 90, "the benchmark")
    assert proc.returncode == 0, printed.decode()
    report = json.loads(out.read_text())
    assert 0 < report["redis_round_trips_per_delta_mirror"] <= 1.5, report
    assert 0 < report["redis_round_trips_per_delta_leader"] <= 1.5, report
    assert report["cancel_across_instances_max_ms"] < 300, report
    assert b"| cancel across instances (worst) | < 300 ms |" in printed


async def test_a_thread_deleted_on_one_instance_is_gone_from_the_others_caches(
        fake: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    """Two instances on one SQLite file (as ``--workers 2`` without PostgreSQL): each keeps the
    threads it saw and their answers in memory; a deletion through one reaches the other."""
    env = {**fake.env("openai"), "DAC_REDIS_URL": redis_server.url, "DAC_REDIS_PREFIX": redis_server.new_prefix(),
           "DAC_DB": str(tmp_path / "shared.db"), "DAC_DEFAULT_PROVIDER": "openai", "DAC_DEFAULT_MODEL": "gpt-test",
           "DAC_AUTH": "header"}
    pair = Cluster(instances=2, env=env, workdir=tmp_path)
    try:
        a, b = await within(asyncio.gather(pair.start_instance(), pair.start_instance()), 30, "two instances")
        pair.instances = [a, b]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            tid = await new_thread(s, b.url)
            fake.script(Script(n=3), model="gpt-deleted")
            body = {"content": "soon deleted", "model": "gpt-deleted"}
            async with s.post(f"{b.url}/api/threads/{tid}/messages", json=body, headers=H) as resp:
                assert resp.status == 200, await resp.text()
            async with s.delete(f"{a.url}/api/threads/{tid}", headers=H) as resp:
                assert resp.status == 204
            async with s.post(f"{b.url}/api/threads/{tid}/messages", json=body, headers=H) as resp:
                assert resp.status == 404, await resp.text()  # not the answer B kept for the thread
                assert (await resp.json())["error"]["type"] == "not_found"
            async with s.get(f"{b.url}/api/threads/{tid}", headers=H) as resp:
                assert resp.status == 404
        await next_call(fake, "gpt-deleted")
    finally:
        await within(pair.stop(), 30, "the instances to stop")
