"""Bad input never gives a 5xx, and a refused request writes nothing: a property-based
fuzz over every route of both surfaces, with the cases once found by hand as explicit
examples.

One gateway serves the whole test, in a thread of its own, and the requests go over
raw HTTP/1.1 (``http.client``), so headers can carry bytes that are not UTF-8 and
bodies can be anything. The seed is printed (``FUZZ_SEED=N`` repeats a run); the
number of generated examples is ``FUZZ_EXAMPLES``: the suite's short form takes 300 (a new
seed each run, beside every explicit case); the full run is ``FUZZ_EXAMPLES=2000``.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import random
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import hypothesis
from hypothesis import HealthCheck, example, given, settings, strategies as st

from server.app import make_app
from server.config import Settings

from .helpers import start_runner

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FAST = "mock:ttft=0,itl=0,n=3"
ORG = "org_fuzz"


# -- a gateway in a thread ---------------------------------------------------------


@contextmanager
def gateway_thread(settings: Settings) -> Iterator[int]:
    """Serve the app on 127.0.0.1 in a thread with its own loop; yields the port."""
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Event] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    failure: list[BaseException] = []

    async def main() -> None:
        runner = await start_runner(make_app(settings), settings)
        port.append(runner.addresses[0][1])
        stop.append(asyncio.Event())
        loop_box.append(asyncio.get_running_loop())
        ready.set()
        try:
            await stop[0].wait()
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the test
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name="fuzz-gateway", daemon=True)
    thread.start()
    assert ready.wait(20), "the gateway did not start"
    assert not failure, failure
    try:
        yield port[0]
    finally:
        loop_box[0].call_soon_threadsafe(stop[0].set)
        thread.join(20)
        assert not thread.is_alive(), "the gateway did not stop"


# -- requests -------------------------------------------------------------------------


@dataclass
class Req:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        body = self.body if self.body is None or len(self.body) < 300 else self.body[:300] + b"..."
        return f"Req({self.method} {self.path[:300]!r} headers={self.headers!r} body={body!r})"


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class Client:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.sent = 0

    def send(self, req: Req) -> Answer:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
            try:
                self.conn.putrequest(req.method, req.path, skip_accept_encoding=True)
                for name, value in req.headers.items():
                    self.conn.putheader(name, value.encode() if isinstance(value, str) else value)
                if req.body is not None:
                    self.conn.putheader("Content-Length", str(len(req.body)))
                self.conn.endheaders(req.body)
                resp = self.conn.getresponse()
                data = resp.read()
                self.sent += 1
                if resp.will_close:
                    self.conn.close()
                    self.conn = None
                return Answer(resp.status, resp.headers, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:  # a fresh connection dropped without an answer
                    raise
            except BaseException:
                self.conn.close()
                self.conn = None
                raise
        raise AssertionError("unreachable")


# -- strategies ----------------------------------------------------------------------

latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=12)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=2)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=3)
models = st.sampled_from([FAST, FAST, FAST, "mock:ttft=nan", "mock:itl=inf", "mock:n=-1", "mock:ttft=0,n=x",
                          "mock:zzz=1", "", "nope", "mock:ttft=1e400"]) | st.text(max_size=10) | values
contents = st.sampled_from(["hello", "what is DAC?", " ", ""]) | st.text(max_size=20) | values
thread_ids = st.sampled_from(["THREAD", "THREAD", "THREAD", "thr_nope", "", "..", "%00"]) | latin1
numbers = st.sampled_from(["1", "10", "0", "-1", "1001", "٣", "²", "1e3", "0x10", " 5", "99999999999999999999"]) | latin1
bodies_kind = st.sampled_from(["json", "json", "json", "json", "raw", "gzip", "badgzip", "deflate", "baddeflate"])


def deep(depth: int) -> str:
    """JSON text of objects nested ``depth`` levels deep (too deep for the json module to write)."""
    return '{"a":' * depth + "1" + "}" * depth


@st.composite
def api_message(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = draw(st.fixed_dictionaries({}, optional={
        "content": contents, "model": models, "stream": st.booleans() | scalars, "provider":
        st.sampled_from(["mock", "nope", "openai"]) | scalars, "role": st.sampled_from(["user", "assistant"]) | scalars,
        "reason": scalars, "scope": scalars, "tools": values, "attachments": values}))
    body.update(draw(st.dictionaries(st.text(max_size=5), values, max_size=2)))
    return body


@st.composite
def v1_body(draw: st.DrawFn) -> dict[str, Any]:
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | scalars,
                                     "content": contents | st.lists(st.fixed_dictionaries(
                                         {"type": st.just("text") | scalars, "text": contents}), max_size=2)})
    body: dict[str, Any] = draw(st.fixed_dictionaries(
        {"model": st.sampled_from([f"mock/{FAST}", FAST, "mock/mock:ttft=nan", "nope/x", "mock/"]) | models},
        optional={"messages": st.lists(message, max_size=3) | values, "stream": st.booleans() | scalars,
                  "temperature": scalars, "max_tokens": scalars, "n": scalars, "stop": values, "seed": scalars,
                  "tools": values, "stream_options": values, "logprobs": scalars}))
    body.update(draw(st.dictionaries(st.text(max_size=5), values, max_size=2)))
    return body


@st.composite
def requests(draw: st.DrawFn) -> Req:
    route = draw(st.sampled_from(["create", "list", "get", "delete", "post", "post", "post", "stream", "stop",
                                  "v1", "v1", "v1", "models", "model", "ops", "static"]))
    headers: dict[str, str | bytes] = {"x-org-id": draw(st.sampled_from([ORG] * 8 + ["", "bad org!", "org_other"]))}
    if draw(st.booleans()):
        headers["Idempotency-Key"] = draw(latin1 | latin1.map(lambda t: t.encode("latin-1")))
    if route == "v1" and draw(st.booleans()):
        headers["x-thread-id"] = draw(thread_ids | latin1.map(lambda t: t.encode("latin-1")))
    extra = draw(st.dictionaries(st.sampled_from(["Accept", "Cache-Control", "Last-Event-ID"]), numbers, max_size=2))
    if "Accept" in extra:
        headers["Accept"] = "text/event-stream"
    if "Cache-Control" in extra:
        headers["Cache-Control"] = "no-cache"
    if "Last-Event-ID" in extra:
        headers["Last-Event-ID"] = extra["Last-Event-ID"]
    tid = quote(draw(thread_ids), safe="")
    query = draw(st.dictionaries(st.sampled_from(["limit", "before", "last_n", "last_event_id", "attach", "org"]),
                                 numbers, max_size=2))
    qs = ("?" + urlencode(query)) if query else ""
    method, path, payload = "GET", "/healthz", None
    if route == "create":
        method, path, payload = "POST", "/api/threads/", draw(st.fixed_dictionaries({}, optional={"title": scalars}))
    elif route == "list":
        path = "/api/threads/" + qs
    elif route == "get":
        path = f"/api/threads/{tid}{qs}"
    elif route == "delete":
        method, path = "DELETE", f"/api/threads/{quote(draw(latin1), safe='') or 'x'}"
    elif route == "post":
        method, path, payload = "POST", f"/api/threads/{tid}/messages", draw(api_message())
    elif route == "stream":
        path = f"/api/streams/{quote(draw(latin1), safe='') or 'x'}{qs}"
    elif route == "stop":
        method, path = "DELETE", f"/api/streams/{quote(draw(latin1), safe='') or 'x'}{qs}"
    elif route == "v1":
        method, path, payload = "POST", "/v1/chat/completions", draw(v1_body())
    elif route == "models":
        path = "/v1/models"
    elif route == "model":
        path = f"/v1/models/{quote(draw(latin1), safe='/') or 'x'}"
    elif route == "ops":
        path = draw(st.sampled_from(["/healthz", "/readyz", "/metrics", "/api/metrics/performance"])) + qs
    else:
        path = "/static/" + (quote(draw(latin1), safe="") or "x") * draw(st.sampled_from([1, 1, 40]))
    body = None
    if payload is not None:
        kind = draw(bodies_kind)
        raw = json.dumps(payload).encode()
        if kind == "raw":
            body = draw(st.binary(max_size=40))
        elif kind == "gzip":
            body, headers["Content-Encoding"] = gzip.compress(raw), "gzip"
        elif kind == "deflate":
            body, headers["Content-Encoding"] = zlib.compress(raw), "deflate"
        elif kind in ("badgzip", "baddeflate"):
            body, headers["Content-Encoding"] = raw, kind.removeprefix("bad")
        else:
            body = raw
        headers["Content-Type"] = draw(st.sampled_from(["application/json"] * 6 + ["text/plain", "", "x/y"]))
    return Req(method, path, body, headers)


def post(path: str, body: Any, **headers: str | bytes) -> Req:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Req("POST", path, raw, {"x-org-id": ORG, "Content-Type": "application/json", **headers})


MSG = "/api/threads/THREAD/messages"
#: the inputs that once gave a 5xx (or wrote rows for a refused request)
FOUND = [
    Req("GET", "/api/threads/?limit=%D9%A3", None, {"x-org-id": ORG}),
    Req("GET", "/api/threads/?limit=%C2%B2", None, {"x-org-id": ORG}),
    Req("GET", "/api/threads/THREAD?limit=%D9%A3", None, {"x-org-id": ORG}),
    post(MSG, {"content": "idem"}, **{"Idempotency-Key": b"k\xff\xfe"}),
    post("/v1/chat/completions", {"model": f"mock/{FAST}", "messages": [{"role": "user", "content": "x"}]},
         **{"Idempotency-Key": b"\xc3\x28"}),
    post("/v1/chat/completions", {"model": f"mock/{FAST}", "messages": [{"role": "user", "content": "x"}]},
         **{"x-thread-id": b"thr_\xff"}),
    *(post(MSG, f'{{"content": "deep", "extra": {deep(depth)}}}'.encode()) for depth in (253, 254, 300, 1022)),
    *(post("/v1/chat/completions", f'{{"model": "mock/{FAST}", "messages": [{{"role": "user", "content": "x"}}],'
                                   f' "tools": [{deep(depth)}]}}'.encode()) for depth in (253, 600)),
    post(MSG, b"\x1f\x8b\x08\x00garbage", **{"Content-Encoding": "gzip"}),
    post(MSG, b"not deflate at all", **{"Content-Encoding": "deflate"}),
    post("/v1/chat/completions", b"\x1f\x8b\x08\x00garbage", **{"Content-Encoding": "gzip"}),
    Req("GET", "/static/" + "a" * 300, None, {}),
    Req("GET", "/static/" + "a" * 5000, None, {}),
    Req("GET", "/static/%00", None, {}),
    post(MSG, {"content": "nan", "model": "mock:ttft=nan"}),
    post(MSG, {"content": "inf", "model": "mock:itl=inf"}),
    post("/v1/chat/completions", {"model": "mock/mock:ttft=nan", "messages": [{"role": "user", "content": "x"}]},
         **{"x-thread-id": "THREAD"}),
    post(MSG, {"content": "x" * 70_000}),
]


def _rows(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM threads)").fetchone()
    return int(row[0]), int(row[1])


def test_no_5xx_and_no_rows_from_bad_input(tmp_path: Path) -> None:
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))
    print(f"\nfuzz seed: {seed} (repeat with FUZZ_SEED={seed})")
    db = tmp_path / "fuzz.db"
    s = Settings.from_env({}).with_(auth="header", db_path=str(db), default_model=FAST, attach_timeout_s=0.2,
                                    max_body_bytes=64 * 1024, result_ttl_s=0.5)
    with gateway_thread(s) as port:
        client = Client(port)
        created = client.send(post("/api/threads/", {"title": "fuzz"}))
        assert created.status == 201, created
        thread = json.loads(created.body)["thread_id"]
        counts = {"examples": 0}

        def check(req: Req) -> None:
            req = Req(req.method, req.path.replace("THREAD", thread), req.body,
                      {k: (v.replace("THREAD", thread) if isinstance(v, str) else v) for k, v in req.headers.items()})
            before = _rows(db)
            answer = client.send(req)
            counts["examples"] += 1
            where = f"seed {seed}: {req!r} -> {answer.status} {answer.body[:300]!r}"
            assert answer.status < 500, where
            if answer.status >= 400 and req.path.startswith(("/api/", "/v1/")):
                assert answer.headers.get("Content-Type", "").startswith("application/json"), where
                assert "error" in json.loads(answer.body), where
            if answer.status >= 400:
                assert _rows(db) == before, "a refused request wrote rows: " + where
            elif answer.status == 202 and json.loads(answer.body)["coalesce"] == "leader":
                # mode 3: the leader's rows are written just after the answer
                deadline = time.monotonic() + 5
                while _rows(db)[0] < before[0] + 2 and time.monotonic() < deadline:
                    time.sleep(0.005)

        run = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                       suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.explicit,
                                                                        hypothesis.Phase.generate])(
            given(requests())(check))
        for found in FOUND:
            run = example(found)(run)
        hypothesis.seed(seed)(run)()
    print(f"fuzz: {counts['examples']} requests, {len(FOUND)} of them the explicit cases, no 5xx")
    assert counts["examples"] >= EXAMPLES, counts
