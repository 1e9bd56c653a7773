"""DMD generator loss and critic loss (docs/method.md §7.3–7.4)."""

from __future__ import annotations

import pytest
import torch

from anyflow.analytic import GaussianFlow
from anyflow.dmd import critic_loss, dmd_generator_loss
from anyflow.timesteps import shift_sigma

SHAPE = (4, 2, 2, 3, 3)
L, D = 3, 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def x0_model(x0_fn, calls=None):
    """An instantaneous-velocity callable whose x0 prediction z − σ·v is exactly x0_fn(c)."""

    def v(z, t, r, c):
        assert torch.equal(t, r)  # scores are called with r = t
        if calls is not None:
            calls.append({"t": t, "c": c})
        sigma = (t / 1000).reshape(*t.shape, 1, 1, 1)
        return (z - x0_fn(c)) / sigma

    return v


def texts():
    c = torch.ones(SHAPE[0], L, D)
    c_neg = torch.zeros(1, L, D)
    return c, c_neg


def by_prompt(cond_value: torch.Tensor, uncond_value: torch.Tensor):
    """x0 = cond_value for the prompt, uncond_value for the negative (all-zero) embedding."""

    def fn(c):
        is_cond = (c.abs().sum(dim=(1, 2)) > 0).reshape(-1, 1, 1, 1, 1)
        return torch.where(is_cond, cond_value, uncond_value)

    return fn


