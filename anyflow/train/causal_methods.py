"""Training methods of the causal FAR variant (docs/method.md §8.2-8.6), on one shared FAR base.

The FAR base (``AnyFlowFARTransformer3DModel`` converted from Wan) carries the named adapters of
:class:`~anyflow.train.adapters.AdapterModel`. Called as one chunk over the whole clip it *is* the
bidirectional model, so the teacher (real score) and the critic (fake score) are adapters on the same base
as the causal generator, as in the bidirectional on-policy stage. The generator adapter also owns the
compressed patch embedding, trained in full (§8.1).

* :class:`CausalFlowMapMethod` — stage 1b (and causal fine-tuning): the teacher-forced forward flow-map loss
  on ``[compressed context | noisy window | clean copy]`` with long-context sampling (§8.2-8.4), plus the
  auxiliary bidirectional loss with probability ``far.bidirectional_prob`` per step.
* :class:`CausalOnPolicyMethod` — stage 2b (§8.6): chunk-by-chunk FMBS rollouts with the same (N, k) for all
  chunks and a KV cache of the generator's own chunks (no gradient across chunks), the whole video scored by
  the bidirectional real score and critic (DMD), co-trained with the teacher-forced loss (no auxiliary loss).

Per-step random choices that must agree on every rank and after a resume (the number of chunks, the
auxiliary-loss coin, N and k) are derived from (seed, step, stream), like :func:`~anyflow.train.methods.rollout_plan`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from anyflow.causal import (
    FarCausalModel,
    causal_rollout,
    sample_num_chunks,
    split_teacher_forcing,
    teacher_forced_fn,
)
from anyflow.config import DistillStage, FarConfig, FlowMapStage, OptimConfig
from anyflow.flowmap import FlowMapLossConfig, guided_flow_matching_loss
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import TrainContext
from anyflow.train.methods import ForwardAccumulator, OnPolicyMethod, flowmap_loss_config, step_generator

FAR_EXTRA = ("far_patch_embedding",)  # trained in full by the causal generator (§8.1, §10)


def num_chunks_for_step(far: FarConfig, seed: int, step: int, stream: str) -> int:
    """§8.2.1 context length of this step's teacher-forced clips (the same on every rank)."""
    return sample_num_chunks(
        step_generator(seed, step, f"chunks:{stream}"), long_context_ratio=far.long_context_ratio,
        min_chunks=far.min_chunks, max_chunks=far.max_chunks,
    )


def causal_forward_loss(
    models: AdapterModel, acc: ForwardAccumulator, batch: Mapping, negative: torch.Tensor,
    loss_cfg: FlowMapLossConfig, far: FarConfig, num_chunks: int, scale: float,
) -> dict[str, float]:
    """§8.4: the forward flow-map loss on the noisy window of the first ``num_chunks`` chunks (backward done).

    Through the bidirectional stage's :class:`~anyflow.train.methods.ForwardAccumulator`, so with gradient
    accumulation the pair split and adaptive scaling are those of the whole accumulated batch.
    """
    split = split_teacher_forcing(batch["latents"], far.chunk_partition, num_chunks,
                                  full_chunk_limit=far.full_chunk_limit)
    u = models.fn("generator", teacher_forced_fn(models.transformer, split))
    out = acc.add(models, batch, negative, loss_cfg, scale, u=u, x=split.window)
    return {**out, "num_chunks": float(num_chunks)}


