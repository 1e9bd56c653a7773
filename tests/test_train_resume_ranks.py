"""Preemption-safe training with several processes (torchrun, gloo on CPU; issue 9).

Every rank used to publish its own checkpoint to the same store folder: the ranks' random states and
data positions differ, so the published checkpoint mixed ranks (its manifest could disagree with its
files) and on resume every rank loaded one rank's loader state -- which the loader refuses ("loader state
has rank=0 but this loader … has rank=1"). Now rank 0 publishes one checkpoint whose state is the same for
every rank (a global data cursor; random draws derived from (seed, step, micro-batch), so no per-rank random
state; tests/test_train_resize.py resumes it on another number of ranks), and a 2-rank run interrupted after
2 of 4 steps and resumed ends bit-for-bit where the uninterrupted run ends, on both ranks. Likewise every rank published the stage's final
artifact (rank 1 with an empty training log); now only rank 0 does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun


def _launch(dataset: str, ckpt: Path, out: Path, steps: int, world: int = 2) -> list[dict]:
    torchrun("resume_worker.py", dataset, str(ckpt), str(out), str(steps), world=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow
def test_two_rank_run_resumed_midway_equals_the_straight_run(tiny_chain, tmp_path: Path) -> None:
    ds = tiny_chain["dataset"].uri
    straight = _launch(ds, tmp_path / "ckpt-a", tmp_path / "a", 4)
    first = _launch(ds, tmp_path / "ckpt-b", tmp_path / "b1", 2)  # "preempted" after its step-2 checkpoint
    resumed = _launch(ds, tmp_path / "ckpt-b", tmp_path / "b2", 4)

    published = sorted({f.relative_to(tmp_path / "ckpt-b").parts[0] for f in (tmp_path / "ckpt-b").rglob("*")
                        if f.is_file()})
    assert published == ["step-00000004"], published  # one checkpoint, the older one's files removed
    for r in range(2):
        assert first[r]["resumed_from"] == 0 and resumed[r]["resumed_from"] == 2, r
        assert resumed[r]["data"]["rank"] == r and resumed[r]["data"] == straight[r]["data"], r
        for key in ("params", "ema"):
            for name, value in straight[r][key].items():
                assert torch.equal(resumed[r][key][name], value), (r, key, name)
    # one global position: the ranks agree on it (it is what the checkpoint holds, for every rank)
    assert straight[0]["data"]["sample_cursor"] == straight[1]["data"]["sample_cursor"] == 4 * 2 * 2


@pytest.mark.slow
def test_a_stage_under_torchrun_publishes_one_complete_artifact(tiny_chain, tmp_path: Path) -> None:
    # Every rank runs the stage; only rank 0 (which writes the training log) publishes the artifact.
    import json

    from pipeline_fixtures import FAST

    from anyflow import storage

    overrides = {**FAST, "flowmap.train.steps": 4, "flowmap.train.batch_size": 2}
    torchrun("stage_worker.py", "train_flowmap", str(tmp_path / "store"), tiny_chain["dataset"].uri,
             json.dumps(overrides))
    records = [json.loads(line) for r in range(2) for line in (tmp_path / f"records-rank{r}.jsonl").read_text().splitlines()]
    (uri,) = {r["uri"] for r in records if "uri" in r}  # both ranks name the same artifact
    publishers = {(r["published"], r["rank"]) for r in records if "published" in r}
    assert {rank for _, rank in publishers} == {0}, publishers  # checkpoints and the artifact: rank 0 only
    manifest = storage.verify(uri)  # re-hashes every file
    log = (Path(uri) / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log][-1] == 4, log  # rank 0's log, not an empty one
    assert manifest["extra"]["stage"] == "train_flowmap"
    # the key holds the 2 processes: a launcher of a 2-process job finds this artifact, a 1-process run does not
    from anyflow.stages import prelaunch_check

    args = dict(preset="tiny", overrides=overrides, inputs={"dataset": tiny_chain["dataset"].uri},
                store=str(tmp_path / "store"))
    assert prelaunch_check("train_flowmap", world_size=2, **args) == uri
    assert prelaunch_check("train_flowmap", world_size=1, **args) is None
