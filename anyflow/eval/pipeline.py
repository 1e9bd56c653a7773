"""Sampling through diffusers' ``AnyFlowPipeline`` (the reference inference path, docs/method.md §2.4, §9).

The evaluate stage samples flow-map checkpoints the way users will: a diffusers ``AnyFlowPipeline``
around a transformer whose generator LoRA is merged into the weights (``W + (α/r)·B·A``, §2.3, as in
the released checkpoints) and ``FlowMapEulerDiscreteScheduler(shift=5)``. This module builds that
pipeline from our :class:`~anyflow.models.loading.BaseModel` and calls it with our own conditioning
and noise, so its output is directly comparable with :func:`anyflow.rollout.flowmap_euler_sample`.

How the pipeline lines up with our sampler (checked in ``tests/test_eval_pipeline.py``):

* Grid: ``set_timesteps(N)`` gives σ = shift_5(linspace(1, 0, N+1)[:-1]) with a terminal 0 appended,
  in float64 — the same σ_i = shift_5(1 − i/N) as §2.4 / ``anyflow.timesteps.flowmap_euler_sigmas``.
* Call i gets t = 1000·σ_i and r = 1000·σ_{i+1} as (B, F) float64 tensors (the transformer's sinusoidal
  projection casts them to fp32, so they equal our fp32 τ; with ``deltatime_type="t-r"`` the
  difference t − r is taken in float64 first); ``use_mean_velocity=False`` feeds r = t.
* Step: z ← z − (σ_i − σ_{i+1})·u, computed in float64 and cast back to the *transformer's* dtype.
* Layout: the pipeline takes ``latents`` as (B, C, F, H, W) (the standard diffusers layout, permuted
  to (B, F, C, H, W) inside) and returns (B, C, F, H, W) for ``output_type="latent"``; we permute on
  both sides so callers keep our (B, F, C, H, W).
* Differences that matter only in reduced precision: the pipeline casts the initial noise to the
  transformer dtype and keeps the latent state in that dtype between steps (bf16 for the real
  models, as §9 says); ``flowmap_euler_sample`` keeps the state in the noise's dtype (fp32) and casts
  only the transformer input. With an fp32 transformer the two agree to float rounding.
* CFG (``guidance_scale > 1``, the teacher only) runs the negative and positive batches in one call
  (``torch.cat([neg, pos])``) and mixes ``u_∅ + g·(u_c − u_∅)``, the same formula as
  ``anyflow.stages.evaluate.guided``.

Prompts given as strings are embedded with :meth:`TextEncoder.encode` (our Wan convention, the same
embeddings every other stage uses), not with the pipeline's own encoder.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from anyflow.timesteps import flowmap_euler_sigmas

if TYPE_CHECKING:
    from diffusers import AnyFlowPipeline

    from anyflow.models.loading import BaseModel

DEFAULT_SHIFT = 5.0  # Wan2.1's shift; the scheduler's own default (1.0) would be a different grid


def build_pipeline(base: BaseModel, transformer: torch.nn.Module, *, shift: float = DEFAULT_SHIFT) -> AnyFlowPipeline:
    """An ``AnyFlowPipeline`` over ``base``'s tokenizer, text encoder and VAE and the given transformer.

    Args:
        base: the frozen base bundle (its ``text.tokenizer``, ``text.model`` and ``vae.vae`` are used).
        transformer: an ``AnyFlowTransformer3DModel``, normally with the generator LoRA merged
            (:func:`anyflow.models.lora.merge_adapter`); it is used as is, not copied.
        shift: the timestep shift of ``FlowMapEulerDiscreteScheduler`` (5 for Wan2.1, docs/method.md §1.2).

    The pipeline's progress bar is disabled (the evaluate stage has its own).
    """
    from diffusers import AnyFlowPipeline

    if not hasattr(transformer, "condition_embedder") or not hasattr(transformer.condition_embedder, "delta_embedder"):
        raise TypeError(
            f"build_pipeline needs an AnyFlowTransformer3DModel (with a delta embedder), got {type(transformer).__name__};"
            " convert a Wan model with anyflow.models.convert.wan_to_anyflow first."
        )
    return _assemble(AnyFlowPipeline, base, transformer, shift)


def _assemble(pipeline_cls: Any, base: BaseModel, transformer: torch.nn.Module, shift: float) -> Any:
    """``pipeline_cls`` over ``base``'s tokenizer, text encoder and VAE, ``transformer`` and a FlowMap-Euler
    scheduler with ``shift``; no progress bar."""
    from diffusers import FlowMapEulerDiscreteScheduler

    pipe = _with_cached_execution_device(pipeline_cls)(
        tokenizer=base.text.tokenizer,
        text_encoder=base.text.model,
        transformer=transformer,
        vae=base.vae.vae,
        scheduler=FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift)),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _component_key(pipe: Any) -> tuple:
    """What ``_execution_device`` depends on, cheaply: per module component its identity, the device of its
    first parameter or buffer, and the accelerate / diffusers hooks on it."""
    names = pipe.__dict__.get("_anyflow_component_names")
    if names is None:  # diffusers' ``components`` inspects the signature on every call: list the names once
        names = pipe.__dict__["_anyflow_component_names"] = tuple(pipe.components)
    key = []
    for name in names:
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            first = next(itertools.chain(model.parameters(), model.buffers()), None)
            key.append((name, id(model), None if first is None else first.device,
                        id(getattr(model, "_hf_hook", None)), id(getattr(model, "_diffusers_hook", None))))
    return tuple(key)


_CACHED_CLASSES: dict[type, type] = {}


def _with_cached_execution_device(pipeline_cls: type) -> type:
    """``pipeline_cls`` with ``_execution_device`` cached per pipeline.

    diffusers' property walks every submodule of every component looking for offloading hooks, several
    times per pipeline call (≈ 5 ms of fixed cost per call on a CPU: measured by ``benchmarks/bench_sampling``).
    The cached value is diffusers' own answer, computed again whenever a component is replaced, moved to
    another device or gets an accelerate / diffusers hook on its top module (``_component_key``); the
    pipelines built here are never offloaded, so the answer cannot change otherwise. Outputs are unchanged
    (``tests/test_eval_pipeline.py`` compares with a plain diffusers pipeline).
    """
    if pipeline_cls not in _CACHED_CLASSES:
        from diffusers import DiffusionPipeline

        def _execution_device(self: Any) -> torch.device:
            key = _component_key(self)
            cached = self.__dict__.get("_anyflow_execution_device")
            if cached is None or cached[0] != key:
                cached = (key, DiffusionPipeline._execution_device.fget(self))
                self.__dict__["_anyflow_execution_device"] = cached
            return cached[1]

        _CACHED_CLASSES[pipeline_cls] = type(pipeline_cls.__name__, (pipeline_cls,),
                                             {"_execution_device": property(_execution_device),
                                              "__module__": pipeline_cls.__module__})
    return _CACHED_CLASSES[pipeline_cls]


def pipeline_sigmas(pipe: AnyFlowPipeline, nfe: int) -> Tensor:
    """The pipeline scheduler's (N+1,) σ grid for ``nfe`` steps (float64, CPU), for comparison with §2.4."""
    pipe.scheduler.set_timesteps(nfe, device="cpu")
    return pipe.scheduler.sigmas.detach().to("cpu", torch.float64).clone()


