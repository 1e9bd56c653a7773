"""Exact resume: N steps straight == N/2 steps, stop, resume, N/2 steps (bit-for-bit on CPU) for the
flow-map and on-policy methods (issue 4); and, on the same tiny on-policy run, the loop's bf16 storage of the
frozen teacher adapter under bf16 mixed precision changes nothing."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers.states import random_adapter_state as _random_state
from helpers.states import trained_state

from anyflow.config import get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models import lora
from anyflow.models.loading import load_base
from anyflow.train.adapters import AdapterModel
from anyflow.train.checkpoint import load_training_state
from anyflow.train.loop import fit
from anyflow.train.methods import FlowMapMethod, OnPolicyMethod

STEPS = 4



def _build(kind: str, dataset: str, **train):
    preset = get_preset("tiny")
    base = load_base("builtin:tiny")
    models = AdapterModel(base.transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
    data = LatentDataset(dataset, batch_size=2, seed=0)
    neg = data.negative_embedding()
    if kind == "flowmap":
        tr = dataclasses.replace(preset.flowmap.train, steps=STEPS, checkpoint_every=2, **train)
        method = FlowMapMethod(models, dataclasses.replace(preset.flowmap, train=tr), neg)
    else:
        tr = dataclasses.replace(preset.distill.train, steps=STEPS, checkpoint_every=2, ema_warmup_step=2, **train)
        probe = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
        probe.add("t", "teacher")
        probe.add("g", "generator")
        method = OnPolicyMethod(
            models, dataclasses.replace(preset.distill, train=tr, steps_list=(2, 4, 50)), neg,
            teacher=_random_state(probe, "t", 1), generator=_random_state(probe, "g", 2),
        )
    return method, tr, data, models


def _optimizer_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.name}/{k}": v for f in sorted(ckpt.glob("optim-*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("kind", ["flowmap", "onpolicy"])
def test_resume_is_bit_for_bit(kind: str, tiny_chain, tmp_path: Path) -> None:
    dataset = tiny_chain["dataset"].uri
    method, tr, data, _ = _build(kind, dataset)
    straight = fit(method, tr, data, work_dir=tmp_path / "straight", progress=False)
    want = trained_state(straight, method)

    method, tr, data, _ = _build(kind, dataset)
    first = fit(method, tr, data, work_dir=tmp_path / "first", stop_after=STEPS // 2, progress=False)
    assert first.steps == STEPS // 2
    method, tr, data, _ = _build(kind, dataset)
    resumed = fit(method, tr, data, work_dir=tmp_path / "second", resume_from=tmp_path / "first" / "checkpoint",
                  progress=False)
    assert resumed.resumed_from == STEPS // 2 and resumed.steps == STEPS
    got = trained_state(resumed, method)

    assert want.keys() == got.keys()
    changed = 0
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after resume"
    # training really moved the parameters (otherwise equality would prove nothing)
    method0, *_ = _build(kind, dataset)
    for g, (ps, _) in method0.optim_groups().items():
        changed += sum(not torch.equal(p, want[f"param/{g}/{k}"]) for k, p in ps.items())
    assert changed > 0
    assert _optimizer_tensors(tmp_path / "straight" / "checkpoint").keys() == _optimizer_tensors(tmp_path / "second" / "checkpoint").keys()
    for k, v in _optimizer_tensors(tmp_path / "straight" / "checkpoint").items():
        assert torch.equal(v, _optimizer_tensors(tmp_path / "second" / "checkpoint")[k]), k
    # the log carries across the interruption: one record per step
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (tmp_path / "second" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_checkpoint_of_another_architecture_is_refused(tiny_chain, tmp_path: Path) -> None:
    dataset = tiny_chain["dataset"].uri
    method, tr, data, _ = _build("flowmap", dataset)
    fit(method, tr, data, work_dir=tmp_path / "a", stop_after=2, progress=False)
    # a method with another adapter layout (teacher targets) cannot load the flow-map state
    from anyflow.train.methods import TeacherMethod

    preset = get_preset("tiny")
    models = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
    teacher = TeacherMethod(models, preset.teacher, data.negative_embedding())
    params = {f"{g}/{k}": p for g, (ps, _) in teacher.optim_groups().items() for k, p in ps.items()}
    with pytest.raises(ValueError, match="does not match this model"):
        load_training_state(tmp_path / "a" / "checkpoint", params=params, ema={}, optimizers={}, schedulers={}, generators={})


def test_bf16_loop_stores_the_frozen_teacher_in_bf16_without_changing_training(tiny_chain, tmp_path: Path,
                                                                                monkeypatch) -> None:
    # Under bf16 autocast every matmul rounds the fp32 teacher LoRA weights to bf16; storing them rounded
    # (half the memory) must give the same run bit for bit. Reference: the same run with the storage left fp32.
    from accelerate.state import AcceleratorState

    def fresh_precision() -> None:  # accelerate's process-wide state fixes the precision; monkeypatch restores it
        monkeypatch.setattr(AcceleratorState, "_shared_state", {})

    fresh_precision()
    dataset = tiny_chain["dataset"].uri
    method, tr, data, models = _build("onpolicy", dataset, mixed_precision="bf16")
    teacher = lora.trainable_parameters(models.transformer, "teacher")
    before = {k: p.detach().clone() for k, p in teacher.items()}
    seen: set[torch.dtype] = set()
    step = method.train_step
    method.train_step = lambda ctx, i: (seen.update(p.dtype for p in teacher.values()), step(ctx, i))[1]
    run = fit(method, tr, data, work_dir=tmp_path / "bf16", progress=False)
    got = trained_state(run, method)
    assert seen == {torch.bfloat16}  # while training
    assert {p.dtype for g, (ps, _) in method.optim_groups().items() for p in ps.values()} == {torch.float32}
    assert all(torch.equal(p, before[k]) for k, p in teacher.items())  # after: the exact fp32 values again
    assert any(b.float().ne(b.bfloat16().float()).any() for b in before.values())  # which bf16 cannot hold

    monkeypatch.setattr(AdapterModel, "frozen_adapters_stored_in", lambda self, dtype: contextlib.nullcontext())
    method, tr, data, models = _build("onpolicy", dataset, mixed_precision="bf16")
    ref = fit(method, tr, data, work_dir=tmp_path / "fp32", progress=False)
    want = trained_state(ref, method)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # the control: bf16 autocast really rounds (the fp32 run of the same method ends elsewhere)
    fresh_precision()
    method, tr, data, models = _build("onpolicy", dataset, mixed_precision="no")
    full = trained_state(fit(method, tr, data, work_dir=tmp_path / "no", progress=False), method)
    assert any(not torch.equal(full[k], want[k]) for k in want)
