"""Training methods of the causal FAR variant (METHOD.md §8.2-8.6), on one shared FAR base.

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

import hashlib
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
from anyflow.dmd import critic_loss, dmd_generator_loss
from anyflow.flowmap import FlowMapLossConfig, guided_flow_matching_loss
from anyflow.rollout import FlowMapFn
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import TrainContext
from anyflow.train.methods import ForwardAccumulator, flowmap_loss_config, rollout_plan

FAR_EXTRA = ("far_patch_embedding",)  # trained in full by the causal generator (§8.1, §10)


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream): the same draws on every rank and after a resume."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def num_chunks_for_step(far: FarConfig, seed: int, step: int, stream: str) -> int:
    """§8.2.1 context length of this step's teacher-forced clips (the same on every rank)."""
    return sample_num_chunks(
        step_generator(seed, step, f"chunks:{stream}"), long_context_ratio=far.long_context_ratio,
        min_chunks=far.min_chunks, max_chunks=far.max_chunks,
    )


def _generator_fn(models: AdapterModel, fn: FlowMapFn) -> FlowMapFn:
    """``fn`` (which calls the FAR transformer directly) with the generator adapter active for each call."""

    def u(z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        models.activate("generator")
        return fn(z, t, r, c)

    return u


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
    u = _generator_fn(models, teacher_forced_fn(models.transformer, split))
    out = acc.add(models, batch, negative, loss_cfg, scale, u=u, x=split.window)
    return {**out, "num_chunks": float(num_chunks)}


class CausalFlowMapMethod:
    """Stage 1b: teacher-forced forward flow-map loss + auxiliary bidirectional loss (§8.4)."""

    def __init__(
        self, models: AdapterModel, cfg: FlowMapStage, far: FarConfig, negative: torch.Tensor, *,
        init: Mapping[str, torch.Tensor] | None = None, name: str = "train_flowmap",
    ) -> None:
        if not models.is_far:
            raise TypeError("CausalFlowMapMethod needs a FAR base (preset variant 'far').")
        self.models, self.cfg, self.far, self.negative, self.name = models, cfg, far, negative, name
        self.loss_cfg = flowmap_loss_config(cfg.loss)
        models.add("generator", "generator", init=init, extra=FAR_EXTRA)

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        return {"generator": (self.models.params("generator"), self.cfg.optim)}

    def ema_group(self) -> str:
        return "generator"

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        accum, seed = ctx.cfg.grad_accum, ctx.cfg.seed
        n_chunks = num_chunks_for_step(self.far, seed, step, "forward")
        aux = float(torch.rand((), generator=step_generator(seed, step, "bidirectional"))) < self.far.bidirectional_prob
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


class CausalOnPolicyMethod:
    """Stage 2b (§8.6): causal FMBS rollouts scored by the bidirectional real score and critic."""

    name = "distill"

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
        self.models, self.cfg, self.far, self.negative = models, cfg, far, negative
        self.loss_cfg = flowmap_loss_config(cfg.loss)
        models.add("teacher", "teacher", init=teacher, trainable=False)
        models.add("critic", "critic", init=critic if critic is not None else teacher)
        models.add("generator", "generator", init=generator, extra=FAR_EXTRA)
        self.causal = FarCausalModel(models.transformer, far.chunk_partition)

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        return {
            "generator": (self.models.params("generator"), self.cfg.generator_optim),
            "critic": (self.models.params("critic"), self.cfg.critic_optim),
        }

    def ema_group(self) -> str:
        return "generator"

    def _rollout(self, ctx: TrainContext, batch: Mapping, n: int, k: int) -> tuple[torch.Tensor, int]:
        """Chunk-wise FMBS from fresh noise (T2V, §8.6); gradients only within chunks when autograd is on."""
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=ctx.generator, dtype=torch.float32).to(latents.device)
        self.models.activate("generator")
        x_hat, info = causal_rollout(self.causal, noise, batch["text"], num_steps=n, k=k, shift=self.cfg.loss.shift)
        return x_hat, info.nfe

    def generator_update(self, ctx: TrainContext, step: int) -> dict[str, float]:
        m, cfg, neg = self.models, self.cfg, self.negative.to(ctx.device)
        n, k = rollout_plan(ctx.cfg.seed, step, "generator", cfg.steps_list)
        accum = ctx.cfg.grad_accum
        out: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            out[key] = out.get(key, 0.0) + value / accum

        n_chunks = num_chunks_for_step(self.far, ctx.cfg.seed, step, "onpolicy")
        forward = ForwardAccumulator(ctx, accum) if cfg.cotrain_forward else None
        for _ in range(accum):
            batch = ctx.next_batch()
            x_hat, nfe = self._rollout(ctx, batch, n, k)
            loss_dmd, _ = dmd_generator_loss(
                x_hat, m.fn("teacher"), m.fn("critic"), batch["text"], neg, ctx.generator,
                real_guidance_scale=cfg.real_guidance_scale, shift=cfg.loss.shift, weight=cfg.dmd_weight,
            )
            m.backward("generator", loss_dmd / accum, ctx.backward)
            add("loss/dmd", float(loss_dmd.detach()))
            add("nfe", float(nfe))
            if forward is not None:  # §8.6: teacher-forced loss with long-context sampling, no auxiliary loss
                causal_forward_loss(m, forward, batch, self.negative, self.loss_cfg, self.far, n_chunks, 1.0 / accum)
        if forward is not None:
            out.update({f"forward/{key}": v for key, v in forward.metrics().items()})
            out["forward/num_chunks"] = float(n_chunks)
        out.update({"rollout_steps": float(n), "rollout_k": float(k)})
        ctx.clip_and_step("generator")
        return out

    def critic_update(self, ctx: TrainContext, step: int) -> dict[str, float]:
        m, cfg = self.models, self.cfg
        n, k = rollout_plan(ctx.cfg.seed, step, "critic", cfg.steps_list)
        accum = ctx.cfg.grad_accum
        total = 0.0
        for _ in range(accum):
            batch = ctx.next_batch()
            with torch.no_grad():
                x_hat, _ = self._rollout(ctx, batch, n, k)
            loss, _ = critic_loss(m.fn("critic"), x_hat, batch["text"], ctx.generator, shift=cfg.loss.shift)
            m.backward("critic", loss / accum, ctx.backward)
            total += float(loss.detach()) / accum
        ctx.clip_and_step("critic")
        return {"loss/critic": total}

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if step % self.cfg.update_ratio == 0:
            out.update(self.generator_update(ctx, step))
        out.update(self.critic_update(ctx, step))
        return out

