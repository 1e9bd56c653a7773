"""Presets and strict configuration (docs/method.md §10).

Presets are Python functions returning frozen dataclasses; overrides come from the CLI
(``key.sub=value``) or YAML and are validated: an unknown key is an error naming it and the valid keys.

Validation is declarative: each field's type is its annotation (checked when an override is coerced) and
its allowed values are declared beside it with :func:`setting` (a range or a set of choices, checked by
:func:`validate` for every field of a resolved preset, with every float finite). Rules that tie fields
together (frames 4k+1, the clip-size bound, FAR chunking) follow in :func:`validate`. Every failure is a
:class:`ConfigError` whose one sentence names the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and what is allowed."""


class StageInputError(ValueError):
    """A stage input artifact is missing, of the wrong kind or incompatible with the preset."""


@dataclass(frozen=True)
class Allowed:
    """The values a config field accepts: bounds (``ge``/``gt``/``le``/``lt``) or ``choices``; for a tuple
    field, every item. Declared beside the field with :func:`setting`; checked by :func:`validate`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo = f"[{_fmt(self.ge)}" if self.ge is not None else f"({_fmt(self.gt)}" if self.gt is not None else None
        hi = f"{_fmt(self.le)}]" if self.le is not None else f"{_fmt(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        return ("<= " if hi and hi[-1] == "]" else "< ") + (hi or "inf)")[:-1]

    def allows(self, v: Any) -> bool:
        if self.choices:
            return v in self.choices
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def setting(default: Any, **allowed: Any) -> Any:
    """A dataclass field with its default and the values it accepts (:class:`Allowed`)."""
    return field(default=default, metadata={"allowed": Allowed(**allowed)})


MAX_STEPS = 10**9  # optimiser steps; a larger count is a typo (1e23), not a run
MAX_SEED = 2**31 - 1
#: Frames x height x width of one clip: the decoded clip is 3 x that many float32 values (12 bytes a pixel),
#: so the bound (3 GiB) refuses a frame size that could only end in an out-of-memory kill, before allocating.
MAX_CLIP_PIXELS = 2**28
WEIGHT_TYPES = ("beta08", "gaussian", "uniform")  # anyflow.timesteps.WEIGHT_KINDS (tests/test_config.py)
CFG_TARGETS = ("released", "meanflow")  # anyflow.flowmap.CFG_TARGETS (tests/test_cfg_target.py)


@dataclass(frozen=True)
class ModelConfig:
    base: str = "builtin:tiny"  # "builtin:tiny" | "builtin:demo" | local dir | s3://… of a diffusers-layout Wan2.1 model
    lora_rank: int = setting(4, ge=1, le=4096)
    lora_alpha: float = setting(4.0, gt=0)
    gradient_checkpointing: bool = False
    gate_value: float = setting(0.25, ge=0, le=1)  # fixed two-time embedding gate g (§2.2)
    cache_dir: str = ""  # where remote base models are mirrored ("" = ~/.cache/anyflow)


@dataclass(frozen=True)
class DataConfig:
    source: str = "procedural:n=16,seed=0"
    frames: int = setting(9, ge=1, le=1025)  # video frames; latent frames F = (frames - 1)/4 + 1
    height: int = setting(32, ge=16, le=8192)
    width: int = setting(32, ge=16, le=8192)
    fps: int = setting(16, ge=1, le=240)
    samples_per_shard: int = setting(8, ge=1, le=1_000_000)
    strict: bool = False
    heldout_fraction: float = setting(0.25, ge=0, lt=1)  # last part of the procedural set kept for evaluation
    # clips per prepare_data partition (arrival-ordered runs of the source listing, each its own cached artifact;
    # anyflow/data/partitions.py, docs/interfaces.md "Partitioned data preparation"); 0 = one unpartitioned run
    partition_size: int = setting(0, ge=0, le=10_000_000)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = setting(1e-3, gt=0, le=1)  # AdamW: a step moves each weight by about lr
    beta1: float = setting(0.9, ge=0, lt=1)
    beta2: float = setting(0.95, ge=0, lt=1)
    weight_decay: float = setting(0.0, ge=0)
    warmup_steps: int = setting(0, ge=0, le=MAX_STEPS)
    grad_clip: float = setting(1.0, gt=0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = setting(4, ge=1, le=MAX_STEPS)
    batch_size: int = setting(2, ge=1, le=65536)  # per rank
    grad_accum: int = setting(1, ge=1, le=65536)
    seed: int = setting(0, ge=0, le=MAX_SEED)
    ema_decay: float = setting(0.999, ge=0, le=1)
    ema_warmup_step: int = setting(1, ge=0, le=MAX_STEPS)  # plain copy before this step (§7.6)
    checkpoint_every: int = setting(2, ge=1, le=MAX_STEPS)
    log_every: int = setting(1, ge=1, le=MAX_STEPS)
    mixed_precision: str = setting("auto", choices=("auto", "no", "bf16", "fp16"))  # auto = bf16 on CUDA, fp32 on CPU; or "no" / "bf16"
    # frozen-base parameter sharding across ranks (FSDP2, anyflow/train/loop.py): "none" (replicated),
    # "fsdp" (shard over all ranks) or "hsdp" (shard within a node, replicate across nodes)
    sharding: str = setting("none", choices=("none", "fsdp", "hsdp"))
    # ZeRO-1 (anyflow/train/loop.py): with several processes each rank keeps the AdamW moments and the EMA
    # of about 1/world of the trainable tensors, updates those tensors and broadcasts their new values (torch
    # ZeroRedundancyOptimizer); the update is the same and checkpoints hold the whole, layout-independent
    # state. No effect on 1 process.
    shard_optimizer: bool = False
    # DeepSpeed ZeRO stage 1/2 for the trainable adapters (anyflow/train/deepspeed_zero.py): "" (off), a built-in
    # config (zero1, zero2, zero2_offload) or a DeepSpeed JSON file. Replaces shard_optimizer when set.
    deepspeed: str = ""


@dataclass(frozen=True)
class LossConfig:
    shift: float = setting(5.0, gt=0)
    text_dropout: float = setting(0.1, ge=0, le=1)
    guidance_scale: float = setting(3.0, gt=0)  # fused CFG g_cfg (§6.2)
    fd_epsilon: float = setting(5.0, gt=0)  # τ units (§6.3)
    # how fused CFG enters the target: "released" (§6.2-6.3, exact CFG only at r = t) or "meanflow" (§6.8,
    # fixed point the CFG flow map; its loss is on u itself, g² times the released loss's scale)
    cfg_target: str = setting("released", choices=CFG_TARGETS)
    weight_type: str = setting("beta08", choices=WEIGHT_TYPES)
    adaptive_scaling: bool = True
    diffusion_ratio: float = setting(0.5, ge=0, le=1)  # with consistency_ratio: at most 1 (validate)
    consistency_ratio: float = setting(0.25, ge=0, le=1)


@dataclass(frozen=True)
class TeacherStage:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    shift: float = setting(5.0, gt=0)
    text_dropout: float = setting(0.1, ge=0, le=1)


@dataclass(frozen=True)
class FlowMapStage:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass(frozen=True)
class DistillStage:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3, ema_decay=0.99))
    generator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, beta1=0.0, beta2=0.999))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, beta1=0.0, beta2=0.999))
    loss: LossConfig = field(default_factory=LossConfig)
    steps_list: tuple[int, ...] = setting((2, 4, 8, 16, 50), ge=1, le=10_000)
    update_ratio: int = setting(1, ge=1, le=MAX_STEPS)  # generator updated when step % update_ratio == 0; critic every step (§7.6)
    real_guidance_scale: float = setting(3.0, gt=0)
    dmd_weight: float = setting(1.0, ge=0)
    cotrain_forward: bool = True


@dataclass(frozen=True)
class FinetuneStage:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2))
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    onpolicy: bool = False  # also keep the on-policy terms (needs a teacher input)


@dataclass(frozen=True)
class EvalStage:
    nfes: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32), ge=1, le=10_000)
    reference_steps: int = setting(64, ge=1, le=10_000)  # the teacher's many-step reference sampler
    num_prompts: int = setting(4, ge=1, le=1_000_000)
    samples_per_prompt: int = setting(1, ge=1, le=10_000)
    seed: int = setting(1234, ge=0, le=MAX_SEED)
    prompts: str = "procedural"  # "procedural" | "vbench" | "vbench-extended" (§11: generate from the augmented
    # prompts, name and score by the original ones) | path to a prompt file
    vbench: bool = False
    vbench_dimensions: tuple[str, ...] = ("temporal_flickering",)
    # VBench-I2V (§11; FAR presets, with vbench true): a local folder or URL (mirrored like model.base) holding
    # the suite in VBench's published layout, vbench2_i2v_full_info.json + data/crop/<i2v_ratio>/<image_name>
    # (docs/evaluation-vbench.md). "" = no VBench-I2V run.
    i2v_suite: str = ""
    i2v_ratio: str = "7-4"  # the crop folder the images come from (§11: the "7-4" crops)
    i2v_dimensions: tuple[str, ...] = (
        "camera_motion", "i2v_subject", "i2v_background", "subject_consistency", "background_consistency",
        "motion_smoothness", "dynamic_degree", "aesthetic_quality", "imaging_quality",
    )  # fmt: skip
    i2v_limit: int = setting(0, ge=0)  # only the first N suite entries listing one of i2v_dimensions (0 = all 1118)
    batch_size: int = setting(8, ge=1, le=65536)  # samples per sampling/decoding batch (decoded videos are held one batch at a time)


@dataclass(frozen=True)
class FarConfig:
    """The causal FAR variant (docs/method.md §8.1-8.2, §10); read only when ``variant == "far"``."""

    chunk_partition: tuple[int, ...] = setting((1, 3, 3, 3, 3, 3, 3, 2), ge=1)  # latent frames per chunk; sums to F
    full_chunk_limit: int = setting(3, ge=1)  # the window: current chunk + 2 most recent at full resolution
    long_context_ratio: float = setting(0.5, ge=0, le=1)  # P(n_chunks ~ U{min..max}) in teacher forcing, else n = min
    min_chunks: int = 3
    max_chunks: int = 8
    bidirectional_prob: float = setting(0.1, ge=0, le=1)  # auxiliary bidirectional loss per train_flowmap step (§8.4, stage 1b only;
    # distill and finetune never add it)
    attention: str = setting("auto", choices=("auto", "flex", "dense"))  # "flex" (BlockMask) | "dense" (SDPA + bool mask, CPU) | "auto" = flex on CUDA


@dataclass(frozen=True)
class Preset:
    name: str = "tiny"
    variant: str = setting("bidirectional", choices=("bidirectional", "far"))  # "bidirectional" | "far"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherStage = field(default_factory=TeacherStage)
    flowmap: FlowMapStage = field(default_factory=FlowMapStage)
    distill: DistillStage = field(default_factory=DistillStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    evaluate: EvalStage = field(default_factory=EvalStage)
    far: FarConfig = field(default_factory=FarConfig)


# ---------------------------------------------------------------------------------------------- presets


def tiny() -> Preset:
    """CPU, tens of seconds to two minutes per stage on 2 cores: the embedded `anyflow run` and the tests.

    Same recipe as the Wan presets on a 40k-parameter transformer, 16 procedural clips (9×32×32 →
    3×4×4×4 latents), LoRA rank 4, a few dozen steps, higher learning rates and a short EMA.
    """
    train = TrainConfig(steps=24, batch_size=2, ema_decay=0.9, ema_warmup_step=12, checkpoint_every=8)
    return Preset(
        teacher=TeacherStage(train=train),
        flowmap=FlowMapStage(train=train),
        distill=DistillStage(train=dataclasses.replace(train, steps=12, ema_warmup_step=6, checkpoint_every=4)),
        finetune=FinetuneStage(train=dataclasses.replace(train, steps=4, ema_warmup_step=2, checkpoint_every=2)),
        evaluate=EvalStage(reference_steps=32),
    )


def demo() -> Preset:
    """CPU, about 5 minutes on 2 idle cores (4 min 21 s measured): a tiny model trained long enough that the
    report shows learning.

    tiny's architecture and VAE with the transformer *pretrained* on procedural clips (``builtin:demo``,
    scripts/pretrain_demo_base.py; like Wan's, the base already follows text, where a LoRA on the random tiny
    base, which never adapts the cross-attention, stays prompt-blind); 512 clips of the small procedural class
    set (``simple=1``: red, green or blue shapes moving left or right or still, on black), LoRA rank 16 (the
    transformer's width is 32), thousands of steps per stage on batches of 16 (distill 300 on 8), and 24
    held-out prompts of the same class set, whose samples' colour and motion are read off and scored
    (adherence_colour, adherence_motion).
    """
    train = TrainConfig(steps=5000, batch_size=16, ema_decay=0.99, ema_warmup_step=100, checkpoint_every=1000,
                        log_every=10)
    optim = OptimConfig(lr=2e-3, warmup_steps=20)
    # Stage 2 (README "The demo preset" has the measurements): the fake-score critic must track the generator's
    # samples or the DMD direction is mostly its lag (it starts as the unguided teacher while the generator samples
    # CFG 3), so it learns 20x faster (the stages' lr, 2e-3) and the generator warms up over 100 steps; the real
    # score uses w = 2, cond + 2·(cond − uncond) = standard CFG 3, the flow map's fused guidance and the evaluation
    # reference's, instead of the released w = 3 (CFG 4), as the toy experiments do (docs/method.md §17.10-17.11).
    generator_optim = OptimConfig(lr=1e-4, beta1=0.0, beta2=0.999, warmup_steps=100)
    critic_optim = OptimConfig(lr=2e-3, beta1=0.0, beta2=0.999)
    return Preset(
        name="demo",
        model=ModelConfig(base="builtin:demo", lora_rank=16, lora_alpha=16.0),
        data=DataConfig(source="procedural:n=512,seed=0,simple=1", samples_per_shard=128),
        teacher=TeacherStage(train=train, optim=optim),
        flowmap=FlowMapStage(train=dataclasses.replace(train, steps=2000, checkpoint_every=500), optim=optim),
        distill=DistillStage(
            train=dataclasses.replace(train, steps=300, batch_size=8, ema_warmup_step=20, checkpoint_every=100),
            generator_optim=generator_optim,
            critic_optim=critic_optim,
            real_guidance_scale=2.0,
        ),
        finetune=FinetuneStage(train=dataclasses.replace(train, steps=100, checkpoint_every=50), optim=optim),
        evaluate=EvalStage(reference_steps=32, num_prompts=24, batch_size=12),
    )


def _wan(name: str, base: str, batch: int, iters: int) -> Preset:
    """The released hyperparameters (docs/method.md §10); sizes differ only in base, batch and iterations."""
    stage_train = TrainConfig(
        steps=iters, batch_size=batch, seed=0, ema_decay=0.999, ema_warmup_step=1000,
        checkpoint_every=500, log_every=10, mixed_precision="bf16", shard_optimizer=True,
    )
    stage_optim = OptimConfig(lr=5e-5, beta1=0.9, beta2=0.95, warmup_steps=1000, grad_clip=1.0)
    distill_optim = OptimConfig(lr=2e-6, beta1=0.0, beta2=0.999, warmup_steps=0, grad_clip=1.0)
    return Preset(
        name=name,
        model=ModelConfig(base=base, lora_rank=256, lora_alpha=256.0, gradient_checkpointing=True),
        data=DataConfig(source="", frames=81, height=480, width=832, fps=16, samples_per_shard=64),
        teacher=TeacherStage(train=stage_train, optim=stage_optim),
        flowmap=FlowMapStage(train=stage_train, optim=stage_optim),
        distill=DistillStage(
            train=dataclasses.replace(
                stage_train, steps=1200, ema_decay=0.99, ema_warmup_step=200, checkpoint_every=200
            ),
            generator_optim=distill_optim,
            critic_optim=distill_optim,
        ),
        finetune=FinetuneStage(train=dataclasses.replace(stage_train, steps=1000), optim=stage_optim),
        evaluate=EvalStage(
            nfes=(1, 2, 4, 8, 16, 32), reference_steps=50, num_prompts=946, samples_per_prompt=5,
            seed=0, prompts="vbench-extended", vbench=True,
            vbench_dimensions=(
                "subject_consistency", "background_consistency", "motion_smoothness",
                "temporal_flickering", "dynamic_degree", "aesthetic_quality", "imaging_quality",
                "object_class", "multiple_objects", "human_action", "color", "spatial_relationship",
                "scene", "appearance_style", "temporal_style", "overall_consistency",
            ),
        ),
    )


def far_tiny() -> Preset:
    """The causal variant at CPU scale: ``tiny`` with 37-frame clips (10 latent frames, chunks [1, 3, 3, 3]).

    Teacher forcing samples 3 or 4 chunks (the window is the last 3); the evaluate stage also runs I2V.
    """
    p = tiny()
    return dataclasses.replace(
        p, name="far-tiny", variant="far",
        data=dataclasses.replace(p.data, frames=37),
        far=FarConfig(chunk_partition=(1, 3, 3, 3), min_chunks=3, max_chunks=4),
        evaluate=dataclasses.replace(p.evaluate, nfes=(1, 2, 4, 8)),  # causal sampling costs N per chunk
    )


def _far(name: str, wan: Preset) -> Preset:
    """AnyFlow-FAR on a Wan2.1 preset: same stages and hyperparameters plus the FAR config of §10."""
    return dataclasses.replace(wan, name=name, variant="far", far=FarConfig())


def wan_1_3b() -> Preset:
    """Wan2.1-T2V-1.3B, bidirectional, the released hyperparameters (batch 2 per GPU, 6000 iterations)."""
    return _wan("wan2.1-t2v-1.3b", "/models/Wan2.1-T2V-1.3B-Diffusers", batch=2, iters=6000)


def wan_14b() -> Preset:
    """Wan2.1-T2V-14B, bidirectional, the released hyperparameters (batch 1 per GPU, 4000 iterations)."""
    return _wan("wan2.1-t2v-14b", "/models/Wan2.1-T2V-14B-Diffusers", batch=1, iters=4000)


def far_1_3b() -> Preset:
    """AnyFlow-FAR (causal, T2V/I2V/V2V) on Wan2.1-1.3B: wan2.1-t2v-1.3b plus the FAR config of §10."""
    return _far("far-1.3b", wan_1_3b())


def far_14b() -> Preset:
    """AnyFlow-FAR (causal, T2V/I2V/V2V) on Wan2.1-14B: wan2.1-t2v-14b plus the FAR config of §10."""
    return _far("far-14b", wan_14b())


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": tiny,
    "demo": demo,
    "wan2.1-t2v-1.3b": wan_1_3b,
    "wan2.1-t2v-14b": wan_14b,
    "far-tiny": far_tiny,
    "far-1.3b": far_1_3b,
    "far-14b": far_14b,
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# -------------------------------------------------------------------------------------------- overrides


_NON_FINITE = ("nan", "inf", "infinity")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if isinstance(value, str) and annotation is not str:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if annotation is bool and value.lower() in ("true", "false", "yes", "no"):
                value = value.lower() in ("true", "yes")
            elif origin is tuple:
                value = [v for v in value.split(",") if v]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in _NON_FINITE:
            value = float(value.strip().lower().replace("infinity", "inf"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value}: expected a finite number (NaN and infinities are refused)")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _apply(obj: Any, path: list[str], value: Any, full_key: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    head = path[0]
    if head not in names:
        where = full_key[: full_key.rfind(head)] or "<top level>"
        raise ConfigError(
            f"unknown config key {full_key!r} (no {head!r} in {where.rstrip('.')}); valid keys there: {', '.join(names)}"
        )
    current = getattr(obj, head)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full_key}: expected a mapping of sub-keys, got {value!r}")
            new = current
            for k, v in value.items():
                new = _apply(new, [k], v, f"{full_key}.{k}")
        else:
            new = _coerce(value, hints[head], full_key)
    else:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_key}: {head!r} is a value, not a section")
        new = _apply(current, path[1:], value, full_key)
    return dataclasses.replace(obj, **{head: new})


def apply_overrides(preset: Preset, overrides: Mapping[str, Any] | None) -> Preset:
    """Apply ``{"distill.train.steps": 5, "data": {"height": 64}}``-style overrides strictly."""
    for key, value in (overrides or {}).items():
        preset = _apply(preset, key.split("."), value, key)
    validate(preset)
    return preset


def merge_overrides(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers win: nested mappings merge key by key (``{"data": {"height": 64}}`` and
    ``{"data": {"source": "…"}}`` keep both), dotted keys are applied after the earlier layers' keys."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_overrides(out[key], value)
            else:
                out.pop(key, None)  # re-insert: apply_overrides applies keys in order, so this one comes last
                out[key] = value
    return out


def parse_override_args(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a.b": "1", "c": "x"}`` (values are coerced against the schema later)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_overrides_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"--config {path}: not valid YAML{where} ({problem}); fix the file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder, not a YAML file of overrides") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def validate(p: Preset) -> None:
    """Refuse a preset with a value outside what its field allows (:func:`setting`; every float finite), or
    fields that do not fit together. One :class:`ConfigError` naming the first offending key."""
    _check_fields(p, "")
    if (p.data.frames - 1) % 4 != 0:
        raise ConfigError(f"data.frames={p.data.frames}: must be 4k+1 (the Wan VAE's temporal factor is 4)")
    if p.data.height % 16 or p.data.width % 16:
        raise ConfigError(f"data.height/width={p.data.height}x{p.data.width}: must be multiples of 16")
    pixels = p.data.frames * p.data.height * p.data.width
    if pixels > MAX_CLIP_PIXELS:
        raise ConfigError(
            f"data.frames x data.height x data.width = {p.data.frames}x{p.data.height}x{p.data.width}: one decoded "
            f"clip would hold {12 * pixels / 2**30:.0f} GiB; at most {MAX_CLIP_PIXELS:,} pixels a clip "
            f"({12 * MAX_CLIP_PIXELS // 2**30} GiB, e.g. 81x720x1280 is {81 * 720 * 1280:,})"
        )
    for stage in ("flowmap", "distill", "finetune"):
        loss: LossConfig = getattr(p, stage).loss
        if loss.diffusion_ratio + loss.consistency_ratio > 1.0 + 1e-9:
            raise ConfigError(
                f"{stage}.loss.diffusion_ratio + {stage}.loss.consistency_ratio = {loss.diffusion_ratio} + "
                f"{loss.consistency_ratio}: must be <= 1 (the rest of the batch is the flow-map pairs)"
            )
    _validate_eval_i2v(p)
    if p.variant == "far":
        _validate_far(p)


def _check_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}={_show(value)}: must be a finite number (NaN and infinities are refused)")
        allowed: Allowed | None = f.metadata.get("allowed")
        if allowed is None:
            continue
        if isinstance(value, tuple) and not value:
            raise ConfigError(f"{key}=[]: must be a non-empty list of values {allowed.describe()}")
        if not all(allowed.allows(item) for item in items):
            each = "each value " if isinstance(value, tuple) else ""
            raise ConfigError(f"{key}={_show(value)}: {each}must be {allowed.describe()}")


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value) if isinstance(value, str) else f"{value}"


def _validate_eval_i2v(p: Preset) -> None:
    import re

    from anyflow.eval.vbench import I2V_RUNNABLE

    ev = p.evaluate
    if ev.i2v_suite and p.variant != "far":
        raise ConfigError(
            f"evaluate.i2v_suite={ev.i2v_suite!r}: VBench-I2V needs a causal FAR preset (variant 'far'), which takes the "
            f"image as its first latent frame; preset {p.name!r} is {p.variant!r}. Leave evaluate.i2v_suite empty."
        )
    if not re.fullmatch(r"[1-9][0-9]*-[1-9][0-9]*", ev.i2v_ratio):
        raise ConfigError(f"evaluate.i2v_ratio={ev.i2v_ratio!r}: a crop folder name W-H such as 7-4, 16-9, 8-5 or 1-1")
    unknown = [d for d in ev.i2v_dimensions if d not in I2V_RUNNABLE]
    if not ev.i2v_dimensions or unknown:
        raise ConfigError(
            f"evaluate.i2v_dimensions={list(ev.i2v_dimensions)}: a non-empty list of VBench-I2V dimensions"
            + (f" ({unknown} are not)" if unknown else "") + f"; valid: {', '.join(I2V_RUNNABLE)}"
        )
    from anyflow.eval.vbench import NORMALIZE_T2V

    unknown = [d for d in ev.vbench_dimensions if d not in NORMALIZE_T2V]
    if unknown:  # caught here, not after the whole sampling sweep
        raise ConfigError(f"evaluate.vbench_dimensions: unknown {unknown}; valid: {', '.join(NORMALIZE_T2V)}")


def _validate_far(p: Preset) -> None:
    f = p.far
    latent_frames = (p.data.frames - 1) // 4 + 1
    if sum(f.chunk_partition) != latent_frames:
        raise ConfigError(
            f"far.chunk_partition={list(f.chunk_partition)} sums to {sum(f.chunk_partition)} latent frames, but "
            f"data.frames={p.data.frames} gives {latent_frames}; set data.frames={4 * sum(f.chunk_partition) - 3}"
        )
    if not 1 <= f.min_chunks <= f.max_chunks <= len(f.chunk_partition):
        raise ConfigError(
            f"far.min_chunks={f.min_chunks}, far.max_chunks={f.max_chunks}: need 1 <= min <= max <= "
            f"{len(f.chunk_partition)} (the number of chunks in far.chunk_partition)"
        )
    if p.data.height % 32 or p.data.width % 32:
        raise ConfigError(
            f"data.height/width={p.data.height}x{p.data.width}: the FAR variant needs multiples of 32 (VAE factor 8 "
            "x the compressed patch (1, 4, 4))"
        )


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def from_dict(d: Mapping[str, Any]) -> Preset:
    """Rebuild a Preset from ``to_dict`` output (e.g. an artifact's config.json), strictly."""
    base = get_preset(d.get("name", "tiny")) if d.get("name") in PRESETS else Preset()
    return apply_overrides(base, {k: v for k, v in d.items()})
