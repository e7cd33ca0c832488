"""The optional third column: LiteLLM's proxy, routing the fake's model to the fake upstream."""

from __future__ import annotations

import importlib.util
import secrets
import shutil
import sys

import orjson

from tools._common import ServerProcess
from tools.bench.harness import FAKE_KEY, FAKE_MODEL

#: how long LiteLLM's proxy may take to start
LITELLM_READY_TIMEOUT_S = 90.0


def find_litellm(choice: str) -> list[str] | None:
    """The command that starts LiteLLM's proxy, or None when it is not installed (or not wanted)."""
    if choice == "off":
        return None
    if choice != "auto":
        return [choice]
    found = shutil.which("litellm")
    if found:
        return [found]
    if importlib.util.find_spec("litellm") is not None:
        return [sys.executable, "-m", "litellm.proxy.proxy_cli"]
    return None


def start_litellm(command: list[str], fake_url: str, cores: set[int] | None) -> tuple[ServerProcess, str]:
    """LiteLLM's proxy routing ``fake-model`` to the fake upstream; returns it and its master key."""
    master_key = "sk-bench-" + secrets.token_hex(16)
    proc = ServerProcess(
        command=[*command, "--host", "127.0.0.1", "--port", "{port}", "--config", "CONFIG"],
        ready_path="/health/liveliness", cores=cores, ready_timeout_s=LITELLM_READY_TIMEOUT_S,
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
             "LITELLM_MASTER_KEY": master_key},
    )
    config = proc.workdir / "litellm.yaml"
    # JSON is YAML: one model routed to the fake upstream on the loopback.
    config.write_bytes(orjson.dumps({
        "model_list": [{"model_name": FAKE_MODEL, "litellm_params": {
            "model": f"openai/{FAKE_MODEL}", "api_base": f"{fake_url}/v1", "api_key": FAKE_KEY}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }))
    proc.command = [str(config) if part == "CONFIG" else part for part in proc.command]
    return proc.start(), master_key
