"""Training methods: each owns its losses and optimiser steps; the loop owns everything else.

* :class:`TeacherMethod` — LoRA flow matching on the data (METHOD.md §4).
* :class:`FlowMapMethod` — the forward flow-map loss (§6) on the base converted to AnyFlow; also the
  downstream ``finetune`` method (same loss, initialised from a distilled generator, §0/§12 Fig. 9).
* :class:`OnPolicyMethod` — on-policy distillation (§7): FMBS rollout + DMD + co-trained forward loss
  for the generator, flow matching on generator samples for the critic, 1:1 (configurable) updates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from anyflow.config import DistillStage, FlowMapStage, LossConfig, OptimConfig, TeacherStage
from anyflow.dmd import critic_loss, dmd_generator_loss
from anyflow.flowmap import FlowMapLossConfig, flow_matching_loss, forward_flowmap_loss
from anyflow.rollout import fmbs_rollout
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import TrainContext


def flowmap_loss_config(loss: LossConfig) -> FlowMapLossConfig:
    return FlowMapLossConfig(
        guidance_scale=loss.guidance_scale,
        fd_epsilon=loss.fd_epsilon,
        weight_type=loss.weight_type,
        adaptive_scaling=loss.adaptive_scaling,
        text_dropout=loss.text_dropout,
        diffusion_ratio=loss.diffusion_ratio,
        consistency_ratio=loss.consistency_ratio,
        shift=loss.shift,
    )


def _scalars(diag: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in diag.items():
        if k.startswith("loss") and torch.is_tensor(v) and v.numel() == 1:
            out[prefix + k] = float(v)
    return out


class TeacherMethod:
    """Stage 0: LoRA flow matching, logit-normal t, shift 5, text dropout to the negative embedding."""

    name = "train_teacher"

    def __init__(self, models: AdapterModel, cfg: TeacherStage, negative: torch.Tensor) -> None:
        self.models, self.cfg, self.negative = models, cfg, negative
        models.add("teacher", "teacher")

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        return {"teacher": (self.models.params("teacher"), self.cfg.optim)}

    def ema_group(self) -> str:
        return "teacher"

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        accum = ctx.cfg.grad_accum
        total = 0.0
        for _ in range(accum):
            batch = ctx.next_batch()
            loss, _ = flow_matching_loss(
                self.models.fn("teacher"), batch["latents"], batch["text"], ctx.generator,
                shift=self.cfg.shift, c_neg=self.negative.to(ctx.device), text_dropout=self.cfg.text_dropout,
            )
            self.models.backward("teacher", loss / accum, ctx.backward)
            total += float(loss.detach()) / accum
        ctx.clip_and_step("teacher")
        return {"loss": total}


def _forward_loss(
    models: AdapterModel, ctx: TrainContext, batch: Mapping, negative: torch.Tensor, loss_cfg: FlowMapLossConfig,
    scale: float,
) -> dict[str, float]:
    loss, diag = forward_flowmap_loss(
        models.fn("generator"), batch["latents"], batch["text"], negative.to(ctx.device), ctx.generator,
        loss_cfg, rank=ctx.rank, world_size=ctx.world_size, gather=ctx.gather,
    )
    models.backward("generator", loss * scale, ctx.backward)
    return {"loss": float(loss.detach()), **_scalars(diag)}


class FlowMapMethod:
    """Stage 1 (and downstream fine-tuning): the forward flow-map loss with fused CFG (§6.7)."""

    def __init__(
        self, models: AdapterModel, cfg: FlowMapStage, negative: torch.Tensor, *,
        init: Mapping[str, torch.Tensor] | None = None, name: str = "train_flowmap",
    ) -> None:
        self.models, self.cfg, self.negative, self.name = models, cfg, negative, name
        self.loss_cfg = flowmap_loss_config(cfg.loss)
        models.add("generator", "generator", init=init)

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        return {"generator": (self.models.params("generator"), self.cfg.optim)}

    def ema_group(self) -> str:
        return "generator"

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        accum = ctx.cfg.grad_accum
        sums: dict[str, float] = {}
        for _ in range(accum):
            out = _forward_loss(self.models, ctx, ctx.next_batch(), self.negative, self.loss_cfg, 1.0 / accum)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        ctx.clip_and_step("generator")
        return sums


def rollout_plan(seed: int, step: int, stream: str, steps_list: tuple[int, ...]) -> tuple[int, int]:
    """(N, k) for this step: N ~ U(steps_list), k ~ U{0..N-1} (§7.2).

    Derived from (seed, step, stream) only, so every rank draws the same plan without a broadcast and
    a resumed run continues the same sequence.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    n = steps_list[int(torch.randint(len(steps_list), (1,), generator=g))]
    k = int(torch.randint(n, (1,), generator=g))
    return n, k


