"""On-policy distribution matching: DMD generator loss and critic (fake-score) loss (pure maths; docs/method.md §7.3–7.4).

``real_v`` (teacher) and ``fake_v`` (critic) are FlowMapFn callables called with r = t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyflow.flowmap import broadcast_time, check_latent, expand_negative, flow_matching_loss
from anyflow.rollout import FlowMapFn
from anyflow.timesteps import NUM_TRAIN_TIMESTEPS, noise_like, sample_uniform, shift_sigma, sigma_to_tau


def _x0(v: FlowMapFn, z: Tensor, tau: Tensor, c: Tensor) -> Tensor:
    """x0 prediction of an instantaneous-velocity model: x0 = z − σ·v(z, τ, τ, c), fp32."""
    return z - broadcast_time(tau, z) / NUM_TRAIN_TIMESTEPS * v(z, tau, tau, c).float()


def dmd_generator_loss(
    x_hat: Tensor,
    real_v: FlowMapFn,
    fake_v: FlowMapFn,
    c: Tensor,
    c_neg: Tensor,
    generator: torch.Generator,
    *,
    real_guidance_scale: float = 3.0,
    shift: float = 5.0,
    weight: float = 1.0,
    min_tau: float = 0.0,
    max_tau: float = 1000.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """§7.3: normalised DMD (reverse-KL) loss on the generator's rollout x̂ (B, F, C, H, W).

    Its gradient w.r.t. x̂ is 2·weight·g/numel with g = (x0_fake − x0_real)/η, so a descent step moves
    x̂ toward the (CFG) real-score prediction and away from the fake-score one.
    """
    check_latent(x_hat)
    if not 0.0 <= min_tau <= max_tau <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"need 0 <= min_tau <= max_tau <= 1000, got min_tau={min_tau}, max_tau={max_tau}.")
    B, F = x_hat.shape[:2]
    with torch.no_grad():
        sigma = shift_sigma(
            sample_uniform(B, generator, device=x_hat.device), shift
        )  # uniform, not logit-normal
        tau = sigma_to_tau(sigma).clamp(min_tau, max_tau)[:, None].expand(B, F).contiguous()
        x = x_hat.detach().float()
        noise = noise_like(x, generator)
        s = broadcast_time(tau, x) / NUM_TRAIN_TIMESTEPS
        z = s * noise + (1.0 - s) * x
        x0_fake = _x0(fake_v, z, tau, c)
        x0_cond = _x0(real_v, z, tau, c)
        x0_uncond = _x0(real_v, z, tau, expand_negative(c_neg, c))
        x0_real = x0_cond + real_guidance_scale * (x0_cond - x0_uncond)  # = CFG scale 1 + w
        eta = (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((x0_fake - x0_real) / eta)
    xd = x_hat.double()
    loss = weight * ((xd - (xd - grad.double()).detach()) ** 2).mean()
    diagnostics = {
        "loss": loss.detach().float(),
        "t": tau,
        "eta": eta.flatten(),
        "grad_norm": grad.flatten(1).norm(dim=1),
        "x0_real_err": (x - x0_real).pow(2).mean(dim=(1, 2, 3, 4)),
        "x0_fake_err": (x - x0_fake).pow(2).mean(dim=(1, 2, 3, 4)),
    }
    return loss.to(x_hat.dtype), diagnostics


def critic_loss(
    fake_v: FlowMapFn, x_hat: Tensor, c: Tensor, generator: torch.Generator, *, shift: float = 5.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """§7.4: flow matching of the fake score on (detached) generator samples; no CFG, dropout or weighting."""
    return flow_matching_loss(fake_v, x_hat.detach(), c, generator, shift=shift)
