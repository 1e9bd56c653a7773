"""``anyflow bench``: the benchmarks (``anyflow.bench`` runs them; same as ``python -m benchmarks``)."""

from __future__ import annotations

from typing import Any


def add_cli(sub: Any) -> None:
    from anyflow.bench import add_arguments, run_from_args

    p = sub.add_parser("bench", help="run the benchmarks and print ratio tables",
                       description="Benchmarks alternate the compared sides in one process and print min/median ratios "
                                   "with the number of pairs; times are indicative. --quick is a smoke run (sized for all "
                                   "benchmarks together <= 3 minutes on an idle 2-core machine). Same as `python -m benchmarks`.")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
