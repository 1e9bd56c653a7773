"""Causal (FAR) training (issue 8): the shared FAR base, the generator's own patch embedding, the causal
forward and on-policy methods (resume bit-for-bit), and the far-tiny stages end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers.states import random_adapter_state as _random_state

from anyflow.config import ConfigError, StageInputError, apply_overrides, get_preset
from anyflow.train.adapters import AdapterModel

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FAST = {
    "teacher.train.steps": 2, "flowmap.train.steps": 2, "distill.train.steps": 2,
    "evaluate.nfes": "1,2", "evaluate.reference_steps": 8, "evaluate.num_prompts": 2,
    "evaluate.samples_per_prompt": 2,
    # every teacher-forced step has compressed context (4 chunks), so the patch embedding trains
    "far.long_context_ratio": 1.0,
}


def _far_base():
    from anyflow.models.loading import load_base

    return load_base("builtin:tiny", far={"chunk_partition": (1, 3, 3, 3), "full_chunk_limit": 3, "attention": "dense"})



# ------------------------------------------------------------------------------------------ shared base


def test_teacher_on_far_base_equals_teacher_on_bidirectional_base() -> None:
    """The real score and critic live on the FAR base (one chunk over the clip). Reference: diffusers'
    bidirectional AnyFlowTransformer3DModel converted from the same Wan, with the same teacher LoRA."""
    from anyflow.models.loading import load_base

    far = AdapterModel(_far_base().transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
    bidi = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
    bidi.add("teacher", "teacher")
    state = _random_state(bidi, "teacher", 3)
    bidi.load_params("teacher", {f"{k.replace('.lora_A.', '.lora_A.teacher.').replace('.lora_B.', '.lora_B.teacher.')}": v
                                 for k, v in state.items()})
    far.add("teacher", "teacher", init=state)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 10, 4, 4, 4, generator=g)
    c = torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([[700.0] * 10, [250.0] * 10])
    r = torch.tensor([[300.0] * 10, [0.0] * 10])
    with torch.no_grad():
        want = bidi.fn("teacher")(z, t, r, c)
        got = far.fn("teacher")(z, t, r, c)
        base = bidi.fn(None)(z, t, r, c)
    assert (want - base).abs().max() > 1e-3  # the LoRA changes the output, so the comparison has teeth
    # RoPE: complex fp64 in the FAR class vs fp32 cos/sin in AnyFlow (see test_far_model.py)
    assert (got - want).abs().max().item() < 2e-6


def test_generator_owns_its_patch_embedding() -> None:
    """Two generator adapters on one FAR base each bring their own compressed patch embedding; activation
    swaps it in, gradients reach only the active one, and state() round-trips it."""
    from anyflow.causal import split_teacher_forcing, teacher_forced_fn

    models = AdapterModel(_far_base().transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
    base_w = models.transformer.far_patch_embedding.weight.detach().clone()
    models.add("g1", "generator", extra=("far_patch_embedding",))
    init2 = models.state("g1")
    init2["far_patch_embedding.weight"] = torch.randn_like(init2["far_patch_embedding.weight"])
    models.add("g2", "generator", init=init2, extra=("far_patch_embedding",))
    assert torch.equal(models.state("g1")["far_patch_embedding.weight"], base_w)
    assert torch.equal(models.state("g2")["far_patch_embedding.weight"], init2["far_patch_embedding.weight"])
    assert "far_patch_embedding.weight" in models.params("g1")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 10, 4, 4, 4, generator=g)
    c = torch.randn(1, 8, 32, generator=g)
    split = split_teacher_forcing(x, (1, 3, 3, 3), 4)  # chunk 0 is compressed context
    u = teacher_forced_fn(models.transformer, split)
    t = torch.full((1, 9), 600.0)
    outs = {}
    for name in ("g1", "g2"):
        models.activate(name)
        assert models.transformer.far_patch_embedding.weight is models.params(name)["far_patch_embedding.weight"]
        out = u(torch.randn(1, 9, 4, 4, 4, generator=torch.Generator().manual_seed(2)), t, t * 0.5, c)
        outs[name] = out
        models.backward(name, out.square().mean(), lambda loss: loss.backward())
    assert (outs["g1"] - outs["g2"]).abs().max() > 1e-4  # context tokens go through each one's embedding
    for name in ("g1", "g2"):
        w = models.params(name)["far_patch_embedding.weight"]
        assert w.grad is not None and w.grad.abs().sum() > 0
    # only one backward per adapter: each got exactly its own gradient (g2's is not accumulated into g1's)
    g1_grad = models.params("g1")["far_patch_embedding.weight"].grad.clone()
    models.params("g1")["far_patch_embedding.weight"].grad = None
    models.activate("g1")
    models.backward("g1", u(torch.randn(1, 9, 4, 4, 4, generator=torch.Generator().manual_seed(2)), t, t * 0.5, c)
                    .square().mean(), lambda loss: loss.backward())
    assert torch.equal(models.params("g1")["far_patch_embedding.weight"].grad, g1_grad)
    # a later adapter starts from the base's embedding, not from whatever is swapped in; the base's own
    # parameters come back for adapters without extras (and for the base itself)
    with torch.no_grad():
        models.params("g1")["far_patch_embedding.weight"].add_(1.0)
    models.activate("g1")
    models.add("g3", "generator", extra=("far_patch_embedding",))
    assert torch.equal(models.state("g3")["far_patch_embedding.weight"], base_w)
    models.add("t", "teacher")
    assert torch.equal(models.transformer.far_patch_embedding.weight, base_w)
    models.activate(None)
    assert torch.equal(models.transformer.far_patch_embedding.weight, base_w)
    with pytest.raises(KeyError, match="no tensors for its extra modules"):
        models.add("g4", "generator", init={k: v for k, v in init2.items() if "far_patch" not in k},
                   extra=("far_patch_embedding",))


def test_causal_generator_gradients_with_checkpointing_equal_without() -> None:
    """Chunk-wise FMBS + DMD on the shared base with adapter switching: gradient checkpointing (recompute in
    backward, KV cache read from the no-grad pass) gives the same generator gradients."""
    from anyflow.causal import FarCausalModel, causal_rollout
    from anyflow.dmd import dmd_generator_loss

    grads = {}
    for ckpt in (False, True):
        models = AdapterModel(_far_base().transformer, rank=4, alpha=4.0, gradient_checkpointing=ckpt)
        models.transformer.train()
        probe = AdapterModel(_far_base().transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
        probe.add("t", "teacher")
        probe.add("g", "generator", extra=("far_patch_embedding",))
        models.add("teacher", "teacher", init=_random_state(probe, "t", 1), trainable=False)
        models.add("critic", "critic", init=_random_state(probe, "t", 2))
        models.add("generator", "generator", init=_random_state(probe, "g", 3), extra=("far_patch_embedding",))
        g = torch.Generator().manual_seed(4)
        noise = torch.randn(2, 10, 4, 4, 4, generator=g)
        c = torch.randn(2, 8, 32, generator=g)
        models.activate("generator")
        x_hat, info = causal_rollout(FarCausalModel(models.transformer, (1, 3, 3, 3)), noise, c, num_steps=4, k=2)
        loss, _ = dmd_generator_loss(x_hat, models.fn("teacher"), models.fn("critic"), c, torch.zeros(1, 8, 32),
                                     torch.Generator().manual_seed(5))
        models.backward("generator", loss, lambda v: v.backward())
        grads[ckpt] = {k: p.grad.clone() for k, p in models.params("generator").items() if p.grad is not None}
        assert info.calls_per_chunk == [3, 3, 3, 3]
    assert grads[False].keys() == grads[True].keys() and len(grads[False]) > 0
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-5, atol=1e-7, msg=k)


def test_guided_flow_matching_loss_matches_hand_computation() -> None:
    """§8.4 auxiliary loss on a linear model u = a·z + b·mean(c): the fused prediction and target by hand."""
    from anyflow.flowmap import flow_matching_loss, guided_flow_matching_loss
    from anyflow.timesteps import (
        NUM_TRAIN_TIMESTEPS,
        noise_like,
        sample_logit_normal,
        shift_sigma,
        sigma_to_tau,
    )

    def u(z, t, r, c):
        assert torch.equal(t, r)
        return 0.7 * z + 0.3 * c.mean(dim=(1, 2))[:, None, None, None, None]

    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 2, 2, generator=g0)
    c = torch.randn(3, 5, 8, generator=g0)
    c_neg = torch.randn(1, 5, 8, generator=g0)
    loss, _ = guided_flow_matching_loss(u, x, c, c_neg, torch.Generator().manual_seed(9), guidance_scale=3.0, shift=5.0)
    gen = torch.Generator().manual_seed(9)
    tau = sigma_to_tau(shift_sigma(sample_logit_normal(3, gen), 5.0))
    eps = noise_like(x, gen)
    s = (tau / NUM_TRAIN_TIMESTEPS)[:, None, None, None, None]
    z = s * eps + (1 - s) * x
    u_c, u_n = u(z, tau, tau, c), u(z, tau, tau, c_neg.expand_as(c))
    p = (u_c + 2.0 * u_n) / 3.0  # (u_c − (1 − g)·u_∅)/g with g = 3
    torch.testing.assert_close(loss, ((p - (eps - x)) ** 2).mean(), rtol=1e-6, atol=0)
    # g = 1 is plain flow matching (same draws)
    plain, _ = flow_matching_loss(u, x, c, torch.Generator().manual_seed(9), shift=5.0)
    g1, _ = guided_flow_matching_loss(u, x, c, c_neg, torch.Generator().manual_seed(9), guidance_scale=1.0, shift=5.0)
    assert torch.equal(plain, g1)


# -------------------------------------------------------------------------------------- config / errors


def test_far_presets_carry_the_paper_config() -> None:
    for name in ("far-1.3b", "far-14b"):
        p = get_preset(name)
        assert p.variant == "far" and p.data.frames == 81
        assert p.far.chunk_partition == (1, 3, 3, 3, 3, 3, 3, 2) and p.far.full_chunk_limit == 3
        assert p.far.long_context_ratio == 0.5 and (p.far.min_chunks, p.far.max_chunks) == (3, 8)
        assert p.far.bidirectional_prob == 0.1
        wan = get_preset(name.replace("far-", "wan2.1-t2v-"))
        assert dataclasses.replace(p, name=wan.name, variant=wan.variant, far=wan.far) == wan  # same hyperparameters
    tiny = get_preset("far-tiny")
    assert sum(tiny.far.chunk_partition) == (tiny.data.frames - 1) // 4 + 1


def test_far_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"far.chunk_partition=\[1, 3, 3, 3\].*data.frames=41.*set data.frames=37"):
        apply_overrides(get_preset("far-tiny"), {"data.frames": 41})
    with pytest.raises(ConfigError, match=r"far\.max_chunks=5"):
        apply_overrides(get_preset("far-tiny"), {"far.max_chunks": 5})
    with pytest.raises(ConfigError, match=r"far\.attention='sdpa'"):
        apply_overrides(get_preset("far-tiny"), {"far.attention": "sdpa"})


# -------------------------------------------------------------------------------------------- methods


@pytest.fixture(scope="module")
def far_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    from anyflow.stages import run_stage

    store = str(tmp_path_factory.mktemp("far-store"))
    return run_stage("prepare_data", preset="far-tiny", store=store, overrides=FAST, progress=False).uri


STEPS = 4


def _build(kind: str, dataset: str):
    from anyflow.data.shards import LatentDataset
    from anyflow.train.causal_methods import CausalFlowMapMethod, CausalOnPolicyMethod

    preset = apply_overrides(get_preset("far-tiny"), {"far.bidirectional_prob": 0.5, "far.long_context_ratio": 0.5})
    models = AdapterModel(_far_base().transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
    data = LatentDataset(dataset, batch_size=2, seed=0)
    neg = data.negative_embedding()
    if kind == "flowmap":
        tr = dataclasses.replace(preset.flowmap.train, steps=STEPS, checkpoint_every=2)
        method = CausalFlowMapMethod(models, dataclasses.replace(preset.flowmap, train=tr), preset.far, neg)
    else:
        tr = dataclasses.replace(preset.distill.train, steps=STEPS, checkpoint_every=2, ema_warmup_step=2)
        probe = AdapterModel(_far_base().transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
        probe.add("t", "teacher")
        probe.add("g", "generator", extra=("far_patch_embedding",))
        method = CausalOnPolicyMethod(
            models, dataclasses.replace(preset.distill, train=tr, steps_list=(2, 4, 50)), preset.far, neg,
            teacher=_random_state(probe, "t", 1), generator=_random_state(probe, "g", 2),
        )
    return method, tr, data, models


def _params(method) -> dict[str, torch.Tensor]:
    return {f"{g}/{k}": p.detach().clone() for g, (ps, _) in method.optim_groups().items() for k, p in ps.items()}


@pytest.mark.parametrize("kind", ["flowmap", "onpolicy"])
def test_causal_resume_is_bit_for_bit(kind: str, far_dataset: str, tmp_path: Path) -> None:
    from anyflow.train.loop import fit

    method, tr, data, _ = _build(kind, far_dataset)
    before = _params(method)
    straight = fit(method, tr, data, work_dir=tmp_path / "straight", progress=False)
    want, want_ema = _params(method), straight.ema
    method, tr, data, _ = _build(kind, far_dataset)
    fit(method, tr, data, work_dir=tmp_path / "first", stop_after=STEPS // 2, progress=False)
    method, tr, data, _ = _build(kind, far_dataset)
    resumed = fit(method, tr, data, work_dir=tmp_path / "second", resume_from=tmp_path / "first" / "checkpoint",
                  progress=False)
    got = _params(method)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    for k in want_ema:
        assert torch.equal(want_ema[k], resumed.ema[k]), k
    moved = [k for k in want if not torch.equal(want[k], before[k])]
    assert any("far_patch_embedding" in k for k in moved), "the generator's patch embedding must train in full"
    assert any("lora" in k for k in moved)
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    if kind == "flowmap":
        chunks = [r["num_chunks"] for r in log]
        assert set(chunks) <= {3.0, 4.0}
        aux = ["loss/bidirectional" in r for r in log]
        assert any(aux) and not all(aux)  # probability 0.5 over 4 steps with this seed: both kinds occur
    else:
        for r in log:  # (N, k) per step: ≤ 3 calls per chunk for 4 chunks + 3 cache passes
            n, k = int(r["rollout_steps"]), int(r["rollout_k"])
            per_chunk = (k > 0) + 1 + (k + 1 < n)
            assert r["nfe"] == 4 * per_chunk + 3
            assert "loss/bidirectional" not in r and "forward/loss/bidirectional" not in r


# ---------------------------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def far_chain(far_dataset: str) -> dict:
    from anyflow.stages import run_stage

    store = str(Path(far_dataset).parents[2])
    out = {"dataset": far_dataset}
    kw = {"preset": "far-tiny", "store": store, "overrides": FAST, "progress": False}
    out["teacher"] = run_stage("train_teacher", inputs={"dataset": far_dataset}, **kw).uri
    out["flowmap"] = run_stage("train_flowmap", inputs={"dataset": far_dataset}, **kw).uri
    out["generator"] = run_stage("distill", inputs={"dataset": far_dataset, "teacher": out["teacher"],
                                                    "flowmap": out["flowmap"]}, **kw).uri
    out["evaluate"] = run_stage("evaluate", inputs={"dataset": far_dataset, "teacher": out["teacher"],
                                                    "flowmap": out["flowmap"], "generator": out["generator"]}, **kw).uri
    return out


def test_far_stages_end_to_end(far_chain: dict) -> None:
    from safetensors.torch import load_file

    from anyflow import storage
    from anyflow.models.far import build_tiny_far

    for role in ("teacher", "flowmap", "generator", "evaluate"):
        storage.verify(far_chain[role])
    init = build_tiny_far(0).far_patch_embedding.weight
    for role in ("flowmap", "generator"):
        meta = json.loads((Path(far_chain[role]) / "model.json").read_text())
        assert meta["variant"] == "far"
        tensors = load_file(str(Path(far_chain[role]) / meta["adapters"]["generator"]["file"]))
        assert not torch.equal(tensors["far_patch_embedding.weight"], init)  # trained in full
    doc = json.loads((Path(far_chain["evaluate"]) / "metrics.json").read_text())
    metrics = doc["metrics"]
    # prompts are expanded prompt-major (2 samples each): each I2V sample starts from its own prompt's clip
    assert doc["prompts"][0] == doc["prompts"][1] != doc["prompts"][2]
    assert doc["i2v_heldout_clip"] == [0, 0, 1, 1]
    for n in (1, 2):
        assert metrics["generator"][str(n)]["calls"] == 4 * n + 3  # 4 chunks × N + 3 cache passes (§8.5)
        assert metrics["generator/i2v"][str(n)]["calls"] == 3 * n + 3  # chunk 0 is the image
        assert metrics["generator/i2v"][str(n)]["context_max_abs"] == 0.0
        assert metrics["generator"][str(n)]["coupled_mse"] > 0
    assert (Path(far_chain["evaluate"]) / "report.html").exists()


def test_far_generator_is_refused_by_a_bidirectional_preset(far_chain: dict) -> None:
    from anyflow.stages import common

    with pytest.raises(StageInputError, match=r"'far' generator.*variant 'bidirectional'"):
        common.read_checkpoint(far_chain["generator"], get_preset("tiny"), role="generator", need=("generator",))
    # the teacher adapter is the bidirectional model on either base: accepted by both variants
    common.read_checkpoint(far_chain["teacher"], get_preset("tiny"), role="teacher", need=("teacher",))


def test_sample_t2v_i2v_v2v_from_a_far_checkpoint(far_chain: dict, tmp_path: Path) -> None:
    """``anyflow sample`` on a far-tiny generator: I2V keeps the image's latent frame, V2V keeps the given
    frames' latents (whole chunks), T2V differs from both; bad context lengths name the valid ones."""
    import numpy as np

    from anyflow.data.procedural import make_clip
    from anyflow.data.video import write_video
    from anyflow.sample import sample_latents

    clip = make_clip(5, 0, frames=37, height=32, width=32)
    video_path, image_path = tmp_path / "clip.mp4", tmp_path / "first.png"
    write_video(video_path, clip.video, fps=16)
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(clip.video[0])).save(image_path)
    kw = {"nfe": 2, "preset": "far-tiny", "overrides": FAST, "seed": 3}
    prompts = [clip.caption, clip.caption]
    t2v, ctx0, _ = sample_latents(far_chain["generator"], prompts, **kw)
    i2v, ctx1, _ = sample_latents(far_chain["generator"], prompts, image=str(image_path), **kw)
    v2v, ctx4, _ = sample_latents(far_chain["generator"], prompts, video=str(video_path), video_frames=13, **kw)
    assert ctx0 is None and ctx1.shape[1] == 1 and ctx4.shape[1] == 4
    assert t2v.shape == i2v.shape == v2v.shape == (2, 10, 4, 4, 4)
    assert torch.equal(i2v[:, :1], ctx1.expand(2, -1, -1, -1, -1))
    assert torch.equal(v2v[:, :4], ctx4.expand(2, -1, -1, -1, -1))
    assert (i2v[:, 1:] - t2v[:, 1:]).abs().max() > 1e-4  # the image conditions the later chunks
    with pytest.raises(ValueError, match=r"--video-frames 9: .*use one of \[1, 13, 25\]"):
        sample_latents(far_chain["generator"], prompts, video=str(video_path), video_frames=9, **kw)
    with pytest.raises(ValueError, match="need a causal FAR checkpoint"):
        sample_latents(far_chain["generator"], prompts, image=str(image_path), nfe=2, preset="tiny")


