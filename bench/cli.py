"""``python -m bench [--quick] [--out DIR] [--scenario NAME] [--docs] [SCENARIO.FIELD=VALUE]``"""

from __future__ import annotations

import argparse
import datetime
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harness import ROOT

SCENARIOS = ("lookup", "hot_voices", "live_sessions", "outage", "memory", "fanout", "matching")
"""Run by default, against servers in the bench's own process."""
SEPARATE = ("load",)
"""Run only when named (``--scenario load``): their servers are subprocesses, their runs take
many minutes, and ``--docs`` rewrites only their own section of docs/benchmarks.md."""


def _parser(prog: str) -> argparse.ArgumentParser:
    from .harness import Sizes

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the voice cache and the live path against a real server and a "
        "real redis-server on loopback; print a table, write results.json and PNG plots.",
        epilog="Sizes: SCENARIO.FIELD=VALUE, e.g. hot_voices.registrations=2000 "
        "live_sessions.levels=1,4,8 outage.seconds=30 lookup.n=50 memory.l1_voices=5000 "
        "fanout.levels=1,10,50 load.levels=1,16 load.peer=0. "
        "Fields and defaults: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in section.items())
            for name, section in Sizes().to_json().items()
        ),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute or two")
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for results.json and the plots "
        "(default: bench-results/<timestamp>/ in the checkout)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS + SEPARATE,
        dest="scenarios",
        help="run only this scenario (repeatable; default: all but load)",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="also write docs/benchmarks.md and docs/img/bench-*.png (the committed copy)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="time cap per scenario (default 120, --quick 30; load: none unless given)",
    )
    parser.add_argument("--log-level", default="WARNING", help="server log level (WARNING)")
    parser.add_argument("sizes", nargs="*", metavar="SCENARIO.FIELD=VALUE")
    return parser


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``bench`` to the ``livevoice`` command line (entry point ``livevoice.commands``)."""
    # No options of its own (prefix_chars): everything after `bench` goes to the bench's parser.
    bench = sub.add_parser(
        "bench",
        help="benchmark the voice cache and live sessions (livevoice bench --help)",
        add_help=False,
        prefix_chars="\0",
    )
    bench.add_argument("args", nargs="*")
    bench.set_defaults(func=lambda args: main(args.args, prog="livevoice bench"))


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m bench") -> int:
    """Run the bench from command-line arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    args = parser.parse_args(argv)
    from .harness import Sizes

    sizes = Sizes.quick() if args.quick else Sizes()
    for assignment in args.sizes:
        try:
            sizes.override(assignment)
        except ValueError as exc:
            parser.error(str(exc))
    if args.scenarios:
        scenarios = [s for s in SCENARIOS + SEPARATE if s in args.scenarios]
    else:
        scenarios = list(SCENARIOS)
    max_seconds = args.max_seconds or (30.0 if args.quick else 120.0)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(args.log_level.upper())  # also under `livevoice`'s own config
    started = datetime.datetime.now()
    out = args.out or ROOT / "bench-results" / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    command = f"{prog} {shlex.join(argv)}".strip()

    from live.cli import run

    results = run(_arun(scenarios, sizes, max_seconds, args.max_seconds, command, started))

    from . import load, report

    report.write_json(results, out / "results.json")
    plots = report.write_plots(results, out)
    print()
    in_process = [s for s in scenarios if s in SCENARIOS]
    if in_process:
        print(report.table(results))
    if "load" in results["scenarios"]:
        print(load.table(results["scenarios"]["load"]))
    print(f"\nresults: {out / 'results.json'}")
    for path in plots:
        print(f"plot:    {path}")
    if args.docs:
        if in_process:  # rewrites the file, keeping the sections of the separate scenarios
            print(f"docs:    {report.write_docs(results, plots, ROOT / 'docs')}")
        if "load" in results["scenarios"]:
            print(f"docs:    {load.write_docs(results, ROOT / 'docs' / 'benchmarks.md')}")
    failed = [name for name, data in results["scenarios"].items() if "error" in data]
    return 1 if failed else 0


async def _arun(
    scenarios: list[str],
    sizes: Any,
    max_seconds: float,
    separate_cap: float | None,
    command: str,
    started: datetime.datetime,
) -> dict[str, Any]:
    from .harness import BenchContext, loadavg, machine
    from .load import arun_load
    from .scenarios import RUNNERS

    runners = RUNNERS | {"load": arun_load}

    t0 = time.perf_counter()
    meta: dict[str, Any] = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "sizes": sizes.to_json(),
        "max_seconds_per_scenario": max_seconds,
    }
    results: dict[str, Any] = {"meta": meta, "scenarios": {}}
    ctx = BenchContext()
    if any(name in SCENARIOS for name in scenarios):
        print(f"loading models and clips ({', '.join(scenarios)})", file=sys.stderr)
        await ctx.aload()
    try:
        for name in scenarios:
            begin = time.perf_counter()
            cap = max_seconds if name in SCENARIOS else separate_cap
            try:
                deadline = begin + cap if cap is not None else float("inf")
                data = await runners[name](ctx, getattr(sizes, name), deadline)
            except Exception as exc:
                traceback.print_exc()
                data = {"error": f"{type(exc).__name__}: {exc}"}
            data["seconds"] = round(time.perf_counter() - begin, 1)
            results["scenarios"][name] = data
    finally:
        await ctx.aclose()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_at_end"] = loadavg()
    return results
