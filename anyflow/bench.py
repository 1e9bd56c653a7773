"""``anyflow bench`` / ``python -m benchmarks``: run the benchmarks in ``benchmarks/`` and print their tables.

Each benchmark is a module ``benchmarks.bench_<name>`` with ``main(argv) -> int`` that measures its
alternatives side by side in one run and prints ratios. This runner calls them in turn, passing each
the arguments that ``--quick`` (a smoke run, sized for all of them together ≤ 3 minutes on an idle 2-core machine:
:data:`QUICK_BUDGET_S`), ``--device`` and ``--e2e`` translate to in its own options, and ends with a summary (status
and seconds per benchmark, the total, and with ``--quick`` the budget and the machine's load average). A
benchmark missing from the checkout is reported as skipped; one that fails is reported and the
others still run (exit code 1).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

BENCHMARKS = {
    "training": "benchmarks.bench_training",
    "storage": "benchmarks.bench_storage",
    "dataprep": "benchmarks.bench_dataprep",
    "sampling": "benchmarks.bench_sampling",
    "zero": "benchmarks.bench_zero",
    "bytes": "benchmarks.bench_bytes",
}
#: What ``--quick`` is sized for: all benchmarks together, in seconds, on an idle 2-core machine (issue 18).
QUICK_BUDGET_S = 180.0
# What --quick means in each benchmark's own options. One torch thread where a benchmark takes --threads: on 2 cores
# a second thread mostly spin-waits as soon as anything else runs (measured: benchmarks/RESULTS.md).
QUICK_ARGS: dict[str, list[str]] = {
    "training": ["--quick", "--threads", "1"],
    "storage": ["--size-mb", "72", "--rounds", "2"],  # still above the 64 MiB multipart threshold
    "dataprep": ["--vaes", "tiny", "--clips", "2", "--batch", "2", "--workers", "0", "--no-estimate",
                 "--rank-bytes", "2"],
    "sampling": ["--quick", "--threads", "1"],
    "zero": ["--steps", "1", "--shape", "tiny"],
    "bytes": ["--quick"],
}
DEVICE_AWARE = {"training", "dataprep", "sampling", "zero"}  # benchmarks with a --device option


def benchmark_argv(name: str, *, quick: bool, device: str | None, e2e: bool) -> list[str]:
    """The argv the runner passes to ``benchmarks.bench_<name>.main``."""
    argv = list(QUICK_ARGS[name]) if quick else []
    if device and name in DEVICE_AWARE:
        argv += ["--device", device]
    if e2e and name == "sampling":
        argv.append("--e2e")
    return argv


def _run_one(module_name: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name)
    main = getattr(module, "main", None)
    if main is None:
        raise RuntimeError(f"{module_name} has no main(argv) function; add one so the runner can call it.")
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors and explicit exits
        rc = exc.code if isinstance(exc.code, int) else 1
    return int(rc or 0)


def run_benchmarks(names: Sequence[str], *, quick: bool = False, device: str | None = None, e2e: bool = False) -> int:
    """Run the named benchmarks (all if empty); print each table, then a summary. Returns 0 if none failed."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks").is_dir():
        print("anyflow bench runs from a source checkout (benchmarks/ is not installed with the package)",
              file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    summary = []
    for name in names or list(BENCHMARKS):
        module_name = BENCHMARKS[name]
        argv = benchmark_argv(name, quick=quick, device=device, e2e=e2e)
        print(f"\n=== {name}: python -m {module_name} {' '.join(argv)}".rstrip() + " ===", flush=True)
        if importlib.util.find_spec(module_name) is None:
            print(f"skipped: {module_name.replace('.', '/')}.py is not in this checkout")
            summary.append((name, "skipped", 0.0))
            continue
        t0 = time.perf_counter()
        try:
            rc = _run_one(module_name, argv)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except Exception as exc:  # report and go on: one broken benchmark should not hide the others
            traceback.print_exc()
            status = f"failed ({type(exc).__name__}: {exc})"
        summary.append((name, status, time.perf_counter() - t0))
        sys.stdout.flush()
    print("\n=== summary ===")
    width = max(len(n) for n, _, _ in summary)
    for name, status, sec in summary:
        print(f"{name.ljust(width)}  {sec:7.1f} s  {status}")
    total = sum(sec for _, _, sec in summary)
    print(f"{'total'.ljust(width)}  {total:7.1f} s", end="")
    if quick:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"  (--quick is sized for {QUICK_BUDGET_S:.0f} s on an idle 2-core machine; "
              f"load average here {load:.1f} on {os.cpu_count()} CPUs)", end="")
    print()
    return 1 if any(s.startswith("failed") for _, s, _ in summary) else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this benchmark (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few rounds, one torch thread; sized for all benchmarks together ≤ 3 minutes on an "
                   "idle 2-core machine (the summary prints the total and the load average)")
    p.add_argument("--device", default=None, help="cpu or cuda for the benchmarks that take one (training, dataprep, sampling)")
    p.add_argument("--e2e", action="store_true", help="sampling: also time each stage of `anyflow run` on the tiny preset")


def run_from_args(args: argparse.Namespace) -> int:
    """Run what the parsed ``add_arguments`` options ask for."""
    return run_benchmarks(args.only or [], quick=args.quick, device=args.device, e2e=args.e2e)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks`` (same options as ``anyflow bench``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
