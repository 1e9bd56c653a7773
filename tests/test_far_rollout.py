"""Causal FAR rollout (docs/method.md §8.3-8.7): KV cache = masked forward, teacher forcing, chunk-wise FMBS,
T2V / I2V / V2V sampling against diffusers' AnyFlowFARPipeline, NFE accounting."""

from __future__ import annotations

import pytest
import torch

from anyflow.causal import (
    FarCausalModel,
    TeacherForcedSplit,
    causal_rollout,
    chunk_bounds,
    expected_nfe,
    far_attention_mask,
    far_token_layout,
    teacher_forced_fn,
)
from anyflow.models.far import build_tiny_far, set_far_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

P4 = (1, 3, 3, 3)
P8 = (1, 3, 3, 3, 3, 3, 3, 2)  # 21 latent frames, as in §8.1


@pytest.fixture(scope="module")
def far():
    return build_tiny_far(0, chunk_partition=P4, attention="dense")


def _data(seed, frames, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, frames, 4, 8, 8, generator=g), torch.randn(b, 6, 32, generator=g), g


def _masked_forward(model, history, z, t, r, c, partition):
    """Reference: one forward over [history (t = r = 0), noisy chunk] with the chunk-causal mask."""
    b, fh = history.shape[:2]
    layout = far_token_layout(partition, 8, 8, has_clean=False)
    mask = far_attention_mask(layout, getattr(model, "_far_attention", "flex"))
    zeros = torch.zeros(b, fh)
    out = model(hidden_states=torch.cat([history, z], 1), timestep=torch.cat([zeros, t], 1),
                r_timestep=torch.cat([zeros, r], 1), encoder_hidden_states=c, chunk_partition=list(partition),
                attention_mask=mask).sample
    return out[:, -z.shape[1]:]


@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_kv_cache_inference_equals_full_masked_forward(far, attention):
    set_far_attention(far, attention)
    try:
        x, c, g = _data(1, 10)
        fm = FarCausalModel(far, P4)
        chunks = range(4) if attention == "dense" else [3]  # flex is slow on CPU: last chunk only
        with torch.no_grad():
            for i in chunks:
                a, e = chunk_bounds(P4)[i]
                state = fm.encode(x[:, :a], c) if i > 0 else fm.empty_state(x)
                z = torch.randn(2, e - a, 4, 8, 8, generator=g)
                t, r = torch.full((2, e - a), 700.0), torch.full((2, e - a), 300.0)
                cached = fm.chunk_fn(state)(z, t, r, c)
                ref = _masked_forward(far, x[:, :a], z, t, r, c, P4[: i + 1])
                torch.testing.assert_close(cached, ref, rtol=0, atol=1e-5)
                if i > 0:  # the history matters (the comparison is not vacuous)
                    other = _masked_forward(far, x[:, :a] + 1.0, z, t, r, c, P4[: i + 1])
                    assert (other - ref).abs().max() > 1e-3
    finally:
        set_far_attention(far, "dense")


def test_teacher_forcing_sees_earlier_clean_copies_only(far):
    """Window chunk i's output depends on the clean copies of window chunks j < i, never j >= i, and on the
    noisy tokens of its own chunk only; all chunks see the compressed context (§8.2)."""
    x, c, g = _data(2, 10, b=1)
    split = TeacherForcedSplit(context=x[:, :1], window=x[:, 1:], chunk_partition=P4)
    z = torch.randn(1, 9, 4, 8, 8, generator=g)
    t, r = torch.full((1, 9), 800.0), torch.full((1, 9), 100.0)
    win = [(0, 3), (3, 6), (6, 9)]  # window chunks 1, 2, 3 in window-frame coordinates
    with torch.no_grad():
        base = teacher_forced_fn(far, split)(z, t, r, c)

        def changed(new_split=split, new_z=z):
            out = teacher_forced_fn(far, new_split)(new_z, t, r, c)
            return [bool((out[:, a:e] - base[:, a:e]).abs().max() > 1e-4) for a, e in win]

        for j, (a, e) in enumerate(win):
            w = split.window.clone()
            w[:, a:e] += 2.0
            assert changed(TeacherForcedSplit(split.context, w, P4)) == [i > j for i in range(3)], j
            zz = z.clone()
            zz[:, a:e] += 2.0
            assert changed(new_z=zz) == [i == j for i in range(3)], j
        assert changed(TeacherForcedSplit(split.context + 2.0, split.window, P4)) == [True] * 3


