"""Text conditioning: a tokenizer + transformers' ``UMT5EncoderModel`` (docs/method.md §1.4).

``TextEncoder.encode`` follows the Wan convention: pad every prompt to ``max_length`` tokens, run the
encoder with the attention mask, and set the embeddings past each prompt's true length to zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The standard Chinese Wan negative prompt (Wan2.1 ``sample_neg_prompt``). Its embedding is the
# "unconditional" embedding everywhere (docs/method.md §1.4). English gloss: "Bright tones, overexposed,
# static, blurred details, subtitles, style, works, paintings, images, static, overall gray, worst
# quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands,
# poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy
# background, three legs, many people in the background, walking backwards".
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

WAN_MAX_LENGTH = 512  # UMT5 context length used by Wan2.1


class TextEncoder:
    """A (tokenizer, ``UMT5EncoderModel``) pair with Wan's padding and zeroing rules.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast or slow) with a pad token.
        model: a ``transformers.UMT5EncoderModel`` (any device / dtype).
        max_length: tokens per prompt (512 for Wan2.1, 16 for the tiny encoder).
    """

    def __init__(self, tokenizer: Any, model: Any, *, max_length: int = WAN_MAX_LENGTH) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("TextEncoder: the tokenizer has no pad token; set tokenizer.pad_token first.")
        if max_length < 1:
            raise ValueError(f"TextEncoder: max_length must be >= 1, got {max_length}.")
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = int(max_length)

    @property
    def dim(self) -> int:
        """Embedding width D (the encoder's d_model; 4096 for UMT5-XXL)."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both (B, max_length) int64, padded/truncated as Wan does."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("TextEncoder.encode expects a list of strings, e.g. ['a red circle'].")
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """Embed prompts to a (B, max_length, D) fp32 tensor; rows past each prompt's length are 0.

        Runs without gradients: text embeddings are precomputed conditioning, never trained here.
        """
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        # docs/method.md §1.4: embeddings past the true sequence length are zeroed (standard Wan).
        return hidden * mask[..., None].to(hidden.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the encoder (in place) and return self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def save_pretrained(self, root_dir: str | Path) -> None:
        """Write ``root_dir/text_encoder/`` (safetensors) and ``root_dir/tokenizer/`` (diffusers Wan layout)."""
        root = Path(root_dir)
        self.model.save_pretrained(root / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(root / "tokenizer")

    @classmethod
    def from_pretrained(
        cls,
        root_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ) -> TextEncoder:
        """Load from a diffusers-layout root holding ``text_encoder/`` and ``tokenizer/`` (no download).

        ``max_length`` defaults to the tokenizer's ``model_max_length`` capped at 512 (Wan's length).
        Weights must be safetensors; pickle files are never loaded.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(root_dir)
        for sub, marker in (("text_encoder", "config.json"), ("tokenizer", None)):
            path = root / sub if marker is None else root / sub / marker
            if not path.exists():
                raise FileNotFoundError(
                    f"Text encoder: {path} is missing; a diffusers Wan model directory needs "
                    f"text_encoder/ and tokenizer/ subfolders."
                )
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(
            root / "text_encoder", use_safetensors=True, dtype=dtype, local_files_only=True
        )
        if max_length is None:
            max_length = min(int(tokenizer.model_max_length), WAN_MAX_LENGTH)
        return cls(tokenizer, model.eval(), max_length=max_length)
