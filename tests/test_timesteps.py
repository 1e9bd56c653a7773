"""Time grids, pair sampling and loss weights (docs/method.md §1.2, §2.4, §6.1, §6.4)."""

from __future__ import annotations

import math

import pytest
import torch

from anyflow.timesteps import (
    NUM_TRAIN_TIMESTEPS,
    PairType,
    TimePairs,
    flowmap_euler_sigmas,
    loss_weight,
    loss_weight_table,
    pair_split_counts,
    sample_logit_normal,
    sample_time_pairs,
    sample_uniform,
    shift_sigma,
    sigma_to_tau,
    tau_to_sigma,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unshift(sigma, k: float = 5.0):
    """Inverse of shift_k, written out by hand: s = σ / (k − (k − 1)σ)."""
    return sigma / (k - (k - 1) * sigma)


def test_shift_and_units():
    assert shift_sigma(0.0) == 0.0 and shift_sigma(1.0) == 1.0
    assert shift_sigma(0.5) == pytest.approx(2.5 / 3.0)  # 5·0.5/(1 + 4·0.5)
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(unshift(shift_sigma(s)), s)
    assert torch.all(torch.diff(shift_sigma(s)) > 0)  # keeps order
    assert torch.equal(shift_sigma(s, 1.0), s)
    assert sigma_to_tau(0.25) == 250.0 and tau_to_sigma(250.0) == 0.25
    assert NUM_TRAIN_TIMESTEPS == 1000


@pytest.mark.parametrize("shift", [5.0, 1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 50])
def test_flowmap_euler_sigmas_match_diffusers(n, shift):
    from diffusers import FlowMapEulerDiscreteScheduler  # the test may import diffusers; the module may not

    sched = FlowMapEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ours = flowmap_euler_sigmas(n, shift)
    assert ours.dtype == torch.float64 and ours.shape == (n + 1,)
    assert ours[0].item() == 1.0 and ours[-1].item() == 0.0
    torch.testing.assert_close(ours, sched.sigmas.to(torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours[:-1] * 1000, sched.timesteps.to(torch.float64), rtol=0, atol=1e-9)


def test_flowmap_euler_sigmas_rejects_bad_n():
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_steps"):
            flowmap_euler_sigmas(bad)


def test_random_draws_are_explicit_and_distributed():
    a = sample_logit_normal(20000, gen(1))
    b = sample_logit_normal(20000, gen(1))
    assert torch.equal(a, b) and a.dtype == torch.float32
    logit = torch.log(a / (1 - a))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    m = sample_logit_normal(20000, gen(1), mean=1.0, std=0.5)
    assert abs(torch.log(m / (1 - m)).mean().item() - 1.0) < 0.02
    u = sample_uniform(20000, gen(2))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize(
    ("global_batch", "expected"),
    [(2, (1, 0, 1)), (16, (8, 4, 4)), (32, (16, 8, 8)), (1, (0, 0, 1)), (6, (3, 2, 1)), (4, (2, 1, 1))],
)
def test_pair_split_counts(global_batch, expected):
    # Python round is half-to-even: round(0.5) = 0, round(1.5) = 2, round(0.5·1) = 0.
    assert pair_split_counts(global_batch) == expected


def test_pair_split_counts_validates():
    assert pair_split_counts(8, 1.0, 0.0) == (8, 0, 0)
    assert pair_split_counts(8, 0.0, 0.0) == (0, 0, 8)
    with pytest.raises(ValueError, match="<= 1"):
        pair_split_counts(8, 0.7, 0.5)
    with pytest.raises(ValueError, match="global_batch"):
        pair_split_counts(0)


def _check_pairs(p: TimePairs, batch: int, frames: int):
    assert p.t.shape == p.r.shape == (batch, frames)
    assert p.t.dtype == p.r.dtype == torch.float32 and p.pair_type.dtype == torch.long
    assert torch.all(p.t == p.t[:, :1]) and torch.all(p.r == p.r[:, :1])  # all frames share t and r
    assert torch.all(p.r <= p.t) and torch.all(p.t <= 1000) and torch.all(p.r >= 0)
    d = p.pair_type == PairType.DIFFUSION
    c = p.pair_type == PairType.CONSISTENCY
    g = p.pair_type == PairType.GENERAL
    assert torch.equal(p.r[d], p.t[d])
    assert torch.all(p.r[c] == 0)
    assert torch.all(p.r[g] < p.t[g]) and torch.all(p.r[g] > 0)


def test_time_pairs_single_rank():
    p = sample_time_pairs(16, 3, gen(3))
    _check_pairs(p, 16, 3)
    assert p.pair_type.tolist() == [0] * 8 + [1] * 4 + [2] * 4
    q = sample_time_pairs(16, 3, gen(3))
    assert torch.equal(p.t, q.t) and torch.equal(p.r, q.r)


@pytest.mark.parametrize(
    ("batch", "world", "expected"),
    [
        # global 16 = 4 ranks × 4: 8 diffusion, 4 consistency, 4 general, by global index.
        (4, 4, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]]),
        # global 2 = 2 ranks × 1: (1, 0, 1).
        (1, 2, [[0], [2]]),
        # global 32 = 4 ranks × 8: 16 / 8 / 8.
        (8, 4, [[0] * 8, [0] * 8, [1] * 8, [2] * 8]),
        # global 6 = 2 × 3: round(3) = 3 diffusion, round(1.5) = 2 consistency, 1 general.
        (3, 2, [[0, 0, 0], [1, 1, 2]]),
    ],
)
def test_time_pairs_use_global_index(batch, world, expected):
    for rank in range(world):
        p = sample_time_pairs(batch, 2, gen(rank), rank=rank, world_size=world)
        _check_pairs(p, batch, 2)
        assert p.pair_type.tolist() == expected[rank]


