"""Forward flow-map loss and flow matching (docs/method.md §4, §6.2–6.7, §7.4)."""

from __future__ import annotations

import math

import pytest
import torch

from anyflow.analytic import ClassConditionalGaussianFlow, GaussianFlow
from anyflow.flowmap import (
    FlowMapLossConfig,
    flow_matching_loss,
    flowmap_time_derivative,
    forward_flowmap_loss,
)
from anyflow.timesteps import PairType, loss_weight, loss_weight_table


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MLPFlowMap:
    """A small smooth network u(z, t, r, c) acting per frame on (z, t/1000, r/1000, mean_L(c))."""

    def __init__(self, item: int, text_dim: int, *, hidden: int = 64, dtype=torch.float64, seed: int = 0):
        g = gen(seed)
        self.w1 = torch.randn(item + 2 + text_dim, hidden, generator=g, dtype=dtype) * 0.6
        self.b1 = torch.randn(hidden, generator=g, dtype=dtype)
        self.w2 = torch.randn(hidden, item, generator=g, dtype=dtype) / math.sqrt(hidden)
        self.dtype = dtype

    def to(self, device) -> MLPFlowMap:
        self.w1, self.b1, self.w2 = (w.to(device) for w in (self.w1, self.b1, self.w2))
        return self

    def __call__(self, z, t, r, c):
        B, F = z.shape[:2]
        feats = [
            z.reshape(B, F, -1).to(self.dtype),
            (t[..., None] / 1000).to(self.dtype),
            (r[..., None] / 1000).to(self.dtype),
            c.mean(dim=1, keepdim=True).expand(B, F, -1).to(self.dtype),
        ]
        h = torch.tanh(torch.cat(feats, dim=-1) @ self.w1 + self.b1)
        return (h @ self.w2).reshape(z.shape).to(z.dtype)


# ------------------------------------------------------------------------------------------------
# Central difference vs exact JVP (§6.3, §15 F)
# ------------------------------------------------------------------------------------------------


