"""loss.cfg_target: the MeanFlow-style CFG target's fixed point is the CFG-w flow map to O(ε_fd²); the released
target's is not (docs/method.md §6.2, §6.8).

Independent reference: the class-conditional 8-Gaussian ring (the toy experiment's data) has closed-form
velocities (``anyflow.analytic.GaussianMixture``). The exact CFG-w flow map is the float64 RK4 solution of
dz/dσ = v_∅ + w·(v_c − v_∅) (error checked by step doubling, far below the residuals measured). It is plugged
in as u_θ, and the expected target given z_t is computed by Gauss–Hermite quadrature over the exact posterior
of x given z_t (no Monte Carlo noise). A fixed point has E[target | z_t] = prediction.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anyflow.analytic import GaussianFlow, GaussianMixture, integrate_ode
from anyflow.config import CFG_TARGETS as CONFIG_CFG_TARGETS
from anyflow.config import ConfigError, apply_overrides, get_preset
from anyflow.flowmap import CFG_TARGETS, FlowMapLossConfig, forward_flowmap_loss, guided_prediction_and_target
from anyflow.train.methods import flowmap_loss_config

G = 3.0
RADIUS, STD = 2.0, 0.15
STEPS = 100  # RK4 steps per flow-map evaluation (step doubling changes u by < 1e-9: test below)
NODES = 6  # Gauss–Hermite nodes per coordinate
# (σ_t, σ_r) of the test points: long jumps, kept away from σ = 0 where the ring's velocity is steep
PAIRS = ((0.9, 0.2), (0.8, 0.35), (0.6, 0.15), (0.95, 0.5))


def ring() -> tuple[GaussianMixture, GaussianMixture]:
    """(class 0 = components {0, 4} of the ring, the unconditional 8-component ring), float64."""
    ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    centers = RADIUS * torch.stack([ang.cos(), ang.sin()], dim=1)
    return GaussianMixture(centers[[0, 4]], STD), GaussianMixture(centers, STD)


COND, UNCOND = ring()


def cfg_velocity(w: float):
    def v(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v0 = UNCOND.velocity(z, sigma)
        return v0 + w * (COND.velocity(z, sigma) - v0)

    return v


def exact_u(w: float, steps: int = STEPS):
    """FlowMapFn: c[:, 0, 0] = 1 → the exact CFG-w average velocity; c = 0 (the negative) → the unguided one."""
    v_cfg, v_un = cfg_velocity(w), UNCOND.velocity

    def u(z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        pts = z[:, 0, :, 0, 0].double()
        st, sr = t[:, 0].double() / 1000, r[:, 0].double() / 1000
        cond = c[:, 0, 0] > 0.5
        out = torch.empty_like(pts)
        for mask, vel in ((cond, v_cfg), (~cond, v_un)):
            if not bool(mask.any()):
                continue
            p, a, b = pts[mask], st[mask], sr[mask]
            diag = (a - b).abs() < 1e-12
            avg = (p - integrate_ode(vel, p, a, b, steps)) / torch.where(diag, 1.0, a - b)[:, None]
            out[mask] = torch.where(diag[:, None], vel(p, a), avg)
        return out[:, None, :, None, None]

    return u


def posterior_nodes(mix: GaussianMixture, z: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature (x nodes (n, 2), weights (n,)) for the posterior of x given z_σ = z (2,) under ``mix``."""
    s2 = mix.std**2
    mu = mix.means.double()
    a = 1 - sigma
    b2 = sigma**2 + a**2 * s2
    logits = mix.weights.log() - ((z - a * mu) ** 2).sum(-1) / (2 * b2)
    pi = torch.softmax(logits, 0)
    mean = mu + a * s2 / b2 * (z - a * mu)  # E[x | z, component]
    sd = math.sqrt(s2 * sigma**2 / b2)
    xi, wi = np.polynomial.hermite.hermgauss(NODES)
    xi, wi = torch.tensor(xi) * math.sqrt(2), torch.tensor(wi) / math.sqrt(math.pi)
    grid = torch.stack(torch.meshgrid(xi, xi, indexing="ij"), -1).reshape(-1, 2)
    gw = (wi[:, None] * wi[None, :]).reshape(-1)
    x = (mean[:, None, :] + sd * grid[None]).reshape(-1, 2)
    return x, (pi[:, None] * gw[None]).reshape(-1)


