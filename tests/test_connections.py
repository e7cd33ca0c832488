"""Connection limits: header and body timeouts, the idle keep-alive timeout, the cap."""

from __future__ import annotations

import asyncio
import json
import resource
import time

from .helpers import within

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


def raise_fd_limit(need: int) -> None:
    """This test process holds both ends of every connection: make room for them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= need, "not enough file descriptors for the test"


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await within(asyncio.open_connection(host, int(port)), 5, "a connection")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await within(reader.readuntil(b"\r\n\r\n"), 5, "a response head")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await within(reader.readexactly(int(headers.get("content-length", "0"))), 5, "a response body")
    return status, headers, body


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Read until the server closes the connection; what it sent meanwhile."""
    return bytes(await within(reader.read(), timeout, "the server to close the connection"))


async def test_a_slowloris_connection_is_closed_within_the_header_timeout(gateway_factory) -> None:
    gw = await gateway_factory(header_timeout_s=0.5)
    reader, writer = await connect(gw.url)
    started = time.perf_counter()
    writer.write(b"GET /healthz HTTP/1.1\r\n")

    async def dribble() -> None:
        for i in range(100):  # one header byte at a time, never the end of the headers
            if writer.is_closing() or reader.at_eof():
                return
            writer.write(b"X-Slow-%d: y\r\n"[:1] if i else b"X")
            await asyncio.sleep(0.05)

    drip = asyncio.create_task(dribble())
    answer = await closed_within(reader, 3)
    took = time.perf_counter() - started
    drip.cancel()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "request_timeout"
    assert 0.4 < took < 1.5, took
    # a connection that opens and sends nothing is closed the same way
    reader, writer = await connect(gw.url)
    started = time.perf_counter()
    assert (await closed_within(reader, 3)).startswith(b"HTTP/1.1 408")
    assert time.perf_counter() - started < 1.5
    writer.close()
    # the server serves on: a whole request in time is answered
    reader, writer = await connect(gw.url)
    writer.write(HEALTH)
    status, _, _ = await read_response(reader)
    assert status == 200
    writer.close()


async def test_a_body_shorter_than_its_length_is_408_after_the_body_timeout(gateway_factory) -> None:
    gw = await gateway_factory(body_timeout_s=0.5)
    reader, writer = await connect(gw.url)
    started = time.perf_counter()
    writer.write(b"POST /api/threads/ HTTP/1.1\r\nHost: t\r\nx-org-id: org_a\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"title\": ")
    status, headers, body = await read_response(reader)
    took = time.perf_counter() - started
    assert status == 408 and json.loads(body)["error"]["type"] == "request_timeout", body
    assert headers.get("connection", "").lower() == "close"
    assert 0.4 < took < 2, took
    await closed_within(reader, 3)
    writer.close()
    async with gw.session.get(f"{gw.url}/api/threads/", headers=gw.h()) as resp:
        assert (await resp.json())["threads"] == []  # nothing was written


async def test_2000_idle_connections_are_closed_by_the_idle_timeout_while_healthz_answers(gateway_factory) -> None:
    raise_fd_limit(5000)
    gw = await gateway_factory(keepalive_timeout_s=6)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def idle_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await connect(gw.url)
        writer.write(HEALTH)
        status, _, _ = await read_response(reader)
        assert status == 200
        return reader, writer

    opened = time.perf_counter()
    for _ in range(10):  # in batches, within the listen backlog
        conns.extend(await within(asyncio.gather(*(idle_one() for _ in range(200))), 30, "200 connections"))
    assert len(conns) == 2000
    assert time.perf_counter() - opened < 4, "too slow to open the connections for this timeout"
    probes = 0
    while time.perf_counter() - opened < 5:  # while all 2000 sit idle, the probe answers at once
        started = time.perf_counter()
        async with gw.session.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200
        assert time.perf_counter() - started < 0.5
        probes += 1
    assert probes > 3
    assert sum(not reader.at_eof() for reader, _ in conns) == 2000, "closed before the idle timeout"
    await within(asyncio.gather(*(reader.read() for reader, _ in conns)), 12,
                 "the idle connections to be closed")
    assert time.perf_counter() - opened < 14
    assert all(reader.at_eof() for reader, _ in conns)
    for _, writer in conns:
        writer.close()
    async with gw.session.get(f"{gw.url}/healthz") as resp:
        assert resp.status == 200


async def test_connections_beyond_the_cap_get_503_but_probes_answer(gateway_factory) -> None:
    gw = await gateway_factory(max_connections=20)
    held = []
    for _ in range(20):
        reader, writer = await connect(gw.url)
        writer.write(HEALTH)
        assert (await read_response(reader))[0] == 200
        held.append((reader, writer))
    reader, writer = await connect(gw.url)
    writer.write(b"GET /api/threads/ HTTP/1.1\r\nHost: t\r\nx-org-id: org_a\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 503 and headers["retry-after"] == "1", body
    assert json.loads(body)["error"]["type"] == "too_many_connections"
    await closed_within(reader, 3)
    writer.close()
    reader, writer = await connect(gw.url)
    writer.write(HEALTH)
    assert (await read_response(reader))[0] == 200  # the probe is answered beyond the cap
    writer.close()
    for _, w in held[:5]:
        w.close()
    deadline = time.perf_counter() + 5
    while True:  # room again once the server has seen them go
        reader, writer = await connect(gw.url)
        writer.write(b"GET /api/threads/ HTTP/1.1\r\nHost: t\r\nx-org-id: org_a\r\n\r\n")
        status, _, _ = await read_response(reader)
        writer.close()
        if status == 200 or time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.05)
    assert status == 200
    for _, w in held[5:]:
        w.close()
