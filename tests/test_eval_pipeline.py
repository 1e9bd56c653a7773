"""diffusers' ``AnyFlowPipeline`` (merged LoRA) against our FlowMap-Euler sampler (unmerged LoRA).

References are independent of the code under test: the pipeline runs diffusers' scheduler and its own
loop over a transformer with the adapter folded into the weights; the reference runs
``anyflow.rollout.flowmap_euler_sample`` over the peft-adapted model (adapter not merged), with CFG
written out here. The adapters are random (lora_B non-zero), so a merge or r-conditioning bug shows.
"""

from __future__ import annotations

import pytest
import torch

from anyflow.eval.pipeline import build_pipeline, check_grid, pipeline_sigmas, sample_with_pipeline
from anyflow.models import lora
from anyflow.models.loading import load_base
from anyflow.models.text import WAN_NEGATIVE_PROMPT
from anyflow.rollout import flowmap_euler_sample
from anyflow.timesteps import flowmap_euler_sigmas
from anyflow.train.adapters import AdapterModel

PROMPTS = ["a red circle moving left", "a blue square  moving up"]  # double space: the pipeline cleans it
TOL = 1e-5


def _randomise(models: AdapterModel, name: str, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in models.params(name).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def tiny():
    base = load_base("builtin:tiny")
    models = AdapterModel(base.transformer, rank=4, alpha=8.0, gradient_checkpointing=False)
    models.add("generator", "generator", trainable=False)
    models.add("teacher", "teacher", trainable=False)
    _randomise(models, "generator", 1)
    _randomise(models, "teacher", 2)
    c = base.text.encode(PROMPTS)
    c_neg = base.text.encode([WAN_NEGATIVE_PROMPT])
    noise = torch.randn((2, *base.vae.latent_shape(9, 32, 32)), generator=torch.Generator().manual_seed(0))
    gen_pipe = build_pipeline(base, lora.merge_adapter(models.transformer, "generator"))
    teacher_pipe = build_pipeline(base, lora.merge_adapter(models.transformer, "teacher"))
    return {"base": base, "models": models, "c": c, "c_neg": c_neg, "noise": noise,
            "gen_pipe": gen_pipe, "teacher_pipe": teacher_pipe}


def test_grid_is_method_grid(tiny):
    """§2.4 / §9: the pipeline's σ grid is shift_5(1 − i/N) with σ_N = 0; a shift-1 scheduler is caught."""
    pipe = tiny["gen_pipe"]
    for n in (1, 2, 3, 4, 8, 16, 32, 1000):
        sig = pipeline_sigmas(pipe, n)
        s = torch.arange(n + 1, dtype=torch.float64) / n
        expected = 5 * (1 - s) / (1 + 4 * (1 - s))  # written out, not via anyflow.timesteps
        assert torch.allclose(sig, expected, atol=1e-12, rtol=0)
        assert torch.equal(pipe.scheduler.timesteps, sig[:-1] * 1000)  # t_i = 1000·σ_i, N entries
        assert check_grid(pipe, n) <= 1e-12
    assert torch.equal(flowmap_euler_sigmas(4), pipeline_sigmas(pipe, 4))
    from diffusers import FlowMapEulerDiscreteScheduler

    unshifted = build_pipeline(tiny["base"], pipe.transformer)
    unshifted.scheduler = FlowMapEulerDiscreteScheduler()  # diffusers' default shift = 1
    with pytest.raises(ValueError, match="shift"):
        check_grid(unshifted, 4)


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_pipeline_equals_flowmap_euler(tiny, nfe):
    """Merged-LoRA pipeline == our sampler over the unmerged adapter, same noise, N ∈ {1, 2, 4}."""
    noise, c = tiny["noise"], tiny["c"]
    noise_copy = noise.clone()
    with torch.no_grad():
        ours = flowmap_euler_sample(tiny["models"].fn("generator"), noise, c, nfe, shift=5.0)
        base_only = flowmap_euler_sample(tiny["models"].fn(None), noise, c, nfe, shift=5.0)
    theirs = sample_with_pipeline(tiny["base"], tiny["gen_pipe"], c, noise, nfe)
    assert theirs.shape == noise.shape and theirs.dtype == torch.float32
    assert torch.equal(noise, noise_copy)  # the caller's noise is not modified
    assert (theirs - ours).abs().max().item() < TOL
    assert (ours - base_only).abs().max().item() > 0.1  # the adapter matters: a dropped merge would fail


def test_pipeline_plain_euler_equals_r_equals_t(tiny):
    """use_mean_velocity=False feeds r = t in both; and it differs from the mean-velocity sample."""
    noise, c = tiny["noise"], tiny["c"]
    with torch.no_grad():
        ours = flowmap_euler_sample(tiny["models"].fn("generator"), noise, c, 4, use_mean_velocity=False)
    theirs = sample_with_pipeline(tiny["base"], tiny["gen_pipe"], c, noise, 4, use_mean_velocity=False)
    mean_vel = sample_with_pipeline(tiny["base"], tiny["gen_pipe"], c, noise, 4)
    assert (theirs - ours).abs().max().item() < TOL
    assert (theirs - mean_vel).abs().max().item() > 1e-3  # r really reaches the delta embedder


def test_pipeline_cfg_equals_guided_euler(tiny):
    """Teacher path: the pipeline's batched CFG + plain Euler == u_∅ + g·(u_c − u_∅) Euler, 3 steps."""
    noise, c, c_neg = tiny["noise"], tiny["c"], tiny["c_neg"]
    u = tiny["models"].fn("teacher")
    g = 3.0

    def cfg(z, t, r, cond):
        u_c, u_n = u(z, t, r, cond), u(z, t, r, c_neg.expand(cond.shape[0], -1, -1))
        return u_n + g * (u_c - u_n)

    with torch.no_grad():
        ours = flowmap_euler_sample(cfg, noise, c, 3, use_mean_velocity=False)
    theirs = sample_with_pipeline(tiny["base"], tiny["teacher_pipe"], c, noise, 3, use_mean_velocity=False,
                                  guidance_scale=g, negative_embeds=c_neg)
    assert (theirs - ours).abs().max().item() < TOL
    with pytest.raises(ValueError, match="negative_embeds"):
        sample_with_pipeline(tiny["base"], tiny["teacher_pipe"], c, noise, 3, guidance_scale=g)


def test_prompt_strings_match_pipeline_text_encoder(tiny):
    """Our Wan text convention == the pipeline's own prompt encoding; strings and embeddings sample alike."""
    base, pipe = tiny["base"], tiny["gen_pipe"]
    theirs, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                   max_sequence_length=base.text.max_length, device=torch.device("cpu"))
    assert torch.allclose(theirs.float(), tiny["c"], atol=1e-6, rtol=0)
    from_strings = sample_with_pipeline(base, pipe, PROMPTS, tiny["noise"], 2)
    from_embeds = sample_with_pipeline(base, pipe, tiny["c"], tiny["noise"], 2)
    assert torch.equal(from_strings, from_embeds)