@pytest.mark.slow
def test_sharded_far_base_trains_like_the_replicated_one(far_dataset: str, tmp_path: Path) -> None:
    """``train.sharding=fsdp`` + ``train.shard_optimizer`` (ZeRO-1), and ``train.sharding=fsdp`` + DeepSpeed ZeRO-2
    (``train.deepspeed=zero2``), on the causal on-policy stage (2 gloo ranks, checkpointing on): the same
    per-rank batches and draws as a replicated data-parallel run, so adapters (incl. the generator's own patch
    embedding), EMA and losses must agree; each rank holds about half of the frozen FAR base and of the
    optimiser state."""
    from helpers.launch import torchrun

    runs = {}
    for mode in ("none", "fsdp", "fsdp-zero2"):
        torchrun("far_fsdp_worker.py", far_dataset, tmp_path, mode, timeout=900)
        runs[mode] = [torch.load(tmp_path / f"{mode}-rank{r}.pt", weights_only=True) for r in range(2)]
    assert runs["none"][0]["shard"] == {}
    for r, ref in [*zip(runs["fsdp"], runs["none"], strict=True),  # rank by rank: metrics are per-rank losses
                   *zip(runs["fsdp-zero2"], runs["none"], strict=True)]:
        s = r["shard"]
        assert s["shard_group"] == 2 and 0.4 < s["local_base_params"] / s["base_params"] < 0.6, s
        o = r["optimizer_shard"]
        assert 0.3 < o["local_params"] / o["params"] < 0.7 and ref["optimizer_shard"]["local_params"] == o["params"], o
        assert r["params"].keys() == ref["params"].keys()
        assert any("far_patch_embedding" in k for k in ref["params"])
        for k, v in ref["params"].items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert r["ema"].keys() == ref["ema"].keys()
        for k, v in ref["ema"].items():
            torch.testing.assert_close(r["ema"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        for a, b in zip(r["metrics"], ref["metrics"], strict=True):
            assert a.keys() == b.keys()
            for key in ("loss/dmd", "loss/critic", "forward/loss"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