class OnPolicyMethod:
    """Stage 2 (§7.7): generator update (FMBS + DMD + forward loss) then critic update, per iteration."""

    name = "distill"

    def __init__(
        self,
        models: AdapterModel,
        cfg: DistillStage,
        negative: torch.Tensor,
        *,
        teacher: Mapping[str, torch.Tensor],
        generator: Mapping[str, torch.Tensor],
        critic: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.models, self.cfg, self.negative = models, cfg, negative
        self.loss_cfg = flowmap_loss_config(cfg.loss)
        models.add("teacher", "teacher", init=teacher, trainable=False)
        models.add("critic", "critic", init=critic if critic is not None else teacher)
        models.add("generator", "generator", init=generator)

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        return {
            "generator": (self.models.params("generator"), self.cfg.generator_optim),
            "critic": (self.models.params("critic"), self.cfg.critic_optim),
        }

    def ema_group(self) -> str:
        return "generator"

    def _noise(self, like: torch.Tensor, ctx: TrainContext) -> torch.Tensor:
        return torch.randn(like.shape, generator=ctx.generator, dtype=torch.float32).to(like.device)

    def generator_update(self, ctx: TrainContext, step: int) -> dict[str, float]:
        m, cfg, neg = self.models, self.cfg, self.negative.to(ctx.device)
        n, k = rollout_plan(ctx.cfg.seed, step, "generator", cfg.steps_list)
        batch = ctx.next_batch()
        x_hat, info = fmbs_rollout(m.fn("generator"), self._noise(batch["latents"], ctx), batch["text"], n, k,
                                   shift=cfg.loss.shift)
        loss_dmd, _ = dmd_generator_loss(
            x_hat, m.fn("teacher"), m.fn("critic"), batch["text"], neg, ctx.generator,
            real_guidance_scale=cfg.real_guidance_scale, shift=cfg.loss.shift, weight=cfg.dmd_weight,
        )
        m.backward("generator", loss_dmd, ctx.backward)
        out = {"loss/dmd": float(loss_dmd.detach()), "nfe": float(info.calls), "rollout_steps": float(n), "rollout_k": float(k)}
        if cfg.cotrain_forward:
            fwd = _forward_loss(m, ctx, batch, self.negative, self.loss_cfg, 1.0)
            out.update({f"forward/{k_}": v for k_, v in fwd.items()})
        ctx.clip_and_step("generator")
        return out

    def critic_update(self, ctx: TrainContext, step: int) -> dict[str, float]:
        m, cfg = self.models, self.cfg
        n, k = rollout_plan(ctx.cfg.seed, step, "critic", cfg.steps_list)
        batch = ctx.next_batch()
        with torch.no_grad():
            x_hat, _ = fmbs_rollout(m.fn("generator"), self._noise(batch["latents"], ctx), batch["text"], n, k,
                                    shift=cfg.loss.shift)
        loss, _ = critic_loss(m.fn("critic"), x_hat, batch["text"], ctx.generator, shift=cfg.loss.shift)
        m.backward("critic", loss, ctx.backward)
        ctx.clip_and_step("critic")
        return {"loss/critic": float(loss.detach())}

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if step % self.cfg.update_ratio == 0:
            out.update(self.generator_update(ctx, step))
        out.update(self.critic_update(ctx, step))
        return out
