"""Tiny Wan-shaped models built in code, for tests and the ``tiny`` preset.

Every builder is deterministic in its ``seed``: the model is constructed with diffusers'/transformers'
own classes and then every parameter is redrawn from an explicit ``torch.Generator`` (no global RNG).
Nothing here touches the network; the one file read is the trained tiny VAE shipped in the package
(:func:`load_tiny_vae`, safetensors).
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from anyflow.models.text import TextEncoder

TINY_Z_DIM = 4  # latent channels of the tiny VAE (= transformer in/out channels)
TINY_TEXT_DIM = 32  # d_model of the tiny UMT5 encoder (= transformer text_dim)
TINY_MAX_LENGTH = 16  # tokens per prompt
#: The trained tiny VAE shipped with the package (a diffusers ``AutoencoderKLWan`` folder: config.json +
#: diffusion_pytorch_model.safetensors), written by ``scripts/train_tiny_vae.py``.
TINY_VAE_DIR = Path(__file__).resolve().parent / "assets" / "tiny_vae"
#: The ``demo`` preset's base transformer (``builtin:demo``): the tiny transformer (seed 0) pretrained by
#: ``scripts/pretrain_demo_base.py`` on procedural clips; diffusion_pytorch_model.safetensors (a state dict).
DEMO_WAN_DIR = Path(__file__).resolve().parent / "assets" / "demo_wan"

# Lowercase words the tiny tokenizer knows; anything else becomes <unk>.
TINY_VOCAB_WORDS: tuple[str, ...] = (
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "white", "black", "gray", "pink", "cyan",
    # shapes and things
    "circle", "square", "triangle", "ball", "box", "star", "line", "dot", "ring", "stripe", "background",
    # motions and directions
    "moving", "moves", "move", "left", "right", "up", "down", "rotating", "spinning", "bouncing",
    "growing", "shrinking", "still", "static", "fast", "slow", "slowly", "quickly", "across", "toward",
    # glue words
    "a", "an", "the", "and", "on", "in", "of", "to", "with", "is", "big", "small", "large", "two", "one",
    ",", ".",
)
TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in UMT5


#: The shipped files each built-in base loads (besides what is built in code from a seed).
BUILTIN_ASSETS: dict[str, tuple[Path, ...]] = {
    "builtin:tiny": (TINY_VAE_DIR,),
    "builtin:demo": (TINY_VAE_DIR, DEMO_WAN_DIR),
}


@functools.cache
def builtin_assets_digest(spec: str) -> str | None:
    """sha256 over the shipped files a built-in base loads (name and bytes of each, sorted), or ``None`` for a
    spec that is not a built-in. Stage keys hold it (:func:`anyflow.stages.stage_key`): replacing the tiny VAE
    or the demo transformer changes every key that used them, so a store never serves latents or checkpoints
    made with other weights under the same key."""
    if spec not in BUILTIN_ASSETS:
        return None
    h = hashlib.sha256()
    for folder in BUILTIN_ASSETS[spec]:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f"{folder.name}/{path.relative_to(folder).as_posix()}\0".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _redraw_parameters(module: nn.Module, seed: int) -> None:
    """Redraw every parameter from ``torch.Generator().manual_seed(seed)`` in named order.

    Weights with ndim >= 2 and biases get U(-b, b) with b = 1/sqrt(fan_in) (PyTorch's default scale);
    parameters that the class initialised to all ones (norm gains) get 1 + U(-0.05, 0.05).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            u = torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 - 1
            if bool((p == 1).all()):
                p.copy_(1 + 0.05 * u)
                continue
            fan_in = p[0].numel() if p.ndim >= 2 else p.numel()
            p.copy_(u / math.sqrt(max(fan_in, 1)))


def tiny_transformer_config() -> dict:
    """Config of the tiny Wan / AnyFlow transformer: patch (1,2,2), 2 heads × 16, 2 layers."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": TINY_Z_DIM,
        "out_channels": TINY_Z_DIM,
        "text_dim": TINY_TEXT_DIM,
        "freq_dim": 32,
        "ffn_dim": 64,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 64,
    }


def build_tiny_wan(seed: int = 0) -> WanTransformer3DModel:
    """A tiny ``WanTransformer3DModel`` (fp32, eval mode) whose weights depend only on ``seed``."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**tiny_transformer_config())
    _redraw_parameters(model, seed)
    return model.eval()


def load_demo_wan() -> WanTransformer3DModel:
    """The ``demo`` preset's pretrained tiny ``WanTransformer3DModel`` (fp32, eval mode), read from safetensors."""
    from safetensors.torch import load_file

    weights = DEMO_WAN_DIR / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{DEMO_WAN_DIR}: the packaged demo base is missing; reinstall anyflow or run "
                                "scripts/pretrain_demo_base.py")
    model = build_tiny_wan(0)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def tiny_vae_config() -> dict:
    """Config of the tiny Wan VAE: base_dim 8, z_dim 4, temporal factor 4, spatial factor 8.

    Built like Wan2.2's VAE (``patch_size`` 2, residual average-pooling / duplication shortcuts around the
    down- and upsamplings): that layout learns to reconstruct the procedural clips in a few hundred CPU steps,
    where Wan2.1's plain layout at this width had not matched a per-clip mean colour after 400
    (scripts/train_tiny_vae.py). ``latents_mean`` / ``latents_std`` here are placeholders for a randomly
    initialised VAE; the shipped trained VAE (:func:`load_tiny_vae`) carries the statistics measured on its
    training clips.
    """
    return {
        "base_dim": 8,
        "z_dim": TINY_Z_DIM,
        "in_channels": 12,  # RGB patchified 2x2
        "out_channels": 12,
        "patch_size": 2,
        "is_residual": True,
        "dim_mult": [1, 2, 2],  # 2x2 patches, then two spatial downsamplings -> factor 8, as in Wan
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [True, True],  # two temporal downsamplings -> factor 4
        "dropout": 0.0,
        # Non-trivial per-channel statistics so that the normalisation of docs/method.md §1.3 is exercised.
        "latents_mean": [0.1, -0.2, 0.05, 0.3],
        "latents_std": [0.5, 1.5, 0.8, 2.0],
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 8,
    }


