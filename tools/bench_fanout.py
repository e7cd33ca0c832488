#!/usr/bin/env python3
"""Fan-out of one flight to 1,000 and 10,000 SSE subscribers: section 5 of ``python -m tools.bench``.

    tools/bench_fanout.py [--fanout-levels 1000,10000] [--tokens 50] [--repeats 1] [--load-processes N]
                          [--quick] [--json FILE]

Every subscriber must receive every token in order (checked by sequence
number and text, and the final message); the table shows how many did, the
server's CPU per delivered event, the p50/p99/max delivery lag and the
server's memory per subscriber, each checked against its target. Exits 1 if
any subscriber missed anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(fanout_only=True))
