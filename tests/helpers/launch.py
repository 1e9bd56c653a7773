"""Run a test worker under torchrun on the CPU (gloo ranks): the one launcher of the multi-process tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).parent


def torchrun(worker: str, *args: str, world: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node WORLD helpers/WORKER ARGS…`` with one OpenMP thread per rank.

    Skips the test when torchrun is not installed; fails it, with the end of stderr, when the workers fail.
    """
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not found next to the interpreter")
    proc = subprocess.run(
        [exe, "--standalone", "--nproc_per_node", str(world), str(HELPERS / worker), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
