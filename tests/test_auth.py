"""Who may call: API keys on every route of both surfaces, stream tokens, the keys command,
CORS, JSON-only bodies and Idempotency-Key reuse.

The gateways here run with ``DAC_AUTH=keys`` (the default outside the tests).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.appkeys import AUTH
from server.auth import StreamTokens, env_key_org, hash_key, new_key

from .conftest import GatewayFactory
from .helpers import Gateway, ManualClock, ScriptedProvider, collect, registry, text_of, within

ROOT = Path(__file__).resolve().parent.parent
FAST = "mock:ttft=0,itl=0,n=3"
SECRET = "a test secret"


@dataclass
class Keys:
    """Org A's key, org B's key, and a revoked key of org A."""

    a: str
    b: str
    revoked: str


async def make_key(gw: Gateway, org: str) -> str:
    key = new_key()
    await within(gw.store.create_api_key(org_id=org, name="test", key_hash=hash_key(key)))
    return key


async def keyed(gateway_factory: GatewayFactory, **settings: Any) -> tuple[Gateway, Keys]:
    gw = await gateway_factory(auth="keys", secret=SECRET, **settings)
    revoked = await make_key(gw, "org_a")
    assert await gw.store.revoke_api_key(key_id="", key_hash=hash_key(revoked)) is not None
    return gw, Keys(a=await make_key(gw, "org_a"), b=await make_key(gw, "org_b"), revoked=revoked)


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


async def call(gw: Gateway, method: str, path: str, *, headers: dict[str, str] | None = None,
               json: Any = None, data: bytes | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
    async def go() -> tuple[int, Any, aiohttp.ClientResponse]:
        async with gw.session.request(method, gw.url + path, headers=headers or {}, json=json, data=data) as resp:
            body = await resp.read()
            kind = resp.headers.get("Content-Type", "")
            parsed = (await resp.json() if kind.startswith("application/json") else body.decode()) if body else None
            return resp.status, parsed, resp
    return await within(go(), what=f"{method} {path}")


async def accepted_stream(gw: Gateway, key: str, thread_id: str, content: str = "hello") -> dict[str, Any]:
    """A mode-3 answer of the fast mock, read to its end through its stream_url."""
    status, body, _ = await call(gw, "POST", f"/api/threads/{thread_id}/messages", headers=bearer(key),
                                 json={"content": content, "model": FAST, "stream": True})
    assert status == 202, body
    async with gw.session.get(gw.url + body["stream_url"]) as resp:
        assert resp.status == 200
        await collect(resp)
    return dict(body)


# -- every route, every kind of caller ------------------------------------------------

#: (method, path, body): every route of /api and /v1; {thread} and {stream} are org A's
ROUTES = [
    ("POST", "/api/threads", {"title": "t"}),
    ("POST", "/api/threads/", {"title": "t"}),
    ("GET", "/api/threads", None),
    ("GET", "/api/threads/", None),
    ("GET", "/api/threads/{thread}", None),
    ("DELETE", "/api/threads/{thread}", None),
    ("POST", "/api/threads/{thread}/messages", {"content": "hi", "model": FAST}),
    ("GET", "/api/streams/{stream}", None),
    ("DELETE", "/api/streams/{stream}", None),
    ("GET", "/api/metrics/performance", None),
    ("POST", "/v1/chat/completions", {"model": "mock/" + FAST, "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/mock/mock", None),
]
#: routes that name one of org A's things: another org's key gets 404 there
FOREIGN_404 = {"/api/threads/{thread}", "/api/threads/{thread}/messages", "/api/streams/{stream}"}
#: routes outside the two surfaces: open to all (the page and its files too)
OPEN = {"/", "/healthz", "/readyz", "/metrics", "/static/{path}"}


def mounted(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, sub-applications included; static files left out."""
    found = set()
    for resource in app.router.resources():
        info = resource.get_info()
        if "app" in info:
            found |= mounted(info["app"])  # its paths carry the prefix already
        elif "directory" not in info:
            path = info.get("path") or info["formatter"]
            found |= {(route.method, path) for route in resource if route.method != "HEAD"}
    return found