def check_grid(pipe: AnyFlowPipeline, nfe: int, shift: float = DEFAULT_SHIFT) -> float:
    """Max |σ_pipeline − σ_§2.4| over the N-step grid; raises if the grids differ by more than 1e-12.

    Guards against a pipeline whose scheduler was configured with another shift (its default is 1).
    """
    ours = flowmap_euler_sigmas(nfe, shift)
    theirs = pipeline_sigmas(pipe, nfe)
    if theirs.shape != ours.shape:
        raise ValueError(f"AnyFlowPipeline grid for NFE={nfe} has {theirs.numel()} points, docs/method.md §2.4 has {ours.numel()}.")
    err = float((theirs - ours).abs().max())
    if err > 1e-12:
        raise ValueError(
            f"AnyFlowPipeline grid for NFE={nfe} differs from σ_i = shift_{shift:g}(1 − i/N) by {err:.3g}; the scheduler"
            f" has shift={pipe.scheduler.config.shift}, build it with build_pipeline(..., shift={shift:g})."
        )
    return err


def _embeds(base: BaseModel, prompts_or_embeds: Sequence[str] | Tensor) -> Tensor:
    if isinstance(prompts_or_embeds, Tensor):
        if prompts_or_embeds.ndim != 3:
            raise ValueError(
                f"sample_with_pipeline: prompt embeddings must be (B, L, D), got shape {tuple(prompts_or_embeds.shape)}."
            )
        return prompts_or_embeds
    if isinstance(prompts_or_embeds, str):
        raise TypeError("sample_with_pipeline: pass a list of prompts, e.g. ['a red circle'], not a single string.")
    with torch.no_grad():
        return base.text.encode(list(prompts_or_embeds))


