"""ZeRO-1 optimiser-state sharding (``train.shard_optimizer``) under torchrun on CPU (gloo), issue 4.

The reference is plain AdamW on every rank (the replicated layout, itself tested against one process in
tests/test_train_distributed.py). With ZeRO-1 each rank keeps the AdamW moments (and the EMA) of about half
of the trainable tensors and broadcasts its updated tensors; the update must be exactly AdamW's. A 2-rank
on-policy run (two optimisers: generator and critic) with ZeRO-1, interrupted after 2 of 4 steps and
resumed, must end bit for bit where the plain run ends -- adapters, EMA, and the published checkpoint's
optimiser state and EMA, consolidated from both ranks into the same files the plain run writes; and that
checkpoint, written with ZeRO-1, also resumes without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun
from safetensors.torch import load_file

from anyflow.config import get_preset


def _launch(dataset: str, ckpt: Path, out: Path, steps: int, mode: str, *extra: str) -> list[dict]:
    torchrun("zero_worker.py", dataset, ckpt, out, steps, mode, *extra)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_same_checkpoint(a: Path, b: Path, ema: dict) -> None:
    """Checkpoints ``a`` and ``b`` hold the same optimiser tensors, EMA (with the names of ``ema``), optimiser
    metadata and scheduler state: one layout, whoever wrote it."""
    for group in ("generator", "critic"):
        pa, pb = load_file(str(a / f"optim-{group}.safetensors")), load_file(str(b / f"optim-{group}.safetensors"))
        assert pa.keys() == pb.keys() and any(k.endswith(".exp_avg_sq") for k in pa), group
        for k in pa:
            assert torch.equal(pa[k], pb[k]), (group, k)
    ema_a, ema_b = load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))
    assert ema_a.keys() == ema_b.keys() == ema.keys()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    meta_a, meta_b = (json.loads((c / "state.json").read_text()) for c in (a, b))
    assert meta_a["optimizers"] == meta_b["optimizers"] and meta_a["schedulers"] == meta_b["schedulers"]


@pytest.fixture(scope="module")
def plain_run(tiny_chain, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """The reference: 4 on-policy steps on 2 ranks with plain AdamW; the results and the checkpoint store (its
    step-2 checkpoint, pruned at step 4, is kept in out/kept: ``plain_step2``)."""
    root = tmp_path_factory.mktemp("plain")
    return _launch(tiny_chain["dataset"].uri, root / "ckpt", root / "out", 4, "plain", "keep"), root / "ckpt"


@pytest.fixture(scope="module")
def plain_step2(plain_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint store holding plain AdamW's state after 2 of the 4 steps (a run "preempted" there): the
    reference run's own step-2 checkpoint."""
    kept = plain_run[1].parent / "out" / "kept" / "step-00000002"
    assert (kept / "manifest.json").is_file()
    store = tmp_path_factory.mktemp("plain2") / "ckpt"
    shutil.copytree(kept, store / kept.name)
    return store


@pytest.mark.slow
def test_zero1_equals_plain_adamw_and_resumes_exactly(tiny_chain, plain_run, tmp_path: Path) -> None:
    ds = tiny_chain["dataset"].uri
    plain, plain_ckpt = plain_run
    first = _launch(ds, tmp_path / "ckpt-zero", tmp_path / "zero1", 2, "zero1")  # "preempted" at step 2
    shutil.copytree(tmp_path / "ckpt-zero", tmp_path / "ckpt-cross")
    zero = _launch(ds, tmp_path / "ckpt-zero", tmp_path / "zero2", 4, "zero1")
    # the checkpoint ZeRO-1 wrote resumes in the other layout too
    cross = _launch(ds, tmp_path / "ckpt-cross", tmp_path / "cross", 4, "plain")

    assert first[0]["resumed_from"] == 0 and zero[0]["resumed_from"] == 2
    # identical training on every rank
    for run in (zero, cross):
        for r in range(2):
            for key in ("params", "ema"):
                assert plain[r][key].keys() == run[r][key].keys()
                for name, value in plain[r][key].items():
                    assert torch.equal(run[r][key][name], value), (r, key, name)
    assert cross[0]["resumed_from"] == 2
    assert [z["wrapper_state"] for z in zero] == [0, 0]  # no second copy of the moments after the resume
    # the control: steps 3-4 (after the resume) moved the adapters, so the equality is not vacuous
    assert any(not torch.equal(first[0]["params"][n], v) for n, v in plain[0]["params"].items())

    # the published checkpoints hold the same optimiser state and EMA, consolidated from both ranks
    _assert_same_checkpoint(plain_ckpt / "step-00000004", tmp_path / "ckpt-zero" / "step-00000004", plain[0]["ema"])

    # and the moments really are split: each rank holds part of them, together all of them once
    total = plain[0]["optimizer_shard"]["params"]
    assert [p["optimizer_shard"]["local_params"] for p in plain] == [total] * 2
    local = [z["optimizer_shard"]["local_params"] for z in zero]
    assert sum(local) == total and max(local) < 0.6 * total, (local, total)
    assert [p["moments_held"] for p in plain] == [2 * total] * 2  # exp_avg + exp_avg_sq of everything
    assert [z["moments_held"] for z in zero] == [2 * n for n in local]
    # so is the EMA (the generator's), which is whole again in the result every rank exports
    ema_total = plain[0]["optimizer_shard"]["ema_params"]
    assert [p["optimizer_shard"]["local_ema_params"] for p in plain] == [ema_total] * 2
    ema_local = [z["optimizer_shard"]["local_ema_params"] for z in zero]
    assert sum(ema_local) == ema_total and max(ema_local) < 0.6 * ema_total, (ema_local, ema_total)