@pytest.mark.parametrize(("num_steps", "k"), [(4, 2), (2, 0)])
def test_chunkwise_fmbs_grad_calls_and_no_cross_chunk_gradient(far, num_steps, k):
    x, c, _ = _data(3, 10)
    noise = x.clone().requires_grad_(True)
    records = []  # (grad enabled, is cache step) for every transformer call, recorded independently
    hook = far.register_forward_pre_hook(
        lambda m, args, kw: records.append((torch.is_grad_enabled(), bool((kw.get("kv_cache_flag") or {})
                                            .get("is_cache_step")))), with_kwargs=True)
    try:
        video, info = causal_rollout(FarCausalModel(far, P4), noise, c, num_steps=num_steps, k=k)
    finally:
        hook.remove()
    calls = 1 + int(k > 0) + int(k < num_steps - 1)
    assert info.calls_per_chunk == [calls] * 4 and calls <= 3
    assert sum(g for g, cache in records if not cache) == 4 * calls  # every denoising call carries grad
    assert sum(1 for _, cache in records if cache) == 3 and not any(g for g, cache in records if cache)
    assert video.shape == noise.shape and video.requires_grad
    # The loss on the last chunk reaches its own noise but not earlier chunks' (no gradient through the cache).
    a, e = chunk_bounds(P4)[3]
    (grad,) = torch.autograd.grad(video[:, a:e].square().sum(), noise)
    assert grad[:, :a].abs().max() == 0
    assert grad[:, a:e].abs().max() > 0
    # ...and the earlier chunks' outputs did influence the last chunk (through the no-grad cache).
    with torch.no_grad():
        alt, _ = causal_rollout(FarCausalModel(far, P4), torch.cat([x[:, :a] + 1, x[:, a:]], 1), c,
                                num_steps=num_steps, k=k)
    assert (alt[:, a:e] - video[:, a:e].detach()).abs().max() > 1e-4


def _pipeline_latents(model, noise, c, num_steps, partition, context=None):
    from diffusers import AnyFlowFARPipeline, FlowMapEulerDiscreteScheduler

    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=c, latents=noise.permute(0, 2, 1, 3, 4), video_latents=context,
               num_inference_steps=num_steps, height=64, width=64, num_frames=4 * (noise.shape[1] - 1) + 1,
               chunk_partition=list(partition), output_type="latent", guidance_scale=1.0).frames
    return out.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize(("ctx_frames", "n_ctx_chunks"), [(0, 0), (1, 1), (4, 2)])
def test_t2v_i2v_v2v_keep_context_and_count_nfe(far, ctx_frames, n_ctx_chunks):
    """T2V / I2V (1 frame) / V2V (chunk-aligned frames): shapes, context unchanged, NFE, context is used."""
    noise, c, g = _data(4, 10, b=1)
    context = torch.randn(1, ctx_frames, 4, 8, 8, generator=g) if ctx_frames else None
    with torch.no_grad():
        video, info = causal_rollout(FarCausalModel(far, P4), noise, c, num_steps=3, context=context)
    assert video.shape == (1, 10, 4, 8, 8) and torch.isfinite(video).all()
    assert info.num_context_chunks == n_ctx_chunks
    assert (info.denoise_calls, info.cache_passes) == expected_nfe(P4, 3, n_ctx_chunks)
    assert info.calls_per_chunk == [3] * (4 - n_ctx_chunks)
    if context is not None:
        assert torch.equal(video[:, :ctx_frames], context)  # written unchanged, never denoised
        with torch.no_grad():
            alt, _ = causal_rollout(FarCausalModel(far, P4), noise, c, num_steps=3, context=context + 1.0)
        assert (alt[:, ctx_frames:] - video[:, ctx_frames:]).abs().max() > 1e-4  # generation sees the context


@pytest.mark.parametrize(("ctx_frames", "n_ctx_chunks"), [
    (0, 0), pytest.param(1, 1, marks=pytest.mark.slow), pytest.param(7, 3, marks=pytest.mark.slow)])
def test_rollout_matches_anyflow_far_pipeline_21_frames(ctx_frames, n_ctx_chunks):
    """[1,3,3,3,3,3,3,2] (21 latent frames): T2V costs 8·N + 7 (§8.5), and the video equals diffusers'
    AnyFlowFARPipeline (its own chunk loop, scheduler and cache passes) from the same noise and context.

    The pipeline runs our processor (dense path, which evaluates its BlockMasks); this also masks the zero
    padding keys that diffusers' cache-read step would attend (see anyflow.models.far._padded_key_mask).
    """
    model = build_tiny_far(0, chunk_partition=P8, attention="dense")
    noise, c, g = _data(4, 21, b=1)
    context = torch.randn(1, ctx_frames, 4, 8, 8, generator=g) if ctx_frames else None
    with torch.no_grad():
        video, info = causal_rollout(FarCausalModel(model, P8), noise, c, num_steps=2, context=context)
        ref = _pipeline_latents(model, noise, c, 2, P8, context)
    assert (info.denoise_calls, info.cache_passes) == expected_nfe(P8, 2, n_ctx_chunks)
    if ctx_frames == 0:
        assert (info.denoise_calls, info.cache_passes, info.nfe) == (8 * 2, 7, 23)
    else:
        assert torch.equal(video[:, :ctx_frames], context)
    torch.testing.assert_close(video, ref, rtol=0, atol=2e-5)
