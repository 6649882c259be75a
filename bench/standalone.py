"""What the benches run on their own (``python -m bench.<name>``) share: the command line, the
run's metadata and the rewrite of their own marked section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .harness import ROOT, loadavg, machine
from .report import replace_section

Results = dict[str, Any]


def run_standalone(
    prog: str,
    description: str | None,
    quick_help: str,
    arun: Callable[[bool], Coroutine[Any, Any, Results]],
    markdown: Callable[[Results, dict[str, Any]], str],
    markers: tuple[str, str],
    argv: list[str] | None = None,
) -> None:
    """Parse ``--quick``/``--docs``, run ``arun(quick)``, and with ``--docs`` rewrite the
    section between ``markers`` of docs/benchmarks.md (appended the first time; the rest of the
    file is kept) with ``markdown(results, meta)``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--docs", action="store_true", help="rewrite docs/benchmarks.md's section")
    args = parser.parse_args(argv)
    flags = [flag for flag, on in (("--quick", args.quick), ("--docs", args.docs)) if on]
    meta: dict[str, Any] = {
        "command": " ".join([prog, *flags]),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    began = time.monotonic()
    results = asyncio.run(arun(args.quick))
    meta["seconds"] = round(time.monotonic() - began)
    meta["loadavg_at_end"] = loadavg()
    if args.docs:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        doc.write_text(replace_section(text, *markers, markdown(results, meta)))
        print(f"wrote {doc}")
