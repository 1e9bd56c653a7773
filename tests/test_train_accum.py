"""Gradient accumulation (``train.grad_accum``) for the flow-map and on-policy methods.

Reference: one step on the concatenation of the A micro-batches (accum = 1, batch A·b) with the same
random numbers (recorded per micro-batch and replayed batched, tests/helpers/replay.py). What must hold:

* DMD normalises per sample and the critic loss is a per-sample mean, so those parts are exact;
* the forward flow-map loss's pair split and adaptive-scaling mean use batch statistics; the method
  makes them global over the accumulated batch (``ForwardAccumulator``), so it is exact too. The
  negative control shows that a per-micro-batch adaptive-scaling mean would *not* be;
* every micro-batch of one update uses the same (N, k) plan, and resume stays bit-for-bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers.replay import (
    ListBatches,
    Recorder,
    Replayer,
    SegmentedBatches,
    concat_batches,
    record_optimizer_grads,
    record_step_metrics,
)
from helpers.states import random_adapter_state as _random_state

from anyflow.config import get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models.loading import load_base
from anyflow.train import methods
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import fit
from anyflow.train.methods import FlowMapMethod, OnPolicyMethod, rollout_plan

STEPS = 3
STEPS_LIST = (2, 4, 50)



def _build(kind: str, neg: torch.Tensor, *, accum: int, batch: int, steps: int = STEPS):
    preset = get_preset("tiny")
    models = AdapterModel(
        load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False
    )
    if kind == "flowmap":
        tr = dataclasses.replace(
            preset.flowmap.train, steps=steps, batch_size=batch, grad_accum=accum, checkpoint_every=2
        )
        method = FlowMapMethod(models, dataclasses.replace(preset.flowmap, train=tr), neg)
    else:
        tr = dataclasses.replace(
            preset.distill.train,
            steps=steps,
            batch_size=batch,
            grad_accum=accum,
            checkpoint_every=2,
            ema_warmup_step=2,
        )
        probe = AdapterModel(
            load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False
        )
        probe.add("t", "teacher")
        probe.add("g", "generator")
        method = OnPolicyMethod(
            models,
            dataclasses.replace(preset.distill, train=tr, steps_list=STEPS_LIST),
            neg,
            teacher=_random_state(probe, "t", 1),
            generator=_random_state(probe, "g", 2),
        )
    return method, tr, models


def _params(method) -> dict[str, torch.Tensor]:
    return {
        f"{g}/{k}": p.detach().clone() for g, (ps, _) in method.optim_groups().items() for k, p in ps.items()
    }


def _run(method, tr, batches, work: Path, log):
    """fit() recording the metrics of every step and the gradients of every optimiser step."""
    grads: list[list[torch.Tensor]] = []
    metrics = record_step_metrics(method)
    with log.active(), record_optimizer_grads(grads):
        result = fit(method, tr, batches, work_dir=work, progress=False)
    return result, metrics, grads


def _accumulated_and_reference(kind: str, dataset: str, tmp: Path, accum: int = 2, b: int = 2):
    data = LatentDataset(dataset, batch_size=b, seed=0)
    neg = data.negative_embedding()
    rec, kept = Recorder(), []
    method, tr, _ = _build(kind, neg, accum=accum, batch=b)
    res_a, met_a, grads_a = _run(method, tr, SegmentedBatches(data, rec, kept), tmp / "accum", rec)
    assert rec.segments[0] == [], "no draws before the first batch"
    per_step = len(kept) // STEPS
    assert per_step == accum * (2 if kind == "onpolicy" else 1)
    # reference: each group of `accum` consecutive micro-batches is one batch of accum·b samples
    ref_batches = [concat_batches(kept[i : i + accum]) for i in range(0, len(kept), accum)]
    groups = [[rec.segments[i + 1 + j] for j in range(accum)] for i in range(0, len(kept), accum)]
    rep = Replayer(groups)
    ref, tr_ref, _ = _build(kind, neg, accum=1, batch=accum * b)
    res_b, met_b, grads_b = _run(
        ref, tr_ref, SegmentedBatches(ListBatches(ref_batches), rep), tmp / "ref", rep
    )
    rep.check_consumed()
    return (method, res_a, met_a, grads_a), (ref, res_b, met_b, grads_b)


def _assert_close_lists(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for i, (ga, gb) in enumerate(zip(a, b, strict=True)):
        assert len(ga) == len(gb)
        for j, (x, y) in enumerate(zip(ga, gb, strict=True)):
            torch.testing.assert_close(
                x, y, rtol=1e-5, atol=1e-7, msg=lambda m, i=i, j=j: f"step {i} grad {j}: {m}"
            )


@pytest.mark.parametrize("kind", ["onpolicy", "flowmap"])
def test_accumulation_equals_one_step_on_the_concatenated_batch(
    kind: str, tiny_chain, tmp_path: Path
) -> None:
    (acc, res_a, met_a, grads_a), (ref, res_b, met_b, grads_b) = _accumulated_and_reference(
        kind, tiny_chain["dataset"].uri, tmp_path
    )
    # one optimiser step per update, with the gradient of the big batch
    assert len(grads_a) == STEPS * (2 if kind == "onpolicy" else 1)
    assert any(float(g.abs().max()) > 0 for gs in grads_a for g in gs)
    _assert_close_lists(grads_a, grads_b)
    pa, pb = _params(acc), _params(ref)
    assert pa.keys() == pb.keys()
    for k in pa:
        # AdamW divides by sqrt(v): on near-zero gradient entries a 1e-9 summation-order difference (it depends
        # on the thread count) moves the update by up to ~1e-7 after 4 steps at lr 1e-3 (measured 3.5e-7 with 2
        # threads); a wrong pair split moves it by ~lr. Hence atol 1e-6 here, 1e-7 on the gradients above.
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in res_a.ema:
        torch.testing.assert_close(res_a.ema[k], res_b.ema[k], rtol=1e-5, atol=1e-6, msg=f"ema {k}")
    # logged losses are the means over the micro-batches = the big batch's
    for step, (ma, mb) in enumerate(zip(met_a, met_b, strict=True)):
        assert ma.keys() == mb.keys()
        for key in ma:
            assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-8), (step, key)
        if kind == "onpolicy":
            assert (ma["rollout_steps"], ma["rollout_k"]) == rollout_plan(0, step, "generator", STEPS_LIST)
    if kind == "flowmap":
        # the accumulated batch of 4 has every pair type (the split of 2 alone has no consistency pair)
        assert {"loss/diffusion", "loss/consistency", "loss/general"} <= met_a[0].keys()


def test_per_micro_batch_adaptive_scaling_would_differ(tiny_chain, tmp_path: Path, monkeypatch) -> None:
    """Negative control: without the step-wide gather, the second micro-batch (consistency + general
    pairs only) finds no diffusion loss to scale by, and the gradient is not the big batch's."""

    def local_gather(self):
        return self.ctx.gather

    monkeypatch.setattr(methods.ForwardAccumulator, "_gather", local_gather)
    (_, _, _, grads_a), (_, _, _, grads_b) = _accumulated_and_reference(
        "flowmap", tiny_chain["dataset"].uri, tmp_path
    )
    assert any(
        not torch.allclose(x, y, rtol=1e-3, atol=1e-6) for x, y in zip(grads_a[0], grads_b[0], strict=True)
    )


