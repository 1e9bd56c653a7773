"""The exit-code contract of every anyflow process: the command line and the stage entry points.

Below both ``anyflow.cli`` and ``anyflow.stages`` (the stages' ``python -m`` entry points need it, and the
command line sits on top of the stages), so no domain module imports the command line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run_with_exit_codes(func: Callable[..., int | None], *args: Any) -> int:
    """Call ``func`` and map known failures to one clear sentence and an exit code.

    0 ok; 1 failure (artifact refused, training diverged); 2 bad input (config, stage inputs, missing
    file); 75 preempted (SIGTERM after a checkpoint: retryable); 130 interrupted. Shared by ``anyflow``
    (``anyflow.cli``) and ``python -m anyflow.stages.<name>`` (what a Trainer job runs), which is why it
    lives below both.
    """
    from anyflow.config import ConfigError, StageInputError

    try:
        return int(func(*args) or 0)
    except (ConfigError, StageInputError, FileNotFoundError) as exc:
        print(f"anyflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anyflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one clear sentence for known failures
        from anyflow import storage
        from anyflow.train.loop import PREEMPTED_EXIT_CODE, Preempted, TrainingDiverged

        if isinstance(exc, Preempted):
            print(f"anyflow: {exc}", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        from anyflow.data.prepare import DataPrepError

        if isinstance(exc, DataPrepError):  # bad input data (strict mode, or nothing usable)
            print(f"anyflow: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, (storage.ArtifactError, TrainingDiverged)):
            print(f"anyflow: error: {exc}", file=sys.stderr)
            return 1
        raise
