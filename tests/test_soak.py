"""The soak tool's SHORT FORM (60 s) in the suite; the full run is documented in README.md
(``tools/soak.py --duration 300``)."""

from __future__ import annotations

import asyncio
import json
import sys

from .helpers import within
from .test_main import ROOT

SHORT_DURATION_S = 60


async def test_soak_short_form_loses_doubles_and_strands_nothing() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "tools/soak.py", "--duration", str(SHORT_DURATION_S), "--json", cwd=ROOT,
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
