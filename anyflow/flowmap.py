"""Forward flow-map loss and plain flow matching (pure maths; docs/method.md §4, §6.2–6.8, §7.4).

All times are fp32 τ tensors (B, F); all loss arithmetic is fp32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from anyflow.rollout import FlowMapFn
from anyflow.timesteps import (
    NUM_TRAIN_TIMESTEPS,
    WEIGHT_KINDS,
    PairType,
    loss_weight,
    loss_weight_table,
    noise_like,
    sample_logit_normal,
    sample_time_pairs,
    sample_uniform,
    shift_sigma,
    sigma_to_tau,
)

GatherFn = Callable[[Tensor], Tensor]  # all-gathers a 1-D tensor across ranks (concatenated in rank order)


#: How fused CFG enters the stage-1 target: the released recipe (§6.2–6.3) or MeanFlow's (§6.8).
CFG_TARGETS = ("released", "meanflow")


@dataclass(frozen=True)
class FlowMapLossConfig:
    guidance_scale: float = 3.0  # §6.2 fused CFG scale g_cfg (1 = no fusion)
    fd_epsilon: float = 5.0  # §6.3 central-difference step, τ units
    weight_type: str = "beta08"  # §6.4
    adaptive_scaling: bool = True  # §6.5
    text_dropout: float = 0.1  # §6.6
    diffusion_ratio: float = 0.5  # §6.1
    consistency_ratio: float = 0.25
    shift: float = 5.0
    cfg_target: str = "released"  # §6.2 (released) or §6.8 (meanflow)

    def __post_init__(self) -> None:
        if self.cfg_target not in CFG_TARGETS:
            raise ValueError(
                f"FlowMapLossConfig.cfg_target {self.cfg_target!r} is unknown; valid: {', '.join(CFG_TARGETS)}."
            )
        if self.guidance_scale <= 0:
            raise ValueError(f"FlowMapLossConfig.guidance_scale must be > 0, got {self.guidance_scale}.")
        if self.fd_epsilon <= 0:
            raise ValueError(f"FlowMapLossConfig.fd_epsilon must be > 0 (τ units), got {self.fd_epsilon}.")
        if self.weight_type not in WEIGHT_KINDS:
            raise ValueError(
                f"FlowMapLossConfig.weight_type {self.weight_type!r} is unknown; valid: {', '.join(WEIGHT_KINDS)}."
            )
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"FlowMapLossConfig.text_dropout must lie in [0, 1], got {self.text_dropout}.")


def _fp32(x: Tensor) -> Tensor:
    """At least fp32: bf16/fp16 model outputs are promoted, fp64 (analytic references in tests) is kept."""
    return x if x.dtype == torch.float64 else x.float()


def broadcast_time(tau: Tensor, z: Tensor) -> Tensor:
    """(B, F) -> (B, F, 1, 1, 1) for broadcasting against a latent."""
    return tau.reshape(*tau.shape, *([1] * (z.ndim - tau.ndim)))


def check_latent(x: Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"latents must be (B, F, C, H, W), got shape {tuple(x.shape)}.")


def expand_negative(c_neg: Tensor, c: Tensor) -> Tensor:
    """The negative embedding (1, L, D) or (B, L, D) as (B, L, D) matching c."""
    if c_neg.ndim != 3 or c_neg.shape[1:] != c.shape[1:] or c_neg.shape[0] not in (1, c.shape[0]):
        raise ValueError(
            f"negative embedding shape {tuple(c_neg.shape)} does not fit text embedding shape {tuple(c.shape)}; "
            "expected (1, L, D) or (B, L, D)."
        )
    return c_neg.to(device=c.device, dtype=c.dtype).expand_as(c)


def apply_text_dropout(
    c: Tensor, c_neg: Tensor, p: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """§6.6: per sample, replace c by the negative embedding with probability p. Returns (c', dropped (B,))."""
    neg = expand_negative(c_neg, c)
    if p <= 0.0:
        return c, torch.zeros(c.shape[0], dtype=torch.bool, device=c.device)
    dropped = sample_uniform(c.shape[0], generator, device=c.device) < p
    return torch.where(dropped[:, None, None], neg, c), dropped


def flowmap_time_derivative(
    u: FlowMapFn, z: Tensor, t: Tensor, r: Tensor, c: Tensor, direction: Tensor, fd_epsilon: float = 5.0
) -> Tensor:
    """§6.3: central difference of u along (dz/dτ = direction/1000, dt/dτ = 1, dr = 0), per τ unit, fp32.

    [u(z + Δ·d, t + ε, r) − u(z − Δ·d, t − ε, r)] / (2ε) with Δ = ε/1000; O(ε²) accurate.
    """
    delta = fd_epsilon / NUM_TRAIN_TIMESTEPS
    u_plus = u(z + delta * direction, t + fd_epsilon, r, c)
    u_minus = u(z - delta * direction, t - fd_epsilon, r, c)
    return (_fp32(u_plus) - _fp32(u_minus)) / (2.0 * fd_epsilon)


def guided_prediction_and_target(
    u: FlowMapFn,
    z: Tensor,
    velocity: Tensor,
    t: Tensor,
    r: Tensor,
    c: Tensor,
    c_neg: Tensor,
    dropped: Tensor,
    cfg: FlowMapLossConfig,
) -> tuple[Tensor, Tensor]:
    """The stage-1 (prediction, target) pair that the loss compares, fp32; the target carries no gradient.

    ``velocity`` is the per-sample velocity ε − x, ``c`` the (already dropped-out) text, ``dropped`` (B,)
    which samples got the negative embedding. ``cfg.cfg_target``:

    * ``released`` (§6.2–6.3): p = (u_c − (1 − g)·sg(u_θ(z, t, r, ∅)))/g against
      (ε − x) − (t − r)·D/g, D the central difference along (ε − x, +1). Exact CFG only at r = t.
    * ``meanflow`` (§6.8): p = u_c against ṽ − (t − r)·D with ṽ = w·(ε − x) + (1 − w)·sg(u_θ(z, t, t, ∅)),
      D along (ṽ, +1), w = g (1 for dropped samples). Fixed point: the CFG-g flow map, to O(ε_fd²).
    """
    g = float(cfg.guidance_scale)
    velocity = _fp32(velocity)
    u_c = _fp32(u(z, t, r, c))  # §6.2 step 1, with grad
    if cfg.cfg_target == "meanflow":
        with torch.no_grad():  # §6.8
            w = broadcast_time((1.0 + (g - 1.0) * (~dropped).to(velocity.dtype))[:, None].expand_as(t), z)
            if g != 1.0:
                v_neg = _fp32(u(z, t, t, expand_negative(c_neg, c)))  # u_∅ on the diagonal: v_∅(z, t)
                v_tilde = w * velocity + (1.0 - w) * v_neg
            else:
                v_tilde = velocity
            d = flowmap_time_derivative(u, z, t, r, c, v_tilde, cfg.fd_epsilon)  # along (ṽ, +1), no 1/w
            target = v_tilde - broadcast_time(t - r, z) * d
        return u_c, target
    with torch.no_grad():
        u_neg = _fp32(u(z, t, r, expand_negative(c_neg, c))) if g != 1.0 else torch.zeros_like(u_c)
        d = flowmap_time_derivative(u, z, t, r, c, velocity, cfg.fd_epsilon) / g  # §6.3, de-guided units
        target = velocity - broadcast_time(t - r, z) * d
    p = (u_c - (1.0 - g) * u_neg) / g  # §6.2 step 3
    return p, target


def _per_type_means(per_sample: Tensor, pair_type: Tensor) -> dict[str, Tensor]:
    out = {}
    for kind in PairType:
        mask = pair_type == kind
        if bool(mask.any()):
            out[f"loss/{kind.name.lower()}"] = per_sample[mask].mean()
    return out


def forward_flowmap_loss(
    u: FlowMapFn,
    x: Tensor,
    c: Tensor,
    c_neg: Tensor,
    generator: torch.Generator,
    cfg: FlowMapLossConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: GatherFn | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """§6.7: the forward (data) flow-map loss with fused CFG, central-difference target and adaptive scaling.

    ``u`` is the student (4 calls: u_c with grad; u_∅, u_+, u_− without; u_∅ is skipped when
    guidance_scale = 1). ``cfg.cfg_target`` picks the released target or MeanFlow's (§6.8). ``gather`` all-gathers a 1-D tensor across ranks (identity by default).
    Returns (mean loss over the local batch, diagnostics).
    """
    check_latent(x)
    B, F = x.shape[:2]
    x = x.float()
    c, dropped = apply_text_dropout(c, c_neg, cfg.text_dropout, generator)
    eps = noise_like(x, generator)
    pairs = sample_time_pairs(
        B,
        F,
        generator,
        rank=rank,
        world_size=world_size,
        diffusion_ratio=cfg.diffusion_ratio,
        consistency_ratio=cfg.consistency_ratio,
        shift=cfg.shift,
        device=x.device,
    )
    t, r = pairs.t, pairs.r
    sigma_t = broadcast_time(t, x) / NUM_TRAIN_TIMESTEPS
    z = sigma_t * eps + (1.0 - sigma_t) * x
    w = eps - x  # conditional velocity, the tangent direction of the central difference

    p, target = guided_prediction_and_target(u, z, w, t, r, c, c_neg, dropped, cfg)

    raw = ((p - target) ** 2).mean(dim=(1, 2, 3, 4))  # §6.4, fp32
    weighted = raw * loss_weight(t, loss_weight_table(cfg.weight_type, cfg.shift).to(x.device), cfg.shift)
    per_sample = weighted
    is_diff = pairs.pair_type == PairType.DIFFUSION
    if cfg.adaptive_scaling:  # §6.5
        gather = gather if gather is not None else (lambda v: v)
        all_losses = gather(weighted.detach())
        all_diff = gather(is_diff.to(weighted.dtype))
        if bool((all_diff > 0).any()):
            m = all_losses[all_diff > 0].mean()
            scale = torch.where(is_diff, torch.ones_like(weighted), m / (weighted.detach() + 1e-5))
            per_sample = weighted * scale.detach()
    loss = per_sample.mean()

    diagnostics: dict[str, Tensor] = {
        "loss": loss.detach(),
        "per_sample": weighted.detach(),  # weighted, before adaptive scaling
        "per_sample_unweighted": raw.detach(),
        "per_sample_scaled": per_sample.detach(),
        "pair_type": pairs.pair_type,
        "t": t,
        "r": r,
        "text_dropped": dropped,
    }
    diagnostics.update(_per_type_means(weighted.detach(), pairs.pair_type))
    return loss, diagnostics


def _logit_normal_point(x: Tensor, generator: torch.Generator, shift: float) -> tuple[Tensor, Tensor, Tensor]:
    """σ ~ logit-normal then shifted (one per sample, shared by its frames), ε, and z = σε + (1 − σ)x (§4)."""
    B, F = x.shape[:2]
    sigma = shift_sigma(sample_logit_normal(B, generator, device=x.device), shift)
    tau = sigma_to_tau(sigma).clamp(0.0, float(NUM_TRAIN_TIMESTEPS))[:, None].expand(B, F).contiguous()
    eps = noise_like(x, generator)
    s = broadcast_time(tau, x) / NUM_TRAIN_TIMESTEPS
    return tau, eps, s * eps + (1.0 - s) * x


def flow_matching_loss(
    v: FlowMapFn,
    x: Tensor,
    c: Tensor,
    generator: torch.Generator,
    *,
    shift: float = 5.0,
    c_neg: Tensor | None = None,
    text_dropout: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """§4 / §7.4: rectified flow matching, σ ~ logit-normal then shifted, v(z, τ, τ, c) ≈ ε − x.

    Teacher: text_dropout = 0.1 with the negative embedding. Critic: no dropout. No time weighting.
    """
    check_latent(x)
    if text_dropout > 0.0 and c_neg is None:
        raise ValueError("flow_matching_loss: text_dropout > 0 needs the negative embedding c_neg.")
    B = x.shape[0]
    x = x.float()
    dropped = torch.zeros(B, dtype=torch.bool, device=x.device)
    if c_neg is not None and text_dropout > 0.0:
        c, dropped = apply_text_dropout(c, c_neg, text_dropout, generator)
    tau, eps, z = _logit_normal_point(x, generator, shift)
    pred = v(z, tau, tau, c).float()
    per_sample = ((pred - (eps - x)) ** 2).mean(dim=(1, 2, 3, 4))
    loss = per_sample.mean()
    return loss, {"loss": loss.detach(), "per_sample": per_sample.detach(), "t": tau, "text_dropped": dropped}


def guided_flow_matching_loss(
    u: FlowMapFn,
    x: Tensor,
    c: Tensor,
    c_neg: Tensor,
    generator: torch.Generator,
    *,
    guidance_scale: float = 3.0,
    shift: float = 5.0,
    text_dropout: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """§8.4 auxiliary bidirectional loss: flow matching at r = t with guidance fusion, no weighting or scaling.

    σ ~ logit-normal then shifted; at r = t the flow-map target is the conditional velocity ε − x, and the
    guided prediction is p = (u_c − (1 − g)·u_∅)/g as in §6.2 (u_∅ without grad; skipped when g = 1).
    """
    check_latent(x)
    g = float(guidance_scale)
    x = x.float()
    c, dropped = apply_text_dropout(c, c_neg, text_dropout, generator)
    tau, eps, z = _logit_normal_point(x, generator, shift)
    u_c = u(z, tau, tau, c).float()
    with torch.no_grad():
        u_neg = u(z, tau, tau, expand_negative(c_neg, c)).float() if g != 1.0 else torch.zeros_like(u_c)
    p = (u_c - (1.0 - g) * u_neg) / g
    per_sample = ((p - (eps - x)) ** 2).mean(dim=(1, 2, 3, 4))
    loss = per_sample.mean()
    return loss, {"loss": loss.detach(), "per_sample": per_sample.detach(), "t": tau, "text_dropped": dropped}
