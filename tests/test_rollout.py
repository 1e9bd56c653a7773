"""Flow-map sampler, FMBS and the analytic Gaussian flow (docs/method.md §2.4, §7.2)."""

from __future__ import annotations

import math

import pytest
import torch

from anyflow.analytic import ClassConditionalGaussianFlow, GaussianFlow
from anyflow.rollout import (
    RolloutInfo,
    explicit_rollout,
    flowmap_euler_sample,
    fmbs_rollout,
    jump,
    sample_rollout_plan,
)
from anyflow.timesteps import flowmap_euler_sigmas

SHAPE = (3, 2, 2, 4, 4)  # (B, F, C, H, W)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(dtype=torch.float64) -> GaussianFlow:
    g = gen(11)
    mean = torch.randn(SHAPE[2:], generator=g, dtype=dtype)
    std = 0.2 + torch.rand(SHAPE[2:], generator=g, dtype=dtype)  # per-coordinate std in [0.2, 1.2]
    return GaussianFlow(mean, std)


def noise(dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=gen(seed), dtype=dtype)


class Counting:
    """Wraps a FlowMapFn, counting calls and recording (t, r) and outputs."""

    def __init__(self, fn):
        self.fn, self.calls, self.times, self.outputs = fn, 0, [], []

    def __call__(self, z, t, r, c):
        self.calls += 1
        assert t.shape == r.shape == z.shape[:2] and t.dtype == r.dtype == torch.float32
        self.times.append((t[0, 0].item(), r[0, 0].item()))
        out = self.fn(z, t, r, c)
        self.outputs.append(out)
        return out


def rk4(v, z, sigma_from: float, sigma_to: float, steps: int = 500):
    """Classical RK4 on dz/dσ = v(z, σ): an independent reference for the exact flow map."""
    h = (sigma_to - sigma_from) / steps
    s = sigma_from
    for _ in range(steps):
        k1 = v(z, s)
        k2 = v(z + h / 2 * k1, s + h / 2)
        k3 = v(z + h / 2 * k2, s + h / 2)
        k4 = v(z + h * k3, s + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        s += h
    return z


# ------------------------------------------------------------------------------------------------
# The analytic flow itself (checked against numerical integration and Monte Carlo)
# ------------------------------------------------------------------------------------------------


def test_analytic_flow_map_solves_the_pf_ode():
    flow, z = gaussian(), noise()
    for t, r in [(1.0, 0.0), (0.9, 0.3), (0.5, 0.49), (0.2, 0.0)]:
        torch.testing.assert_close(flow.flow_map(z, t, r), rk4(flow.velocity, z, t, r), rtol=1e-9, atol=1e-9)
        u = flow.average_velocity(z, t, r)
        torch.testing.assert_close(z - (t - r) * u, flow.flow_map(z, t, r), rtol=1e-12, atol=1e-12)
    # u*(z, t, t) = v(z, t); semigroup Φ(s→r)∘Φ(t→s) = Φ(t→r).
    torch.testing.assert_close(flow.average_velocity(z, 0.7, 0.7), flow.velocity(z, 0.7))
    composed = flow.flow_map(flow.flow_map(z, 0.9, 0.4), 0.4, 0.1)
    torch.testing.assert_close(composed, flow.flow_map(z, 0.9, 0.1))


def test_analytic_velocity_is_the_conditional_mean():
    # v(z, σ) = E[ε − x | z]: the least-squares regression of ε − x on z at fixed σ (per coordinate).
    flow = GaussianFlow(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 0.8]))
    n, sigma = 400000, 0.4
    g = gen(2)
    x = flow.mean + flow.std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    z = sigma * eps + (1 - sigma) * x
    target = eps - x
    zc = z - z.mean(0)
    slope = (zc * (target - target.mean(0))).mean(0) / (zc**2).mean(0)
    probe = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    v = flow.velocity(probe, sigma)
    torch.testing.assert_close(v[1] - v[0], slope, atol=0.01, rtol=0)
    torch.testing.assert_close(v[0], target.mean(0) - slope * z.mean(0), atol=0.01, rtol=0)


# ------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_flowmap_euler_sample_is_exact_with_the_exact_map(n):
    flow, z = gaussian(), noise()
    model = Counting(flow.u)
    out = flowmap_euler_sample(model, z, None, n)
    assert model.calls == n
    torch.testing.assert_close(out, flow.flow_map(z, 1.0, 0.0), rtol=1e-5, atol=1e-5)
    sig = flowmap_euler_sigmas(n).tolist()
    expected = [(1000 * sig[i], 1000 * sig[i + 1]) for i in range(n)]  # t = current, r = next grid time
    torch.testing.assert_close(torch.tensor(model.times), torch.tensor(expected), rtol=1e-6, atol=1e-3)


