"""The command line of ``python -m tools.bench`` and ``tools/bench_fanout.py``, and the report it prints:
the targets table first (every checked figure, its target and PASS or FAIL), then each section."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from tools._common import cpu_split, markdown_table, pin, progress, raise_open_files
from tools.bench.fanout import FANOUT_ITL_MS, FANOUT_NOTE, load_processes, run_fanout
from tools.bench.litellm_proxy import find_litellm
from tools.bench.plan import Plan
from tools.bench.side_by_side import side_by_side
from tools.bench.targets import targets_table

ALL_SECTIONS = {1, 2, 3, 4, 5, 6}


def _parser(fanout_only: bool) -> argparse.ArgumentParser:
    prog = "tools/bench_fanout.py" if fanout_only else "python -m tools.bench"
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Fan-out of one flight to many SSE subscribers." if fanout_only else
        "The gateway's performance report: every figure beside its target, measured side by side with a "
        "direct call (and LiteLLM's proxy, if installed) against the same fake OpenAI-compatible upstream "
        "on 127.0.0.1."))
    parser.add_argument("--quick", action="store_true", help="a short run (smaller counts)")
    if not fanout_only:
        parser.add_argument("--sections", default="1,2,3,4,5,6",
                            help="comma-separated sections: 1 ttft, 2 identical, 3 client close and Stop, "
                                 "4 throughput, 5 fan-out, 6 memory (default all)")
        parser.add_argument("--litellm", default="auto",
                            help="LiteLLM's proxy: auto (use it if installed), off, or the command to run")
        parser.add_argument("--floor", choices=("on", "off"), default="on",
                            help="the 'aiohttp proxy (floor)' column, tools/bare_proxy.py: what a bare aiohttp "
                                 "hop adds on this machine (default on)")
        parser.add_argument("--strict", action="store_true", help="exit 1 when any target fails, too")
    parser.add_argument("--fanout-levels", "--subscribers", dest="subscribers", default=None,
                        help="fan-out levels, comma-separated (default 1000,10000; --quick: 200)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens of the fan-out flight")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fan-out runs per level; the one with the median p99 lag is shown (default 1)")
    parser.add_argument("--load-processes", type=int, default=None,
                        help="processes holding the fan-out subscribers (default: one per 2,500, from 2 to 8)")
    parser.add_argument("--soak-requests", type=int, default=None,
                        help="distinct requests of the memory section (default 10000; --quick 300)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load to different cores")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    return parser


def parse_args(argv: list[str] | None, *, fanout_only: bool = False) -> argparse.Namespace:
    parser = _parser(fanout_only)
    args = parser.parse_args(argv)
    if fanout_only:
        args.sections, args.litellm, args.strict, args.floor = "5", "off", False, "off"
    try:
        args.sections = {int(s) for s in args.sections.split(",") if s.strip()}
        levels = tuple(int(s) for s in args.subscribers.split(",")) if args.subscribers else None
    except ValueError:
        parser.error("--sections and --fanout-levels take comma-separated whole numbers")
    if not args.sections or not args.sections <= ALL_SECTIONS:
        parser.error("--sections takes numbers from 1 to 6")
    plan = Plan.make(quick=args.quick)
    if levels:
        if min(levels) < 1:
            parser.error("--fanout-levels must be positive")
        plan.fanout_levels = levels
    if args.tokens:
        plan.fanout_tokens = args.tokens
    if args.repeats:
        plan.fanout_repeats = args.repeats
    if args.soak_requests:
        plan.soak.requests = args.soak_requests
    if args.load_processes is not None and args.load_processes < 1:
        parser.error("--load-processes must be at least 1")
    args.plan = plan
    return args


def render(report: dict[str, Any]) -> str:
    verdict = "every target met" if report["pass"] else (
        f"{sum(c['verdict'] == 'FAIL' for c in report['checks'])} of {len(report['checks'])} targets missed")
    parts = [f"# Performance report ({'quick' if report['quick'] else 'full'} run): {verdict}", "",
             report["setup"], "", "## Targets", "", targets_table(report["checks"]), ""]
    for key in sorted(report["sections"], key=int):
        section = report["sections"][key]
        parts += [f"## {section['title']}", ""]
        if "note" in section:
            parts += [section["note"], ""]
        parts += [section["table"] if "table" in section else markdown_table(section["headers"], section["rows"]), ""]
    return "\n".join(parts)


def _side_sections(args: argparse.Namespace, report: dict[str, Any], setup: list[str], *,
                   litellm_cmd: list[str] | None, cores: tuple[set[int] | None, set[int] | None]) -> bool:
    """Sections 1-4 and 6 into ``report``; True if a check of ours failed."""
    results, via_fake = side_by_side(args.plan, args.sections - {5}, litellm_cmd=litellm_cmd,
                                     server_cores=cores[0], load_cores=cores[1], report=report,
                                     floor=args.floor == "on")
    route = ("its openai provider" if via_fake else
             "its built-in mock with the same timings (this gateway has no openai provider)")
    setup.append(f"Upstream: tools/fake_openai.py in its own process (OpenAI chat.completions wire format); "
                 f"the gateway reaches it through {route}; LiteLLM: {report['litellm']}.")
    for key, section in results.items():
        if "table" not in section:
            section["table"] = markdown_table(section["headers"], section["rows"])
        report["sections"][str(key)] = section
    return any(section.get("broken") for section in results.values())


def _fanout_section(args: argparse.Namespace, report: dict[str, Any], *, pinned: bool,
                    cores: tuple[set[int] | None, set[int] | None]) -> bool:
    """Section 5 into ``report``; True if a subscriber missed anything."""
    plan: Plan = args.plan
    fan = run_fanout(plan.fanout_levels, tokens=plan.fanout_tokens, workers=args.load_processes,
                     server_cores=cores[0], load_cores=cores[1], repeats=plan.fanout_repeats)
    fan["title"] = (f"5. Fan-out of one flight to {', '.join(f'{n:,}' for n in plan.fanout_levels)} SSE "
                    f"subscribers (gateway only)")
    workers = args.load_processes or "/".join(str(load_processes(n, None)) for n in plan.fanout_levels)
    fan["note"] = FANOUT_NOTE.format(tokens=plan.fanout_tokens, itl=FANOUT_ITL_MS, workers=workers,
                                     pinning=" pinned apart from the server" if pinned else "",
                                     repeats=plan.fanout_repeats)
    report["sections"]["5"] = fan
    return not fan["ok"]


def main(argv: list[str] | None = None, *, fanout_only: bool = False) -> int:
    args = parse_args(argv, fanout_only=fanout_only)
    server_cores, load_cores = (None, None) if args.no_pin else cpu_split()
    cores = (server_cores, load_cores)
    pinned = pin(0, load_cores)
    raise_open_files(max(args.plan.fanout_levels) + 1024)
    litellm_cmd = find_litellm(args.litellm)
    report: dict[str, Any] = {
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "server_cores": sorted(server_cores or []),
                    "load_cores": sorted(load_cores or []), "pinned": pinned, "python": sys.version.split()[0],
                    "loadavg_at_start": os.getloadavg()},
        "litellm": "not installed" if litellm_cmd is None and args.litellm == "auto" else
                   ("off" if litellm_cmd is None else " ".join(litellm_cmd)),
        "sections": {},
    }
    setup = [f"{os.cpu_count()} CPU(s); " + (
        f"server pinned to core(s) {sorted(server_cores or [])}, load and fake upstream to {sorted(load_cores or [])}"
        if pinned else "not pinned (fewer than 2 cores allowed, or --no-pin)") + "."]
    failed = False
    if args.sections - {5}:
        failed |= _side_sections(args, report, setup, litellm_cmd=litellm_cmd, cores=cores)
    if 5 in args.sections:
        failed |= _fanout_section(args, report, pinned=pinned, cores=cores)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    setup.append("Load average (1 min) of the whole machine: {:.2f} at the start, {:.2f} at the end (other "
                 "processes share these cores).".format(report["machine"]["loadavg_at_start"][0],
                                                       report["machine"]["loadavg_at_end"][0]))
    report["setup"] = " ".join(setup)
    report["checks"] = [c for key in sorted(report["sections"], key=int)
                        for c in report["sections"][key].get("checks", [])]
    report["pass"] = all(c["verdict"] == "PASS" for c in report["checks"])
    print(render(report))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        progress(f"JSON written to {args.json}")
    return 1 if failed or (args.strict and not report["pass"]) else 0