def test_time_pairs_distribution():
    # Before the shift t = max(a, b) and r = min(a, b): E[t] = 2/3, E[r] = 1/3 (general pairs).
    p = sample_time_pairs(40000, 1, gen(4), diffusion_ratio=0.0, consistency_ratio=0.0)
    t = unshift(p.t[:, 0].double() / 1000)
    r = unshift(p.r[:, 0].double() / 1000)
    assert abs(t.mean().item() - 2 / 3) < 0.01 and abs(r.mean().item() - 1 / 3) < 0.01
    with pytest.raises(ValueError, match="rank"):
        sample_time_pairs(2, 1, gen(), rank=2, world_size=2)


def test_weight_table_beta08():
    w = loss_weight_table("beta08").double()
    assert w.shape == (1001,)
    assert w.sum().item() == pytest.approx(1000.0, rel=1e-5)
    grid = 1000 * shift_sigma(torch.linspace(1, 0, 1001, dtype=torch.float64))
    s = grid / 1000
    assert s[0] == 1.0 and s[-1] == 0.0
    assert w[0].item() == 0.0 and w[-1].item() == 0.0  # zero at s = 1 and s = 0
    assert abs(s[w.argmax()].item() - 2 / 3) < 0.01  # peak of s·(1 − s)^0.5
    ref = s * (1 - s) ** 0.5
    torch.testing.assert_close(w, ref * 1000 / ref.sum(), rtol=1e-6, atol=1e-6)


def test_weight_table_other_kinds():
    g = loss_weight_table("gaussian").double()
    assert g.sum().item() == pytest.approx(1000.0, rel=1e-5) and g.min().item() == 0.0
    grid = 1000 * shift_sigma(torch.linspace(1, 0, 1001, dtype=torch.float64))
    assert abs(grid[g.argmax()].item() - 500.0) < 5.0
    assert torch.equal(loss_weight_table("uniform"), torch.ones(1001))
    with pytest.raises(ValueError, match=r"beta08.*gaussian.*uniform"):
        loss_weight_table("beta8")


def test_loss_weight_snaps_to_grid():
    table = loss_weight_table("beta08")
    grid = 1000 * shift_sigma(torch.linspace(1, 0, 1001, dtype=torch.float64))
    idx = torch.tensor([0, 100, 333, 600, 1000])
    on_grid = grid[idx].float()
    assert torch.equal(loss_weight(on_grid, table), table[idx])
    # A point a third of the way from grid[500] towards grid[501] snaps to grid[500], and vice versa.
    near = (grid[500] + (grid[501] - grid[500]) / 3).float()
    far = (grid[500] + 2 * (grid[501] - grid[500]) / 3).float()
    assert loss_weight(near[None], table).item() == table[500].item()
    assert loss_weight(far[None], table).item() == table[501].item()
    # (B, F): per-frame weights averaged over frames.
    two = torch.stack([on_grid[:2], on_grid[2:4]], dim=1)  # (2, 2)
    expected = torch.stack([table[idx[[0, 2]]].mean(), table[idx[[1, 3]]].mean()])
    torch.testing.assert_close(loss_weight(two, table), expected)


def test_loss_weight_averages_to_one_on_training_times():
    # §6.4: training t ~ shift_5(U) matches the grid density, so the mean weight is about 1.
    tau = 1000 * shift_sigma(sample_uniform(200000, gen(5)))
    assert abs(loss_weight(tau, loss_weight_table("beta08")).mean().item() - 1.0) < 0.02
    assert not math.isnan(loss_weight(tau[:3], loss_weight_table("gaussian")).sum().item())