def test_pipeline_decode_equals_video_vae(tiny):
    """§2.4 output: the pipeline's un-normalise + VAE decode == our VideoVAE.decode (frames in [0, 1])."""
    base, noise, c = tiny["base"], tiny["noise"][:1, :1], tiny["c"][:1]  # one latent frame: cheap to decode
    lat = sample_with_pipeline(base, tiny["gen_pipe"], c, noise, 1)
    video = tiny["gen_pipe"](prompt_embeds=c, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=1,
                             num_frames=1, height=32, width=32, output_type="pt").frames  # (B, T, 3, H, W)
    ours = base.vae.decode(lat).permute(0, 2, 1, 3, 4) * 0.5 + 0.5
    assert video.shape == ours.shape
    assert (video - ours).abs().max().item() < 1e-5


def test_input_errors(tiny):
    base, pipe = tiny["base"], tiny["gen_pipe"]
    with pytest.raises(ValueError, match="nfe"):
        sample_with_pipeline(base, pipe, tiny["c"], tiny["noise"], 0)
    with pytest.raises(ValueError, match="noise"):
        sample_with_pipeline(base, pipe, tiny["c"], tiny["noise"][0], 2)
    with pytest.raises(ValueError, match="prompt embeddings"):
        sample_with_pipeline(base, pipe, tiny["c"][:1], tiny["noise"], 2)
    with pytest.raises(TypeError, match="AnyFlowTransformer3DModel"):
        build_pipeline(base, torch.nn.Linear(2, 2))