def _frame_size(base: BaseModel, noise: Tensor) -> tuple[int, int, int]:
    """(num_frames, height, width) in pixels for the pipeline's input checks (the latents fix the real shape).

    The pipeline insists on height/width divisible by 16; they only feed that check when ``latents``
    is given, so sizes that are not are rounded up to the next multiple of 16.
    """
    f, _, h, w = noise.shape[1:]
    tf, sf = base.vae.temporal_factor, base.vae.spatial_factor
    return (f - 1) * tf + 1, 16 * math.ceil(h * sf / 16), 16 * math.ceil(w * sf / 16)


@torch.no_grad()
def sample_with_pipeline(
    base: BaseModel,
    transformer: torch.nn.Module | AnyFlowPipeline,
    prompts_or_embeds: Sequence[str] | Tensor,
    noise: Tensor,
    nfe: int,
    *,
    shift: float = DEFAULT_SHIFT,
    use_mean_velocity: bool = True,
    guidance_scale: float = 1.0,
    negative_embeds: Tensor | None = None,
) -> Tensor:
    """Sample with diffusers' ``AnyFlowPipeline`` from fixed noise; returns normalised latents (B, F, C, h, w).

    Args:
        base: the base bundle (text encoder, VAE) the pipeline is built around.
        transformer: a merged AnyFlow transformer (see :func:`build_pipeline`) or an ``AnyFlowPipeline``
            built before (reused; its scheduler's grid is checked against docs/method.md §2.4).
        prompts_or_embeds: prompts (embedded with ``base.text.encode``) or embeddings (B, L, D).
        noise: the initial latent (B, F, C, h, w) at σ = 1, in our layout; not modified.
        nfe: N, the number of steps = transformer calls (2N batched rows with CFG).
        shift: the grid's timestep shift (docs/method.md §1.2, §2.4).
        use_mean_velocity: False feeds r = t (plain Euler with the instantaneous velocity).
        guidance_scale: 1 for flow-map checkpoints (CFG is fused, §2.4); > 1 runs the pipeline's CFG
            with ``negative_embeds`` (the teacher's Euler + CFG sampler).
        negative_embeds: (1 or B, L, D) unconditional embeddings; required when ``guidance_scale > 1``.

    Output: fp32 latents on ``noise``'s device, ready for ``base.vae.decode``.
    """
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"sample_with_pipeline: nfe must be a positive int, got {nfe!r}.")
    if noise.ndim != 5:
        raise ValueError(f"sample_with_pipeline: noise must be a (B, F, C, h, w) latent, got shape {tuple(noise.shape)}.")
    pipe = transformer if hasattr(transformer, "scheduler") else build_pipeline(base, transformer, shift=shift)
    check_grid(pipe, nfe, shift)
    c = _embeds(base, prompts_or_embeds)
    b = noise.shape[0]
    if c.shape[0] != b:
        raise ValueError(f"sample_with_pipeline: {c.shape[0]} prompt embeddings for {b} noise samples; pass one per sample.")
    neg = None
    if guidance_scale > 1.0:
        if negative_embeds is None:
            raise ValueError(
                "sample_with_pipeline: guidance_scale > 1 needs negative_embeds (e.g. base.text.encode([WAN_NEGATIVE_PROMPT]))."
            )
        neg = negative_embeds.expand(b, -1, -1) if negative_embeds.shape[0] == 1 else negative_embeds
    device = next(itertools.chain(pipe.transformer.parameters(), pipe.transformer.buffers())).device
    if torch.device(pipe._execution_device) != device:  # the pipeline puts the latents on its first module's device
        raise ValueError(
            f"sample_with_pipeline: the pipeline runs on {pipe._execution_device} but the transformer is on {device};"
            " put base.vae, base.text and the transformer on one device."
        )
    num_frames, height, width = _frame_size(base, noise)
    out = pipe(
        prompt_embeds=c.to(device),
        negative_prompt_embeds=None if neg is None else neg.to(device),
        latents=noise.permute(0, 2, 1, 3, 4).to(device),  # ours (B, F, C, h, w) -> diffusers (B, C, F, h, w)
        num_inference_steps=nfe,
        guidance_scale=float(guidance_scale),
        num_frames=num_frames,
        height=height,
        width=width,
        output_type="latent",
        use_mean_velocity=use_mean_velocity,
        return_dict=False,
    )[0]
    return out.permute(0, 2, 1, 3, 4).float().to(noise.device)  # back to (B, F, C, h, w)


