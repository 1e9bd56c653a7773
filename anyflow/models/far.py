"""Wan → AnyFlow-FAR conversion, the tiny FAR model and the CPU attention path (docs/method.md §2.2, §8.1).

We use diffusers' ``AnyFlowFARTransformer3DModel`` unchanged. What we add:

* :func:`convert_wan_to_far`: load a ``WanTransformer3DModel``'s weights into the FAR class (parameter names
  match), set ``delta_embedder`` to a copy of ``time_embedder`` (§2.2) and initialise the compressed
  (1, 4, 4) ``far_patch_embedding`` from the (1, 2, 2) kernel by trilinear interpolation, bias copied (§8.1).
  The FAR constructor does this interpolation too, but from its *random* init; after loading Wan weights it
  must be redone, which is what this module does.
* :func:`build_tiny_far`: the converted tiny Wan of :mod:`anyflow.models.tiny` (tests, ``far-tiny``).
* :class:`DenseMaskCausalAttnProcessor` / :func:`set_far_attention`: diffusers' causal processor only accepts
  the flex backend. Flex attention runs on CPU only as an unfused eager fallback; the ``"dense"`` path
  runs the same processor through SDPA with a dense boolean mask (see ``anyflow.causal.far_attention_mask``).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from anyflow.models.convert import WAN_CONFIG_KEYS

if TYPE_CHECKING:
    from diffusers import AnyFlowFARTransformer3DModel, WanTransformer3DModel

DEFAULT_CHUNK_PARTITION: tuple[int, ...] = (1, 3, 3, 3, 3, 3, 3, 2)  # §8.1, 21 latent frames
TINY_CHUNK_PARTITION: tuple[int, ...] = (1, 3, 3, 3)  # 10 latent frames, used by tests and far-tiny

# Wan config keys that the FAR class copies 1:1 (the same as the bidirectional AnyFlow class).
_SHARED_KEYS = WAN_CONFIG_KEYS


def far_config_from_wan(
    wan_config: dict[str, Any],
    *,
    compressed_patch_size: Sequence[int] = (1, 4, 4),
    full_chunk_limit: int = 3,
    chunk_partition: Sequence[int] = DEFAULT_CHUNK_PARTITION,
    gate_value: float = 0.25,
    deltatime_type: str = "r",
) -> dict[str, Any]:
    """The ``AnyFlowFARTransformer3DModel`` kwargs for a Wan config (§2.2 gate 0.25, δ = r; §8.1 FAR parts)."""
    if wan_config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(
            f"Wan config field qk_norm={wan_config.get('qk_norm')!r} is not supported by the FAR model; "
            "only 'rms_norm_across_heads' (Wan2.1) converts."
        )
    for key in ("added_kv_proj_dim", "pos_embed_seq_len"):
        if wan_config.get(key) is not None:
            raise ValueError(f"Wan config field {key}={wan_config[key]!r} is not supported by the FAR model; use a "
                             "Wan2.1 T2V config where it is None.")
    missing = [k for k in _SHARED_KEYS if k not in wan_config]
    if missing:
        raise ValueError(f"Wan config lacks the fields {missing}; pass the full WanTransformer3DModel config.")
    cfg = {k: wan_config[k] for k in _SHARED_KEYS}
    cfg["patch_size"] = tuple(cfg["patch_size"])
    cfg.update(
        compressed_patch_size=tuple(compressed_patch_size),
        full_chunk_limit=int(full_chunk_limit),
        chunk_partition=tuple(int(n) for n in chunk_partition),
        gate_value=float(gate_value),
        deltatime_type=deltatime_type,
    )
    return cfg


def interpolate_patch_kernel(weight: Tensor, size: Sequence[int]) -> Tensor:
    """§8.1: resize a Conv3d kernel (D, C, kt, kh, kw) to ``size`` by trilinear interpolation.

    Each (out, in) kernel slice is interpolated independently (align_corners=False).
    """
    if weight.ndim != 5:
        raise ValueError(f"patch-embedding weight must be a 5-D Conv3d kernel, got shape {tuple(weight.shape)}.")
    out_ch, in_ch = weight.shape[:2]
    flat = weight.detach().float().reshape(out_ch * in_ch, 1, *weight.shape[2:])
    resized = F.interpolate(flat, size=tuple(size), mode="trilinear", align_corners=False)
    return resized.reshape(out_ch, in_ch, *size).to(weight.dtype)


@torch.no_grad()
def init_far_parts_from_wan(far: AnyFlowFARTransformer3DModel) -> None:
    """Set the FAR-only parameters from the already-loaded Wan ones (in place).

    ``delta_embedder`` ← copy of ``time_embedder`` (§2.2: at r = t the two-time embedding equals Wan's);
    ``far_patch_embedding`` ← trilinear resize of ``patch_embedding`` with the bias copied (§8.1).
    """
    emb = far.condition_embedder
    emb.delta_embedder.load_state_dict(copy.deepcopy(emb.time_embedder.state_dict()))
    size = tuple(far.far_patch_embedding.weight.shape[2:])
    far.far_patch_embedding.weight.copy_(interpolate_patch_kernel(far.patch_embedding.weight, size))
    far.far_patch_embedding.bias.copy_(far.patch_embedding.bias)


def convert_wan_to_far(wan: WanTransformer3DModel, *, copy: bool = True, **far_kwargs: Any) -> AnyFlowFARTransformer3DModel:
    """Wan → AnyFlow-FAR: same weights, + delta embedder (copy) and the compressed patch embedding (§2.2, §8.1).

    ``far_kwargs`` go to :func:`far_config_from_wan` (``chunk_partition``, ``full_chunk_limit``, …). The FAR model
    is built on the ``meta`` device (no random init, no second full-size allocation: at 14B that would be
    53 GiB of fp32 per process) and Wan's tensors are assigned into it: cloned (default) or, with
    ``copy=False``, shared with ``wan`` (use it only when ``wan`` is discarded). Only the FAR-only parts are
    allocated, on Wan's device and in Wan's dtypes. The result is in eval mode.
    """
    from diffusers import AnyFlowFARTransformer3DModel

    with torch.device("meta"):
        far = AnyFlowFARTransformer3DModel(**far_config_from_wan(dict(wan.config), **far_kwargs))
    state = {k: v.detach().clone() if copy else v for k, v in wan.state_dict().items()}
    missing, unexpected = far.load_state_dict(state, strict=False, assign=True)
    far_only = {k for k in far.state_dict() if k.startswith(("condition_embedder.delta_embedder.", "far_patch_embedding."))}
    if unexpected or set(missing) != far_only:
        raise ValueError(
            f"Wan state dict does not map onto AnyFlowFARTransformer3DModel: unexpected={sorted(unexpected)}, "
            f"missing={sorted(set(missing) - far_only)}; check that the Wan config is a Wan2.1 T2V config."
        )
    emb = far.condition_embedder
    device = wan.patch_embedding.weight.device
    far.far_patch_embedding.to_empty(device=device).to(wan.patch_embedding.weight.dtype)
    emb.delta_embedder.to_empty(device=device).to(emb.time_embedder.linear_1.weight.dtype)
    gate = float(far.config.gate_value)
    emb.delta_emb_gate = torch.tensor([gate], dtype=torch.float32, device=device)  # non-persistent buffer
    init_far_parts_from_wan(far)
    leftover = [n for n, t in [*far.named_parameters(), *far.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"convert_wan_to_far left tensors uninitialised: {leftover}; diffusers' FAR class changed.")
    return far.eval()


def build_tiny_far(seed: int = 0, *, chunk_partition: Sequence[int] = TINY_CHUNK_PARTITION,
                   attention: str = "dense") -> AnyFlowFARTransformer3DModel:
    """The tiny FAR model: :func:`anyflow.models.tiny.build_tiny_wan` (``seed``) converted by
    :func:`convert_wan_to_far`, with ``attention`` set by :func:`set_far_attention` (fp32, eval)."""
    from anyflow.models.tiny import build_tiny_wan

    far = convert_wan_to_far(build_tiny_wan(seed), chunk_partition=chunk_partition)
    set_far_attention(far, attention)
    return far


def _padded_key_mask(hidden_states: Tensor, kv_cache: Any, kv_cache_flag: Any, dense: bool) -> Any:
    """Mask of the KV-cache read step, where diffusers passes none: real keys only.

    diffusers pads q/k/v with zeros to a multiple of 128 *after* concatenating the cache, and its inference
    path (``_forward_inference``) passes no mask, so real queries would also attend the zero padding keys
    (score 0), diluting the softmax. That breaks "KV-cache inference = masked forward"; we mask them.
    """
    q_len = hidden_states.shape[1]
    q_pad = int(math.ceil(q_len / 128) * 128)
    real_kv = q_len
    if kv_cache is not None and kv_cache_flag is not None and not kv_cache_flag.get("is_cache_step"):
        real_kv += kv_cache_flag["num_cached_compressed_tokens"] + kv_cache_flag["num_cached_full_tokens"]
    kv_len = real_kv + (q_pad - q_len)
    if dense:
        return (torch.arange(kv_len, device=hidden_states.device) < real_kv).expand(q_pad, kv_len)
    return _key_block_mask(q_pad, kv_len, real_kv, str(hidden_states.device))


@functools.lru_cache(maxsize=64)
def _key_block_mask(q_len: int, kv_len: int, real_kv: int, device: str) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < real_kv

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device,
                             _compile=device.startswith("cuda"))


@functools.cache
def _processor_classes() -> dict[str, type]:
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor
    from torch.nn.attention.flex_attention import BlockMask

    class FlexCausalAttnProcessor(AnyFlowCausalAttnProcessor):
        """diffusers' flex causal processor; on the KV-cache read step it masks the zero padding keys."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     rotary_emb=None, kv_cache=None, kv_cache_flag=None):
            if attention_mask is None:
                attention_mask = _padded_key_mask(hidden_states, kv_cache, kv_cache_flag, dense=False)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                    kv_cache, kv_cache_flag)

    class DenseMaskCausalAttnProcessor(AnyFlowCausalAttnProcessor):
        """diffusers' causal processor (KV-cache read/write, RoPE) run through SDPA with a dense bool mask.

        A ``BlockMask`` (what diffusers' pipeline builds) is evaluated densely from its ``mask_mod``. The dense
        mask is O(L²) memory: this is the CPU / test path; use ``"flex"`` at 480p (about 65k training tokens).
        The parent pads the sequence to a multiple of 128 and passes ``attention_mask`` on; a dense mask of
        that padded size is therefore what it expects. Padding query rows would be fully masked and make SDPA
        return NaN there (and NaN gradients); they are dropped by the parent anyway, so we let each padding
        row attend to itself only. Real rows are untouched.
        """

        _attention_backend = "native"
        _SUPPORTED_BACKENDS = ("native",)

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     rotary_emb=None, kv_cache=None, kv_cache_flag=None):
            if attention_mask is None:
                attention_mask = _padded_key_mask(hidden_states, kv_cache, kv_cache_flag, dense=True)
            elif isinstance(attention_mask, BlockMask):  # e.g. from AnyFlowFARPipeline: evaluate it densely
                n_q, n_kv = attention_mask.seq_lengths
                dev = hidden_states.device
                q, k = torch.arange(n_q, device=dev)[:, None], torch.arange(n_kv, device=dev)[None, :]
                attention_mask = attention_mask.mask_mod(0, 0, q, k).to(hidden_states.device, torch.bool)
                attention_mask = attention_mask | torch.diag_embed(~attention_mask.any(dim=-1))
            elif not (torch.is_tensor(attention_mask) and attention_mask.dtype == torch.bool):
                raise ValueError(
                    "the dense FAR attention path needs a boolean mask tensor from "
                    "anyflow.causal.far_attention_mask(..., 'dense'); got "
                    f"{type(attention_mask).__name__}. Use set_far_attention(model, 'flex') for BlockMasks."
                )
            else:
                dead = ~attention_mask.any(dim=-1)
                if bool(dead.any()):
                    attention_mask = attention_mask | torch.diag_embed(dead)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                    kv_cache, kv_cache_flag)

    return {"flex": FlexCausalAttnProcessor, "dense": DenseMaskCausalAttnProcessor}