def _plain_pipeline(base, transformer):
    """The pipeline as diffusers builds it, without the execution-device cache (the old path)."""
    from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    pipe = AnyFlowPipeline(tokenizer=base.text.tokenizer, text_encoder=base.text.model, transformer=transformer,
                           vae=base.vae.vae, scheduler=FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_execution_device_keeps_outputs_identical(tiny, guidance):
    """build_pipeline's pipeline (execution device cached) gives bit-identical samples to a plain diffusers
    AnyFlowPipeline over the same merged transformer, with and without CFG, N ∈ {1, 2, 4}."""
    base, noise, c = tiny["base"], tiny["noise"], tiny["c"]
    pipe = tiny["gen_pipe"] if guidance == 1.0 else tiny["teacher_pipe"]
    plain = _plain_pipeline(base, pipe.transformer)
    assert type(plain) is not type(pipe)
    kw = {} if guidance == 1.0 else {"guidance_scale": guidance, "negative_embeds": tiny["c_neg"],
                                     "use_mean_velocity": False}
    for nfe in (1, 2, 4):
        ours = sample_with_pipeline(base, pipe, c, noise, nfe, **kw)
        old = sample_with_pipeline(base, plain, c, noise, nfe, **kw)
        assert torch.equal(ours, old)


def test_execution_device_is_computed_once_per_pipeline(tiny, monkeypatch):
    """diffusers walks every module of every component for the execution device; after the first call the
    pipeline answers from its cache, and the answer is diffusers' own (also when a hook appears)."""
    from diffusers import DiffusionPipeline

    base, noise, c = tiny["base"], tiny["noise"], tiny["c"]
    pipe = build_pipeline(base, tiny["gen_pipe"].transformer)
    walks = [0]
    original = DiffusionPipeline._execution_device.fget

    def counting(self):
        walks[0] += 1
        return original(self)

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(counting))
    sample_with_pipeline(base, pipe, c, noise, 2)
    first = walks[0]
    sample_with_pipeline(base, pipe, c, noise, 2)
    sample_with_pipeline(base, pipe, c, noise, 4)
    assert first == 1 and walks[0] == 1  # the plain diffusers pipeline walks ≥ 2 times per call
    plain = _plain_pipeline(base, pipe.transformer)
    walks[0] = 0
    sample_with_pipeline(base, plain, c, noise, 2)
    assert walks[0] >= 2
    assert pipe._execution_device == original(pipe) == torch.device("cpu")

    class Hook:  # what accelerate's offloading leaves on a component: the device the pipeline must use
        execution_device = "meta"

    vae = pipe.vae
    try:
        vae._hf_hook = Hook()
        assert original(pipe) == torch.device("meta")
        assert pipe._execution_device == torch.device("meta")  # recomputed: the component got a hook
    finally:
        del vae._hf_hook
    assert pipe._execution_device == torch.device("cpu")


def test_far_pipeline_with_cached_execution_device_is_identical(tiny):
    """build_far_pipeline shares the cache: the causal sample (and its call count) equals a plain diffusers
    AnyFlowFARPipeline's over the same FAR transformer, noise and text."""
    from diffusers import AnyFlowFARPipeline, FlowMapEulerDiscreteScheduler

    from anyflow.eval.pipeline import build_far_pipeline, sample_with_far_pipeline
    from anyflow.models.far import build_tiny_far

    base = tiny["base"]
    model = build_tiny_far(0, chunk_partition=(1, 2, 2), attention="dense")
    ours = build_far_pipeline(base, model)
    plain = AnyFlowFARPipeline(tokenizer=base.text.tokenizer, text_encoder=base.text.model, transformer=model,
                               vae=base.vae.vae, scheduler=FlowMapEulerDiscreteScheduler(num_train_timesteps=1000,
                                                                                         shift=5.0))
    plain.set_progress_bar_config(disable=True)
    assert type(plain) is not type(ours)
    g = torch.Generator().manual_seed(3)
    noise, c = torch.randn(1, 5, 4, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    got, calls = sample_with_far_pipeline(base, ours, c, noise, 2)
    ref, ref_calls = sample_with_far_pipeline(base, plain, c, noise, 2)
    assert torch.equal(got, ref) and calls == ref_calls > 0
