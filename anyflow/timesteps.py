"""Time grids, time sampling and loss weights (pure maths; docs/method.md §1.2, §2.4, §6.1, §6.4, §9).

Conventions: σ ∈ [0, 1] (1 = noise, 0 = data); networks take τ = 1000·σ as fp32 tensors (B, F).
Randomness always comes from an explicit ``torch.Generator``. Draws happen on the generator's device
and are then moved, so a CPU generator gives the same numbers whatever device the tensors live on.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------------------------------
# Shift and unit conversions
# --------------------------------------------------------------------------------------------------


def shift_sigma(sigma: Tensor | float, shift: float = 5.0) -> Tensor | float:
    """§1.2: shift_k(σ) = k·σ / (1 + (k − 1)·σ). Keeps 0 and 1 fixed and keeps order."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}.")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_to_tau(sigma: Tensor | float) -> Tensor | float:
    """σ ∈ [0, 1] -> network timestep τ = 1000·σ."""
    return sigma * NUM_TRAIN_TIMESTEPS


def tau_to_sigma(tau: Tensor | float) -> Tensor | float:
    """Network timestep τ -> σ = τ / 1000."""
    return tau / NUM_TRAIN_TIMESTEPS


def flowmap_euler_sigmas(num_steps: int, shift: float = 5.0) -> Tensor:
    """§2.4: the N-step FlowMap-Euler grid σ_i = shift(1 − i/N), float64 (N+1,), σ_0 = 1, σ_N = 0.

    Same values as diffusers' ``FlowMapEulerDiscreteScheduler(shift=shift).set_timesteps(N).sigmas``.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)
    sigmas[-1] = 0.0  # shift(0) = 0 already; make the terminal value exact whatever the float path
    return sigmas


# --------------------------------------------------------------------------------------------------
# Random draws (explicit generator)
# --------------------------------------------------------------------------------------------------


def _gen_device(generator: torch.Generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def noise_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise with the shape of ``x``, fp32, on x's device, drawn from ``generator``."""
    eps = torch.randn(x.shape, generator=generator, device=_gen_device(generator), dtype=torch.float32)
    return eps.to(x.device)


def sample_uniform(n: int, generator: torch.Generator, *, device=None) -> Tensor:
    """n draws of U(0, 1), fp32."""
    u = torch.rand(n, generator=generator, device=_gen_device(generator), dtype=torch.float32)
    return u.to(device) if device is not None else u


def sample_logit_normal(
    n: int, generator: torch.Generator, *, mean: float = 0.0, std: float = 1.0, device=None
) -> Tensor:
    """n draws of σ = sigmoid(N(mean, std²)), fp32 (§4, §7.4)."""
    g = torch.randn(n, generator=generator, device=_gen_device(generator), dtype=torch.float32)
    s = torch.sigmoid(mean + std * g)
    return s.to(device) if device is not None else s


# --------------------------------------------------------------------------------------------------
# Time pairs for the forward flow-map loss (§6.1)
# --------------------------------------------------------------------------------------------------


class PairType(enum.IntEnum):
    DIFFUSION = 0  # r = t: plain flow matching
    CONSISTENCY = 1  # r = 0
    GENERAL = 2  # r < t as drawn


def pair_split_counts(
    global_batch: int, diffusion_ratio: float = 0.5, consistency_ratio: float = 0.25
) -> tuple[int, int, int]:
    """§6.1: (diffusion, consistency, general) counts of a global batch; Python round (half to even).

    2 -> (1, 0, 1), 16 -> (8, 4, 4), 32 -> (16, 8, 8).
    """
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}.")
    if not (0.0 <= diffusion_ratio <= 1.0 and 0.0 <= consistency_ratio <= 1.0):
        raise ValueError(
            f"diffusion_ratio and consistency_ratio must lie in [0, 1], got {diffusion_ratio}, {consistency_ratio}."
        )
    if diffusion_ratio + consistency_ratio > 1.0 + 1e-9:
        raise ValueError(
            f"diffusion_ratio + consistency_ratio must be <= 1, got {diffusion_ratio} + {consistency_ratio}."
        )
    n_diff = min(round(diffusion_ratio * global_batch), global_batch)
    n_cons = min(round(consistency_ratio * global_batch), global_batch - n_diff)
    return n_diff, n_cons, global_batch - n_diff - n_cons


