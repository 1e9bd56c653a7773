"""Toy pieces for the any-step experiment (docs/method.md §15 A–E): data, MLPs, samplers and metrics.

Everything here is small and CPU-friendly. Points are 2-D and travel through the package's pure maths
as latents of shape (B, 1, 2, 1, 1) (one "frame", two "channels"); the class condition is a one-hot
"text embedding" of shape (B, 1, K + 1) whose last slot is the null class (the negative embedding).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from anyflow.rollout import FlowMapFn
from anyflow.timesteps import NUM_TRAIN_TIMESTEPS, flowmap_euler_sigmas

# --------------------------------------------------------------------------------------------------
# Data: class-conditional 8-Gaussian ring
# --------------------------------------------------------------------------------------------------


class RingMixture:
    """8 Gaussians on a ring of radius ``radius``; class j ∈ {0..K−1} owns components {j, j+K, …}.

    With K = 4 every class is bimodal (two opposite components), so the conditional PF-ODE has to split
    the noise between two far-apart modes: few-step samplers are stressed, and CFG (which pushes away
    from the other classes' modes) changes the distribution visibly.
    """

    def __init__(self, num_classes: int = 4, num_components: int = 8, radius: float = 2.0, std: float = 0.15):
        if num_components % num_classes != 0:
            raise ValueError(
                f"num_components={num_components} must be a multiple of num_classes={num_classes}."
            )
        self.K, self.M, self.radius, self.std = num_classes, num_components, radius, std
        ang = 2 * math.pi * torch.arange(num_components) / num_components
        self.centers = radius * torch.stack([ang.cos(), ang.sin()], dim=1)  # (M, 2)

    @property
    def cond_dim(self) -> int:
        return self.K + 1

    def labels(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(self.K, (n,), generator=generator)

    def balanced_labels(self, n: int) -> Tensor:
        return torch.arange(n) % self.K

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Points (B, 2) for the given class labels (B,)."""
        slot = torch.randint(self.M // self.K, labels.shape, generator=generator)
        comp = labels + self.K * slot
        return self.centers[comp] + self.std * torch.randn(labels.shape[0], 2, generator=generator)

    def embed(self, labels: Tensor) -> Tensor:
        """One-hot condition (B, 1, K+1); label K is the null class."""
        return nn.functional.one_hot(labels, self.K + 1).float()[:, None, :]

    def negative(self) -> Tensor:
        """The null-class ("negative prompt") embedding (1, 1, K+1)."""
        return self.embed(torch.tensor([self.K]))

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(x latent (n,1,2,1,1), c (n,1,K+1), labels (n,))."""
        y = self.labels(n, generator)
        return to_latent(self.sample(y, generator)), self.embed(y), y


def to_latent(points: Tensor) -> Tensor:
    """(B, D) -> (B, 1, D, 1, 1)."""
    return points[:, None, :, None, None]


def from_latent(z: Tensor) -> Tensor:
    """(B, 1, D, 1, 1) -> (B, D)."""
    return z[:, 0, :, 0, 0]


# --------------------------------------------------------------------------------------------------
# Model: MLP velocity / flow-map network with a Wan-style (two-)time embedder
# --------------------------------------------------------------------------------------------------


def sinusoid(tau: Tensor, dim: int) -> Tensor:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos, sin] of τ·freqs."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=tau.device) / half)
    arg = tau.float()[:, None] * freqs[None]
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class TimeEmbedder(nn.Module):
    """Linear → SiLU → Linear, as Wan's ``time_embedder`` (docs/method.md §2.2)."""

    def __init__(self, freq_dim: int, width: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(freq_dim, width), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2, self.mod = (
            nn.Linear(width, width),
            nn.Linear(width, width),
            nn.Linear(width, width),
        )

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(h)) + self.mod(emb)))


