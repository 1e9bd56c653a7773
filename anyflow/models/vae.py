"""Video VAE wrapper around diffusers' ``AutoencoderKLWan`` with AnyFlow's latent conventions.

Latents are (B, F, C, h, w) and normalised per channel with the VAE config's ``latents_mean`` /
``latents_std`` (docs/method.md §1.3): ``x = (μ − mean) / std`` where μ is the posterior mean (no sampling).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class VideoVAE:
    """Encode videos in [-1, 1] to normalised (B, F, C, h, w) latents and decode them back.

    Args:
        vae: a diffusers ``AutoencoderKLWan`` (any device / dtype; its config must hold
            ``latents_mean`` and ``latents_std`` with ``z_dim`` entries each).
    """

    def __init__(self, vae: Any) -> None:
        cfg = vae.config
        z_dim = int(cfg.z_dim)
        for field in ("latents_mean", "latents_std"):
            values = getattr(cfg, field, None)
            if values is None or len(values) != z_dim:
                raise ValueError(
                    f"VAE config field {field} must list z_dim={z_dim} numbers, got {values!r}; "
                    f"fix vae/config.json."
                )
        self.vae = vae
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32)

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for Wan)."""
        return int(self.vae.config.scale_factor_temporal)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W (8 for Wan)."""
        return int(self.vae.config.scale_factor_spatial)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(F, C, h, w) for a video of ``frames × height × width``: F = (T − 1)/4 + 1, h = H/8, w = W/8."""
        tf, sf = self.temporal_factor, self.spatial_factor
        if frames < 1 or (frames - 1) % tf != 0:
            raise ValueError(
                f"Video length {frames} frames is not 1 + {tf}·k; use e.g. {1 + tf * max((frames - 1) // tf, 0)}."
            )
        if height % sf or width % sf:
            raise ValueError(f"Video size {height}×{width} is not a multiple of {sf}; resize or crop it.")
        return (frames - 1) // tf + 1, self.latent_channels, height // sf, width // sf

    # ---- encode / decode ------------------------------------------------------------------------
    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, 1, -1, 1, 1)  # broadcast over (B, F, C, h, w)
        return self._mean.to(like.device).view(shape), self._std.to(like.device).view(shape)

    @property
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.vae.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) video in [-1, 1] -> normalised latents (B, F, C, h, w) fp32.

        Uses the posterior mean (deterministic: the same video always gives the same latent).
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"VideoVAE.encode expects (B, 3, T, H, W), got shape {tuple(video.shape)}.")
        self.latent_shape(video.shape[2], video.shape[3], video.shape[4])  # validates the geometry
        device, dtype = self._device_dtype
        posterior = self.vae.encode(video.to(device=device, dtype=dtype)).latent_dist
        mu = posterior.mean.float().permute(0, 2, 1, 3, 4)  # (B, C, F, h, w) -> (B, F, C, h, w)
        mean, std = self._stats(mu)
        return (mu - mean) / std  # docs/method.md §1.3

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, F, C, h, w) -> video (B, 3, T, H, W) fp32 clamped to [-1, 1]."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"VideoVAE.decode expects (B, F, {self.latent_channels}, h, w), got {tuple(latents.shape)}."
            )
        device, dtype = self._device_dtype
        mean, std = self._stats(latents)
        mu = latents.float() * std + mean  # un-normalise (docs/method.md §2.4)
        video = self.vae.decode(mu.permute(0, 2, 1, 3, 4).to(device=device, dtype=dtype)).sample
        return video.float().clamp(-1.0, 1.0)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VideoVAE:
        """Move the VAE (in place) and return self."""
        self.vae.to(device=device, dtype=dtype)
        return self
