"""The Grafana dashboard and its provisioning, checked against a real Prometheus.

The static checks run everywhere. The end-to-end test starts Debian's
``prometheus`` on 127.0.0.1 scraping a gateway every second, runs a known
workload twice (so every counter has increased between two scrapes), and
evaluates every PromQL expression of the dashboard through ``/api/v1/query``:
each must return data. Without the binary it is skipped, unless
``DAC_REQUIRE_PROMETHEUS=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import Metrics

from .conftest import GatewayFactory
from .fake_upstream import FakeUpstream, Script
from .helpers import Gateway, ScriptedProvider, registry, within
from .workload import mixed_workload, scrape, scrape_until

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "tools" / "grafana"
DASHBOARD = GRAFANA / "dac-gateway.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
#: what Grafana would put in place of its variables, for a 1 s scrape interval
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m",
                     "provider": ".*", "model": ".*"}
PROMETHEUS_TIMEOUT = 60.0
DS = {"type": "prometheus", "uid": "${datasource}"}


def need(binary: str) -> None:
    if Path(binary).is_file() and os.access(binary, os.X_OK):
        return
    message = (f"{binary} not found: install Debian's prometheus package "
               "(apt-get install -y prometheus) to run this test")
    if os.environ.get("DAC_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(message + " (DAC_REQUIRE_PROMETHEUS=1)")
    pytest.skip(message)


# -- the dashboard as data ------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def expressions(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", []) if t.get("expr")]


def promql(expr: str) -> str:
    """``expr`` with Grafana's variables replaced as Grafana would."""
    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def exported_series() -> set[str]:
    """Every sample name /metrics can carry."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def panel_expr(title: str) -> str:
    """The first query of the dashboard's panel ``title``, as Grafana would send it."""
    [found] = [p for p in panels(dashboard()) if p["title"] == title]
    return promql(found["targets"][0]["expr"])


def test_dashboard_imports_without_edits() -> None:
    dash = dashboard()
    assert dash["uid"] == "dac-gateway" and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert "__inputs" not in dash  # nothing to fill in on import
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dash):
        assert panel["datasource"] == DS, panel["title"]
        assert panel["gridPos"]["w"] > 0 and panel["gridPos"]["h"] > 0
        for target in panel["targets"]:
            assert target["datasource"] == DS, panel["title"]
    # no datasource is named by uid anywhere but through the variable
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text()))
    assert uids == {"dac-gateway", "${datasource}"}


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    exprs = [e for _, e in expressions(dashboard())]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    wanted = {
        "request rate": r"rate\(dac_request_duration_seconds_count",
        "p95 latency": r"histogram_quantile\(0\.95, sum by \(le[^)]*\) \(rate\(dac_request_duration_seconds_bucket",
        "p95 TTFT": r"histogram_quantile\(0\.95, sum by \(le[^)]*\) \(rate\(dac_time_to_first_token_seconds_bucket",
        "queue wait": r"histogram_quantile\(0\.95, .*dac_queue_wait_seconds_bucket",
        "coalesce ratio": r'dac_coalesce_total\{role=~"follower\|cache"\}.*/ sum\(rate\(dac_coalesce_total',
        "calls saved": r'increase\(dac_coalesce_total\{role=~"follower\|cache"\}',
        "cache hits": r'dac_coalesce_total\{role="cache"\}',
        "cancels": r"rate\(dac_cancels_total",
        "cancel latency": r"histogram_quantile\(0\.9\d?, .*dac_cancel_latency_seconds_bucket",
        "active flights": r"dac_active_flights",
        "active listeners": r"dac_active_listeners",
        "errors by type": r"sum by \(type\) \(rate\(dac_errors_total",
    }
    missing = [name for name, pattern in wanted.items() if not some(pattern)]
    assert not missing, f"the dashboard lacks: {missing}"


def test_every_series_the_dashboard_reads_is_exported() -> None:
    exported = exported_series()
    for title, expr in expressions(dashboard()):
        for name in re.findall(r"\bdac_\w+", expr):
            assert name in exported, f"panel {title!r} reads {name}, which /metrics never carries"


