"""Model callables: diffusers transformers wrapped into the ``FlowMapFn`` contract (docs/interfaces.md).

``u = fn(z (B,F,C,H,W), t (B,F) τ fp32, r (B,F) τ fp32, c (B,L,D)) -> (B,F,C,H,W)``.
An instantaneous-velocity model is the same callable called with r = t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel

FlowMapFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _check_inputs(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> None:
    if z.ndim != 5:
        raise ValueError(f"Model callable: z must be (B, F, C, H, W), got shape {tuple(z.shape)}.")
    b, f = z.shape[:2]
    for name, x in (("t", t), ("r", r)):
        if tuple(x.shape) != (b, f):
            raise ValueError(f"Model callable: {name} must be (B, F) = ({b}, {f}) timesteps, got {tuple(x.shape)}.")
    if c.ndim != 3 or c.shape[0] != b:
        raise ValueError(f"Model callable: c must be (B={b}, L, D), got shape {tuple(c.shape)}.")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    # proj_out is never kept in fp32, so its dtype is the model's compute dtype.
    return model.proj_out.weight.dtype


def flowmap_fn(transformer: AnyFlowTransformer3DModel) -> FlowMapFn:
    """Wrap an ``AnyFlowTransformer3DModel`` as a ``FlowMapFn`` returning the average velocity u.

    z and c are cast to the model's dtype; t and r stay fp32 (docs/method.md §14: keep t and r in fp32);
    the output comes back in z's dtype. Gradients flow if the caller has them enabled.
    """

    def fn(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        _check_inputs(z, t, r, c)
        dtype = _model_dtype(transformer)
        out = transformer(
            hidden_states=z.to(dtype),
            timestep=t.to(torch.float32),
            r_timestep=r.to(torch.float32),
            encoder_hidden_states=c.to(dtype),
            return_dict=False,
        )[0]
        return out.to(z.dtype)

    return fn


def velocity_fn_wan(wan: WanTransformer3DModel) -> FlowMapFn:
    """Wrap a ``WanTransformer3DModel`` as a ``FlowMapFn`` that ignores r (instantaneous velocity).

    If every frame of a sample shares one t, Wan gets the standard Wan2.1 timestep of shape (B,);
    otherwise it gets per-token timesteps (B, F·tokens_per_frame) (the Wan2.2-TI2V path).
    """

    def fn(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        del r
        _check_inputs(z, t, t, c)
        dtype = _model_dtype(wan)
        _, p_h, p_w = wan.config.patch_size
        tokens_per_frame = (z.shape[3] // p_h) * (z.shape[4] // p_w)
        t = t.to(torch.float32)
        timestep = t[:, 0] if bool((t == t[:, :1]).all()) else t.repeat_interleave(tokens_per_frame, dim=1)
        out = wan(
            hidden_states=z.permute(0, 2, 1, 3, 4).to(dtype),  # Wan takes (B, C, F, H, W)
            timestep=timestep,
            encoder_hidden_states=c.to(dtype),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4).to(z.dtype)

    return fn
