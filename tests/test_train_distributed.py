"""Data parallel on CPU (gloo, 2 ranks under torchrun): ranks see different samples yet end with
identical adapter weights — the loop's gradient averaging works (issue 4, multi-GPU semantics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.launch import torchrun


@pytest.mark.slow
def test_two_ranks_stay_in_sync(tiny_chain, tmp_path: Path) -> None:
    torchrun("ddp_worker.py", tiny_chain["dataset"].uri, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert set(r0["keys"]).isdisjoint(r1["keys"]), "each rank must read its own samples"
    assert r0["hash"] == r1["hash"], "ranks diverged: gradients were not averaged"
