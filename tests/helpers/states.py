"""Random, non-zero adapter states for training tests (so moved parameters and gradients are non-trivial)."""

from __future__ import annotations

from typing import Any

import torch


def trained_state(result: Any, method: Any) -> dict[str, torch.Tensor]:
    """What a training run ends with: every optimiser group's tensors (``param/<group>/<name>``) and the EMA of
    ``fit``'s ``result`` (``ema/<name>``), copied."""
    out = {f"param/{g}/{k}": p.detach().clone() for g, (ps, _) in method.optim_groups().items() for k, p in ps.items()}
    return out | {f"ema/{k}": v.clone() for k, v in result.ema.items()}


def random_adapter_state(models: Any, name: str, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Tensors shaped like ``models.state(name)`` (an ``AdapterModel`` adapter), N(0, scale²), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in models.state(name).items()}
