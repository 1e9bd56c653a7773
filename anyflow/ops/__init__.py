"""Operations on top of the stages: periodic re-distillation with a data window, warm start, an
evaluation gate and atomic promotion (``anyflow.ops.redistill``; see docs/operations.md)."""

from __future__ import annotations

from typing import Any


def add_cli(subparsers: Any) -> None:
    """Register ``anyflow redistill``."""
    from anyflow.ops._redistill_cli import add_cli as _add  # light: no torch at --help time

    _add(subparsers)