def test_central_difference_matches_jvp_with_second_order_error():
    B, F, C, H, W, L, D = 4, 2, 2, 3, 3, 5, 3
    net = MLPFlowMap(C * H * W, D)
    g = gen(1)
    z = torch.randn(B, F, C, H, W, generator=g, dtype=torch.float64)
    v = torch.randn(B, F, C, H, W, generator=g, dtype=torch.float64)  # the tangent ε − x
    t = (torch.rand(B, 1, generator=g, dtype=torch.float64) * 800 + 100).expand(B, F).contiguous()
    r = t * torch.rand(B, 1, generator=g, dtype=torch.float64)
    c = torch.randn(B, L, D, generator=g, dtype=torch.float64)

    # Exact total derivative per τ unit along (dz/dτ = v/1000, dt/dτ = 1, dr/dτ = 0).
    _, exact = torch.func.jvp(lambda zz, tt: net(zz, tt, r, c), (z, t), (v / 1000, torch.ones_like(t)))
    errors = {}
    for eps in (10.0, 5.0, 2.5):
        fd = flowmap_time_derivative(net, z, t, r, c, v, eps).double()
        errors[eps] = (fd - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert errors[5.0] < 1e-3 * scale, (errors, scale)
    assert 3.0 < errors[10.0] / errors[5.0] < 5.0, errors  # O(ε²): halving ε divides the error by ~4
    assert 3.0 < errors[5.0] / errors[2.5] < 5.0, errors


class Recorder:
    """Wraps a FlowMapFn and records every call's inputs and whether autograd was on."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, z, t, r, c):
        self.calls.append({"z": z, "t": t, "r": r, "c": c, "grad": torch.is_grad_enabled()})
        return self.fn(z, t, r, c)


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_forward_loss_matches_an_independent_jvp_reference(guidance):
    B, F, C, H, W, L, D = 8, 2, 2, 3, 3, 4, 3
    net = MLPFlowMap(C * H * W, D, seed=2)
    g = gen(3)
    x = torch.randn(B, F, C, H, W, generator=g)
    c = torch.randn(B, L, D, generator=g)
    c_neg = torch.randn(1, L, D, generator=g)
    cfg = FlowMapLossConfig(guidance_scale=guidance, text_dropout=0.3, adaptive_scaling=False)
    rec = Recorder(net)
    loss, diag = forward_flowmap_loss(rec, x, c, c_neg, gen(4), cfg)

    assert len(rec.calls) == (4 if guidance != 1.0 else 3)
    grad_calls = [call for call in rec.calls if call["grad"]]
    assert len(grad_calls) == 1  # only u_c carries a gradient
    z, t, r, c_used = (grad_calls[0][k].double() for k in ("z", "t", "r", "c"))
    assert torch.equal(grad_calls[0]["t"], diag["t"]) and torch.equal(grad_calls[0]["r"], diag["r"])
    # Text dropout replaced whole samples by the negative embedding.
    dropped = diag["text_dropped"]
    assert torch.equal(c_used[dropped], c_neg.double().expand(B, L, D)[dropped])
    assert torch.equal(c_used[~dropped], c.double()[~dropped])

    sigma = (t / 1000)[..., None, None, None]
    xd = x.double()
    eps = (z - (1 - sigma) * xd) / sigma
    w = eps - xd
    _, du = torch.func.jvp(lambda zz, tt: net(zz, tt, r, c_used), (z, t), (w / 1000, torch.ones_like(t)))
    target = w - (t - r)[..., None, None, None] * du / guidance
    u_neg = net(z, t, r, c_neg.double().expand(B, L, D))
    p = (net(z, t, r, c_used) - (1 - guidance) * u_neg) / guidance
    ref = ((p - target) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(diag["per_sample_unweighted"].double(), ref, rtol=2e-3, atol=1e-6)

    weights = loss_weight(diag["t"], loss_weight_table("beta08"))
    torch.testing.assert_close(diag["per_sample"], diag["per_sample_unweighted"] * weights)
    torch.testing.assert_close(loss.detach(), diag["per_sample"].mean())


# ------------------------------------------------------------------------------------------------
# Stationarity at the exact flow map (analytic Gaussian data)
# ------------------------------------------------------------------------------------------------
#
# For Gaussian data u* is affine in z, so the central difference is linear in the tangent ε − x and,
# given z_t, the residual p − target = u* − (ε − x) + (t − r)·D is an affine function of ε − x whose
# conditional mean is O(ε_fd²) (MeanFlow identity u* = v − (t − r)·du*/dt). The conditional law of
# ε − x given z_t is a symmetric Gaussian, and the adaptive-scaling factor m/ℓ_i is even in it, so the
# *expected* gradient at u* vanishes although every per-sample loss is positive. A finite batch leaves
# Monte-Carlo noise only; a perturbed map or a non-flow-map (instantaneous velocity for every r) has a
# gradient two orders of magnitude larger.

ITEM = (2, 8, 8)


def _gaussian_setup():
    mean = torch.randn(ITEM, generator=gen(5))
    return GaussianFlow(mean, 0.5)


def _param_grad(flow, base: str, bias0: float, gain0: float, cfg: FlowMapLossConfig, seed: int):
    params = torch.tensor([bias0, gain0], dtype=torch.float32, requires_grad=True)

    def u(z, t, r, c):
        core = flow.u(z, t, r) if base == "exact" else flow.v(z, t)
        return core + params[0] + params[1] * z

    g = gen(seed)
    B = 4096
    x = flow.sample((B, 1, *ITEM), g)
    c = torch.zeros(B, 1, 4)
    loss, diag = forward_flowmap_loss(u, x, c, torch.zeros(1, 1, 4), g, cfg)
    loss.backward()
    assert set(diag) >= {"loss/diffusion", "loss/consistency", "loss/general"}
    assert diag["loss/general"] > 0.05  # per-sample losses are far from zero even at the exact map
    return params.grad


@pytest.mark.parametrize("adaptive", [True, False])
def test_forward_loss_is_stationary_at_the_exact_flow_map(adaptive):
    flow = _gaussian_setup()
    cfg = FlowMapLossConfig(guidance_scale=1.0, text_dropout=0.0, adaptive_scaling=adaptive)
    exact = _param_grad(flow, "exact", 0.0, 0.0, cfg, seed=6)
    bias = _param_grad(flow, "exact", 0.1, 0.0, cfg, seed=6)
    gain = _param_grad(flow, "exact", 0.0, 0.1, cfg, seed=6)
    instantaneous = _param_grad(flow, "instantaneous", 0.0, 0.0, cfg, seed=6)
    assert exact.abs().max() < 0.01, exact  # Monte-Carlo noise ~1e-3 at B = 4096
    assert bias[0] > 0.1 and gain[1] > 0.1, (bias, gain)  # descent pulls the perturbation back
    assert instantaneous.abs().max() > 0.1, instantaneous  # r ignored: not a flow map, not stationary


def test_fused_guidance_fixed_point_is_the_cfg_velocity():
    # §6.2 with g_cfg = 3 on diffusion pairs (r = t): the conditional branch is stationary exactly when
    # it outputs v_∅ + 3·(v_c − v_∅) while the negative embedding gives v_∅.
    means = torch.stack([torch.full(ITEM, -1.0), torch.full(ITEM, 1.5)]) + 0.3 * torch.randn(
        2, *ITEM, generator=gen(7)
    )
    cond = ClassConditionalGaussianFlow(means, std=0.6)
    B = 4096
    g = gen(8)
    labels = torch.randint(2, (B,), generator=g)
    x = cond.sample(labels, (1, *ITEM), g)
    c = cond.embed(labels, seq_len=2, dim=3)
    c_neg = torch.zeros(1, 2, 3)
    cfg = FlowMapLossConfig(
        guidance_scale=3.0,
        text_dropout=0.0,
        diffusion_ratio=1.0,
        consistency_ratio=0.0,
        adaptive_scaling=False,
    )

    def grad_for(branch):
        delta = torch.zeros(2, requires_grad=True)  # one offset per class, on the conditional branch only

        def u(z, t, r, cc):
            return branch(z, t, r, cc) + (cc[:, 0, :2] @ delta).reshape(-1, 1, 1, 1, 1)

        loss, diag = forward_flowmap_loss(u, x, c, c_neg, gen(9), cfg)
        assert set(k for k in diag if k.startswith("loss/")) == {"loss/diffusion"}
        loss.backward()
        return delta.grad.abs().max().item()

    fused = grad_for(cond.guided_velocity(3.0))
    unguided = grad_for(cond.v)  # a plain conditional model is not the fixed point under fusion
    assert fused < 0.01 and unguided > 0.1, (fused, unguided)


# ------------------------------------------------------------------------------------------------
# Adaptive scaling, dropout, diagnostics (§6.5, §6.6)
# ------------------------------------------------------------------------------------------------


def _per_sample_offset_grad(cfg, *, seed=10, B=8, rank=0, world_size=1, gather=None):
    net = MLPFlowMap(2 * 2 * 2, 3, dtype=torch.float32, seed=3)
    offsets = torch.zeros(B, 1, 1, 1, 1, requires_grad=True)

    def u(z, t, r, c):
        return net(z, t, r, c) + offsets

    g = gen(seed)
    x = torch.randn(B, 1, 2, 2, 2, generator=g)
    c = torch.randn(B, 3, 3, generator=g)
    loss, diag = forward_flowmap_loss(
        u, x, c, torch.zeros(1, 3, 3), gen(seed + 1), cfg, rank=rank, world_size=world_size, gather=gather
    )
    loss.backward()
    return offsets.grad.flatten(), diag


def test_adaptive_scaling_rescales_non_diffusion_to_the_diffusion_mean():
    on = FlowMapLossConfig(adaptive_scaling=True)
    off = FlowMapLossConfig(adaptive_scaling=False)
    g_on, d_on = _per_sample_offset_grad(on)
    g_off, d_off = _per_sample_offset_grad(off)
    torch.testing.assert_close(d_on["per_sample"], d_off["per_sample"])  # same draws
    is_diff = d_on["pair_type"] == PairType.DIFFUSION
    assert d_on["pair_type"].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    m = d_on["per_sample"][is_diff].mean()
    torch.testing.assert_close(d_on["per_sample_scaled"][~is_diff], m.expand(4), rtol=1e-4, atol=0)
    torch.testing.assert_close(d_on["per_sample_scaled"][is_diff], d_on["per_sample"][is_diff])
    # The factor is a stop-gradient: each non-diffusion gradient is multiplied by m/(ℓ_i + 1e-5).
    scale = torch.where(is_diff, torch.ones(8), m / (d_on["per_sample"] + 1e-5))
    torch.testing.assert_close(g_on, g_off * scale, rtol=1e-4, atol=1e-9)
    assert torch.all(g_on[~is_diff] != 0)


def test_adaptive_scaling_without_diffusion_samples_is_a_no_op():
    cfg = FlowMapLossConfig(diffusion_ratio=0.0, consistency_ratio=0.5)
    grad, diag = _per_sample_offset_grad(cfg)
    ref, _ = _per_sample_offset_grad(
        FlowMapLossConfig(diffusion_ratio=0.0, consistency_ratio=0.5, adaptive_scaling=False)
    )
    torch.testing.assert_close(diag["per_sample_scaled"], diag["per_sample"])
    torch.testing.assert_close(grad, ref)
    assert "loss/diffusion" not in diag and all(
        torch.isfinite(v).all() for v in diag.values() if v.is_floating_point()
    )


def test_adaptive_scaling_uses_the_global_diffusion_mean():
    # World of 2 ranks × 2: global indices 0, 1 are diffusion (rank 0), 2 consistency and 3 general (rank 1).
    cfg = FlowMapLossConfig()
    _, d0 = _per_sample_offset_grad(cfg, B=2, rank=0, world_size=2)
    assert d0["pair_type"].tolist() == [0, 0]
    losses0, flags0 = d0["per_sample"], torch.ones(2)

    def gather(v):  # simulated all-gather: rank 0's tensors first, then ours
        is_flags = bool(torch.all((v == 0) | (v == 1)))
        return torch.cat([flags0 if is_flags else losses0, v])

    _, d1 = _per_sample_offset_grad(cfg, B=2, rank=1, world_size=2, gather=gather)
    assert d1["pair_type"].tolist() == [1, 2]
    torch.testing.assert_close(d1["per_sample_scaled"], losses0.mean().expand(2), rtol=1e-4, atol=0)
    _, alone = _per_sample_offset_grad(cfg, B=2, rank=1, world_size=2)  # identity gather: no diffusion seen
    torch.testing.assert_close(alone["per_sample_scaled"], alone["per_sample"])


def test_text_dropout_goes_to_the_negative_embedding():
    B = 2000
    x = torch.zeros(B, 1, 1, 1, 1)
    c = torch.ones(B, 2, 3)
    c_neg = -torch.ones(1, 2, 3)
    for p, lo, hi in [(0.0, 0, 0), (1.0, B, B), (0.1, 0.08 * B, 0.12 * B)]:
        rec = Recorder(lambda z, t, r, cc: torch.zeros_like(z))
        _, diag = forward_flowmap_loss(rec, x, c, c_neg, gen(12), FlowMapLossConfig(text_dropout=p))
        first = rec.calls[0]["c"]
        n_neg = int((first[:, 0, 0] == -1).sum())
        assert lo <= n_neg <= hi and n_neg == int(diag["text_dropped"].sum())
        # u_∅ always sees the negative embedding; u_± see the (dropped) conditional one.
        assert torch.all(rec.calls[1]["c"] == -1)
        assert torch.equal(rec.calls[2]["c"], first) and torch.equal(rec.calls[3]["c"], first)


def test_forward_loss_is_deterministic_and_validates():
    cfg = FlowMapLossConfig()
    g1, d1 = _per_sample_offset_grad(cfg)
    g2, d2 = _per_sample_offset_grad(cfg)
    assert torch.equal(g1, g2) and torch.equal(d1["per_sample"], d2["per_sample"])
    with pytest.raises(ValueError, match="weight_type"):
        FlowMapLossConfig(weight_type="beta")
    with pytest.raises(ValueError, match=r"\(B, F, C, H, W\)"):
        forward_flowmap_loss(
            lambda *a: a[0], torch.zeros(2, 3, 4), torch.zeros(2, 1, 1), torch.zeros(1, 1, 1), gen(), cfg
        )
    with pytest.raises(ValueError, match="negative embedding"):
        forward_flowmap_loss(
            lambda *a: a[0],
            torch.zeros(2, 1, 1, 1, 1),
            torch.zeros(2, 1, 3),
            torch.zeros(1, 1, 4),
            gen(),
            cfg,
        )


# ------------------------------------------------------------------------------------------------
# Plain flow matching (§4 teacher, §7.4 critic)
# ------------------------------------------------------------------------------------------------


def test_flow_matching_is_stationary_at_the_marginal_velocity():
    flow = _gaussian_setup()
    B = 4096
    x = flow.sample((B, 1, *ITEM), gen(13))

    def grad_for(delta0):
        delta = torch.tensor(delta0, requires_grad=True)
        rec = Recorder(lambda z, t, r, c: flow.v(z, t) + delta)
        loss, diag = flow_matching_loss(rec, x, torch.zeros(B, 1, 2), gen(14))
        loss.backward()
        assert torch.equal(rec.calls[0]["t"], rec.calls[0]["r"]) and len(rec.calls) == 1
        return delta.grad.item(), diag

    at_v, diag = grad_for(0.0)
    off_v, _ = grad_for(0.05)
    assert abs(at_v) < 0.005 and off_v > 0.08, (at_v, off_v)
    sigma = diag["t"][:, 0] / 1000
    logit = torch.log(sigma / (1 - sigma)) - math.log(5.0)  # undo shift_5: logit(shift(s)) = logit(s) + log 5
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1.0) < 0.05


def test_flow_matching_text_dropout():
    B = 1000
    x = torch.zeros(B, 1, 1, 1, 1)
    rec = Recorder(lambda z, t, r, c: torch.zeros_like(z))
    _, diag = flow_matching_loss(
        rec, x, torch.ones(B, 2, 3), gen(), c_neg=-torch.ones(1, 2, 3), text_dropout=0.1
    )
    n_neg = int((rec.calls[0]["c"][:, 0, 0] == -1).sum())
    assert 70 <= n_neg <= 130 and n_neg == int(diag["text_dropped"].sum())
    with pytest.raises(ValueError, match="c_neg"):
        flow_matching_loss(rec, x, torch.ones(B, 2, 3), gen(), text_dropout=0.1)


# ------------------------------------------------------------------------------------------------
# CUDA: same draws from a CPU generator give the same loss on the GPU; a CUDA generator works too
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_and_flow_matching_losses_on_cuda():
    B, F, C, H, W, L, D = 8, 2, 2, 3, 3, 4, 3
    g = gen(20)
    x = torch.randn(B, F, C, H, W, generator=g)
    c = torch.randn(B, L, D, generator=g)
    c_neg = torch.randn(1, L, D, generator=g)
    cfg = FlowMapLossConfig(text_dropout=0.3)
    results = {}
    for device in ("cpu", "cuda"):
        net = MLPFlowMap(C * H * W, D, seed=4).to(device)
        loss, diag = forward_flowmap_loss(net, x.to(device), c.to(device), c_neg.to(device), gen(21), cfg)
        fm, _ = flow_matching_loss(
            net, x.to(device), c.to(device), gen(22), c_neg=c_neg.to(device), text_dropout=0.1
        )
        assert loss.device.type == device and diag["t"].device.type == device
        results[device] = (loss.cpu(), diag["per_sample"].cpu(), fm.cpu())
    for a, b in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    net = MLPFlowMap(C * H * W, D, seed=4).to("cuda")
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    loss, diag = forward_flowmap_loss(net, x.cuda(), c.cuda(), c_neg.cuda(), cuda_gen, cfg)
    assert torch.isfinite(loss) and diag["pair_type"].device.type == "cuda"
