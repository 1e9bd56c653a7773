"""``anyflow bench``: the benchmarks (``anyflow.bench`` runs them; same as ``python -m benchmarks``)."""

from __future__ import annotations

from typing import Any


def add_cli(sub: Any) -> None:
    from anyflow.bench import add_arguments, run_from_args

    p = sub.add_parser("bench", help="run the benchmarks and print ratio tables",
                       description="Benchmarks measure side by side in one run and print ratios; times are indicative. "
                                   "Same as `python -m benchmarks`.")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