class CausalFlowMapMethod:
    """Stage 1b: teacher-forced forward flow-map loss + auxiliary bidirectional loss (§8.4)."""

    def __init__(
        self, models: AdapterModel, cfg: FlowMapStage, far: FarConfig, negative: torch.Tensor, *,
        init: Mapping[str, torch.Tensor] | None = None, name: str = "train_flowmap", bidirectional: bool = True,
    ) -> None:
        if not models.is_far:
            raise TypeError("CausalFlowMapMethod needs a FAR base (preset variant 'far').")
        self.models, self.cfg, self.far, self.negative, self.name = models, cfg, far, negative, name
        # §8.4: the auxiliary loss belongs to stage 1b; downstream fine-tuning passes bidirectional=False
        self.bidirectional_prob = far.bidirectional_prob if bidirectional else 0.0
        self.loss_cfg = flowmap_loss_config(cfg.loss)
        models.add("generator", "generator", init=init, extra=FAR_EXTRA)

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        return {"generator": (self.models.params("generator"), self.cfg.optim)}

    def ema_group(self) -> str:
        return "generator"

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        accum, seed = ctx.cfg.grad_accum, ctx.cfg.seed
        n_chunks = num_chunks_for_step(self.far, seed, step, "forward")
        aux = float(torch.rand((), generator=step_generator(seed, step, "bidirectional"))) < self.bidirectional_prob
        acc = ForwardAccumulator(ctx, accum)
        aux_sum = 0.0
        for _ in range(accum):
            batch = ctx.next_batch()
            causal_forward_loss(self.models, acc, batch, self.negative, self.loss_cfg, self.far, n_chunks, 1.0 / accum)
            if aux:
                aux_sum += self._bidirectional(ctx, batch, 1.0 / accum) / accum
        ctx.clip_and_step("generator")
        out = {**acc.metrics(), "num_chunks": float(n_chunks)}
        if aux:
            out["loss/bidirectional"] = aux_sum
        return out

    def _bidirectional(self, ctx: TrainContext, batch: Mapping, scale: float) -> float:
        """§8.4 auxiliary loss on the full clip (r = t, fused guidance), backpropagated into the same grads."""
        loss_cfg = self.cfg.loss
        loss, _ = guided_flow_matching_loss(
            self.models.fn("generator"), batch["latents"], batch["text"], self.negative.to(ctx.device), ctx.generator,
            guidance_scale=loss_cfg.guidance_scale, shift=loss_cfg.shift, text_dropout=loss_cfg.text_dropout,
        )
        self.models.backward("generator", loss * scale, ctx.backward)
        return float(loss.detach())


class CausalOnPolicyMethod(OnPolicyMethod):
    """Stage 2b (§8.6): :class:`~anyflow.train.methods.OnPolicyMethod` (same updates, optimisers, accumulation
    and (N, k) plans) with the causal rollout and the teacher-forced co-trained loss. The teacher and critic
    are the bidirectional model on the FAR base and score the whole video (§7.3-7.4)."""

    generator_extra = FAR_EXTRA

    def __init__(
        self,
        models: AdapterModel,
        cfg: DistillStage,
        far: FarConfig,
        negative: torch.Tensor,
        *,
        teacher: Mapping[str, torch.Tensor],
        generator: Mapping[str, torch.Tensor],
        critic: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not models.is_far:
            raise TypeError("CausalOnPolicyMethod needs a FAR base (preset variant 'far').")
        self.far = far
        super().__init__(models, cfg, negative, teacher=teacher, generator=generator, critic=critic)
        self.causal = FarCausalModel(models.transformer, far.chunk_partition)

    def rollout(self, ctx: TrainContext, batch: Mapping, n: int, k: int) -> tuple[torch.Tensor, int]:
        """Chunk-wise FMBS from fresh noise (T2V, the same (N, k) in every chunk), the KV cache holding the
        generator's own chunks under no-grad: gradients only within chunks. Returns calls incl. cache passes."""
        self.models.activate("generator")
        x_hat, info = causal_rollout(self.causal, self._noise(batch["latents"], ctx), batch["text"], num_steps=n,
                                     k=k, shift=self.cfg.loss.shift)
        return x_hat, info.nfe

    def cotrain(self, forward: ForwardAccumulator, batch: Mapping, step: int, scale: float) -> None:
        """§8.6: the teacher-forced loss with long-context sampling and no auxiliary bidirectional loss."""
        n_chunks = num_chunks_for_step(self.far, forward.ctx.cfg.seed, step, "onpolicy")
        causal_forward_loss(self.models, forward, batch, self.negative, self.loss_cfg, self.far, n_chunks, scale)