def test_flowmap_euler_sample_without_mean_velocity_is_plain_euler():
    flow, z = gaussian(), noise()
    model = Counting(flow.u)
    n = 4
    out = flowmap_euler_sample(model, z, None, n, use_mean_velocity=False)
    assert model.calls == n and all(t == r for t, r in model.times)
    sig = flowmap_euler_sigmas(n).tolist()
    ref = z
    for i in range(n):
        ref = ref - (sig[i] - sig[i + 1]) * flow.velocity(ref, sig[i])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # 4 Euler steps are visibly off the exact solution: the flag really changes what is fed.
    assert (out - flow.flow_map(z, 1.0, 0.0)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# FMBS
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 50])
def test_fmbs_equals_explicit_rollout_with_the_exact_map(n):
    flow, z = gaussian(), noise()
    full = explicit_rollout(flow.u, z, None, n)
    torch.testing.assert_close(full, flow.flow_map(z, 1.0, 0.0), rtol=1e-5, atol=1e-5)
    for k in range(n):
        model = Counting(flow.u)
        out, info = fmbs_rollout(model, z, None, n, k)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
        expected_calls = 1 + (k > 0) + (k < n - 1)
        assert model.calls == info.calls == expected_calls <= 3
        assert len(info.segments) == info.calls and (info.num_steps, info.k) == (n, k)
        # The middle call is exactly the k-th step of the N-step sampler, starting from its state z_k.
        sig = flowmap_euler_sigmas(n).tolist()
        assert (sig[k], sig[k + 1]) in info.segments
        z_k = explicit_rollout(flow.u, z, None, n, stop_at=k)
        torch.testing.assert_close(z_k, flow.flow_map(z, 1.0, sig[k]), rtol=1e-5, atol=1e-5)


def mlp_map(seed: int = 0):
    """A smooth non-exact flow map (not compositional), to check FMBS's plumbing."""
    g = gen(seed)
    w1 = torch.randn(32 + 2, 64, generator=g, dtype=torch.float64) / 6
    w2 = torch.randn(64, 32, generator=g, dtype=torch.float64) / 8

    def u(z, t, r, c):
        B, F = z.shape[:2]
        h = torch.cat([z.reshape(B, F, -1), t[..., None] / 1000, r[..., None] / 1000], dim=-1)
        return (torch.tanh(h.to(w1.dtype) @ w1) @ w2).reshape(z.shape).to(z.dtype)

    return u


def test_fmbs_segments_on_a_non_exact_map():
    u, z = mlp_map(), noise()
    n, k = 8, 3
    sig = flowmap_euler_sigmas(n).tolist()
    out, info = fmbs_rollout(u, z, None, n, k)

    def tau(s):
        return torch.full(SHAPE[:2], 1000 * s, dtype=torch.float32)

    ref = z
    for a, b in [(1.0, sig[k]), (sig[k], sig[k + 1]), (sig[k + 1], 0.0)]:
        ref = ref - (a - b) * u(ref, tau(a), tau(b), None)
    torch.testing.assert_close(out, ref)
    assert info.segments == [(1.0, sig[k]), (sig[k], sig[k + 1]), (sig[k + 1], 0.0)]
    # For a non-compositional map FMBS is not the N-step rollout (so it does not secretly run N steps).
    assert (out - explicit_rollout(u, z, None, n)).abs().max() > 1e-6


@pytest.mark.parametrize(("n", "k"), [(8, 3), (4, 0), (4, 3), (1, 0)])
def test_fmbs_gradients_reach_every_segment(n, k):
    flow = gaussian(torch.float32)
    z = noise(torch.float32).requires_grad_(True)
    gains = torch.zeros(3, requires_grad=True)  # one learnable gain per call

    calls = []

    def model(zz, t, r, c):
        out = flow.u(zz, t, r) * (1 + gains[len(calls)])
        out.retain_grad()
        calls.append(out)
        return out

    out, info = fmbs_rollout(model, z, None, n, k)
    out.pow(2).sum().backward()
    assert len(calls) == info.calls
    for i, o in enumerate(calls):
        assert o.grad is not None and o.grad.abs().sum() > 0, f"no gradient reached call {i}"
        assert gains.grad[i].abs() > 0
    assert torch.all(gains.grad[info.calls :] == 0)
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_fmbs_validates_k():
    flow, z = gaussian(), noise()
    for n, k in [(4, 4), (4, -1), (1, 1)]:
        with pytest.raises(ValueError, match="0 <= k < num_steps"):
            fmbs_rollout(flow.u, z, None, n, k)
    with pytest.raises(ValueError, match="num_steps"):
        fmbs_rollout(flow.u, z, None, 0, 0)


def test_jump_and_rollout_info():
    flow, z = gaussian(), noise()
    torch.testing.assert_close(
        jump(flow.u, z, None, 0.8, 0.3), flow.flow_map(z, 0.8, 0.3), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        jump(flow.u, z, None, 0.8, 0.3, instantaneous=True),
        z - 0.5 * flow.velocity(z, 0.8),
        rtol=1e-5,
        atol=1e-5,
    )
    assert RolloutInfo(4, 1).segments == []


