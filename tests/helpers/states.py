"""Random, non-zero adapter states for training tests (so moved parameters and gradients are non-trivial)."""

from __future__ import annotations

from typing import Any

import torch


def random_adapter_state(models: Any, name: str, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Tensors shaped like ``models.state(name)`` (an ``AdapterModel`` adapter), N(0, scale²), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in models.state(name).items()}
