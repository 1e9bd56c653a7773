"""LoRA adapters through peft (docs/method.md §2.3): one frozen base, several named adapters.

The memory design: the teacher, the fake score (critic) and the generator are *named adapters on one
frozen base transformer*; ``set_active_adapter`` picks which one a forward pass uses.

Trainability is ours, not peft's. peft's ``set_adapter`` / ``enable_adapters`` flip ``requires_grad``
(the active adapter becomes trainable, every other adapter frozen, and "base only" freezes all).
Here every adapter has a ``trainable`` flag chosen in :func:`add_lora` (or :func:`set_trainable`), and
every switch re-applies those flags, so switching to the teacher never makes it trainable and
switching away from the generator never freezes it. Non-LoRA (base) parameters are always frozen by
:func:`add_lora`; unfreeze extras (e.g. a FAR patch embedding) after it if a method needs them.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

Role = Literal["teacher", "critic", "generator"]

# docs/method.md §2.3: self-attention (never the cross-attention attn2) and the FFN.
TEACHER_TARGETS: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
# The flow-map student additionally adapts both time embedders (their linear_1 and linear_2).
GENERATOR_TARGETS: tuple[str, ...] = (
    *TEACHER_TARGETS,
    "time_embedder.linear_1",
    "time_embedder.linear_2",
    "delta_embedder.linear_1",
    "delta_embedder.linear_2",
)
ROLE_TARGETS: dict[str, tuple[str, ...]] = {
    "teacher": TEACHER_TARGETS,
    "critic": TEACHER_TARGETS,
    "generator": GENERATOR_TARGETS,
}
_REGISTRY = "_anyflow_lora"  # attribute on the model: {adapter name: {"role", "rank", "alpha", "trainable"}}


def _role_targets(role: str) -> tuple[str, ...]:
    if role not in ROLE_TARGETS:
        raise ValueError(f"LoRA role {role!r} is not one of {sorted(ROLE_TARGETS)}.")
    return ROLE_TARGETS[role]


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _registry(model: nn.Module) -> dict[str, dict]:
    return model.__dict__.setdefault(_REGISTRY, {})


def _require_adapter(model: nn.Module, name: str) -> dict:
    reg = _registry(model)
    if name not in reg:
        raise KeyError(f"Adapter {name!r} is not on this model; adapters present: {sorted(reg)}.")
    return reg[name]


def lora_target_modules(model: nn.Module, role: Role) -> list[str]:
    """Full names of the ``nn.Linear`` modules that get LoRA for ``role`` (docs/method.md §2.3).

    A module matches if its name contains one of the role's substrings. Names are those of the
    original layers, also on a model that already carries adapters (peft's ``.base_layer`` and
    ``lora_A`` / ``lora_B`` sub-layers are not counted).
    """
    targets = _role_targets(role)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name:
            continue
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        if any(t in name for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"No nn.Linear in {type(model).__name__} matches the {role} LoRA targets {targets}.")
    return sorted(set(names))


def _apply_trainability(model: nn.Module) -> None:
    """Set requires_grad of every LoRA parameter from the registry flags (undoing peft's choices)."""
    reg = _registry(model)
    for pname, p in model.named_parameters():
        if ".lora_A." in pname or ".lora_B." in pname:
            adapter = pname.rsplit(".", 2)[-2]
            p.requires_grad_(bool(reg.get(adapter, {}).get("trainable", False)))


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the one used in forward passes; ``None`` runs the base model only.

    Layers that ``name`` does not adapt run as the base. ``requires_grad`` is restored from each
    adapter's ``trainable`` flag afterwards (see the module docstring).
    """
    if name is not None:
        _require_adapter(model, name)
    for _, layer in _tuner_layers(model):
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    model.__dict__["_anyflow_active_adapter"] = name
    _apply_trainability(model)


def active_adapter(model: nn.Module) -> str | None:
    """Name of the adapter in use (None: base only)."""
    return model.__dict__.get("_anyflow_active_adapter")


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Mark adapter ``name`` trainable or frozen (persists across :func:`set_active_adapter`)."""
    _require_adapter(model, name)["trainable"] = bool(trainable)
    _apply_trainability(model)


def add_lora(
    model: nn.Module,
    adapter_name: str,
    role: Role,
    *,
    rank: int,
    alpha: float,
    init_from: dict[str, Tensor] | None = None,
    trainable: bool = True,
    seed: int = 0,
) -> None:
    """Add a named LoRA adapter (dropout 0, no bias) on the ``role``'s target modules, in place.

    ``lora_A`` is drawn from U(−1/√fan_in, 1/√fan_in) with ``torch.Generator().manual_seed(seed)`` and
    ``lora_B`` is zero, so a new adapter starts equal to the base; ``init_from`` (an
    :func:`adapter_state_dict`) overwrites both. All non-LoRA parameters are frozen. The new adapter
    becomes the active one.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not adapter_name or "." in adapter_name:
        raise ValueError(f"Adapter name {adapter_name!r} must be a non-empty string without dots.")
    if adapter_name in _registry(model):
        raise ValueError(f"Adapter {adapter_name!r} already exists on this model; pick another name.")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    targets = lora_target_modules(model, role)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none", init_lora_weights=True
    )
    with warnings.catch_warnings():  # several adapters on one model is the design, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    _registry(model)[adapter_name] = {"role": role, "rank": int(rank), "alpha": float(alpha), "trainable": trainable}

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in _tuner_layers(model):
            if adapter_name not in getattr(layer, "lora_A", {}):
                continue
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) * bound)
            b.zero_()
    for pname, p in model.named_parameters():
        if ".lora_A." not in pname and ".lora_B." not in pname:
            p.requires_grad_(False)
    if init_from is not None:
        load_adapter_state_dict(model, adapter_name, init_from)
    set_active_adapter(model, adapter_name)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model`` (in insertion order)."""
    return list(_registry(model))


def is_trainable(model: nn.Module, adapter_name: str) -> bool:
    """Whether adapter ``adapter_name`` was added ``trainable`` (frozen adapters keep ``requires_grad`` off)."""
    return bool(_require_adapter(model, adapter_name)["trainable"])


def trainable_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The adapter's ``lora_A`` / ``lora_B`` parameters, by full parameter name (for the optimiser)."""
    _require_adapter(model, adapter_name)
    tag_a, tag_b = f".lora_A.{adapter_name}.", f".lora_B.{adapter_name}."
    return {n: p for n, p in model.named_parameters() if tag_a in n or tag_b in n}


def _strip_name(param_name: str, adapter: str) -> str:
    for kind in ("lora_A", "lora_B"):
        param_name = param_name.replace(f".{kind}.{adapter}.", f".{kind}.")
    return param_name


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The adapter's weights with the adapter name removed from the keys (detached copies).

    Key example: ``blocks.0.attn1.to_q.lora_A.weight``.
    """
    return {_strip_name(n, name): p.detach().clone() for n, p in trainable_parameters(model, name).items()}


def load_adapter_state_dict(model: nn.Module, name: str, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (keys as from :func:`adapter_state_dict`) into adapter ``name``; keys must match exactly."""
    params = {_strip_name(n, name): p for n, p in trainable_parameters(model, name).items()}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"Adapter {name!r} state does not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved for another role or model?"
        )
    with torch.no_grad():
        for key, p in params.items():
            if tuple(state[key].shape) != tuple(p.shape):
                raise ValueError(
                    f"Adapter {name!r} tensor {key} has shape {tuple(state[key].shape)}, the model expects "
                    f"{tuple(p.shape)} (different LoRA rank?)."
                )
            p.copy_(state[key].to(device=p.device, dtype=p.dtype))