def test_every_micro_batch_of_an_update_uses_the_same_plan(tiny_chain, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[int, int]] = []
    real = methods.fmbs_rollout

    def spy(fn, z, c, n, k, **kw):
        seen.append((n, k))
        return real(fn, z, c, n, k, **kw)

    monkeypatch.setattr(methods, "fmbs_rollout", spy)
    data = LatentDataset(tiny_chain["dataset"].uri, batch_size=1, seed=0)
    method, tr, _ = _build("onpolicy", data.negative_embedding(), accum=3, batch=1, steps=4)
    fit(method, tr, data, work_dir=tmp_path, progress=False)
    assert len(seen) == 4 * 2 * 3  # steps × (generator, critic) × micro-batches
    for step in range(4):
        gen, critic = seen[6 * step : 6 * step + 3], seen[6 * step + 3 : 6 * step + 6]
        assert gen == [rollout_plan(0, step, "generator", STEPS_LIST)] * 3
        assert critic == [rollout_plan(0, step, "critic", STEPS_LIST)] * 3


def test_resume_with_accumulation_is_bit_for_bit(tiny_chain, tmp_path: Path) -> None:
    dataset = tiny_chain["dataset"].uri

    def build():
        data = LatentDataset(dataset, batch_size=2, seed=0)
        method, tr, _ = _build("onpolicy", data.negative_embedding(), accum=2, batch=2, steps=4)
        return method, tr, data

    method, tr, data = build()
    straight = fit(method, tr, data, work_dir=tmp_path / "straight", progress=False)
    want = _params(method)
    method, tr, data = build()
    fit(method, tr, data, work_dir=tmp_path / "first", stop_after=2, progress=False)
    method, tr, data = build()
    resumed = fit(
        method,
        tr,
        data,
        work_dir=tmp_path / "second",
        resume_from=tmp_path / "first" / "checkpoint",
        progress=False,
    )
    assert resumed.resumed_from == 2 and resumed.steps == 4
    got = _params(method)
    fresh, *_ = build()
    # training moved the parameters (otherwise equality would prove nothing)
    assert any(not torch.equal(p, want[k]) for k, p in _params(fresh).items())
    for k in want:
        assert torch.equal(want[k], got[k]), k
    for k in straight.ema:
        assert torch.equal(straight.ema[k], resumed.ema[k]), k