def pair_types(
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    diffusion_ratio: float = 0.5,
    consistency_ratio: float = 0.25,
    device=None,
) -> Tensor:
    """PairType per local sample (B,) long, decided by the global index rank·B + i (§6.1)."""
    if not 0 <= rank < world_size:
        raise ValueError(
            f"rank must satisfy 0 <= rank < world_size, got rank={rank}, world_size={world_size}."
        )
    n_diff, n_cons, _ = pair_split_counts(batch_size * world_size, diffusion_ratio, consistency_ratio)
    idx = rank * batch_size + torch.arange(batch_size, device=device)
    types = torch.full((batch_size,), int(PairType.GENERAL), dtype=torch.long, device=device)
    types[idx < n_diff + n_cons] = int(PairType.CONSISTENCY)
    types[idx < n_diff] = int(PairType.DIFFUSION)
    return types


@dataclass
class TimePairs:
    t: Tensor  # (B, F) τ fp32
    r: Tensor  # (B, F) τ fp32, r <= t
    pair_type: Tensor  # (B,) long, values of PairType


def sample_time_pairs(
    batch_size: int,
    num_frames: int,
    generator: torch.Generator,
    *,
    rank: int = 0,
    world_size: int = 1,
    diffusion_ratio: float = 0.5,
    consistency_ratio: float = 0.25,
    shift: float = 5.0,
    device=None,
) -> TimePairs:
    """§6.1: a, b ~ U(0,1), t = max, r = min (before the shift); type by global index; shift; ×1000."""
    ab = torch.rand(2, batch_size, generator=generator, device=_gen_device(generator), dtype=torch.float32)
    ab = ab.to(device) if device is not None else ab
    t, r = ab.max(dim=0).values, ab.min(dim=0).values
    types = pair_types(
        batch_size,
        rank=rank,
        world_size=world_size,
        diffusion_ratio=diffusion_ratio,
        consistency_ratio=consistency_ratio,
        device=t.device,
    )
    r = torch.where(types == PairType.DIFFUSION, t, r)
    r = torch.where(types == PairType.CONSISTENCY, torch.zeros_like(r), r)
    tau_t = sigma_to_tau(shift_sigma(t, shift))
    tau_r = sigma_to_tau(shift_sigma(r, shift))
    # Diffusion pairs: make r bit-identical to t after the float maths.
    tau_r = torch.where(types == PairType.DIFFUSION, tau_t, tau_r)
    return TimePairs(
        t=tau_t[:, None].expand(batch_size, num_frames).contiguous(),
        r=tau_r[:, None].expand(batch_size, num_frames).contiguous(),
        pair_type=types,
    )


# --------------------------------------------------------------------------------------------------
# Loss weights (§6.4)
# --------------------------------------------------------------------------------------------------

WEIGHT_KINDS = ("beta08", "gaussian", "uniform")


@functools.lru_cache(maxsize=16)
def _weight_grid(shift: float) -> Tensor:
    """The 1001-point shifted τ grid G = 1000·shift(linspace(1, 0, 1001)), float64, decreasing."""
    return sigma_to_tau(shift_sigma(torch.linspace(1.0, 0.0, 1001, dtype=torch.float64), shift))


def loss_weight_table(kind: str = "beta08", shift: float = 5.0) -> Tensor:
    """§6.4: the weight on each of the 1001 shifted grid points, fp32 (1001,).

    beta08: s·(1 − s)^0.5 with s = G/1000, normalised to Σ = 1000; gaussian: exp(−2((G − 500)/1000)²)
    minus its min, normalised to Σ = 1000; uniform: all ones.
    """
    grid = _weight_grid(float(shift))
    if kind == "beta08":
        s = grid / NUM_TRAIN_TIMESTEPS
        y = s * (1.0 - s).clamp_min(0.0).sqrt()
    elif kind == "gaussian":
        y = torch.exp(-2.0 * ((grid - 500.0) / 1000.0) ** 2)
        y = y - y.min()
    elif kind == "uniform":
        return torch.ones(grid.shape, dtype=torch.float32)
    else:
        raise ValueError(f"Unknown loss weight kind {kind!r}; valid kinds: {', '.join(WEIGHT_KINDS)}.")
    return (y * (1000.0 / y.sum())).to(torch.float32)


def loss_weight(tau_t: Tensor, table: Tensor, shift: float = 5.0) -> Tensor:
    """Per-sample weight (B,): τ_t (B,) or (B, F) snapped to the nearest grid point, averaged over frames."""
    if table.ndim != 1 or table.numel() != 1001:
        raise ValueError(
            f"table must be the (1001,) output of loss_weight_table, got shape {tuple(table.shape)}."
        )
    if tau_t.ndim not in (1, 2):
        raise ValueError(f"tau_t must have shape (B,) or (B, F), got {tuple(tau_t.shape)}.")
    tau = tau_t if tau_t.ndim == 2 else tau_t[:, None]
    grid = _weight_grid(float(shift)).to(tau.device)
    idx = (tau.detach().to(torch.float64)[..., None] - grid).abs().argmin(dim=-1)  # (B, F)
    return table.to(tau.device, torch.float32)[idx].mean(dim=1)
