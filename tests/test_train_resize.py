"""Resume on another number of processes (issue 23 item 2; docs/operations.md, "Resume on another number of
processes").

A checkpoint holds nothing per rank: whole per-parameter tensors (adapters, AdamW moments, EMA), one global
sample cursor, and no random state (every micro-batch's draws come from (seed, step, global micro-batch)). A
stage preempted on W ranks therefore resumes on W' ranks with the same global batch (W·A = W'·A' micro-batches
per step, ``train.grad_accum`` = A), and the stage key folds the process count into ``grad_accum`` so that the
resumed run finds the checkpoint folder.

What is bit-for-bit and what is not, and why:

* **bit-for-bit**: which samples each step trains on (the global micro-batch g = j·W + r reads global batch g of
  the loader whatever W is), the step count and LR schedule, and the per-parameter key layout of the checkpoint;
  each micro-batch's own forward pass and random draws are identical too (same sample, same (seed, step, g) seed,
  micro-batches of one sample in every layout).
* **within float tolerance only**: the trained weights, EMA and AdamW moments. The gradient of a step is the same
  sum of W·A per-micro-batch gradients, but summed in another order and grouping (A local accumulations of
  ``loss / A`` then an all-reduce over W ranks divided by W: (2 ranks × 2) vs (1 × 4) vs (4 × 1)), and
  floating-point addition is not associative; the forward loss's adaptive-scaling mean over the gathered
  diffusion pairs is likewise summed in another order. AdamW then carries these ~1e-8 relative differences on.
  (Resuming on the *same* number of ranks stays bit-for-bit: tests/test_train_resume_ranks.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun
from safetensors.torch import load_file

from anyflow.config import apply_overrides, get_preset
from anyflow.stages import cache_key, stage_module

ATOL, RTOL = 2e-6, 1e-4


def _dataset(root: Path) -> str:
    """16 samples in the tiny preset's latent / text shapes (a prepared dataset's layout, written directly: the
    test is about the loop, not about encoding), two shards of 8."""
    from safetensors.torch import save_file

    from anyflow.data.shards import NEGATIVE, NEGATIVE_KEY, ShardWriter

    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(root, samples_per_shard=8)
    for i in range(16):
        writer.add(
            f"clip-{i:03d}", torch.randn(3, 4, 4, 4, generator=g), torch.randn(16, 32, generator=g), f"c{i}"
        )
    writer.close()
    save_file({NEGATIVE_KEY: torch.randn(1, 16, 32, generator=g)}, str(root / NEGATIVE))
    return str(root)


def _launch(
    dataset: str, ckpt: Path, out: Path, steps: int, world: int, accum: int, *extra: str
) -> list[dict]:
    torchrun("resize_worker.py", dataset, str(ckpt), str(out), str(steps), str(accum), *extra, world=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _preempted_at_step_2(tmp_path: Path, *ckpts: str) -> Path:
    """What a run preempted right after step 2 leaves: the uninterrupted run's own step-2 checkpoint (the 4-step
    run launched with ``keep`` copied it to a/kept before pruning it), as the only checkpoint of each of the store
    folders ``ckpts``. Returns the kept folder."""
    kept = tmp_path / "a" / "kept" / "step-00000002"
    assert (kept / "manifest.json").is_file(), sorted(p.name for p in kept.parent.iterdir())
    for name in ckpts:
        shutil.copytree(kept, tmp_path / name / kept.name)
    return kept


def _global_batches(ranks: list[dict], accum: int, first_call: int, steps: int) -> list[list[list[str]]]:
    """Per step, the keys of global micro-batches 0..W·A-1 (micro-batch j of rank r is global j·W + r), from the
    per-rank call logs starting at this rank's call ``first_call``."""
    world = len(ranks)
    out = []
    for s in range(steps):
        step = [None] * (world * accum)
        for r, rec in enumerate(ranks):
            for j in range(accum):
                step[j * world + r] = rec["keys"][first_call + s * accum + j]
        out.append(step)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_and_on_four_ranks(tmp_path: Path) -> None:
    """Train 4 steps of a global batch of 4 one-sample micro-batches on 2 ranks (grad_accum 2), checkpoint at
    step 2 (kept: a run preempted there leaves just that checkpoint); resume from that step-2 checkpoint on 1 rank (grad_accum 4) and on 4 ranks (grad_accum 1), and compare
    each with the uninterrupted 2-rank run: the same samples per step exactly, the same weights, EMA and moments
    within float tolerance (module docstring: why not bit-for-bit). Resumed on 2 ranks again it is bit-for-bit."""
    ds = _dataset(tmp_path / "data")
    straight = _launch(ds, tmp_path / "ckpt-a", tmp_path / "a", 4, 2, 2, "keep")
    kept = _preempted_at_step_2(tmp_path, "ckpt-b", "ckpt-c", "ckpt-e")
    same = _launch(ds, tmp_path / "ckpt-e", tmp_path / "same", 4, world=2, accum=2)
    one = _launch(ds, tmp_path / "ckpt-b", tmp_path / "one", 4, world=1, accum=4)
    four = _launch(ds, tmp_path / "ckpt-c", tmp_path / "four", 4, world=4, accum=1)

    want_batches = _global_batches(
        straight, 2, first_call=2 * 2, steps=2
    )  # steps 3 and 4 of the straight run
    checkpoint = load_file(str(kept / "optim-generator.safetensors"))
    want_moments = load_file(str(tmp_path / "ckpt-a" / "step-00000004" / "optim-generator.safetensors"))
    # on the same number of ranks: bit-for-bit (the same sums in the same order)
    for r in range(2):
        assert same[r]["resumed_from"] == 2 and same[r]["keys"] == straight[r]["keys"][4:], r
        for key in ("params", "ema"):
            assert all(torch.equal(same[r][key][k], v) for k, v in straight[r][key].items()), (r, key)
    at_2 = {  # the generator's weights after step 2
        k.removeprefix("generator/"): v for k, v in load_file(str(kept / "params.safetensors")).items()
        if k.startswith("generator/")
    }
    moved = _max_diff(straight[0]["params"], at_2)  # how far steps 3-4 move the weights
    worst = 0.0
    for name, run, accum, ckpt in (("1 rank", one, 4, "ckpt-b"), ("4 ranks", four, 1, "ckpt-c")):
        assert all(r["resumed_from"] == 2 for r in run), name
        # bit-for-bit: the samples of every step, and the loader's global cursor after them
        assert _global_batches(run, accum, first_call=0, steps=2) == want_batches, name
        assert {r["data"]["sample_cursor"] for r in run} == {straight[0]["data"]["sample_cursor"]} == {16}, (
            name
        )
        # within tolerance: weights and EMA on every rank, and the AdamW moments of the final checkpoint, which
        # hold the same per-parameter keys whatever the process count
        for r in run:
            for key in ("params", "ema"):
                diff = _max_diff(r[key], straight[0][key])
                print(f"{name} {key}: max |resumed - straight| = {diff:.3g}")
                assert diff <= ATOL, (name, key, diff)
                worst = max(worst, diff)
        moments = load_file(str(tmp_path / ckpt / "step-00000004" / "optim-generator.safetensors"))
        assert sorted(moments) == sorted(want_moments) == sorted(checkpoint), name
        for k, v in moments.items():
            torch.testing.assert_close(v, want_moments[k], atol=ATOL, rtol=RTOL, msg=f"{name}: {k}")
    # the control: steps 3-4 move the weights by far more than the resumed runs differ, so agreement is not vacuous
    print(f"steps 3-4 move the weights by up to {moved:.3g}")
    assert moved > 100 * ATOL and moved > 1000 * worst, (moved, worst)
    assert all(
        k.startswith("state.") and not k.split(".")[1].isdigit() for k in want_moments
    )  # keyed by name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero", "ds:zero2"])
