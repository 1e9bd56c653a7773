"""Wan2.1 -> AnyFlow weight conversion (docs/method.md §2.2).

diffusers' ``AnyFlowTransformer3DModel`` keeps every Wan parameter name, and adds
``condition_embedder.delta_embedder.*`` (same architecture as ``time_embedder``) plus a fixed,
non-persistent gate buffer g. Initialising the delta embedder as a copy of the time embedder makes
``e = (1 − g)·e_t + g·e_r = e_t`` at r = t, so the converted model is the Wan model on the diagonal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel

# Wan config keys that AnyFlowTransformer3DModel takes unchanged.
WAN_CONFIG_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "eps",
    "image_dim",
    "rope_max_seq_len",
)
_TIME = "condition_embedder.time_embedder."
_DELTA = "condition_embedder.delta_embedder."
DELTATIME_TYPES = ("r", "t-r")


def anyflow_config_from_wan(
    config: Mapping[str, Any], *, gate_value: float = 0.25, deltatime_type: str = "r"
) -> dict:
    """AnyFlow constructor kwargs for a Wan transformer config (a dict or a diffusers FrozenDict).

    Raises ValueError for Wan features the bidirectional AnyFlow class does not have (I2V added
    K/V projections, image position embeddings, a different QK norm).
    """
    cfg = dict(config)
    if cfg.get("added_kv_proj_dim") is not None or cfg.get("pos_embed_seq_len") is not None:
        raise ValueError(
            "Wan config has added_kv_proj_dim/pos_embed_seq_len (an I2V / FLF2V model); AnyFlow conversion "
            "supports the Wan2.1 T2V transformer only."
        )
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"Wan config qk_norm={cfg['qk_norm']!r} is not supported; expected 'rms_norm_across_heads'.")
    patch = tuple(cfg.get("patch_size", (1, 2, 2)))
    if len(patch) != 3 or patch[0] != 1 or patch[1] != patch[2]:
        raise ValueError(f"Wan config patch_size={patch!r} is not supported: AnyFlow needs (1, p, p).")
    if deltatime_type not in DELTATIME_TYPES:
        raise ValueError(f"deltatime_type={deltatime_type!r} is not one of {DELTATIME_TYPES}.")
    out = {k: cfg[k] for k in WAN_CONFIG_KEYS if k in cfg}
    if "patch_size" in out:
        out["patch_size"] = tuple(out["patch_size"])
    out["gate_value"] = float(gate_value)
    out["deltatime_type"] = deltatime_type
    return out


def anyflow_state_dict_from_wan(
    wan_state: Mapping[str, torch.Tensor],
    anyflow_keys: set[str],
    *,
    copy: bool = True,
    delta_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Map a Wan state dict onto AnyFlow keys; ``delta_embedder`` gets a fresh copy of ``time_embedder``.

    ``delta_dtype`` (default: the time embedder's dtype) is the dtype of that copy.

    Raises ValueError naming every Wan key with no destination and every AnyFlow key left unfilled.
    """
    out: dict[str, torch.Tensor] = {}
    orphans = []
    for key, value in wan_state.items():
        if key not in anyflow_keys:
            orphans.append(key)
            continue
        out[key] = value.detach().clone() if copy else value.detach()
        if key.startswith(_TIME):
            # docs/method.md §2.2: delta_embedder is initialised as a deep copy of the time_embedder.
            out[_DELTA + key[len(_TIME) :]] = value.detach().to(dtype=delta_dtype or value.dtype, copy=True)
    if orphans:
        raise ValueError(
            f"Wan weights with no AnyFlow destination: {sorted(orphans)}; this Wan variant is not supported."
        )
    unfilled = sorted(anyflow_keys - set(out))
    if unfilled:
        raise ValueError(f"AnyFlow weights not provided by the Wan checkpoint: {unfilled}.")
    return out


def wan_to_anyflow(
    wan: WanTransformer3DModel,
    *,
    gate_value: float = 0.25,
    deltatime_type: str = "r",
    copy: bool = True,
) -> AnyFlowTransformer3DModel:
    """Convert a diffusers ``WanTransformer3DModel`` into an ``AnyFlowTransformer3DModel``.

    All Wan weights are carried over under the same names (dtype and device kept per tensor) and
    ``condition_embedder.delta_embedder`` is a copy of ``condition_embedder.time_embedder``. With
    ``deltatime_type="r"`` the result equals the Wan model at r = t (see tests/test_models_convert.py).

    Args:
        wan: the source model; it is not modified.
        gate_value: the fixed gate g of the delta embedding (0.25 in the paper).
        deltatime_type: ``"r"`` (released setting) or ``"t-r"``.
        copy: clone every tensor (default). ``False`` shares storage with ``wan`` (no extra memory for
            big models; use it only when ``wan`` is discarded afterwards).
    """
    from diffusers import AnyFlowTransformer3DModel

    cfg = anyflow_config_from_wan(wan.config, gate_value=gate_value, deltatime_type=deltatime_type)
    with torch.device("meta"):  # no random init, no memory: every tensor is assigned below
        model = AnyFlowTransformer3DModel(**cfg)
    target_keys = set(model.state_dict().keys())
    # Wan keeps time_embedder in fp32 even in bf16 (``_keep_in_fp32_modules``); AnyFlow's class keeps
    # only time_embedder there and mixes the delta embedding in the compute dtype, so the copy takes
    # the dtype of time_proj. In fp32 this changes nothing; in bf16, r = t holds up to bf16 rounding.
    delta_dtype = wan.condition_embedder.time_proj.weight.dtype
    state = anyflow_state_dict_from_wan(wan.state_dict(), target_keys, copy=copy, delta_dtype=delta_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    # The only buffer is the non-persistent fp32 gate g (not in state dicts): rebuild it for real.
    device = next(wan.parameters()).device
    model.condition_embedder.delta_emb_gate = torch.tensor([float(gate_value)], dtype=torch.float32, device=device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"wan_to_anyflow left tensors uninitialised: {leftover}; diffusers' AnyFlow class changed.")
    model.train(wan.training)
    return model
