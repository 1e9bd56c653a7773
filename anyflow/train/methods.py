"""Training methods: each owns its losses and optimiser steps; the loop owns everything else.

* :class:`TeacherMethod` — LoRA flow matching on the data (docs/method.md §4).
* :class:`FlowMapMethod` — the forward flow-map loss (§6) on the base converted to AnyFlow; also the
  downstream ``finetune`` method (same loss, initialised from a distilled generator, §0/§12 Fig. 9).
* :class:`OnPolicyMethod` — on-policy distillation (§7): FMBS rollout + DMD + co-trained forward loss
  for the generator, flow matching on generator samples for the critic, 1:1 (configurable) updates.

Gradient accumulation (``train.grad_accum`` = A): every optimiser step backpropagates A micro-batches of
``train.batch_size`` with each loss scaled by 1/A, and logs the means over them. The on-policy
generator and critic updates use one (N, k) plan per update for all their micro-batches (and ranks,
:func:`rollout_plan`). The accumulated gradient equals a single step on the A micro-batches together
(same samples and random draws): DMD normalises per sample and the critic loss is a per-sample mean;
the forward loss's pair split and adaptive scaling are made global over the accumulated batch
(:class:`ForwardAccumulator`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from anyflow.config import DistillStage, FlowMapStage, LossConfig, OptimConfig, TeacherStage
from anyflow.dmd import critic_loss, dmd_generator_loss
from anyflow.flowmap import FlowMapLossConfig, flow_matching_loss, forward_flowmap_loss
from anyflow.rollout import FlowMapFn, fmbs_rollout
from anyflow.timesteps import PairType
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
        cfg_target=loss.cfg_target,
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
    """The forward flow-map loss (§6.7) of one batch for the generator, backpropagated with ``scale``."""
    return ForwardAccumulator(ctx, 1).add(models, batch, negative, loss_cfg, scale)


class ForwardAccumulator:
    """The forward flow-map loss over the ``accum`` micro-batches of one optimiser step.

    Micro-batch j on rank r is sample block j·W + r (W ranks) of one global batch of A·W·b samples:

    * the diffusion / consistency / general split (§6.1, by global index) is the split of that whole
      batch, as for a single step with A·b samples per rank; A copies of the split of W·b would, e.g.
      for W·b = 2 (split (1, 0, 1)), never train a consistency pair;
    * the adaptive-scaling mean (§6.5) is taken over the diffusion-pair losses of this micro-batch and
      of every earlier one of the step (the gather handed to the loss returns them too). Diffusion pairs
      hold the lowest global indices, so every one of them is in a micro-batch no later than any
      non-diffusion pair: each non-diffusion pair is scaled by the mean over *all* diffusion pairs of
      the accumulated batch, exactly as in one big step.

    With A = 1 this is the plain loss on the local batch (the ranks' pair split and gather).
    So, up to floating-point summation order, the accumulated gradient equals that of a single step on
    the concatenated micro-batches (the same samples and random draws; with W > 1 the global batch's
    blocks are ordered micro-batch-major instead of rank-major). ``tests/test_train_accum.py`` checks it.
    """

    def __init__(self, ctx: TrainContext, accum: int) -> None:
        self.ctx, self.accum, self.micro = ctx, accum, 0
        self._gathered: dict[int, list[torch.Tensor]] = {}  # gather call index -> this step's gathered values
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def _gather(self) -> Callable[[torch.Tensor], torch.Tensor]:
        calls = [0]

        def gather(v: torch.Tensor) -> torch.Tensor:
            g = self.ctx.gather(v)
            past = self._gathered.setdefault(calls[0], [])
            calls[0] += 1
            out = torch.cat([*past, g]) if past else g
            past.append(g)
            return out

        return gather

    def add(
        self, models: AdapterModel, batch: Mapping, negative: torch.Tensor, loss_cfg: FlowMapLossConfig, scale: float,
        *, u: FlowMapFn | None = None, x: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One micro-batch: loss, backward of ``loss * scale``; returns its scalars (and accumulates them).

        ``u`` / ``x`` replace the generator callable and the clean latents (default: ``models.fn("generator")``
        on ``batch["latents"]``); the causal variant passes its teacher-forced callable and the window.
        """
        ctx = self.ctx
        if self.micro >= self.accum:
            raise RuntimeError(f"forward loss: micro-batch {self.micro + 1} of a step with {self.accum}")
        loss, diag = forward_flowmap_loss(
            u if u is not None else models.fn("generator"), batch["latents"] if x is None else x, batch["text"],
            negative.to(ctx.device), ctx.generator,
            loss_cfg, rank=self.micro * ctx.world_size + ctx.rank, world_size=self.accum * ctx.world_size,
            gather=self._gather(),
        )
        models.backward("generator", loss * scale, ctx.backward)
        self.micro += 1
        out = {"loss": float(loss.detach()), **_scalars(diag)}
        # per-pair-type means are weighted by how many pairs of the type the micro-batch holds
        counts = {f"loss/{kind.name.lower()}": float((diag["pair_type"] == kind).sum()) for kind in PairType}
        for k, v in out.items():
            w = counts.get(k, 1.0)
            self._sums[k] = self._sums.get(k, 0.0) + v * w
            self._weights[k] = self._weights.get(k, 0.0) + w
        return out

    def metrics(self) -> dict[str, float]:
        """The scalars of the whole accumulated batch (means over its samples, per type where typed)."""
        return {k: self._sums[k] / self._weights[k] for k in self._sums}


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
        forward = ForwardAccumulator(ctx, accum)
        for _ in range(accum):
            forward.add(self.models, ctx.next_batch(), self.negative, self.loss_cfg, 1.0 / accum)
        ctx.clip_and_step("generator")
        return forward.metrics()


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream) only: every rank draws the same values without a
    broadcast, and a resumed run continues the same sequence."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def rollout_plan(seed: int, step: int, stream: str, steps_list: tuple[int, ...]) -> tuple[int, int]:
    """(N, k) for this step: N ~ U(steps_list), k ~ U{0..N-1} (§7.2), from :func:`step_generator`."""
    g = step_generator(seed, step, stream)
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
        models.add("generator", "generator", init=generator, extra=self.generator_extra)

    #: base modules the generator adapter trains in full (the causal variant's patch embedding)
    generator_extra: tuple[str, ...] = ()

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        return {
            "generator": (self.models.params("generator"), self.cfg.generator_optim),
            "critic": (self.models.params("critic"), self.cfg.critic_optim),
        }

    def rollout(self, ctx: TrainContext, batch: Mapping, n: int, k: int) -> tuple[torch.Tensor, int]:
        """FMBS from fresh noise (§7.2): the sample and the network calls it made (grads if autograd is on)."""
        x_hat, info = fmbs_rollout(self.models.fn("generator"), self._noise(batch["latents"], ctx), batch["text"],
                                   n, k, shift=self.cfg.loss.shift)
        return x_hat, info.calls

    def cotrain(self, forward: ForwardAccumulator, batch: Mapping, step: int, scale: float) -> None:
        """The co-trained forward flow-map loss of one micro-batch (§7.5), backward included."""
        forward.add(self.models, batch, self.negative, self.loss_cfg, scale)

    def ema_group(self) -> str:
        return "generator"

    def _noise(self, like: torch.Tensor, ctx: TrainContext) -> torch.Tensor:
        return torch.randn(like.shape, generator=ctx.generator, dtype=torch.float32).to(like.device)

    def generator_update(self, ctx: TrainContext, step: int) -> dict[str, float]:
        """One generator update over ``train.grad_accum`` micro-batches, one (N, k) plan for all of them.

        Each micro-batch: fresh batch → FMBS rollout from fresh noise → DMD (per-sample normalised, so
        accumulation is exact) → backward of ``L_DMD / accum``; then the co-trained forward loss
        (:class:`ForwardAccumulator`, also exact). Logged losses are the means over the micro-batches.
        """
        m, cfg, neg = self.models, self.cfg, self.negative.to(ctx.device)
        n, k = rollout_plan(ctx.cfg.seed, step, "generator", cfg.steps_list)
        accum = ctx.cfg.grad_accum
        forward = ForwardAccumulator(ctx, accum) if cfg.cotrain_forward else None
        dmd, calls = 0.0, 0
        for _ in range(accum):
            batch = ctx.next_batch()
            x_hat, calls = self.rollout(ctx, batch, n, k)
            loss_dmd, _ = dmd_generator_loss(
                x_hat, m.fn("teacher"), m.fn("critic"), batch["text"], neg, ctx.generator,
                real_guidance_scale=cfg.real_guidance_scale, shift=cfg.loss.shift, weight=cfg.dmd_weight,
            )
            m.backward("generator", loss_dmd / accum, ctx.backward)
            dmd += float(loss_dmd.detach()) / accum
            if forward is not None:
                self.cotrain(forward, batch, step, 1.0 / accum)
        out = {"loss/dmd": dmd, "nfe": float(calls), "rollout_steps": float(n), "rollout_k": float(k)}
        if forward is not None:
            out.update({f"forward/{k_}": v for k_, v in forward.metrics().items()})
        ctx.clip_and_step("generator")
        return out

    def critic_update(self, ctx: TrainContext, step: int) -> dict[str, float]:
        """One critic update over ``train.grad_accum`` fresh micro-batches, one no-grad (N', k') plan."""
        m, cfg = self.models, self.cfg
        n, k = rollout_plan(ctx.cfg.seed, step, "critic", cfg.steps_list)
        accum = ctx.cfg.grad_accum
        total = 0.0
        for _ in range(accum):
            batch = ctx.next_batch()
            with torch.no_grad():
                x_hat, _ = self.rollout(ctx, batch, n, k)
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