def test_provisioning_files() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "dac-prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"].startswith("http://127.0.0.1:")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dac.yaml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and Path(provider["options"]["path"]).is_absolute()
    scrape_config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    # Grafana derives $__rate_interval from the datasource's scrape interval: keep them equal
    assert source["jsonData"]["timeInterval"] == scrape_config["global"]["scrape_interval"]
    [job] = scrape_config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


def test_grafana_variables_are_substituted() -> None:
    assert promql("rate(x[$__rate_interval])") == "rate(x[1m])"
    assert promql("increase(x[${__range}])") == "increase(x[5m])"
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        promql("rate(x{job=\"$job\"}[1m])")


def test_provider_and_model_filter_the_per_provider_panels() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("provider", "model"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"], name
        assert variables[name]["datasource"] == DS
    for title, expr in expressions(dash):
        for series in ("dac_upstream_calls_total", "dac_time_to_first_token_seconds_bucket",
                       "dac_time_per_output_token_seconds_bucket", "dac_upstream_duration_seconds_bucket"):
            if series in expr:
                assert 'provider=~"$provider"' in expr and 'model=~"$model"' in expr, title


# -- with the real tools -----------------------------------------------------------------


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await within(proc.communicate(stdin), 60, " ".join(argv))
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_promtool_accepts_the_exposition_and_the_sample_config(gateway_factory: GatewayFactory) -> None:
    need(PROMTOOL)
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    await mixed_workload(gw, provider, thread, "lint")
    text = (await scrape(gw)).text
    rc, out = await run(PROMTOOL, "check", "metrics", stdin=text.encode())
    assert (rc, out.strip()) == (0, ""), f"promtool check metrics:\n{out}"
    rc, out = await run(PROMTOOL, "check", "config", str(GRAFANA / "prometheus.yml"))
    assert rc == 0, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus server of our own on 127.0.0.1, storing in a temporary folder."""

    def __init__(self, gw: Gateway, workdir: Path) -> None:
        self.gw = gw
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        target = self.gw.url.removeprefix("http://")
        config = {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "dac", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(json.dumps(config))
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                PROMETHEUS, f"--config.file={config_file}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        await self.until(self._ready, "Prometheus to be ready")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def _ready(self) -> bool:
        try:
            async with self.gw.session.get(f"{self.url}/-/ready") as resp:
                return resp.status == 200
        except OSError:
            return False

    async def until(self, check: Callable[[], Awaitable[bool]], what: str) -> None:
        deadline = time.monotonic() + PROMETHEUS_TIMEOUT
        while not await check():
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; prometheus log:\n{self.tail()}")
            await asyncio.sleep(0.2)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async def get() -> list[dict[str, Any]]:
            async with self.gw.session.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
                body = await resp.json()
            assert resp.status == 200 and body["status"] == "success", f"{expr}: {body}"
            assert body["data"]["resultType"] == "vector", body
            return list(body["data"]["result"])

        return await within(get(), 30, f"query {expr!r}")

    async def value(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def sees(self, expr: str, expected: float) -> None:
        async def check() -> bool:
            return await self.value(expr) == expected

        await self.until(check, f"{expr} == {expected}")


async def test_real_prometheus_evaluates_every_dashboard_query(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    need(PROMETHEUS)
    provider = ScriptedProvider()
    gw = await gateway_factory(providers=registry(provider))
    thread = await gw.new_thread()
    prom = Prometheus(gw, tmp_path)
    try:
        await prom.start()
        await prom.sees('up{job="dac"}', 1)
        await prom.sees("sum(dac_coalesce_total)", 0)  # a scrape before any request

        for phase in ("one", "two"):
            requests = await mixed_workload(gw, provider, thread, phase)
            total = requests * (1 if phase == "one" else 2)
            local = await scrape_until(gw, lambda s, total=total: s.value("dac_coalesce_total") >= total,
                                       f"phase {phase} recorded")
            await prom.sees("sum(dac_coalesce_total)", local.value("dac_coalesce_total"))
            await prom.sees("sum(dac_cancels_total)", local.value("dac_cancels_total"))

        empty: list[str] = []
        for title, expr in expressions(dashboard()):
            result = await prom.query(promql(expr))
            values = [float(sample["value"][1]) for sample in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {promql(expr)} -> {result}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # a few figures an operator would read off the dashboard
        ratio = await prom.value(promql(
            'sum(rate(dac_coalesce_total{role=~"follower|cache"}[$__rate_interval]))'
            " / sum(rate(dac_coalesce_total[$__rate_interval]))"))
        assert ratio is not None and 0.5 < ratio < 1  # 10 of 13 requests per phase saved a call
        assert await prom.value("sum(dac_active_flights)") == 0
        assert await prom.value("sum(dac_active_listeners)") == 0
        assert await prom.value('sum(dac_upstream_calls_total{outcome="cancelled"})') == 2
        assert await prom.value('sum(dac_errors_total{type="upstream_error"})') == 2
    finally:
        await prom.stop()


async def test_the_error_rate_is_failed_answers_over_answers_and_tpot_is_the_formula(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """A scripted mix through real Prometheus: requests refused before any answer (400s,
    an unknown thread) are not answers; upstream failures are failed answers."""
    need(PROMETHEUS)
    async with FakeUpstream.start() as fake:
        fake.script(Script(n=5, first_token_s=0.2, interval_s=0.1), model="timed")
        fake.script(Script(status=500), model="broken")
        fake.script(Script(status=400), model="refusing")
        gw = await gateway_factory(env=fake.env("openai"))
        thread = await gw.new_thread()
        prom = Prometheus(gw, tmp_path)
        try:
            await prom.start()
            await prom.sees('up{job="dac"}', 1)
            await prom.sees("sum(dac_chat_answers_total)", 0)

            async def v1(model: str, content: str, **extra: Any) -> int:
                async with gw.session.post(f"{gw.url}/v1/chat/completions", headers={"x-org-id": "org_a"}, json={
                        "model": model, "messages": [{"role": "user", "content": content}], **extra}) as resp:
                    await resp.read()
                    return resp.status

            # 3 answers, streamed upstream (a whole answer has no time between its tokens)
            statuses = [await within(v1("openai/timed", f"timed {i}", stream=True)) for i in range(3)]
            statuses.append((await gw.post(thread, {"content": "fine", "model": "mock:ttft=0,itl=0,n=3"}))[0])
            statuses.append(await within(v1("openai/broken", "upstream fails")))  # failed answers
            statuses.append((await gw.post(thread, {"content": "fails", "provider": "openai",
                                                    "model": "broken"}))[0])
            statuses.append((await gw.post(thread, {"content": "mock fails", "model": "mock:ttft=0,fail=1"}))[0])
            statuses.append(await within(v1("openai/refusing", "upstream says 400")))
            # refused before any answer was attempted: not answers
            statuses.append(await within(v1("openai/timed", "bad", temperature=5)))
            statuses.append((await gw.post(thread, {"content": ""}))[0])
            statuses.append((await gw.post("thr_missing", {"content": "nowhere"}))[0])
            assert statuses == [200, 200, 200, 200, 502, 502, 502, 400, 400, 400, 404]

            await prom.sees("sum(dac_chat_answers_total)", 8)
            await prom.sees('sum(dac_chat_answers_total{outcome="error"})', 4)
            rate = await prom.value(panel_expr("Error rate"))
            assert rate == pytest.approx(4 / 8, abs=1e-9)  # errors over requests would say 7 / 11

            # time per output token: (duration - first output) / (output tokens - 1), per answer
            await prom.sees('sum(dac_time_per_output_token_seconds_count{provider="openai"})', 3)
            tpot = await prom.value('sum(dac_time_per_output_token_seconds_sum{provider="openai"})')
            durations = await prom.value(
                'sum(dac_upstream_duration_seconds_sum{provider="openai", outcome="ok"})')
            first = await prom.value('sum(dac_time_to_first_byte_seconds_sum{provider="openai"})')
            assert tpot is not None and durations is not None and first is not None
            assert tpot == pytest.approx((durations - first) / (5 - 1), rel=1e-9)
            assert 0.09 <= tpot / 3 < 0.2  # the fake streams a token every 0.1 s
        finally:
            await prom.stop()
