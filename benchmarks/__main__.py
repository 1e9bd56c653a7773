"""``python -m benchmarks [--quick] [--only NAME] [--device cuda] [--e2e]``: every benchmark, one table each.

The same runner as ``anyflow bench`` (:mod:`anyflow.bench`).
"""

from __future__ import annotations

from anyflow.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