def test_sample_rollout_plan():
    plans = [sample_rollout_plan(gen(s)) for s in range(400)]
    assert plans == [sample_rollout_plan(gen(s)) for s in range(400)]
    assert {n for n, _ in plans} == {2, 4, 8, 16, 50}
    assert all(0 <= k < n for n, k in plans)
    assert {k for n, k in plans if n == 4} == {0, 1, 2, 3}
    assert all(p == (3, p[1]) for p in (sample_rollout_plan(gen(s), (3,)) for s in range(5)))
    with pytest.raises(ValueError, match="steps_list"):
        sample_rollout_plan(gen(), ())


def test_class_conditional_flow_selects_the_class():
    means = torch.stack([torch.full((2, 4, 4), -1.0), torch.full((2, 4, 4), 2.0)])
    cond = ClassConditionalGaussianFlow(means, std=0.5)
    labels = torch.tensor([1, 0, -1])
    c = cond.embed(labels, seq_len=3, dim=5)
    assert c.shape == (3, 3, 5) and cond.labels(c).tolist() == [1, 0, -1]
    z = noise(torch.float32)
    tau = torch.full(SHAPE[:2], 600.0)
    out = cond.u(z, tau, tau * 0.5, c)
    for i, mean in enumerate([2.0, -1.0, 0.5]):  # the null class defaults to the mean of the class means
        ref = GaussianFlow(mean, 0.5).u(z[i : i + 1], tau[i : i + 1], tau[i : i + 1] * 0.5)
        torch.testing.assert_close(out[i : i + 1], ref)
    x = cond.sample(torch.tensor([1] * 2000), (2, 4, 4), gen(3))
    assert abs(x.mean().item() - 2.0) < 0.02 and abs(x.std().item() - 0.5) < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_fmbs_and_analytic_on_cuda():
    flow = gaussian(torch.float32)
    z = noise(torch.float32)
    ref_sample = flowmap_euler_sample(flow.u, z, None, 4)
    ref_fmbs, _ = fmbs_rollout(flow.u, z, None, 8, 3)
    cuda_flow = GaussianFlow(flow.mean.cuda(), flow.std.cuda())
    zc = z.cuda()
    torch.testing.assert_close(flowmap_euler_sample(cuda_flow.u, zc, None, 4).cpu(), ref_sample)
    torch.testing.assert_close(fmbs_rollout(cuda_flow.u, zc, None, 8, 3)[0].cpu(), ref_fmbs)
    torch.testing.assert_close(
        explicit_rollout(cuda_flow.u, zc, None, 8).cpu(), ref_fmbs, rtol=1e-4, atol=1e-4
    )
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    n, k = sample_rollout_plan(cuda_gen)
    assert 0 <= k < n
    means = torch.randn(2, *SHAPE[2:], generator=gen(3)).cuda()
    cond = ClassConditionalGaussianFlow(means, std=0.5)
    c = cond.embed(torch.tensor([0, 1, -1]).cuda())
    tau = torch.full(SHAPE[:2], 500.0, device="cuda")
    out = cond.u(zc, tau, tau / 2, c)
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    assert cond.sample(torch.tensor([0, 1]), SHAPE[2:], cuda_gen).device.type == "cuda"


def test_gaussian_mixture_velocity():
    from anyflow.analytic import GaussianMixture

    # One component: the mixture velocity is the Gaussian one.
    mean = torch.randn(1, *SHAPE[1:], generator=gen(4), dtype=torch.float64)
    one = GaussianMixture(mean, std=0.4)
    z = noise()
    tau = torch.full(SHAPE[:2], 700.0, dtype=torch.float64)
    torch.testing.assert_close(one.v(z, tau), GaussianFlow(mean[0], 0.4).velocity(z, 0.7))
    # Tower property E[v(z)·h(z)] = E[(ε − x)·h(z)] for h = 1, z (Monte Carlo), three 2-D components.
    mix = GaussianMixture(torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]]), std=0.3)
    x, labels = mix.sample(200000, gen(5))
    assert set(labels.tolist()) == {0, 1, 2}
    eps = torch.randn(x.shape, generator=gen(6))
    for sigma in (0.2, 0.5, 0.8):
        zz = sigma * eps + (1 - sigma) * x
        v = mix.velocity(zz, sigma)
        torch.testing.assert_close(v.mean(0), (eps - x).mean(0), atol=0.02, rtol=0)
        torch.testing.assert_close((v * zz).mean(0), ((eps - x) * zz).mean(0), atol=0.03, rtol=0)
    # The PF-ODE of the exact velocity carries noise to the data: RK4 from σ = 1 to 0 recovers the modes.
    out = rk4(mix.velocity, torch.randn(4000, 2, generator=gen(7), dtype=torch.float64), 1.0, 0.0, steps=100)
    dist = torch.cdist(out, mix.means.double())
    nearest, mode = dist.min(dim=1)
    # Each mode gets a third of the mass, and the distance to it is Rayleigh(0.3): median 0.3·√(2 ln 2).
    assert all(abs((mode == k).double().mean().item() - 1 / 3) < 0.03 for k in range(3))
    assert abs(nearest.median().item() - 0.3 * (2 * math.log(2)) ** 0.5) < 0.02