async def test_the_route_table_covers_every_route_of_both_surfaces(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    served = {(m, p) for m, p in mounted(gw.app) if p not in OPEN}
    names = {"{thread}": "{thread_id}", "{stream}": "{stream_id}", "mock/mock": "{model}"}
    table = set()
    for method, template, _ in ROUTES:
        for name, placeholder in names.items():
            template = template.replace(name, placeholder)
        table.add((method, template))
    assert served == table


async def _fixtures(gateway_factory: GatewayFactory) -> tuple[Gateway, Keys, dict[str, str]]:
    gw, keys = await keyed(gateway_factory)
    status, thread, _ = await call(gw, "POST", "/api/threads/", headers=bearer(keys.a), json={"title": "A's"})
    assert status == 201
    stream = await accepted_stream(gw, keys.a, thread["thread_id"])
    return gw, keys, {"thread": thread["thread_id"], "stream": stream["stream_id"]}


@pytest.mark.parametrize(("method", "template", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_every_route_refuses_callers_without_a_good_key(gateway_factory: GatewayFactory, method: str,
                                                              template: str, body: Any) -> None:
    gw, keys, names = await _fixtures(gateway_factory)
    path = template.format(**names)
    for why, headers in (("no key", {}), ("x-org-id alone", {"x-org-id": "org_a"}),
                         ("another scheme", {"Authorization": f"Basic {keys.a}"}),
                         ("a wrong key", bearer(new_key())), ("a revoked key", bearer(keys.revoked))):
        status, answer, resp = await call(gw, method, path, headers=headers, json=body)
        assert status == 401, (why, answer)
        assert resp.headers["WWW-Authenticate"] == "Bearer", why
        assert resp.content_type == "application/json" and answer["error"], why
    # org A's key with an x-org-id that names another org: 403
    status, answer, _ = await call(gw, method, path, headers=bearer(keys.a, **{"x-org-id": "org_b"}), json=body)
    assert status == 403 and answer["error"], answer
    # org B's key: org A's thread or stream does not exist
    status, answer, _ = await call(gw, method, path, headers=bearer(keys.b), json=body)
    if template in FOREIGN_404 or template == "/api/streams/{stream}" and method == "DELETE":
        assert status == 404, answer
    else:
        assert status in (200, 201), answer
        assert names["thread"] not in str(answer)  # nothing of org A's
    # and org A's own key is let through
    status, answer, _ = await call(gw, method, path, headers=bearer(keys.a), json=body)
    assert status in (200, 201, 204) or (method, template) == ("DELETE", "/api/streams/{stream}") and status == 400, \
        answer


async def test_a_key_revoked_elsewhere_is_refused_within_the_cache_time(gateway_factory: GatewayFactory) -> None:
    clock = ManualClock()
    gw, keys = await keyed(gateway_factory, clock=clock, key_cache_ttl_s=10)
    ok, _, _ = await call(gw, "GET", "/api/threads/", headers=bearer(keys.a))
    assert ok == 200
    assert await gw.store.revoke_api_key(key_id="", key_hash=hash_key(keys.a))  # as `keys revoke` does
    clock.advance(9)
    assert (await call(gw, "GET", "/api/threads/", headers=bearer(keys.a)))[0] == 200  # still known
    clock.advance(2)
    assert (await call(gw, "GET", "/api/threads/", headers=bearer(keys.a)))[0] == 401


async def test_a_key_in_steady_use_is_read_again_beside_its_requests(gateway_factory: GatewayFactory) -> None:
    """Past half the cache time a request is answered from what is known while the key is
    read again beside it; that read, which sees a revocation, holds from then on."""
    clock = ManualClock()
    gw, keys = await keyed(gateway_factory, clock=clock, key_cache_ttl_s=10)
    assert (await call(gw, "GET", "/api/threads/", headers=bearer(keys.a)))[0] == 200
    store = gw.store
    read = store.find_api_key
    reads: list[str] = []
    release = asyncio.Event()

    async def held(key_hash: str) -> Any:
        reads.append(key_hash)
        await release.wait()
        return await read(key_hash)

    store.find_api_key = held
    clock.advance(6)
    assert (await call(gw, "GET", "/api/threads/", headers=bearer(keys.a)))[0] == 200  # not waiting for the read
    assert reads == [hash_key(keys.a)]
    assert await gw.store.revoke_api_key(key_id="", key_hash=hash_key(keys.a))  # meanwhile, elsewhere
    release.set()
    ring = gw.app[AUTH].keys

    async def refreshed() -> None:
        while ring._refreshing:
            await asyncio.sleep(0.01)

    await within(refreshed(), 5, "the key read again")
    assert (await call(gw, "GET", "/api/threads/", headers=bearer(keys.a)))[0] == 401  # before the old verdict's end
    assert len(reads) == 1


async def test_environment_keys_are_orgs_of_their_own_on_both_surfaces(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(auth="keys", env={"DAC_API_KEYS": "env-one, env-two"})
    status, thread, _ = await call(gw, "POST", "/api/threads/", headers=bearer("env-one"), json={})
    assert status == 201
    status, answer, _ = await call(gw, "POST", "/v1/chat/completions",
                                   headers=bearer("env-one", **{"x-thread-id": thread["thread_id"]}),
                                   json={"model": "mock/" + FAST, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, answer
    assert len(await gw.store.messages(env_key_org("env-one"), thread["thread_id"])) == 2
    status, _, _ = await call(gw, "GET", f"/api/threads/{thread['thread_id']}", headers=bearer("env-two"))
    assert status == 404


# -- stream tokens --------------------------------------------------------------------


async def test_each_org_sees_only_its_own_requests_in_the_performance_figures(
        gateway_factory: GatewayFactory) -> None:
    gw, keys = await keyed(gateway_factory)
    for key, count in ((keys.a, 2), (keys.b, 1)):
        status, thread, _ = await call(gw, "POST", "/api/threads/", headers=bearer(key), json={"title": "t"})
        assert status == 201
        for n in range(count):
            status, body, _ = await call(gw, "POST", f"/api/threads/{thread['thread_id']}/messages",
                                         headers=bearer(key), json={"content": f"q{n}", "model": FAST})
            assert status == 200, body
    for key, count in ((keys.a, 2), (keys.b, 1)):
        status, perf, _ = await call(gw, "GET", "/api/metrics/performance", headers=bearer(key))
        assert status == 200
        assert perf["requests"] == count and perf["coalesce"]["leaders"] == count
    # another org's key cannot ask for A's figures by naming A
    status, body, _ = await call(gw, "GET", "/api/metrics/performance",
                                 headers=bearer(keys.b, **{"x-org-id": "org_a"}))
    assert status == 403 and body["error"]["param"] == "x-org-id"


async def test_a_stream_url_opens_with_no_header_and_only_for_its_stream(gateway_factory: GatewayFactory) -> None:
    scripted = ScriptedProvider()
    gw, keys = await keyed(gateway_factory, providers=registry(scripted))
    thread = (await call(gw, "POST", "/api/threads/", headers=bearer(keys.a), json={}))[1]["thread_id"]
    status, first, _ = await call(gw, "POST", f"/api/threads/{thread}/messages", headers=bearer(keys.a),
                                  json={"content": "one", "provider": "scripted", "model": "s", "stream": True})
    assert status == 202
    call_one = await scripted.next_call()
    call_one.send("answer")
    call_one.finish()
    async with gw.session.get(gw.url + first["stream_url"]) as resp:  # as EventSource: no header
        assert resp.status == 200
        assert text_of(await collect(resp)) == "answer"
    other = await accepted_stream(gw, keys.a, thread, "two")
    url, token = first["stream_url"].split("?token=")
    expiry, nonce, org, signature = token.split(".")
    forged = {
        "another stream's token": f"{url}?token={other['stream_url'].split('?token=')[1]}",
        "a later expiry": f"{url}?token={int(expiry) + 60}.{nonce}.{org}.{signature}",
        "another listener": f"{url}?token={expiry}.x{nonce}.{org}.{signature}",
        "a changed signature": f"{url}?token={expiry}.{nonce}.{org}.{signature[:-2]}AA",
        "garbage": f"{url}?token=garbage",
        "an empty token": f"{url}?token=",
        "a token signed with another secret": f"{url}?token="
        + StreamTokens(b"another secret", ttl_s=60).sign("org_a", first["stream_id"], nonce),
        "an expired token": f"{url}?token="
        + StreamTokens(SECRET.encode(), ttl_s=60, clock=lambda: time.time() - 120).sign(
            "org_a", first["stream_id"], nonce),
    }
    for why, path in forged.items():
        for method in ("GET", "DELETE"):
            status, answer, _ = await call(gw, method, path)
            assert status == 404 and answer["error"]["type"] == "not_found", (why, method, answer)
            # a good key beside a bad token changes nothing: the token is what the URL claims
            assert (await call(gw, method, path, headers=bearer(keys.a)))[0] == 404, (why, method)
    # a token signed with the server's secret but for another org's stream id
    status, _, _ = await call(gw, "GET", f"{url}?token=" + StreamTokens(SECRET.encode(), ttl_s=60).sign(
        "org_b", first["stream_id"]))
    assert status == 404
    # the key instead of a token; ?org= is no credential
    assert (await call(gw, "GET", url, headers=bearer(keys.a)))[0] == 200
    assert (await call(gw, "GET", url + "?org=org_a"))[0] == 401
    assert (await call(gw, "GET", url, headers=bearer(keys.b)))[0] == 404


async def test_the_stream_token_settles_the_attach_promise_and_stops_its_listener(
        gateway_factory: GatewayFactory) -> None:
    scripted = ScriptedProvider()
    gw, keys = await keyed(gateway_factory, providers=registry(scripted), attach_timeout_s=30, cancel_grace_s=30)
    thread = (await call(gw, "POST", "/api/threads/", headers=bearer(keys.a), json={}))[1]["thread_id"]
    status, accepted, _ = await call(gw, "POST", f"/api/threads/{thread}/messages", headers=bearer(keys.a),
                                     json={"content": "q", "provider": "scripted", "model": "s", "stream": True})
    assert status == 202
    upstream = await scripted.next_call()
    # Stop before attaching, with the stream_url's token alone: the promise is dropped and the upstream aborted
    status, _, _ = await call(gw, "DELETE", accepted["stream_url"])
    assert status == 204
    await within(upstream.closed.wait(), 5, "the upstream to close (grace and attach timeout are 30 s)")


# -- the keys command -------------------------------------------------------------------


async def keys_command(db: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "keys", *args, cwd=ROOT,
        env={**os.environ, "DAC_DB": str(db), "DAC_DATABASE_URL": ""},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await within(proc.communicate(), 30, f"keys {' '.join(args)}")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_keys_command_creates_lists_and_revokes(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    clock = ManualClock()
    gw = await gateway_factory(auth="keys", db_path=str(db), clock=clock, key_cache_ttl_s=5)
    status, out, err = await keys_command(db, "create", "--org", "org_cli", "--name", "laptop")
    assert status == 0, err
    key = out.splitlines()[-1]
    assert re.fullmatch(r"dac_[A-Za-z0-9_-]{43}", key), out
    key_id = re.search(r"key_[0-9a-f]{32}", out)
    assert key_id is not None and "org_cli" in out
    _, second_out, _ = await keys_command(db, "create", "--org", "org_other")
    second = second_out.splitlines()[-1]

    status, listing, _ = await keys_command(db, "list")
    assert status == 0 and key_id[0] in listing and "laptop" in listing and "org_other" in listing
    assert key not in listing and hash_key(key) not in listing  # never the key, nor its hash
    status, listing, _ = await keys_command(db, "list", "--org", "org_cli")
    assert "org_other" not in listing and key_id[0] in listing

    status, thread, _ = await call(gw, "POST", "/api/threads/", headers=bearer(key), json={})
    assert status == 201
    assert (await call(gw, "GET", "/api/threads/", headers=bearer(second)))[0] == 200
    second_id = re.search(r"key_[0-9a-f]{32}", second_out)
    assert second_id is not None
    for ref, used in ((key, key), (second_id[0], second)):  # by the key itself, or by its id
        status, out, err = await keys_command(db, "revoke", ref)
        assert status == 0 and "revoked" in out, err
        clock.advance(6)  # the server's verdict on the key expires
        status, answer, resp = await call(gw, "GET", "/api/threads/", headers=bearer(used))
        assert status == 401 and resp.headers["WWW-Authenticate"] == "Bearer", answer
    status, _, err = await keys_command(db, "revoke", key)  # revoked already
    assert status == 1 and "no key in use" in err
    status, _, err = await keys_command(db, "create", "--org", "not an org")
    assert status == 2 and "--org" in err


async def read_until(stream: asyncio.StreamReader, pattern: str, what: str) -> re.Match[str]:
    seen = ""

    async def go() -> re.Match[str]:
        nonlocal seen
        while line := (await stream.readline()).decode():
            seen += line
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"the output ended without {what}: {seen!r}")

    try:
        return await within(go(), 30, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; output: {seen!r}") from None


async def test_a_first_start_on_loopback_prints_the_page_address_with_a_first_key(tmp_path: Path) -> None:
    env = {**os.environ, "DAC_DB": str(tmp_path / "dac.db"), "DAC_AUTH": "keys", "DAC_DATABASE_URL": ""}
    env.pop("DAC_API_KEYS", None)
    for start in ("first", "again"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        try:
            base = (await read_until(proc.stdout, r"listening on (http://\S+)", "the listening line"))[1]
            if start == "first":
                found = await read_until(proc.stdout, r"(http://\S+)/#key=(dac_\S+)$", "the page's address")
                assert found[1] == base
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{base}/api/threads/", headers=bearer(found[2])) as resp:
                        assert resp.status == 200
                    async with http.get(f"{base}/api/threads/", headers={"x-org-id": "org_demo"}) as resp:
                        assert resp.status == 401
            else:  # a key exists: none is made, and the way to make one is shown
                await read_until(proc.stdout, r"keys create --org org_demo", "the hint")
        finally:
            proc.send_signal(signal.SIGINT)
            await within(proc.wait(), 20, "the server to stop")
    status, listing, _ = await keys_command(tmp_path / "dac.db", "list", "--org", "org_demo")
    assert len(listing.strip().splitlines()) == 2  # a header and the one key
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


async def test_header_mode_off_loopback_warns_at_start(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", "0", cwd=ROOT,
        env={**os.environ, "DAC_DB": str(tmp_path / "dac.db"), "DAC_AUTH": "header", "DAC_DATABASE_URL": ""},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        await read_until(proc.stdout, r"^warning: DAC_AUTH=header on 0\.0\.0\.0", "the warning")
    finally:
        proc.send_signal(signal.SIGINT)
        await within(proc.wait(), 20, "the server to stop")


# -- CORS and JSON bodies ------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


async def test_cors_preflights_are_answered_for_listed_origins_only(gateway_factory: GatewayFactory) -> None:
    gw, keys = await keyed(gateway_factory, cors_origins=("https://app.example.org",))
    for path in ("/api/threads/", "/v1/chat/completions"):
        status, _, resp = await call(gw, "OPTIONS", path, headers={"Origin": "https://app.example.org", **PREFLIGHT})
        assert status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
        status, answer, resp = await call(gw, "OPTIONS", path, headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert status == 403 and answer["error"]["type"] == "cors_refused"
        assert not any(h.startswith("Access-Control-Allow") for h in resp.headers)
    # the answer itself (an error too) can be read by the listed origin only
    for origin, readable in (("https://app.example.org", True), ("https://evil.example", False)):
        for headers in (bearer(keys.a, Origin=origin), {"Origin": origin}):
            _, _, resp = await call(gw, "GET", "/api/threads/", headers=headers)
            assert ("Access-Control-Allow-Origin" in resp.headers) is readable


async def test_no_cors_origins_by_default(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    status, _, resp = await call(gw, "OPTIONS", "/api/threads/", headers={"Origin": "http://localhost:3000",
                                                                          **PREFLIGHT})
    assert status == 403 and "Access-Control-Allow-Origin" not in resp.headers


async def test_a_body_that_is_not_json_typed_is_415_and_reaches_nothing(gateway_factory: GatewayFactory) -> None:
    scripted = ScriptedProvider()
    gw = await gateway_factory(providers=registry(scripted))  # header mode: what a cross-site form could reach
    thread = await gw.new_thread()
    chat = b'{"model": "scripted/s", "messages": [{"role": "user", "content": "hi"}]}'
    for path, body, org in (("/v1/chat/completions", chat, {}),
                            (f"/api/threads/{thread}/messages", b'{"content": "hi", "provider": "scripted"}',
                             {"x-org-id": "org_a"}),
                            ("/api/threads/", b'{"title": "t"}', {"x-org-id": "org_a"})):
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, answer, resp = await call(gw, "POST", path, headers={"Content-Type": kind, **org}, data=body)
            assert status == 415, (path, kind, answer)
            error = answer["error"]
            assert resp.content_type == "application/json"
            assert "unsupported_media_type" in (error["type"], error.get("code")), error
    assert scripted.calls == []
    assert (await gw.thread(thread))["messages"] == []
    assert len(await gw.store.list_threads("org_a")) == 1
    # with its type, the same body is served
    status, _, _ = await call(gw, "POST", "/api/threads/", headers={"Content-Type": "application/json; charset=utf-8",
                                                                    "x-org-id": "org_a"}, data=b'{"title": "t"}')
    assert status == 201


# -- Idempotency-Key ------------------------------------------------------------------


async def test_an_idempotency_key_is_free_again_after_the_result_ttl(gateway_factory: GatewayFactory) -> None:
    clock = ManualClock()
    gw = await gateway_factory(clock=clock, result_ttl_s=60)
    thread = await gw.new_thread()
    key = {"Idempotency-Key": "order-1"}
    status, first = await gw.post(thread, {"content": "first", "model": FAST}, headers=key)
    assert status == 200
    status, refused = await gw.post(thread, {"content": "second", "model": FAST}, headers=key)
    assert status == 422 and refused["error"]["param"] == "Idempotency-Key"
    clock.advance(61)
    status, second = await gw.post(thread, {"content": "second", "model": FAST}, headers=key)
    assert status == 200 and second["coalesce"] == "leader"
    assert second["message"]["content"] != first["message"]["content"]
    # on /v1 too, per surface: the key used on /api is another key there
    async with gw.session.post(f"{gw.url}/v1/chat/completions", headers={"x-org-id": "org_a", **key},
                               json={"model": "mock/" + FAST, "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.status == 200
    async with gw.session.post(f"{gw.url}/v1/chat/completions", headers={"x-org-id": "org_a", **key},
                               json={"model": "mock/" + FAST, "messages": [{"role": "user", "content": "y"}]}) as r:
        assert r.status == 422 and (await r.json())["error"]["code"] == "idempotency_key_reused"
