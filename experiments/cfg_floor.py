"""The N-step floor of the released fused-CFG objective (issue 17 item 4; docs/method.md §6.2, §6.8).

A *perfect* stage 1 trained with the released target (§6.2–6.3) and g = 3 is the objective's fixed point, not the
CFG-3 flow map. With exact data velocities (the toy ring, ``anyflow.analytic.GaussianMixture``) that fixed point
can be computed without training: taking the posterior mean of the target (linear in ε − x) gives, for a fixed r,

* dropped prompt (c = ∅): g·u_∅ + (t − r)·du_∅/dt = g·v_∅ along dz/dt = v_∅, so
  u_∅(z_t, t, r) = g/(t − r)^g · ∫_r^t (s − r)^(g−1) v_∅(z_s, s) ds on the unguided trajectory through z_t;
* conditional: u_c + (t − r)·du_c/dt = g·v_c + (1 − g)·u_∅(z, t, r) along dz/dt = v_c, so
  (t − r)·u_c(z_t, t, r) = g·(z_t − z_r) + (1 − g)·∫_r^t u_∅(z_s, s, r) ds on the conditional trajectory.

Both integrals are done with RK4 in float64 (the inner one at every stage of the outer one). The sampler is
FlowMap Euler on the shift-1 grid σ_k = 1 − k/N (as in toy_anystep.py); the reference is the exact CFG-3 ODE
(RK4) from the same noise; the score is the mean L2 distance ("coupled error"). ``--null exact`` replaces the
fixed-point u_∅ by the exact unguided map (a stage 1 whose unconditional branch were perfect).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/cfg_floor.py --out experiments/results_fair/floor.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyflow.analytic import GaussianMixture, integrate_ode

Velocity = Callable[[Tensor, Tensor], Tensor]


def ring(label: int = 0, radius: float = 2.0, std: float = 0.15) -> tuple[GaussianMixture, GaussianMixture]:
    """(class ``label`` = components {label, label + 4}, all 8 components): toy_models.RingMixture's data, fp64."""
    ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    centers = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
    return GaussianMixture(centers[[label, label + 4]], std), GaussianMixture(centers, std)


def cfg_velocity(cond: GaussianMixture, uncond: GaussianMixture, w: float) -> Velocity:
    def v(z: Tensor, s: Tensor) -> Tensor:
        v0 = uncond.velocity(z, s)
        return v0 + w * (cond.velocity(z, s) - v0)

    return v


def _rk4(f: Callable[[Tensor, Tensor], Tensor], y: Tensor, s0: Tensor, s1: Tensor, steps: int) -> Tensor:
    return integrate_ode(f, y, s0, s1, steps)


def released_null_map(v0: Velocity, g: float, steps: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """u_∅(y, s, r) of the released objective's fixed point for dropped prompts (see the module docstring)."""

    def u0(y: Tensor, s: Tensor, r: Tensor) -> Tensor:
        d = y.shape[-1]
        gap = (s - r).clamp_min(0.0)
        tiny = gap < 1e-9

        def f(state: Tensor, q: Tensor) -> Tensor:  # state = (y_q, I_q); dI/dq = g (q − r)^(g−1) v_∅
            vel = v0(state[:, :d], q)
            return torch.cat([vel, g * (q - r).clamp_min(0.0)[:, None] ** (g - 1) * vel], dim=1)

        state = _rk4(f, torch.cat([y, torch.zeros_like(y)], dim=1), s, r, steps)
        integral = -state[:, d:]  # integrated from s down to r: ∫_r^s = −(I_r − I_s)
        return torch.where(tiny[:, None], v0(y, s), integral / torch.where(tiny, 1.0, gap)[:, None] ** g)

    return u0


def exact_null_map(v0: Velocity, steps: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def u0(y: Tensor, s: Tensor, r: Tensor) -> Tensor:
        gap = s - r
        tiny = gap < 1e-9
        avg = (y - _rk4(v0, y, s, r, steps)) / torch.where(tiny, 1.0, gap)[:, None]
        return torch.where(tiny[:, None], v0(y, s), avg)

    return u0


def released_cond_jump(
    vc: Velocity, u0, g: float, z: Tensor, t: float | Tensor, r: float | Tensor, steps: int
) -> Tensor:
    """z_t − (t − r)·u_c(z_t, t, r) for the released fixed point u_c (see the module docstring); ``vc`` is the
    *conditional* (unguided) velocity: the target's tangent and its posterior mean are ε − x's."""
    d = z.shape[-1]
    rr = torch.as_tensor(r, dtype=z.dtype).expand(z.shape[:1])

    def f(state: Tensor, s: Tensor) -> Tensor:  # state = (z_s, J_s); dJ/ds = u_∅(z_s, s, r)
        y = state[:, :d]
        return torch.cat([vc(y, s), u0(y, s, rr)], dim=1)

    state = _rk4(f, torch.cat([z, torch.zeros_like(z)], dim=1), t, r, steps)
    z_r, integral = state[:, :d], -state[:, d:]  # ∫_r^t u_∅ ds
    jump = g * (z - z_r) + (1 - g) * integral  # = (t − r)·u_c
    return z - jump


def floor_errors(
    nfes: Sequence[int] = (1, 2, 4, 8, 32),
    *,
    g: float = 3.0,
    n: int = 256,
    steps: int = 24,
    ref_steps: int = 400,
    null: str = "released",
    seed: int = 0,
    label: int = 0,
) -> dict[int, float]:
    """Coupled error (mean L2 to the exact CFG-g ODE endpoint) of the released objective's fixed point, by N."""
    cond, uncond = ring(label)
    vc, v0 = cond.velocity, uncond.velocity
    u0 = released_null_map(v0, g, steps) if null == "released" else exact_null_map(v0, steps)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = integrate_ode(cfg_velocity(cond, uncond, g), noise, 1.0, 0.0, ref_steps)
    out = {}
    for N in nfes:
        z = noise
        for k in range(N):
            t, r = 1.0 - k / N, 1.0 - (k + 1) / N
            z = released_cond_jump(vc, u0, g, z, t, r, max(8, steps // N))
        out[N] = float((z - ref).norm(dim=1).mean())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="write the numbers as JSON here (default: print only)")
    p.add_argument("--g", type=float, default=3.0)
    p.add_argument(
        "--n", type=int, default=256, help="noise samples (class 0; the ring is rotation-symmetric)"
    )
    p.add_argument("--steps", type=int, default=24, help="RK4 steps per unit σ of each fixed-point integral")
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    p.add_argument("--null", choices=("released", "exact"), default="released")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    errs = floor_errors(a.nfe, g=a.g, n=a.n, steps=a.steps, null=a.null)
    wall = time.perf_counter() - t0
    print(" ".join(f"N={k}: {v:.4g}" for k, v in errs.items()), f"({wall:.0f} s)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        rec = {"g": a.g, "n": a.n, "steps": a.steps, "null": a.null, "coupled_error": errs, "wall_s": wall}
        Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