# ------------------------------------------------------------------------------- causal (FAR) checkpoints


def build_far_pipeline(base: BaseModel, transformer: torch.nn.Module, *, shift: float = DEFAULT_SHIFT) -> Any:
    """An ``AnyFlowFARPipeline`` over ``base``'s text encoder and VAE and a FAR transformer (generator merged).

    The transformer keeps the attention processors :func:`anyflow.models.far.set_far_attention` installed: they
    also mask the zero padding keys diffusers' cache-read step would attend (tests/test_far_rollout.py checks
    the pipeline then equals :func:`anyflow.causal.causal_rollout` to 2e-5).
    """
    from diffusers import AnyFlowFARPipeline

    if not hasattr(transformer, "far_patch_embedding"):
        raise TypeError(f"build_far_pipeline needs an AnyFlowFARTransformer3DModel, got {type(transformer).__name__}.")
    return _assemble(AnyFlowFARPipeline, base, transformer, shift)


@torch.no_grad()
def sample_with_far_pipeline(
    base: BaseModel, pipe: Any, prompt_embeds: Tensor, noise: Tensor, nfe: int, *, context: Tensor | None = None,
    shift: float = DEFAULT_SHIFT,
) -> tuple[Tensor, int]:
    """Sample a causal checkpoint with ``AnyFlowFARPipeline`` (N FlowMap-Euler steps per chunk, KV cache, §8.5).

    ``noise`` (B, F, C, h, w) in our layout; ``context`` (B, F_ctx, C, h, w) latents for I2V (1 frame) or V2V
    (whole chunks), kept unchanged. Returns the latents (B, F, C, h, w) fp32 and the transformer calls counted
    during the call (denoising calls + cache passes).
    """
    if noise.ndim != 5:
        raise ValueError(f"sample_with_far_pipeline: noise must be (B, F, C, h, w), got shape {tuple(noise.shape)}.")
    check_grid(pipe, nfe, shift)
    transformer = pipe.transformer
    device = transformer.device
    calls = [0]
    hook = transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        num_frames, height, width = _frame_size(base, noise)
        out = pipe(
            prompt_embeds=prompt_embeds.to(device),
            latents=noise.permute(0, 2, 1, 3, 4).to(device),  # ours (B, F, C, h, w) -> diffusers (B, C, F, h, w)
            video_latents=None if context is None else context.to(device),
            num_inference_steps=nfe,
            num_frames=num_frames,
            height=height,
            width=width,
            chunk_partition=list(transformer.config.chunk_partition),
            output_type="latent",
            guidance_scale=1.0,  # CFG is fused into the flow map (§6.2)
        ).frames
    finally:
        hook.remove()
    return out.permute(0, 2, 1, 3, 4).float().to(noise.device), calls[0]
