"""What every benchmark module shares: the machine line of its results and its command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: (section, heading, body) -> None: bench.run.update_doc, which rewrites docs/benchmarks.md.
WriteDoc = Callable[[str, str, str], None]


def machine(note: str = "") -> str:
    """'<n> vCPU <cpu model>[, note], Python <version>' of this host, for results and docs."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    extra = f", {note}" if note else ""
    return f"{os.cpu_count()} vCPU {cpu}{extra}, Python {platform.python_version()}"


def section_main(
    prog: str,
    quick_help: str,
    run_section: Callable[[bool, WriteDoc | None], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> int:
    """The command line of a bench section (`python -m bench.<name> [--quick] [--no-doc]`):
    measure, print the rendered section; exit 1 unless every target in it was met."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    write_doc = None
    if not args.no_doc:
        from bench.run import update_doc  # here: bench.run imports every section module

        write_doc = update_doc
    result = run_section(args.quick, write_doc)
    print(render(result))
    return 0 if all(c["ok"] for c in result["targets"]) else 1
