"""Closed-form flows for Gaussian data, for tests and experiments (pure maths).

Data x ~ N(μ, s²) independently per coordinate (μ, s broadcast against the latent), noise ε ~ N(0, 1),
z_σ = σ·ε + (1 − σ)·x. Then z_σ ~ N(m(σ), b(σ)²) with

    m(σ) = (1 − σ)·μ,        b(σ)² = σ² + (1 − σ)²·s².

Marginal velocity v(z, σ) = E[ε − x | z_σ = z]. By Gaussian conditioning (Cov(ε, z) = σ,
Cov(x, z) = (1 − σ)s²):

    v(z, σ) = (σ − (1 − σ)s²)/b² · (z − m) − μ = m'(σ) + (b'/b)·(z − m)      (since b·b' = σ − (1 − σ)s²).

So the PF-ODE dz/dσ = v is linear in z and keeps (z − m)/b constant: the exact flow map is

    Φ(z; t → r) = m(r) + (b(r)/b(t))·(z − m(t)),

and the exact average velocity u*(z, t, r) = (z − Φ)/(t − r) has the cancellation-free form

    u*(z, t, r) = (z − m(t))·[(t + r) − s²(2 − t − r)] / (b(t)·(b(t) + b(r))) − μ,

which equals v(z, t) at r = t. All callables here follow ``FlowMapFn``: τ = 1000·σ in, c ignored
(except by the class-conditional variant), velocity per unit σ out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyflow.rollout import FlowMapFn
from anyflow.timesteps import NUM_TRAIN_TIMESTEPS


def _as_sigma(tau_or_sigma: Tensor | float, z: Tensor, *, is_tau: bool) -> Tensor | float:
    """τ (or σ) as σ, broadcastable against z: (B, F) -> (B, F, 1, 1, 1); floats stay floats."""
    if not torch.is_tensor(tau_or_sigma):
        return tau_or_sigma / NUM_TRAIN_TIMESTEPS if is_tau else tau_or_sigma
    s = tau_or_sigma.to(device=z.device, dtype=z.dtype)
    if is_tau:
        s = s / NUM_TRAIN_TIMESTEPS
    return s.reshape(*s.shape, *([1] * (z.ndim - s.ndim)))


def _like(value: Tensor | float, z: Tensor) -> Tensor | float:
    return value.to(device=z.device, dtype=z.dtype) if torch.is_tensor(value) else value


class GaussianFlow:
    """Exact flow of x ~ N(mean, std²) per coordinate; ``mean``/``std`` broadcast against z (B, F, C, H, W)."""

    def __init__(self, mean: Tensor | float = 0.0, std: Tensor | float = 1.0):
        if (torch.as_tensor(std) <= 0).any():
            raise ValueError("GaussianFlow needs std > 0 (the flow map is singular at σ = 0 otherwise).")
        self.mean = mean
        self.std = std

    # ---- closed forms in σ units -------------------------------------------------------------
    def marginal(self, z: Tensor, sigma: Tensor | float) -> tuple[Tensor | float, Tensor]:
        """(m(σ), b(σ)) of z_σ, broadcast for z."""
        mu, s = _like(self.mean, z), _like(self.std, z)
        a = 1 - sigma
        b = torch.sqrt(torch.as_tensor(sigma**2 + (a * s) ** 2, dtype=z.dtype, device=z.device))
        return a * mu, b

    def velocity(self, z: Tensor, sigma: Tensor | float) -> Tensor:
        """v(z, σ) = E[ε − x | z_σ = z]."""
        mu, s = _like(self.mean, z), _like(self.std, z)
        m, b = self.marginal(z, sigma)
        return (sigma - (1 - sigma) * s**2) / b**2 * (z - m) - mu

    def flow_map(self, z: Tensor, sigma_t: Tensor | float, sigma_r: Tensor | float) -> Tensor:
        """Φ(z; t -> r), the exact PF-ODE solution from σ_t to σ_r."""
        m_t, b_t = self.marginal(z, sigma_t)
        m_r, b_r = self.marginal(z, sigma_r)
        return m_r + (b_r / b_t) * (z - m_t)

    def average_velocity(self, z: Tensor, sigma_t: Tensor | float, sigma_r: Tensor | float) -> Tensor:
        """u*(z, t, r) = (z − Φ(z; t -> r))/(t − r), with u*(z, t, t) = v(z, t)."""
        mu, s = _like(self.mean, z), _like(self.std, z)
        m_t, b_t = self.marginal(z, sigma_t)
        _, b_r = self.marginal(z, sigma_r)
        slope = ((sigma_t + sigma_r) - s**2 * (2 - sigma_t - sigma_r)) / (b_t * (b_t + b_r))
        return slope * (z - m_t) - mu

    def sample(self, shape: tuple[int, ...], generator: torch.Generator, *, dtype=torch.float32) -> Tensor:
        """Data samples x of the given shape (drawn on the generator's device)."""
        eps = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        return _like(self.mean, eps) + _like(self.std, eps) * eps

    # ---- FlowMapFn-compatible callables (τ units in) -------------------------------------------
    def u(self, z: Tensor, t: Tensor, r: Tensor, c: Tensor | None = None) -> Tensor:
        """Exact average velocity u*(z, t, r) as a FlowMapFn."""
        return self.average_velocity(z, _as_sigma(t, z, is_tau=True), _as_sigma(r, z, is_tau=True))

    def v(self, z: Tensor, t: Tensor, r: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        """Exact instantaneous velocity v(z, t) as a FlowMapFn (r ignored, like a teacher)."""
        return self.velocity(z, _as_sigma(t, z, is_tau=True))

    def __call__(self, z: Tensor, t: Tensor, r: Tensor, c: Tensor | None = None) -> Tensor:
        return self.u(z, t, r, c)


class ClassConditionalGaussianFlow:
    """Class k has data N(class_means[k], std²) per coordinate; the null (negative) embedding has its own Gaussian.

    The class is read from the text embedding c (B, L, D): a one-hot in c[:, 0, :K]; an all-zero first
    token is the null/negative prompt. ``embed`` builds such embeddings. ``class_means`` is (K, *item)
    with ``item`` broadcastable to the trailing latent dims (e.g. (C, H, W) or (F, C, H, W)).
    """

    def __init__(
        self,
        class_means: Tensor,
        std: float = 1.0,
        *,
        null_mean: Tensor | None = None,
        null_std: float | None = None,
    ):
        if class_means.ndim < 1 or class_means.ndim > 5:
            raise ValueError(
                f"class_means must be (K, *item) with item of <= 4 dims, got {tuple(class_means.shape)}."
            )
        self.class_means = class_means
        self.std = float(std)
        self.null_mean = class_means.mean(dim=0) if null_mean is None else null_mean
        self.null_std = self.std if null_std is None else float(null_std)
        self.num_classes = class_means.shape[0]

    def embed(self, labels: Tensor, *, seq_len: int = 1, dim: int | None = None) -> Tensor:
        """Embedding (B, seq_len, dim) for labels (B,) long; label −1 gives the null embedding."""
        dim = self.num_classes if dim is None else dim
        if dim < self.num_classes:
            raise ValueError(f"dim must be >= num_classes={self.num_classes}, got {dim}.")
        c = torch.zeros(labels.shape[0], seq_len, dim, dtype=torch.float32, device=labels.device)
        rows = torch.nonzero(labels >= 0).flatten()
        c[rows, 0, labels[rows]] = 1.0
        return c

    def labels(self, c: Tensor) -> Tensor:
        """Labels (B,) from embeddings; −1 for the null embedding."""
        head = c[:, 0, : self.num_classes]
        return torch.where(
            head.abs().sum(dim=-1) > 0, head.argmax(dim=-1), torch.full_like(head[:, 0], -1).long()
        )

    def flow(self, c: Tensor, z: Tensor) -> GaussianFlow:
        """The per-sample GaussianFlow selected by c, broadcast for z (B, F, C, H, W)."""
        labels = self.labels(c).to(z.device)
        item = self.class_means.shape[1:]
        lead = (z.shape[0],) + (1,) * (z.ndim - 1 - len(item))
        means = self.class_means.to(z.device, z.dtype)[labels.clamp_min(0)]
        null = labels < 0
        means = torch.where(null.view(-1, *[1] * len(item)), self.null_mean.to(z.device, z.dtype), means)
        std = torch.full(null.shape, self.std, dtype=z.dtype, device=z.device).masked_fill(
            null, self.null_std
        )
        return GaussianFlow(means.reshape(*lead, *item), std.reshape(-1, *[1] * (z.ndim - 1)))

    def u(self, z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        return self.flow(c, z).u(z, t, r)

    def v(self, z: Tensor, t: Tensor, r: Tensor | None, c: Tensor) -> Tensor:
        return self.flow(c, z).v(z, t)

    def __call__(self, z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        return self.u(z, t, r, c)

    def guided_velocity(self, scale: float) -> FlowMapFn:
        """CFG velocity v_∅ + w·(v_c − v_∅) as an instantaneous FlowMapFn (null embedding: v_∅)."""

        def fn(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
            null_c = torch.zeros_like(c)
            v_null = self.v(z, t, t, null_c)
            return v_null + scale * (self.v(z, t, t, c) - v_null)

        return fn

    def sample(self, labels: Tensor, item_shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Data (B, *item_shape) fp32 for labels (B,) (−1 draws from the null Gaussian)."""
        z = torch.zeros((labels.shape[0], *item_shape), device=generator.device)
        return self.flow(self.embed(labels.to(generator.device)), z).sample(z.shape, generator)


class GaussianMixture:
    """Data x ~ Σ_k π_k N(means[k], std²·I) over whole items (means is (K, *item)); exact marginal velocity.

    Given z_σ the component posterior is w_k(z) ∝ π_k·N(z; (1 − σ)μ_k, b²I) (b as above, shared by all
    components), and v(z, σ) = Σ_k w_k·v_k(z) = (σ − (1 − σ)s²)/b²·(z − (1 − σ)μ̄) − μ̄ with μ̄ = Σ_k w_k μ_k.
    The flow map has no closed form; integrate ``velocity`` (or use many sampler steps) for references.
    """

    def __init__(self, means: Tensor, std: float = 0.1, weights: Tensor | None = None):
        if means.ndim < 2:
            raise ValueError(f"means must be (K, *item), got shape {tuple(means.shape)}.")
        if std <= 0:
            raise ValueError(f"GaussianMixture needs std > 0, got {std}.")
        k = means.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights.double()
        if weights.shape != (k,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be (K,) = ({k},) non-negative with a positive sum.")
        self.means, self.std, self.weights = means, float(std), weights / weights.sum()

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x (n, *item) fp32, component labels (n,) long), drawn on the generator's device."""
        dev = generator.device
        labels = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        eps = torch.randn((n, *self.item_shape), generator=generator, device=dev)
        return self.means.to(dev, torch.float32)[labels] + self.std * eps, labels

    def velocity(self, z: Tensor, sigma: Tensor | float) -> Tensor:
        """v(z, σ) for z (*batch, *item); σ a float or a tensor of shape batch."""
        item_nd = len(self.item_shape)
        batch_shape = z.shape[: z.ndim - item_nd]
        sig = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).expand(batch_shape)
        a = 1 - sig
        b2 = sig**2 + (a * self.std) ** 2
        zf = z.reshape(*batch_shape, 1, -1)
        mu = self.means.to(z.device, z.dtype).reshape(self.means.shape[0], -1)
        d2 = ((zf - a[..., None, None] * mu) ** 2).sum(dim=-1)  # (*batch, K)
        logits = self.weights.to(z.device, z.dtype).log() - d2 / (2 * b2[..., None])
        # Clamp far-away components to weight ~e^-80 (not 0): keeps exp out of the very slow denormal range.
        logits = (logits - logits.amax(dim=-1, keepdim=True)).clamp_min(-80.0)
        mu_bar = (torch.softmax(logits, dim=-1)[..., None] * mu).sum(dim=-2)  # (*batch, P)
        slope = ((sig - a * self.std**2) / b2)[..., None]
        v = slope * (zf[..., 0, :] - a[..., None] * mu_bar) - mu_bar
        return v.reshape(z.shape)

    def v(self, z: Tensor, t: Tensor, r: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        """Exact instantaneous velocity as a FlowMapFn (r, c ignored); t (B, F) or matching z's batch dims."""
        batch_nd = z.ndim - len(self.item_shape)
        sigma = t.to(z.dtype) / NUM_TRAIN_TIMESTEPS
        if sigma.ndim > batch_nd:  # items span the frames: one σ per sample
            if not torch.all(sigma == sigma[..., :1]):
                raise ValueError("GaussianMixture.v: items span frames, so all frames must share t.")
            sigma = sigma[..., 0]
        return self.velocity(z, sigma)


def integrate_ode(
    velocity, z: Tensor, sigma_t: Tensor | float, sigma_r: Tensor | float, steps: int = 400
) -> Tensor:
    """Classical RK4 solution of dz/dσ = velocity(z, σ) from σ_t to σ_r in ``steps`` equal steps.

    ``velocity(z, σ)`` takes σ as a tensor of z's batch shape (as ``GaussianMixture.velocity``); σ_t, σ_r are
    floats or tensors of that shape (per-sample times). Run it in float64 for references: with smooth
    velocities the error falls as steps⁻⁴, so doubling ``steps`` and comparing bounds it.
    """
    batch_shape = z.shape[:1]
    s_t = torch.as_tensor(sigma_t, dtype=z.dtype, device=z.device).expand(batch_shape)
    s_r = torch.as_tensor(sigma_r, dtype=z.dtype, device=z.device).expand(batch_shape)
    h = (s_r - s_t) / steps
    hb = h.reshape(-1, *([1] * (z.ndim - 1)))
    s = s_t
    for _ in range(steps):
        k1 = velocity(z, s)
        k2 = velocity(z + 0.5 * hb * k1, s + 0.5 * h)
        k3 = velocity(z + 0.5 * hb * k2, s + 0.5 * h)
        k4 = velocity(z + hb * k3, s + h)
        z = z + hb / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        s = s + h
    return z
