"""For the torchrun workers of the resume tests: keep the checkpoints a run prunes.

``anyflow.stages.common.train_resumable`` deletes the older ``step-XXXXXXXX`` folder once a newer checkpoint is
published (rank 0). :func:`keep_pruned` copies each such folder to ``DEST/step-XXXXXXXX`` first, so one
uninterrupted run also leaves the checkpoint that a run preempted at that step would resume from (the tests then
need no separate shorter "preempted" launch). The deletion itself still runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from anyflow import storage
from anyflow.stages import common


def keep_pruned(dest: Path) -> None:
    """Copy every checkpoint folder the run prunes to ``dest`` before it is deleted (local stores only)."""
    remove = common._remove_checkpoint

    def keep_then_remove(url: str) -> None:
        shutil.copytree(storage.local_path(url), Path(dest) / url.rstrip("/").rsplit("/", 1)[1])
        remove(url)

    common._remove_checkpoint = keep_then_remove