class ToyFlowMapMLP(nn.Module):
    """v(z, τ, c) (teacher, critic) or, after ``to_flowmap``, u(z, τ_t, τ_r, c) (student).

    The time embedding e conditions every block (shift) together with a projection of the condition.
    With a ``delta_embedder`` (§2.2, deltatime_type 'r'): e = e_t + g·(e_r − e_t), g = 0.25 fixed,
    written so that e = e_t bit-for-bit at r = t.
    """

    def __init__(
        self, data_dim: int = 2, cond_dim: int = 5, width: int = 128, depth: int = 2, freq_dim: int = 64
    ):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimeEmbedder(freq_dim, width)
        self.delta_embedder: TimeEmbedder | None = None
        self.register_buffer("gate", torch.tensor(0.25), persistent=False)
        self.cond_proj = nn.Linear(cond_dim, width)
        self.in_proj = nn.Linear(data_dim, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out_proj = nn.Linear(width, data_dim)

    def embed_time(self, tau_t: Tensor, tau_r: Tensor) -> Tensor:
        e_t = self.time_embedder(sinusoid(tau_t, self.freq_dim))
        if self.delta_embedder is None:
            return e_t
        e_r = self.delta_embedder(sinusoid(tau_r, self.freq_dim))
        return e_t + self.gate * (e_r - e_t)  # = (1 − g)·e_t + g·e_r

    def forward(self, z: Tensor, tau_t: Tensor, tau_r: Tensor, c: Tensor) -> Tensor:
        emb = nn.functional.silu(self.embed_time(tau_t, tau_r) + self.cond_proj(c))
        h = self.in_proj(z)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out_proj(nn.functional.silu(h))


def to_flowmap(model: ToyFlowMapMLP, gate: float = 0.25) -> ToyFlowMapMLP:
    """§2.2: a two-time student: a deep copy whose delta embedder is a copy of the time embedder."""
    student = copy.deepcopy(model)
    student.delta_embedder = copy.deepcopy(model.time_embedder)
    student.gate.fill_(gate)
    return student


def as_fn(model: nn.Module) -> FlowMapFn:
    """Wrap the MLP into the package's FlowMapFn convention (z (B,1,D,1,1), τ (B,1), c (B,1,Dc))."""

    def fn(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        b = z.shape[0]
        cc = c[:, 0].expand(b, -1) if c.shape[0] == 1 else c[:, 0]
        return to_latent(model(from_latent(z), t[:, 0], r[:, 0], cc))

    return fn


def cfg_fn(v: FlowMapFn, c_neg: Tensor, scale: float) -> FlowMapFn:
    """Classifier-free guidance in the standard convention v_∅ + w·(v_c − v_∅), instantaneous (r = t)."""

    def fn(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        b = z.shape[0]
        out = v(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([c, c_neg.expand_as(c)]))
        v_c, v_n = out[:b], out[b:]
        return v_n + scale * (v_c - v_n)

    return fn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1.0 - decay)


# --------------------------------------------------------------------------------------------------
# Consistency-distillation endpoint map and multistep consistency sampling (§13, §15 A)
# --------------------------------------------------------------------------------------------------


def consistency_endpoint(u: FlowMapFn, z: Tensor, sigma: Tensor, c: Tensor) -> Tensor:
    """f(z, σ) = z − σ·u(z, τ, 0, c): the one-call jump to data; f(z, 0) = z exactly (boundary condition)."""
    tau = (sigma * NUM_TRAIN_TIMESTEPS).float().expand(z.shape[0])[:, None].contiguous()
    return z - sigma.reshape(-1, 1, 1, 1, 1) * u(z, tau, torch.zeros_like(tau), c)


@torch.no_grad()
def consistency_sample(
    u: FlowMapFn, z: Tensor, c: Tensor, num_steps: int, generator: torch.Generator, *, shift: float
) -> Tensor:
    """Multistep consistency sampling: x̂0 = f(z, σ_i); re-noise to σ_{i+1} with fresh noise; N calls."""
    sigmas = flowmap_euler_sigmas(num_steps, shift).float()
    x0 = consistency_endpoint(u, z, sigmas[0].expand(z.shape[0]), c)
    for i in range(1, num_steps):
        s = float(sigmas[i])
        noise = torch.randn(z.shape, generator=generator)
        x0 = consistency_endpoint(u, s * noise + (1 - s) * x0, sigmas[i].expand(z.shape[0]), c)
    return x0


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def energy_distance(a: Tensor, b: Tensor, *, paired: bool = False) -> float:
    """Squared energy distance 2E|A−B| − E|A−A'| − E|B−B'| (U-statistics: self-pairs dropped).

    ``paired=True`` (a_i and b_i share their noise) also drops the i = j cross pairs, so coupling does
    not bias the estimate downward.
    """

    def mean_offdiag(d: Tensor) -> Tensor:
        n = d.shape[0]
        return (d.sum() - d.diagonal().sum()) / (n * (n - 1))

    dab = torch.cdist(a.double(), b.double())
    cross = mean_offdiag(dab) if paired else dab.mean()
    return float(
        2 * cross
        - mean_offdiag(torch.cdist(a.double(), a.double()))
        - mean_offdiag(torch.cdist(b.double(), b.double()))
    )


def classwise_energy_distance(
    a: Tensor, la: Tensor, b: Tensor, lb: Tensor, num_classes: int, *, paired: bool = False
) -> float:
    """Energy distance between the class-conditional sample sets, averaged over classes."""
    vals = [energy_distance(a[la == k], b[lb == k], paired=paired) for k in range(num_classes)]
    return float(sum(vals) / len(vals))


def coupled_error(x: Tensor, ref: Tensor) -> float:
    """Mean Euclidean distance between samples generated from the same initial noise."""
    return float((from_latent(x) - from_latent(ref)).norm(dim=1).mean())


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole batch."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