def test_big_presets_shard_the_optimizer_and_tiny_does_not() -> None:
    # one process (the tiny preset on a laptop) has nothing to shard; the Wan presets run on 8+ GPUs
    assert not get_preset("tiny").distill.train.shard_optimizer
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        p = get_preset(name)
        assert all(getattr(p, s).train.shard_optimizer for s in ("teacher", "flowmap", "distill", "finetune")), name


@pytest.mark.slow
def test_deepspeed_zero_equals_plain_adamw_and_checkpoints_cross_layouts(
    tiny_chain, plain_run, plain_step2, tmp_path: Path
) -> None:
    """train.deepspeed: one DeepSpeed ZeRO engine per optimiser group (generator, critic) over the shared base.
    ZeRO-2 interrupted after 2 of 4 steps and resumed ends where plain AdamW ends (on 2 gloo ranks the
    averaging and clipping round the same, so bit for bit); its checkpoint is the plain layout (the same
    files, optimiser tensors and metadata) and resumes without DeepSpeed; a plain checkpoint resumes under
    ZeRO-1 and under ZeRO-2 with the optimiser state offloaded to the CPU."""
    ds = tiny_chain["dataset"].uri
    plain, plain_ckpt = plain_run
    _launch(ds, tmp_path / "ckpt-ds", tmp_path / "ds-a", 2, "ds:zero2")  # "preempted" at step 2
    shutil.copytree(tmp_path / "ckpt-ds", tmp_path / "ckpt-cross")
    zero2 = _launch(ds, tmp_path / "ckpt-ds", tmp_path / "ds-b", 4, "ds:zero2")
    cross = _launch(ds, tmp_path / "ckpt-cross", tmp_path / "cross", 4, "plain")
    runs = {"zero2": zero2, "zero2 -> plain": cross}
    for mode in ("ds:zero1", "ds:zero2_offload"):  # the plain run's step-2 checkpoint, resumed under DeepSpeed
        store = tmp_path / f"ckpt-{mode[3:]}"
        shutil.copytree(plain_step2, store)
        runs[f"plain -> {mode}"] = _launch(ds, store, tmp_path / mode[3:], 4, mode)

    for label, run in runs.items():
        assert [r["resumed_from"] for r in run] == [2, 2], label
        for r in range(2):
            for key in ("params", "ema"):
                assert plain[r][key].keys() == run[r][key].keys(), (label, key)
                for name, value in plain[r][key].items():
                    assert torch.equal(run[r][key][name], value), (label, r, key, name)
    assert [z["zero_stage"] for z in zero2] == [2, 2]
    assert [z["zero_stage"] for z in runs["plain -> ds:zero1"]] == [1, 1]
    assert [z["zero_stage"] for z in cross] == [0, 0]

    _assert_same_checkpoint(plain_ckpt / "step-00000004", tmp_path / "ckpt-ds" / "step-00000004", plain[0]["ema"])

    # each rank keeps the AdamW moments of about half of the trainable elements
    total = plain[0]["optimizer_shard"]["params"]
    ema_total = plain[0]["optimizer_shard"]["ema_params"]
    for run in (zero2, runs["plain -> ds:zero1"], runs["plain -> ds:zero2_offload"]):
        local = [z["optimizer_shard"]["local_params"] for z in run]
        assert sum(local) == total and max(local) < 0.6 * total, (local, total)
        # AdamW's moments over this rank's flat partition (alignment padding included, so at least 2 x local)
        assert all(2 * n <= z["moments_held"] <= 2 * n + 64 for n, z in zip(local, run, strict=True))
        # and the generator's EMA, kept beside its moments over the same partition
        ema_local = [z["optimizer_shard"]["local_ema_params"] for z in run]
        assert sum(ema_local) == ema_total and max(ema_local) < 0.6 * ema_total, (ema_local, ema_total)