def build_tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    """A tiny *randomly initialised* ``AutoencoderKLWan`` (fp32, eval mode) whose weights depend only on
    ``seed``: it decodes latents to colour noise. The tiny preset uses :func:`load_tiny_vae` instead."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**tiny_vae_config())
    _redraw_parameters(vae, seed)
    return vae.eval()


def load_tiny_vae() -> AutoencoderKLWan:
    """The trained tiny ``AutoencoderKLWan`` shipped in the package (fp32, eval mode).

    Trained once by ``scripts/train_tiny_vae.py`` to reconstruct procedural clips
    (:mod:`anyflow.data.procedural`), so decoded tiny-preset samples show the moving shapes; read with
    plain diffusers from safetensors (no network).

    Built with the class's constructor and ``load_state_dict`` rather than ``from_pretrained``: diffusers'
    ``from_pretrained`` creates parameters under accelerate's process-wide meta-device patch, so a model built
    in another thread meanwhile (two in-process redistill runs load the tiny base at once) got meta tensors.
    """
    import json

    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    weights = TINY_VAE_DIR / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{TINY_VAE_DIR}: the packaged tiny VAE is missing; reinstall anyflow or run "
                                "scripts/train_tiny_vae.py")
    config = json.loads((TINY_VAE_DIR / "config.json").read_text(encoding="utf-8"))
    vae = AutoencoderKLWan.from_config(config)
    vae.load_state_dict(load_file(str(weights)), strict=True)
    return vae.float().eval()


def build_tiny_tokenizer(max_length: int = TINY_MAX_LENGTH):
    """A word-level tokenizer over :data:`TINY_VOCAB_WORDS`, built in code (no download).

    Returned as a ``transformers.PreTrainedTokenizerFast`` that appends ``</s>`` like UMT5 and can
    ``save_pretrained`` / ``from_pretrained``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + TINY_VOCAB_WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        model_max_length=max_length,
        padding_side="right",
    )


def tiny_text_encoder_config() -> dict:
    """Kwargs of the tiny ``UMT5Config``: d_model 32, 2 layers, 2 heads × 16."""
    return {
        "vocab_size": len(TINY_SPECIAL_TOKENS) + len(TINY_VOCAB_WORDS),
        "d_model": TINY_TEXT_DIM,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": False,
    }


def build_tiny_text_encoder(seed: int = 0) -> TextEncoder:
    """A tiny UMT5 encoder + word-level tokenizer (max length 16) wrapped as :class:`TextEncoder`."""
    from transformers import UMT5Config, UMT5EncoderModel

    from anyflow.models.text import TextEncoder

    model = UMT5EncoderModel(UMT5Config(**tiny_text_encoder_config()))
    _redraw_parameters(model, seed)
    return TextEncoder(build_tiny_tokenizer(), model.eval(), max_length=TINY_MAX_LENGTH)
