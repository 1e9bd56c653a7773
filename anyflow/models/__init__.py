"""Models layer: diffusers' Wan / AnyFlow classes, Wan -> AnyFlow conversion, LoRA (peft), tiny models.

Names are re-exported lazily so that ``import anyflow.models`` stays cheap (no torch / diffusers
import until a name is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FlowMapFn": "callable",
    "flowmap_fn": "callable",
    "velocity_fn_wan": "callable",
    "wan_to_anyflow": "convert",
    "anyflow_config_from_wan": "convert",
    "TEACHER_TARGETS": "lora",
    "GENERATOR_TARGETS": "lora",
    "lora_target_modules": "lora",
    "add_lora": "lora",
    "set_active_adapter": "lora",
    "set_trainable": "lora",
    "trainable_parameters": "lora",
    "adapter_state_dict": "lora",
    "load_adapter_state_dict": "lora",
    "save_adapter": "lora",
    "load_adapter": "lora",
    "merge_adapter": "lora",
    "BaseModel": "loading",
    "load_base": "loading",
    "save_tiny_base": "loading",
    "TextEncoder": "text",
    "WAN_NEGATIVE_PROMPT": "text",
    "VideoVAE": "vae",
    "tiny_transformer_config": "tiny",
    "build_tiny_wan": "tiny",
    "tiny_vae_config": "tiny",
    "build_tiny_vae": "tiny",
    "load_tiny_vae": "tiny",
    "build_tiny_text_encoder": "tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anyflow.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"anyflow.models.{_EXPORTS[name]}"), name)