def test_a_sharded_optimizer_checkpoint_is_re_sharded_on_another_number_of_ranks(
    tmp_path: Path, mode: str
) -> None:
    """The same with the optimiser state sharded over the ranks: ``zero`` = ``train.shard_optimizer`` (ZeRO-1: each
    rank keeps the AdamW moments and EMA of its own tensors), ``ds:zero2`` = ``train.deepspeed=zero2`` (DeepSpeed
    ZeRO-2, flat partitions). The 2-rank checkpoint holds the state whole (gathered on save); on 4 ranks the
    loading optimiser keeps each rank's new share (ZeroRedundancyOptimizer's ``load_state_dict``, DeepSpeed's
    ``safe_set_full_optimizer_state``), on 1 rank one process takes it all. Same samples exactly, same weights and
    EMA within float tolerance (module docstring)."""
    ds = _dataset(tmp_path / "data")
    straight = _launch(ds, tmp_path / "ckpt-a", tmp_path / "a", 4, 2, 2, mode, "keep")
    _preempted_at_step_2(tmp_path, "ckpt-b", "ckpt-c")
    one = _launch(ds, tmp_path / "ckpt-b", tmp_path / "one", 4, 1, 4, mode)
    four = _launch(ds, tmp_path / "ckpt-c", tmp_path / "four", 4, 4, 1, mode)
    total = straight[0]["optimizer_shard"]["params"]
    assert [r["optimizer_shard"]["local_params"] for r in one] == [total]  # one process: no sharding
    assert (
        sum(r["optimizer_shard"]["local_params"] for r in four) >= total
    )  # four shares (DeepSpeed pads) ...
    assert max(r["optimizer_shard"]["local_params"] for r in four) < total  # ... none of them whole
    want_batches = _global_batches(straight, 2, first_call=4, steps=2)
    want_moments = load_file(str(tmp_path / "ckpt-a" / "step-00000004" / "optim-generator.safetensors"))
    for name, run, accum, ckpt in (("1 rank", one, 4, "ckpt-b"), ("4 ranks", four, 1, "ckpt-c")):
        assert _global_batches(run, accum, first_call=0, steps=2) == want_batches, name
        for r in run:
            for key in ("params", "ema"):
                diff = _max_diff(r[key], straight[0][key])
                print(f"{mode}, {name} {key}: max |resumed - straight| = {diff:.3g}")
                assert diff <= ATOL, (name, key, diff)
        moments = load_file(str(tmp_path / ckpt / "step-00000004" / "optim-generator.safetensors"))
        assert sorted(moments) == sorted(want_moments), name
        for k, v in moments.items():
            torch.testing.assert_close(v, want_moments[k], atol=ATOL, rtol=RTOL, msg=f"{name}: {k}")