def test_one_sgd_step_moves_toward_real_and_away_from_fake():
    g = gen(1)
    x0_fake = torch.randn(SHAPE, generator=g)
    x0_cond = torch.randn(SHAPE, generator=g)
    x0_uncond = torch.randn(SHAPE, generator=g)
    x0_real = x0_cond + 3.0 * (x0_cond - x0_uncond)  # "cond + 3·(cond − uncond)"
    c, c_neg = texts()
    real_calls, fake_calls = [], []
    real_v = x0_model(by_prompt(x0_cond, x0_uncond), real_calls)
    fake_v = x0_model(lambda cc: x0_fake, fake_calls)

    # The generator's output sits at the fake score's prediction (plus a little noise).
    x_hat = (x0_fake + 0.01 * torch.randn(SHAPE, generator=g)).requires_grad_(True)
    loss, _ = dmd_generator_loss(x_hat, real_v, fake_v, c, c_neg, gen(2), min_tau=20.0)
    loss.backward()
    assert loss.dtype == x_hat.dtype and torch.isfinite(loss)
    assert len(fake_calls) == 1 and len(real_calls) == 2
    assert torch.equal(fake_calls[0]["c"], c) and torch.all(real_calls[1]["c"] == 0)

    # Exact gradient: d/dx̂ mean((x̂ − sg(x̂ − g))²) = 2·g/numel, g = (x0_fake − x0_real)/mean|x̂ − x0_real|.
    xd = x_hat.detach()
    eta = (xd - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = 2 * (x0_fake - x0_real) / eta / xd.numel()
    torch.testing.assert_close(x_hat.grad, expected, rtol=1e-3, atol=1e-7)

    stepped = xd - 100.0 * x_hat.grad
    assert (stepped - x0_real).norm() < (xd - x0_real).norm()
    assert (stepped - x0_fake).norm() > (xd - x0_fake).norm()
    # Per sample the step is along x0_real − x0_fake (η only rescales each sample).
    cos = torch.nn.functional.cosine_similarity(
        (stepped - xd).flatten(1), (x0_real - x0_fake).flatten(1), dim=1
    )
    assert torch.all(cos > 0.9999)


def test_weight_scales_the_loss_and_loss_is_float64_internally():
    g = gen(3)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    c, c_neg = texts()
    real_v, fake_v = x0_model(lambda cc: a), x0_model(lambda cc: b)
    x_hat = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    l1, _ = dmd_generator_loss(x_hat, real_v, fake_v, c, c_neg, gen(4))
    l2, _ = dmd_generator_loss(x_hat, real_v, fake_v, c, c_neg, gen(4), weight=2.5)
    torch.testing.assert_close(l2, 2.5 * l1)
    # Value: mean(g²) with g = (x0_fake − x0_real)/η (x0_real = a since cond = uncond).
    eta = (x_hat - a).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(l1, (((b - a) / eta) ** 2).mean(), rtol=1e-5, atol=0)


def test_noise_level_is_shifted_uniform_and_clamped():
    c = torch.ones(4000, 1, 1)
    x_hat = torch.zeros(4000, 1, 1, 1, 1)
    zero = x0_model(lambda cc: torch.zeros(()))
    _, diag = dmd_generator_loss(x_hat, zero, zero, c, torch.zeros(1, 1, 1), gen(5))
    sigma = diag["t"][:, 0].double() / 1000
    u = sigma / (5 - 4 * sigma)  # undo shift_5: uniform, not logit-normal
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01
    _, diag = dmd_generator_loss(
        x_hat, zero, zero, c, torch.zeros(1, 1, 1), gen(5), min_tau=200.0, max_tau=900.0
    )
    assert diag["t"].min() >= 200.0 and diag["t"].max() <= 900.0
    assert (diag["t"] == 900.0).any() and (diag["t"] == 200.0).any()
    with pytest.raises(ValueError, match="min_tau"):
        dmd_generator_loss(x_hat, zero, zero, c, torch.zeros(1, 1, 1), gen(5), min_tau=500.0, max_tau=100.0)
    assert shift_sigma(0.5) == pytest.approx(5 / 6)


def test_degenerate_normaliser_gives_no_nan():
    # x̂ equals every prediction: η = 0 and g = 0/0 -> nan_to_num -> 0.
    x = torch.randn(SHAPE, generator=gen(6))
    same = x0_model(lambda cc: x)
    c, c_neg = texts()
    x_hat = x.clone().requires_grad_(True)
    loss, _ = dmd_generator_loss(x_hat, same, same, c, c_neg, gen(7), min_tau=20.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().max() == 0


def test_critic_loss_is_flow_matching_on_detached_samples():
    flow = GaussianFlow(torch.randn(SHAPE[2:], generator=gen(8)), 0.7)
    x_hat = flow.sample((4096, *SHAPE[1:]), gen(9)).requires_grad_(True)
    c = torch.zeros(4096, L, D)

    def grad_for(delta0):
        delta = torch.tensor(delta0, requires_grad=True)
        loss, diag = critic_loss(lambda z, t, r, cc: flow.v(z, t) + delta, x_hat, c, gen(10))
        loss.backward()
        return delta.grad.item(), diag

    at_v, diag = grad_for(0.0)
    off_v, _ = grad_for(0.1)
    assert x_hat.grad is None  # generator samples are detached
    assert abs(at_v) < 0.01 and off_v > 0.15, (at_v, off_v)
    assert diag["t"].min() >= 0 and diag["t"].max() <= 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dmd_and_critic_on_cuda():
    g = gen(30)
    a, b, x = (torch.randn(SHAPE, generator=g) for _ in range(3))
    c, c_neg = texts()
    flow = GaussianFlow(0.3, 0.7)
    results = {}
    for device in ("cpu", "cuda"):
        a_d, b_d = a.to(device), b.to(device)
        real_v, fake_v = x0_model(lambda cc, a_d=a_d: a_d), x0_model(lambda cc, b_d=b_d: b_d)
        x_hat = x.detach().clone().to(device).requires_grad_(True)
        loss, _ = dmd_generator_loss(
            x_hat, real_v, fake_v, c.to(device), c_neg.to(device), gen(31), min_tau=20.0
        )
        loss.backward()
        crit, _ = critic_loss(lambda z, t, r, cc: flow.v(z, t), x.to(device), c.to(device), gen(32))
        results[device] = (loss.detach().cpu(), x_hat.grad.cpu(), crit.detach().cpu())
    for p, q in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
