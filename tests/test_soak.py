"""The soak tool's SHORT FORM in the suite: 10 s of 25 chats with a faster mock (each answer
about 0.15 s, so a thousand turns or more), every check of the full run (the kill -9 halfway,
failures, drops, then the store read back). The full run is documented in README.md
(``tools/soak.py --duration 300``)."""

from __future__ import annotations

import asyncio
import json
import sys

from .helpers import within
from .test_main import ROOT

SHORT_DURATION_S = 10
#: the mock's timing in the short form: a turn takes ttft + tokens * itl
SHORT_TIMING = ("--ttft-ms", "30", "--itl-ms", "8", "--tokens", "12")


async def test_soak_short_form_loses_doubles_and_strands_nothing() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "tools/soak.py", "--duration", str(SHORT_DURATION_S), *SHORT_TIMING, "--json", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await within(proc.communicate(), SHORT_DURATION_S + 120, "the short soak run")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    result = json.loads(out.decode().strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    assert proc.returncode == 0 and result["ok"], (result, err.decode()[-2000:])
    counts = result["counts"]
    assert counts["restarts"] == 1
    outcomes = counts["outcomes"]
    assert outcomes.get("done", 0) > 100 and outcomes.get("dropped", 0) > 0 and outcomes.get("error", 0) > 0, counts