def test_the_stage_key_holds_the_global_batch_not_the_process_count() -> None:
    """W processes × grad_accum A train what W·A micro-batches per step train (test above), so they share a key
    (and so a checkpoint folder): 8 × 1 = 4 × 2 = 2 × 4 = 1 × 8. Another global batch is another key; a stage with
    no training keeps the process count."""
    sections = stage_module("train_flowmap").SECTIONS
    inputs = {"dataset": "0" * 64}

    def key(world: int, accum: int, stage: str = "train_flowmap") -> str:
        cfg = apply_overrides(get_preset("tiny"), {"flowmap.train.grad_accum": accum})
        return cache_key(
            stage,
            cfg,
            sections if stage != "evaluate" else stage_module("evaluate").SECTIONS,
            inputs,
            world_size=world,
        )

    assert key(8, 1) == key(4, 2) == key(2, 4) == key(1, 8)
    assert key(2, 1) != key(2, 2) and key(1, 1) != key(2, 1)
    assert key(1, 1, "evaluate") != key(2, 1, "evaluate")


def test_optimizer_state_is_keyed_by_parameter_name_and_old_per_rank_checkpoints_are_refused(
    tmp_path: Path,
) -> None:
    """The moments are stored under the parameters' names (``state.<name>.<key>``), so a reader whose optimiser
    lists the same parameters in another order gets each moment back on its own parameter (an index-keyed layout
    would hand it to whichever parameter now sits at that position); a checkpoint of the older per-rank layout is
    refused naming it."""
    import json

    from anyflow.train.checkpoint import load_training_state, save_training_state

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    (a.sum() * 2 + b.sum() * 5).backward()
    opt.step()
    save_training_state(
        tmp_path / "ck",
        step=1,
        params={"a": a, "b": b},
        ema={},
        optimizers={"g": opt},
        schedulers={},
        data_state={},
        param_names={"g": ["a", "b"]},
    )
    files = load_file(str(tmp_path / "ck" / "optim-g.safetensors"))
    assert sorted(files) == [
        "state.a.exp_avg",
        "state.a.exp_avg_sq",
        "state.a.step",
        "state.b.exp_avg",
        "state.b.exp_avg_sq",
        "state.b.step",
    ]
    a2, b2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt2 = torch.optim.AdamW([b2, a2], lr=0.1)  # the other order
    load_training_state(
        tmp_path / "ck",
        params={"a": a2, "b": b2},
        ema={},
        optimizers={"g": opt2},
        schedulers={},
        param_names={"g": ["b", "a"]},
    )
    # the reference: what the first optimiser holds for each parameter
    assert torch.equal(opt2.state[a2]["exp_avg"], opt.state[a]["exp_avg"])
    assert torch.equal(opt2.state[b2]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    (tmp_path / "ck" / "state.json").write_text(json.dumps({**state, "ranks": [{"data": {}}, {"data": {}}]}))
    with pytest.raises(ValueError, match="per-rank random states and data positions"):
        load_training_state(
            tmp_path / "ck",
            params={"a": a2, "b": b2},
            ema={},
            optimizers={"g": opt2},
            schedulers={},
            param_names={"g": ["b", "a"]},
        )