@functools.cache
def enable_compiled_flex() -> bool:
    """Route CUDA calls of ``torch.nn.attention.flex_attention.flex_attention`` through ``torch.compile``.

    diffusers' flex backend calls the module attribute (so that users can compile it, as its comment says).
    Uncompiled, flex attention falls back to a reference implementation that materialises the full score
    matrix: at Wan2.1 480p (≈ 22k-65k FAR training tokens) that is tens of GB per layer. The compiled function
    (``dynamic=True``, so varying context lengths reuse one kernel) is used for CUDA tensors only; CPU calls keep the eager function. ``ANYFLOW_FLEX_COMPILE=0`` opts
    out. Returns whether the compiled path is installed.
    """
    import os

    import torch.nn.attention.flex_attention as fa

    if not torch.cuda.is_available() or os.environ.get("ANYFLOW_FLEX_COMPILE", "1") == "0":
        return False
    import torch._dynamo as dynamo

    # Each BlockMask (the training mask, the padded-key mask of the cache read) guards its own graph: the default
    # limit of 8 recompiles was hit on far-tiny, after which dynamo runs the eager (materialising) kernel.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(64, getattr(dynamo.config, knob)))
    eager = fa.flex_attention
    # dynamic=True: one shape-generic kernel for every sequence length (3-8 context chunks, each chunk's KV
    # length). Automatic dynamic shapes would first compile a static graph and then a dynamic one, and a
    # gradient-checkpointing recomputation could then run a different graph than the forward did.
    compiled = torch.compile(eager, dynamic=True)

    @functools.wraps(eager)
    def flex_attention(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        return (compiled if query.is_cuda else eager)(query, key, value, *args, **kwargs)

    fa.flex_attention = flex_attention
    return True


def set_far_attention(model: AnyFlowFARTransformer3DModel, attention: str) -> None:
    """Pick the self-attention path of every FAR block: ``"flex"`` (diffusers' processor, takes a ``BlockMask``)
    or ``"dense"`` (SDPA with a dense boolean mask; the fast CPU path). Both mask the zero padding keys of the
    KV-cache read step (see :func:`_padded_key_mask`). Recorded as ``model._far_attention``. ``"flex"`` on a
    CUDA machine also installs the compiled flex kernel (:func:`enable_compiled_flex`)."""
    classes = _processor_classes()
    if attention not in classes:
        raise ValueError(f"FAR attention must be 'flex' or 'dense', got {attention!r}.")
    if attention == "flex":
        enable_compiled_flex()
    for block in model.blocks:
        block.attn1.set_processor(classes[attention]())
    model._far_attention = attention


def far_attention_kind(model: Any) -> str:
    """``"flex"`` or ``"dense"``: which mask type :func:`set_far_attention` configured (flex if never set)."""
    return getattr(model, "_far_attention", "flex")
