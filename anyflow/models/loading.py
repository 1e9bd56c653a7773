"""Base models: the tiny built-in model or a diffusers-layout Wan2.1 directory / URL.

A Wan2.1 diffusers directory holds ``model_index.json``, ``transformer/``, ``vae/``,
``text_encoder/`` and ``tokenizer/`` (and usually ``scheduler/``). ``load_base`` loads it with
safetensors only (pickle files are never opened) and converts the transformer to AnyFlow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anyflow.models.text import TextEncoder
from anyflow.models.vae import VideoVAE

if TYPE_CHECKING:
    from diffusers import AnyFlowTransformer3DModel

BUILTIN_TINY = "builtin:tiny"
#: ``builtin:tiny`` with its transformer pretrained on procedural clips (the ``demo`` preset's base;
#: scripts/pretrain_demo_base.py): the same architecture, VAE and text encoder.
BUILTIN_DEMO = "builtin:demo"
_REQUIRED = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer")


@dataclass
class BaseModel:
    """The frozen base: AnyFlow transformer (converted from Wan), VAE, text encoder, and where it came from."""

    transformer: AnyFlowTransformer3DModel
    vae: VideoVAE
    text: TextEncoder
    source: str


def _check_layout(root: Path, spec: str) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"Base model {spec!r}: {root} is not a directory.")
    for rel in _REQUIRED:
        if not (root / rel).exists():
            raise FileNotFoundError(
                f"Base model {spec!r}: {root / rel} is missing; a diffusers Wan2.1 directory needs "
                f"{', '.join(_REQUIRED)}."
            )


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to ``dtype`` but keep the class's ``_keep_in_fp32_modules`` in fp32, as ``from_pretrained`` does.

    Parameters and floating buffers are cast one by one (``ModelMixin.to`` would warn about the fp32 modules).
    """
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            if t.dtype != target:
                t.data = t.data.to(target)
    return model


def load_base(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    gate_value: float = 0.25,
    deltatime_type: str = "r",
    far: Mapping[str, Any] | None = None,
) -> BaseModel:
    """Load a base model and convert its transformer to AnyFlow (docs/method.md §2.2).

    Args:
        spec: ``"builtin:tiny"`` (built in code from seed 0, no files), ``"builtin:demo"`` (the same with the
            pretrained transformer shipped in the package, :func:`anyflow.models.tiny.load_demo_wan`), a local diffusers Wan2.1
            directory, or a URL (``s3://…``) of one, mirrored once into ``cache_dir`` by
            ``anyflow.storage.mirror``.
        cache_dir: local cache for URLs (``None``: the storage layer's default).
        dtype: transformer and text-encoder dtype (Wan keeps its time embedder etc. in fp32).
        vae_dtype: VAE dtype (fp32 recommended).
        device: where the models are placed.
        gate_value, deltatime_type: AnyFlow delta-embedding settings (paper: 0.25, "r").
        far: convert to the causal ``AnyFlowFARTransformer3DModel`` instead (docs/method.md §8.1):
            ``chunk_partition``, ``full_chunk_limit`` and ``attention`` ("flex", "dense" or "auto" =
            flex where CUDA is available, dense otherwise). Called as a single chunk it is the bidirectional model
            (``anyflow.causal.far_bidirectional_fn``), so teacher and critic adapters share this base.

    All modules are returned in eval mode with gradients off (the base is frozen).
    """
    from anyflow.models.convert import wan_to_anyflow

    spec = str(spec)
    if spec in (BUILTIN_TINY, BUILTIN_DEMO):
        from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_wan, load_demo_wan, load_tiny_vae

        wan = _cast_like_from_pretrained(build_tiny_wan(0) if spec == BUILTIN_TINY else load_demo_wan(), dtype)
        vae = _cast_like_from_pretrained(load_tiny_vae(), vae_dtype)  # trained: decodes the procedural shapes
        text = build_tiny_text_encoder(0).to(dtype=dtype)
    else:
        if spec.startswith("builtin:"):
            raise ValueError(f"Unknown built-in base model {spec!r}; use {BUILTIN_TINY!r} or {BUILTIN_DEMO!r}.")
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        from anyflow import storage

        root = Path(storage.mirror(spec, cache_dir))
        _check_layout(root, spec)
        wan = WanTransformer3DModel.from_pretrained(
            root / "transformer", use_safetensors=True, torch_dtype=dtype, local_files_only=True
        )
        vae = AutoencoderKLWan.from_pretrained(
            root / "vae", use_safetensors=True, torch_dtype=vae_dtype, local_files_only=True
        )
        text = TextEncoder.from_pretrained(root, dtype=dtype)
    if far is None:
        transformer = wan_to_anyflow(wan, gate_value=gate_value, deltatime_type=deltatime_type, copy=False)
    else:
        from anyflow.models.far import convert_wan_to_far, set_far_attention

        transformer = convert_wan_to_far(
            wan, copy=False, chunk_partition=tuple(far["chunk_partition"]), full_chunk_limit=int(far["full_chunk_limit"]),
            gate_value=gate_value, deltatime_type=deltatime_type,
        )
        transformer = _cast_like_from_pretrained(transformer, dtype)
        attention = far.get("attention", "auto")
        if attention == "auto":
            attention = "flex" if torch.cuda.is_available() else "dense"  # models move to the GPU later
        set_far_attention(transformer, attention)
    del wan
    for module in (transformer, vae, text.model):
        module.to(device).eval().requires_grad_(False)
    return BaseModel(transformer=transformer, vae=VideoVAE(vae), text=text, source=spec)


def save_tiny_base(root_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny models in the diffusers Wan2.1 layout (safetensors) and return the root.

    ``transformer/`` holds the *unconverted* ``WanTransformer3DModel``; ``load_base(root_dir)`` then
    reproduces ``load_base("builtin:tiny")`` exactly when ``seed == 0``. ``vae/`` is always the trained tiny
    VAE shipped with the package (:func:`anyflow.models.tiny.load_tiny_vae`); ``seed`` draws the others.
    """
    import diffusers
    from diffusers import UniPCMultistepScheduler

    from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_wan, load_tiny_vae

    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    build_tiny_wan(seed).save_pretrained(root / "transformer", safe_serialization=True)
    load_tiny_vae().save_pretrained(root / "vae", safe_serialization=True)
    build_tiny_text_encoder(seed).save_pretrained(root)
    # Wan2.1's own scheduler config, so that diffusers' WanPipeline can open the folder too.
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000
    ).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root
