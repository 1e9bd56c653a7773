"""Flow-map sampling and Flow Map Backward Simulation (pure maths; docs/method.md §2.4, §7.2).

A flow-map model is a callable ``u = fn(z, t, r, c)`` (see ``FlowMapFn``) returning the average
velocity; one call jumps z_t -> z_r = z_t − ((τ_t − τ_r)/1000)·u. Nothing here detaches: gradients
flow through every call when autograd is on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from anyflow.timesteps import flowmap_euler_sigmas, sigma_to_tau

# u = fn(z (B,F,C,H,W), t (B,F) τ fp32, r (B,F) τ fp32, c (B,L,D)) -> (B,F,C,H,W) average velocity.
# An instantaneous-velocity model (teacher, critic) is the same callable called with r = t.
FlowMapFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _tau(z: Tensor, sigma: float) -> Tensor:
    """A (B, F) fp32 τ tensor filled with 1000·σ."""
    return torch.full(z.shape[:2], float(sigma_to_tau(float(sigma))), dtype=torch.float32, device=z.device)


def jump(
    u: FlowMapFn, z: Tensor, c: Tensor, sigma_from: float, sigma_to: float, *, instantaneous: bool = False
) -> Tensor:
    """One flow-map call: z_{σ_to} = z − (σ_from − σ_to)·u(z, τ_from, τ_to, c) (§2.1).

    ``instantaneous=True`` feeds r = t (an Euler step with the instantaneous velocity).
    """
    if z.ndim != 5:
        raise ValueError(f"z must be a (B, F, C, H, W) latent, got shape {tuple(z.shape)}.")
    t = _tau(z, sigma_from)
    r = t if instantaneous else _tau(z, sigma_to)
    return z - (float(sigma_from) - float(sigma_to)) * u(z, t, r, c)


def flowmap_euler_sample(
    u: FlowMapFn, z: Tensor, c: Tensor, num_steps: int, *, shift: float = 5.0, use_mean_velocity: bool = True
) -> Tensor:
    """§2.4: the N-step FlowMap-Euler sampler from noise z (σ = 1) to a sample (σ = 0): exactly N calls.

    The model gets the current grid time as t and the next as r; ``use_mean_velocity=False`` feeds
    r = t, i.e. plain Euler with the instantaneous velocity.
    """
    sigmas = flowmap_euler_sigmas(num_steps, shift).tolist()
    for i in range(num_steps):
        z = jump(u, z, c, sigmas[i], sigmas[i + 1], instantaneous=not use_mean_velocity)
    return z


def explicit_rollout(
    u: FlowMapFn, z: Tensor, c: Tensor, num_steps: int, *, shift: float = 5.0, stop_at: int | None = None
) -> Tensor:
    """Reference N-step rollout on the grid, one call per step (stops after ``stop_at`` steps if given).

    Written independently of ``jump``/``fmbs_rollout`` so tests can compare the two.
    """
    sigmas = flowmap_euler_sigmas(num_steps, shift)
    n = num_steps if stop_at is None else stop_at
    if not 0 <= n <= num_steps:
        raise ValueError(f"stop_at must lie in [0, num_steps={num_steps}], got {stop_at}.")
    taus = (sigmas * 1000.0).to(torch.float32)
    batch_frames = z.shape[:2]
    for i in range(n):
        t = taus[i].to(z.device).expand(batch_frames).contiguous()
        r = taus[i + 1].to(z.device).expand(batch_frames).contiguous()
        z = z - float(sigmas[i] - sigmas[i + 1]) * u(z, t, r, c)
    return z


@dataclass
class RolloutInfo:
    num_steps: int
    k: int
    calls: int = 0
    segments: list[tuple[float, float]] = field(default_factory=list)  # (sigma_from, sigma_to) per call


def fmbs_rollout(
    u: FlowMapFn, z: Tensor, c: Tensor, num_steps: int, k: int, *, shift: float = 5.0
) -> tuple[Tensor, RolloutInfo]:
    """§7.2 Flow Map Backward Simulation: the N-step sampler's output in ≤ 3 calls whatever N.

    prefix shortcut σ_0 -> σ_k (skipped if k = 0), the sampler's own Euler step σ_k -> σ_{k+1}, suffix
    shortcut σ_{k+1} -> 0 (skipped if k = N − 1). No segment is detached.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < num_steps:
        raise ValueError(
            f"the FMBS step index k must be an int with 0 <= k < num_steps={num_steps}, got {k!r}."
        )
    sigmas = flowmap_euler_sigmas(num_steps, shift).tolist()
    segments = [(sigmas[0], sigmas[k]), (sigmas[k], sigmas[k + 1]), (sigmas[k + 1], sigmas[num_steps])]
    info = RolloutInfo(num_steps=num_steps, k=k)
    for sigma_from, sigma_to in segments:
        if sigma_from == sigma_to:  # empty prefix (k = 0) or suffix (k = N − 1)
            continue
        z = jump(u, z, c, sigma_from, sigma_to)
        info.calls += 1
        info.segments.append((sigma_from, sigma_to))
    return z, info


def sample_rollout_plan(
    generator: torch.Generator, steps_list: Sequence[int] = (2, 4, 8, 16, 50)
) -> tuple[int, int]:
    """§7.2: N uniform from ``steps_list``, then k uniform in {0, …, N − 1}. Broadcast them from rank 0."""
    if len(steps_list) == 0 or any(int(n) < 1 for n in steps_list):
        raise ValueError(f"steps_list must be a non-empty list of positive ints, got {list(steps_list)}.")
    device = generator.device
    i = int(torch.randint(len(steps_list), (1,), generator=generator, device=device).item())
    n = int(steps_list[i])
    k = int(torch.randint(n, (1,), generator=generator, device=device).item())
    return n, k