def save_adapter(model: nn.Module, name: str, path: str | Path) -> None:
    """Write adapter ``name`` as one safetensors file, with role / rank / alpha in its metadata."""
    from safetensors.torch import save_file

    info = _require_adapter(model, name)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    meta = {"format": "anyflow-lora", "role": info["role"], "rank": str(info["rank"]), "alpha": repr(info["alpha"])}
    meta["target_modules"] = json.dumps(lora_target_modules(model, info["role"]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_adapter(model: nn.Module, name: str, path: str | Path, *, trainable: bool = True) -> None:
    """Load a :func:`save_adapter` file into adapter ``name``, creating it (role/rank/alpha from the file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file {path} does not exist.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "anyflow-lora":
        raise ValueError(f"{path} is not an anyflow LoRA file (metadata 'format' is {meta.get('format')!r}).")
    state = load_file(str(path))
    if name not in _registry(model):
        add_lora(
            model, name, meta["role"], rank=int(meta["rank"]), alpha=float(meta["alpha"]), trainable=trainable
        )
    load_adapter_state_dict(model, name, state)


def merge_adapter(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` with adapter ``name`` folded in (``W + (α/r)·B·A``) and no peft layers left.

    The input model is not modified. The copy's parameters are frozen; it holds plain ``nn.Linear``s.
    """
    info = _require_adapter(model, name)
    merged = copy.deepcopy(model)
    merged.__dict__.pop(_REGISTRY, None)
    merged.__dict__.pop("_anyflow_active_adapter", None)
    merged.__dict__.pop("peft_config", None)  # set by peft's inject_adapter_in_model
    scale = info["alpha"] / info["rank"]
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for lname, layer in _tuner_layers(merged):
            base = layer.get_base_layer()
            if name in getattr(layer, "lora_A", {}):
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                delta = (b.float() @ a.float()) * scale  # docs/method.md §2.3: merge W + (α/r)·B·A
                base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            parent_name, _, child = lname.rpartition(".")
            setattr(modules[parent_name] if parent_name else merged, child, base)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged
