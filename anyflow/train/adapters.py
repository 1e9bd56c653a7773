"""One frozen base transformer with named LoRA adapters (the on-policy memory design).

Teacher (real score), critic (fake score) and generator differ only by LoRA adapters (and the
generator's delta embedder, which is the identity at r = t, METHOD.md §2.2). So instead of three full
copies of a 1.3B/14B transformer we hold one frozen AnyFlow base and switch adapters per call.

Gradient checkpointing recomputes a block's forward during backward, with whatever adapter is active
*then*. :meth:`AdapterModel.backward` therefore re-activates the adapter that built the graph before
calling backward; ``tests/test_train_adapters.py`` checks the gradients equal those of separate copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from anyflow.models import lora
from anyflow.models.callable import flowmap_fn
from anyflow.rollout import FlowMapFn


class AdapterModel:
    def __init__(self, transformer: nn.Module, *, rank: int, alpha: float, gradient_checkpointing: bool) -> None:
        self.transformer = transformer
        self.rank = rank
        self.alpha = alpha
        self.transformer.requires_grad_(False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self._base_fn = flowmap_fn(transformer)

    def add(
        self, name: str, role: str, *, init: Mapping[str, torch.Tensor] | None = None, trainable: bool = True
    ) -> None:
        """Add adapter ``name`` for ``role`` (teacher/critic/generator targets, METHOD.md §2.3).

        ``requires_grad`` follows ``trainable`` whatever adapter is active (peft's switching would
        otherwise flip it).
        """
        lora.add_lora(
            self.transformer, name, role, rank=self.rank, alpha=self.alpha,
            init_from=dict(init) if init is not None else None, trainable=trainable,
        )

    @property
    def active(self) -> str | None:
        return lora.active_adapter(self.transformer)

    def activate(self, name: str | None) -> None:
        if name != self.active:
            lora.set_active_adapter(self.transformer, name)

    def fn(self, name: str | None) -> FlowMapFn:
        """The model callable u(z, t, r, c) with adapter ``name`` active for each call."""

        def u(z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            self.activate(name)
            return self._base_fn(z, t, r, c)

        return u

    def backward(self, name: str, loss: torch.Tensor, backward: Callable[[torch.Tensor], None]) -> None:
        """Backward with the adapter that built the graph active (checkpoint recomputation uses it)."""
        self.activate(name)
        backward(loss)

    def params(self, name: str) -> dict[str, nn.Parameter]:
        return lora.trainable_parameters(self.transformer, name)

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in lora.adapter_state_dict(self.transformer, name).items()}

    @torch.no_grad()
    def load_params(self, name: str, values: Mapping[str, torch.Tensor]) -> None:
        """Copy ``values`` (keyed like :meth:`params`, e.g. an EMA) into the adapter's parameters."""
        for k, p in self.params(name).items():
            p.copy_(values[k].to(p.dtype))
