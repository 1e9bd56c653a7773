"""``anyflow bench``: run the benchmarks in ``benchmarks/`` and print their tables (ratios side by side)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = {
    "training": "benchmarks.bench_training",
    "storage": "benchmarks.bench_storage",
    "dataprep": "benchmarks.bench_dataprep",
    "sampling": "benchmarks.bench_sampling",
}


def _handler(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks").is_dir():
        print("anyflow bench runs from a source checkout (benchmarks/ is not installed with the package)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    names = args.only or list(BENCHMARKS)
    for name in names:
        print(f"\n=== {name} ({BENCHMARKS[name]}) ===", flush=True)
        saved = sys.argv
        sys.argv = [BENCHMARKS[name], *(["--quick"] if args.quick else [])]
        try:
            runpy.run_module(BENCHMARKS[name], run_name="__main__")
        finally:
            sys.argv = saved
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("bench", help="run the benchmarks and print ratio tables",
                       description="Benchmarks measure side by side in one run and print ratios; times are indicative.")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this benchmark (repeatable)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke)")
    p.set_defaults(func=_handler)
