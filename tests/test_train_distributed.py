"""Data parallel on CPU (gloo, 2 ranks under torchrun): ranks see different samples yet end with
identical adapter weights — the loop's gradient averaging works (issue 4, multi-GPU semantics)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"


@pytest.mark.slow
def test_two_ranks_stay_in_sync(tiny_chain, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), tiny_chain["dataset"].uri, str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert set(r0["keys"]).isdisjoint(r1["keys"]), "each rank must read its own samples"
    assert r0["hash"] == r1["hash"], "ranks diverged: gradients were not averaged"