def residuals(
    cfg_target: str, fd_epsilon: float, *, dropped: bool, w: float = G, seed: int = 0
) -> torch.Tensor:
    """Per test point, the fixed-point residual in u units: g·(p − E[target | z_t]) for the released target
    (its loss is on p = u_c/g + …), p − E[target | z_t] for MeanFlow's (loss on u_c). Shape (points, 2)."""
    mix = UNCOND if dropped else COND
    gen = torch.Generator().manual_seed(seed)
    cfg = FlowMapLossConfig(guidance_scale=w, fd_epsilon=fd_epsilon, cfg_target=cfg_target)
    zs, xs, ws, ts, rs, first = [], [], [], [], [], []
    for st, sr in PAIRS:  # all points in one batch: one ODE solve per call of u
        x0 = mix.sample(1, gen)[0][0].double()
        z = st * torch.randn(2, generator=gen, dtype=torch.float64) + (1 - st) * x0
        x, wts = posterior_nodes(mix, z, st)
        first.append(sum(len(v) for v in ws))
        zs.append(z.expand_as(x))
        xs.append(x)
        ws.append(wts)
        ts.append(torch.full((len(x), 1), 1000 * st, dtype=torch.float64))
        rs.append(torch.full((len(x), 1), 1000 * sr, dtype=torch.float64))
    z, x, t, r = (torch.cat(v) for v in (zs, xs, ts, rs))
    sigma = t[:, :1, None, None, None] / 1000
    n = len(z)
    vel = ((z - x)[:, None, :, None, None]) / sigma  # ε − x given z_t = σε + (1 − σ)x
    zz = z[:, None, :, None, None]
    c_neg = torch.zeros(1, 1, 1, dtype=torch.float64)
    c = c_neg.expand(n, 1, 1) if dropped else torch.ones(n, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        p, target = guided_prediction_and_target(
            exact_u(w), zz, vel, t, r, c, c_neg, torch.full((n,), dropped), cfg
        )
    out = []
    for i, (st, _) in enumerate(PAIRS):
        sl = slice(first[i], first[i] + len(ws[i]))
        wts = ws[i][:, None]
        # the quadrature reproduces the exact conditional velocity E[ε − x | z_t]
        v_exact = mix.velocity(z[first[i]][None], torch.tensor([st], dtype=torch.float64))[0]
        assert torch.allclose((wts * vel[sl, 0, :, 0, 0]).sum(0), v_exact, atol=1e-10)
        res = p[first[i], 0, :, 0, 0].double() - (wts * target[sl, 0, :, 0, 0].double()).sum(0)
        out.append(res * (w if cfg_target == "released" and not dropped else 1.0))
    return torch.stack(out)


EPS = (10.0, 5.0, 2.5)  # fd_epsilon, τ units: each half the previous


def test_cfg_target_is_a_config_setting_passed_to_the_loss() -> None:
    assert CONFIG_CFG_TARGETS == CFG_TARGETS == ("released", "meanflow")
    p = get_preset("tiny")
    assert p.flowmap.loss.cfg_target == "released" and p.distill.loss.cfg_target == "released"
    p = apply_overrides(p, {"flowmap.loss.cfg_target": "meanflow"})
    assert flowmap_loss_config(p.flowmap.loss).cfg_target == "meanflow"
    with pytest.raises(ConfigError, match=r"flowmap\.loss\.cfg_target"):
        apply_overrides(p, {"flowmap.loss.cfg_target": "mean_flow"})
    with pytest.raises(ValueError, match="cfg_target 'x' is unknown"):
        FlowMapLossConfig(cfg_target="x")


def test_the_reference_ode_is_accurate() -> None:
    """RK4 against a closed-form flow map (one Gaussian), and step doubling on the ring's CFG-3 ODE."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    flow = GaussianFlow(mean=torch.tensor([1.5, -0.5], dtype=torch.float64), std=0.3)
    exact = flow.flow_map(z, 0.9, 0.15)
    approx = integrate_ode(lambda y, s: flow.velocity(y, s[:, None]), z, 0.9, 0.15, STEPS)
    assert (approx - exact).abs().max() < 1e-9
    v = cfg_velocity(G)
    for st, sr in PAIRS:
        a, b = integrate_ode(v, z, st, sr, STEPS), integrate_ode(v, z, st, sr, 2 * STEPS)
        # in u units: measured <= 7e-7 on these random points, 50x below the smallest residual tested (4e-5)
        assert (a - b).abs().max() / (st - sr) < 1e-6


def _median_ratios(cfg_target: str, *, dropped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.stack([residuals(cfg_target, e, dropped=dropped).norm(dim=1) for e in EPS])  # (eps, points)
    return norms, (norms[:-1] / norms[1:]).median(dim=1).values


@pytest.mark.slow
def test_meanflow_target_has_the_cfg_flow_map_as_fixed_point_to_second_order() -> None:
    """With u_θ = the exact CFG-3 map (and v_∅ on the diagonal), E[target | z_t] − u_θ = O(ε_fd²): halving ε_fd
    divides the residual by about 4 (median over the test points; points near the ring's mode split reach the
    asymptotic regime only at the smaller ε). Same for a dropped prompt (w = 1) against the unguided map."""
    for dropped in (False, True):
        norms, ratios = _median_ratios("meanflow", dropped=dropped)
        print(
            f"meanflow dropped={dropped}: |residual| per point at ε={EPS}:\n{norms.numpy()}\nmedian ratios {ratios.numpy()}"
        )
        assert ((ratios > 3.5) & (ratios < 4.6)).all(), (norms, ratios)
        assert norms[-1].median() < 2e-4


@pytest.mark.slow
def test_released_target_residual_does_not_vanish() -> None:
    """The released target (§6.2–6.3) with the exact CFG-3 map (and the exact unguided map as u_∅ at (t, r)):
    the residual converges to a nonzero floor as ε_fd → 0 (here ≈ 2–4 in u units, O(1) against |u| ≈ 5);
    for a dropped prompt (derivative still divided by g) the unguided map is not its fixed point either."""
    for dropped in (False, True):
        norms = torch.stack([residuals("released", e, dropped=dropped).norm(dim=1) for e in EPS[1:]])
        print(f"released dropped={dropped}: |residual| per point at ε={EPS[1:]}:\n{norms.numpy()}")
        assert (norms[-1] > 0.2).all()  # a floor, 1000× the MeanFlow residual at this ε
        assert ((norms[0] - norms[1]).abs() / norms[1] < 0.02).all()  # converged in ε: not an O(ε²) error
    # at g = 1 both targets are the same formula, so the released residual is O(ε²) there too (control)
    norms = torch.stack([residuals("released", e, dropped=False, w=1.0).norm(dim=1) for e in EPS[1:]])
    assert (norms[0] / norms[1]).median() > 3.5 and norms[1].median() < 1e-3


def test_g1_targets_agree_and_meanflow_loss_is_on_u() -> None:
    """At g = 1 the two targets are the same formula (ṽ = ε − x, no division): identical losses. At g = 3 the
    MeanFlow loss is on u itself: with u ≡ the MeanFlow target's mean … checked by the loss-scale relation
    on diffusion pairs (r = t): released (p − v)² = ((u_c − v_cfg')/g)², MeanFlow (u_c − ṽ)²."""
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x = torch.randn(16, 1, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    c = torch.ones(16, 1, 1)
    c_neg = torch.zeros(1, 1, 1)
    u = exact_u(1.0, steps=20)

    def u32(z, t, r, cc):
        return u(z.double(), t.double(), r.double(), cc).float()

    a, _ = forward_flowmap_loss(u32, x, c, c_neg, gen(), FlowMapLossConfig(guidance_scale=1.0, shift=1.0))
    b, _ = forward_flowmap_loss(
        u32, x, c, c_neg, gen(), FlowMapLossConfig(guidance_scale=1.0, shift=1.0, cfg_target="meanflow")
    )
    assert torch.allclose(a, b, rtol=1e-6)
    # r = t, g = 3, no dropout: MeanFlow target ṽ = 3(ε − x) − 2 v_∅; released p − target = (u_c + 2u_∅)/3 − (ε − x)
    n = 8
    z = torch.randn(n, 1, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vel = torch.randn(n, 1, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.full((n, 1), 700.0, dtype=torch.float64)
    cc = torch.ones(n, 1, 1, dtype=torch.float64)
    none = torch.zeros(n, dtype=torch.bool)
    uu = exact_u(G, steps=20)
    v_c = uu(z, t, t, cc)
    v_0 = uu(z, t, t, torch.zeros_like(cc))
    p_m, tgt_m = guided_prediction_and_target(
        uu, z, vel, t, t, cc, c_neg.double(), none, FlowMapLossConfig(cfg_target="meanflow")
    )
    p_r, tgt_r = guided_prediction_and_target(uu, z, vel, t, t, cc, c_neg.double(), none, FlowMapLossConfig())
    assert torch.allclose(p_m, v_c) and torch.allclose(tgt_m, G * vel + (1 - G) * v_0)
    assert torch.allclose(p_r, (v_c - (1 - G) * v_0) / G) and torch.allclose(tgt_r, vel)
    # the two residuals differ by the factor g (losses by g²)
    assert torch.allclose(p_m - tgt_m, G * (p_r - tgt_r))
