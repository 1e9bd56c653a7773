"""The one training loop every stage uses (accelerate-based).

The loop owns: device / mixed precision / distributed setup (accelerate), sharding of the frozen base
across ranks (``train.sharding``: FSDP2 ``fully_shard`` per transformer block + root, see
:func:`shard_frozen_base`) and of the optimiser state and EMA (``train.shard_optimizer``: ZeRO-1; or
``train.deepspeed``: a DeepSpeed ZeRO-1/2 engine per optimiser group, :mod:`anyflow.train.deepspeed_zero`),
optimisers and the LR warm-up→constant schedule, the EMA of the exported parameters (fp32, plain copy
before ``ema_warmup_step``), periodic checkpoints and exact resume, SIGTERM handling, NaN detection,
logging (JSONL + TensorBoard) and the progress line. A *method* (teacher, flowmap, onpolicy, finetune)
owns its losses and optimiser steps and is called once per iteration with a :class:`TrainContext`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from anyflow.config import ConfigError, OptimConfig, TrainConfig
from anyflow.train.checkpoint import load_training_state, save_training_state
from anyflow.train.deepspeed_zero import DeepSpeedGroup, Snapshot

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: retryable (pod preempted, SIGTERM); bad input exits 2


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; no checkpoint was written for the bad step."""


class Preempted(RuntimeError):
    """SIGTERM received; a checkpoint was written and the process should exit with PREEMPTED_EXIT_CODE."""


class Method(Protocol):
    """What a training method provides to the loop."""

    name: str

    def optim_groups(self) -> dict[str, tuple[dict[str, nn.Parameter], OptimConfig]]:
        """Optimiser name -> (named trainable parameters, optimiser config)."""
        ...

    def ema_group(self) -> str:
        """The optimiser group whose parameters are EMA-averaged and exported."""
        ...

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        """One iteration: draw batches from ``ctx``, backward, ``ctx.clip_and_step(name)``."""
        ...


@dataclass
class TrainContext:
    """Handed to a method each step: batches, randomness, backward/step helpers, cross-rank gather."""

    accelerator: Any
    cfg: TrainConfig
    batches: Iterator[dict[str, Any]]
    generator: torch.Generator
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    params: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)
    clip: dict[str, float] = field(default_factory=dict)
    step: int = 0
    last_grad_norm: dict[str, float] = field(default_factory=dict)
    # train.deepspeed: optimiser group -> its DeepSpeed engine (anyflow/train/deepspeed_zero.py), and which
    # group a backward belongs to when the method does not say (the active adapter: adapters and optimiser
    # groups share names)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    active_group: Callable[[], str | None] | None = None
    # next_batch calls of this rank in the current step (the micro-batch index j of :meth:`next_batch`)
    micro: int = 0
    micro_step: int = -1  # the step ``micro`` counts for

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def begin_step(self, step: int) -> None:
        """Start ``step``: reset the micro-batch count; draws before the step's first batch (no method makes
        any) come from a (seed, step, rank) stream."""
        self.step, self.micro, self.micro_step = step, 0, step
        self.generator.manual_seed(draw_seed(self.cfg.seed, step, f"step-rank{self.rank}"))

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch, and ``generator`` re-seeded for it: the j-th batch of rank r in a step is global
        micro-batch g = j·W + r (the loader's global batch, ``anyflow.data.shards``), and its random draws come
        from (seed, step, g) alone. So a sample's data and noise do not depend on how many ranks share the step
        (docs/operations.md, "Resume on another number of processes"), and no random state needs saving."""
        batch = next(self.batches)
        if self.micro_step != self.step:  # a caller that set ``step`` itself
            self.micro, self.micro_step = 0, self.step
        g = self.micro * self.world_size + self.rank
        self.generator.manual_seed(draw_seed(self.cfg.seed, self.step, f"micro{g}"))
        self.micro += 1
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t.contiguous()) if self.world_size > 1 else t

    def backward(self, loss: torch.Tensor, group: str | None = None) -> None:
        """Backpropagate ``loss`` (accumulating gradients until the group's ``clip_and_step``). Under
        ``train.deepspeed`` the gradients go to ``group``'s engine (default: the active adapter's group)."""
        if not self.deepspeed:
            self.accelerator.backward(loss)
            return
        name = group if group is not None else (self.active_group() if self.active_group is not None else None)
        if name not in self.deepspeed:
            raise RuntimeError(f"backward for optimiser group {name!r}: the DeepSpeed groups are {sorted(self.deepspeed)}")
        self.deepspeed[name].accumulate(loss)

    def clip_and_step(self, name: str) -> float:
        """Clip the group's gradient norm, refuse non-finite gradients, step and zero the optimiser."""
        if self.deepspeed:  # DeepSpeed averages over the ranks, clips and steps
            value = self.deepspeed[name].step()
            if not math.isfinite(value):  # DeepSpeed reports inf for a NaN too, and skipped the update
                raise TrainingDiverged(f"gradient norm of {name!r} is not finite ({value})")
            self.last_grad_norm[name] = value
            return value
        params = list(self.params[name].values())
        if self.world_size > 1:
            # Data-parallel gradient averaging for the (small) trainable adapter set. The frozen base is
            # never wrapped in DDP: several adapters share it and switch per call, which DDP's hooks
            # cannot follow, so the reduction happens here, once per optimiser step (after all the
            # micro-batches of gradient accumulation). With train.sharding the trainable tensors stay
            # replicated plain tensors (shard_frozen_base ignores them), so this is unchanged.
            import torch.distributed as dist

            # A tensor no rank used this step (e.g. the causal generator's patch embedding when no clip had
            # compressed context) keeps grad None, as in a one-process run: AdamW then skips it instead of
            # moving it by momentum on an all-zero gradient.
            used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
            dist.all_reduce(used, op=dist.ReduceOp.SUM)
            for p, n_used in zip(params, used.tolist(), strict=True):
                if n_used == 0:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)
        opt = self.optimizers[name]
        # train.mixed_precision="fp16" on CUDA: accelerate's backward multiplied the loss by its GradScaler's
        # scale (2^16 to start), but our optimisers are not accelerate-wrapped, so nothing divides it out
        # again. Unscale before clipping (the clip threshold and the logged norm are in true units), and let
        # the scaler skip the step and lower its scale on an overflow, as fp16 training expects, instead of
        # calling it divergence. The groups back-propagate and step one after the other, so one scaler
        # updated after each group's step always unscales with the scale its backward used.
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip[name])
        value = float(norm)
        if scaler is not None:
            scaler.step(opt)  # skipped when the unscaled gradients hold an inf or NaN
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if math.isfinite(value):
                self.last_grad_norm[name] = value
            return value
        if not math.isfinite(value):
            raise TrainingDiverged(f"gradient norm of {name!r} is {value}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.last_grad_norm[name] = value
        return value


def draw_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed from (seed, step, stream) only (the same on every rank and in every world size)."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def _warmup_constant(warmup: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def _unshardable(models: Any) -> set[nn.Parameter]:
    """What a sharded base must leave as plain replicated tensors: every LoRA tensor (trainable or not),
    every parameter that requires grad, every tensor an adapter owns (``AdapterModel.params``) and the
    current parameters of the modules holding such extra tensors (they are swapped per adapter)."""
    from anyflow.models import lora

    t = models.transformer
    out = {p for n, p in t.named_parameters() if p.requires_grad or ".lora_A." in n or ".lora_B." in n}
    for name in lora.adapter_names(t):
        for key, p in models.params(name).items():
            out.add(p)
            if ".lora_A." not in key and ".lora_B." not in key:  # an extra base tensor this adapter owns
                out.update(t.get_submodule(key.rsplit(".", 1)[0]).parameters(recurse=False))
    return out


def shard_frozen_base(models: Any, mode: str, accelerator: Any) -> dict[str, int]:
    """Shard the frozen base transformer of ``models`` (an ``AdapterModel``) across the ranks, in place.

    FSDP2 ``fully_shard`` on every transformer block, then on the root (docs/method.md §10: the paper's
    runs use FSDP2). ``mode`` "fsdp" shards over all ranks; "hsdp" shards within a node
    (``LOCAL_WORLD_SIZE`` ranks) and replicates across nodes (a 2-D mesh, the paper's hybrid sharding).

    Only *frozen* base parameters are sharded. The LoRA adapters and anything trainable stay plain,
    replicated tensors (``ignored_params``): adapters keep switching per call, the optimisers, EMA and
    checkpoints see ordinary tensors, and ``TrainContext.clip_and_step`` all-reduces their gradients
    (fp32, as the adapters are fp32) exactly as without sharding. The frozen base has no gradients, so
    FSDP reduces nothing; its ``reduce_dtype`` is fp32 for completeness. Parameters are all-gathered in
    the dtype they were loaded in (``param_dtype=None``): bf16 on CUDA with Wan's fp32 modules (time
    embedder, norms, scale-shift tables) kept fp32, i.e. exactly the unsharded numerics; forcing
    ``param_dtype=bf16`` would also round those modules. Inputs are not cast (``cast_forward_inputs=False``):
    τ stays fp32 (docs/method.md §14). Blocks reshard after forward and are all-gathered again for the backward
    (and for gradient checkpointing's recomputation, under the adapter :meth:`AdapterModel.backward` made
    active). Returns ``{"base_params", "local_base_params", "shard_group"}`` (frozen base parameter count,
    the part held by this rank, ranks per shard group); ``{}`` when nothing was sharded (one process).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    world = accelerator.num_processes
    if world == 1:
        return {}
    transformer = models.transformer
    exempt = _unshardable(models)
    if not isinstance(transformer, FSDPModule):
        device_type = accelerator.device.type
        if mode == "fsdp":
            mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
        elif mode == "hsdp":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            if local < 1 or world % local:
                raise ConfigError(f"train.sharding=hsdp: {world} ranks do not split into nodes of {local}")
            mesh = init_device_mesh(device_type, (world // local, local), mesh_dim_names=("replicate", "shard"))
        else:
            raise ConfigError(f"train.sharding={mode!r}: use none, fsdp or hsdp")
        mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
        blocks = getattr(transformer, "blocks", None)
        if blocks is None:
            raise ConfigError(f"train.sharding: {type(transformer).__name__} has no transformer blocks to shard")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=exempt)
        fully_shard(transformer, mesh=mesh, mp_policy=mp, ignored_params=exempt)
    base = [p for p in transformer.parameters() if p not in exempt]
    group = 1
    for p in base:
        if isinstance(p, DTensor):
            group = max(group, p.device_mesh.size(p.device_mesh.ndim - 1))
    return {
        "base_params": sum(p.numel() for p in base),
        "local_base_params": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in base),
        "shard_group": group,
    }


def make_optimizer(params: list[nn.Parameter], oc: OptimConfig, *, shard: bool) -> torch.optim.Optimizer:
    """AdamW over ``params``. ``shard`` (ZeRO-1, ``train.shard_optimizer`` with several processes): PyTorch's
    ``ZeroRedundancyOptimizer`` assigns each tensor to one rank (greedy by size, the same on every rank), that
    rank alone keeps its AdamW moments and updates it, then broadcasts the new values. Every rank still
    holds every parameter and its (all-reduced, clipped) gradient, so the update is exactly plain AdamW's
    (tests/test_train_zero.py); the moments cost 1/world per rank. Needs ``torch.distributed`` set up."""
    kwargs: dict[str, Any] = {"lr": oc.lr, "betas": (oc.beta1, oc.beta2), "weight_decay": oc.weight_decay}
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def is_sharded_optimizer(opt: torch.optim.Optimizer) -> bool:
    if not torch.distributed.is_available():  # a torch build without distributed has no ZeRO-1 optimisers
        return False
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(opt, ZeroRedundancyOptimizer)


def local_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimiser that holds this rank's AdamW state for one of the loop's optimisers (``fit``'s
    ``TrainContext.optimizers``): ZeRO-1's rank-local AdamW, a DeepSpeed group's AdamW over the rank's flat
    partition, or a plain AdamW itself."""
    if is_sharded_optimizer(opt):
        return opt.optim
    if isinstance(opt, DeepSpeedGroup):
        return opt.optimizer
    return opt


def optimizer_partition(optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, int]:
    """``{"params", "local_params"}``: trainable elements over all optimisers, and the elements whose moments
    this rank keeps (all of them without ZeRO-1)."""
    total = local = 0
    for opt in optimizers.values():
        total += sum(p.numel() for g in opt.param_groups for p in g["params"])
        local += sum(p.numel() for g in local_optimizer(opt).param_groups for p in g["params"])
    return {"params": total, "local_params": local}


def _owned(opt: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> set[str]:
    """Names of ``params`` whose moments this rank keeps in the ZeRO-1 optimiser ``opt``."""
    mine = {id(p) for g in opt.optim.param_groups for p in g["params"]}
    return {n for n, p in params.items() if id(p) in mine}


def _cpu_group() -> Any:
    """A gloo process group over all ranks for object collectives on CPU tensors (``None``: the default group
    already is gloo). Every rank must call it, in the same order."""
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _gather_ema(
    ema: dict[str, torch.Tensor], accelerator: Any, *, to: int | None, group: Any = None
) -> dict[str, torch.Tensor]:
    """The whole EMA from every rank's part, as CPU tensors: on rank ``to`` (others get ``{}``) or, with
    ``to=None``, on every rank. ``group``: a gloo group (:func:`_cpu_group`) or ``None`` for the default."""
    import torch.distributed as dist

    mine = {k: v.detach().cpu() for k, v in ema.items()}
    parts: list[Any] = [None] * accelerator.num_processes
    if to is None:
        dist.all_gather_object(parts, mine, group=group)
    else:
        dist.gather_object(mine, parts if accelerator.process_index == to else None, dst=to, group=group)
        if accelerator.process_index != to:
            return {}
    return {k: v for part in parts for k, v in part.items()}


def _check_launch(cfg: TrainConfig, accelerator: Any, method: Any) -> None:
    """Refuse launch layouts the loop does not implement, instead of silently running something else."""
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "NO"))
    if kind == "DEEPSPEED":
        raise ConfigError(
            "launched with an accelerate DeepSpeed config: anyflow drives DeepSpeed itself, one ZeRO engine per "
            "optimiser group over the shared frozen base (accelerate's integration wraps one model and one "
            "optimiser). Launch with configs/accelerate/multi_gpu_ddp.yaml (or torchrun) and set "
            "--set <stage>.train.deepspeed=zero2 (or zero1, zero2_offload, or a DeepSpeed JSON file)"
        )
    if kind == "FSDP" and cfg.sharding == "none":
        raise ConfigError(
            "launched with an accelerate FSDP config but <stage>.train.sharding is 'none': anyflow shards the frozen "
            "base itself (FSDP2), so set --set <stage>.train.sharding=fsdp (or hsdp), or launch with multi_gpu_ddp.yaml"
        )
    if cfg.sharding != "none" and getattr(method, "models", None) is None:
        raise ConfigError(f"train.sharding={cfg.sharding!r}: method {method.name!r} exposes no adapter model to shard")


@dataclass
class FitResult:
    steps: int
    resumed_from: int
    last_metrics: dict[str, float]
    ema: dict[str, torch.Tensor]
    seconds: float
    shard: dict[str, int] = field(default_factory=dict)  # shard_frozen_base's counts ({} when not sharded)
    # ema: whole on every rank; on the parameters' device, or CPU tensors with ZeRO-1 or DeepSpeed (gathered)
    # optimizer_partition: trainable elements, and those whose AdamW moments this rank holds
    optimizer_shard: dict[str, int] = field(default_factory=dict)


class _SigtermFlag:
    def __init__(self) -> None:
        self.raised = False
        self._old: Any = None

    def __enter__(self) -> _SigtermFlag:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a KFP local runner thread): no handler
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def fit(
    method: Method,
    cfg: TrainConfig,
    batches: Any,
    *,
    work_dir: str | Path,
    accelerator: Any = None,
    checkpoint_sync: Callable[[Path, int], str] | None = None,
    resume_from: Path | None = None,
    resume_label: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    final_checkpoint: bool = True,
    log_name: str = "log.jsonl",
) -> FitResult:
    """Run ``cfg.steps`` iterations of ``method``.

    ``batches`` is an iterator with ``state_dict()/load_state_dict()`` (the resumable data loader).
    ``work_dir/checkpoint`` holds the newest training state, saved every ``cfg.checkpoint_every`` steps, at the end
    of the run and on SIGTERM; ``final_checkpoint=False`` saves none after the final step (``cfg.steps``; the stages:
    they publish the trained weights instead, so nothing would ever resume from it), but still at the end of a run
    stopped early (``stop_after``) and on SIGTERM. ``checkpoint_sync(path, step)`` (if given)
    publishes it after each save, e.g. to S3, so a retried pod can resume, and returns where it went
    (named in errors as the last good checkpoint). ``resume_from`` restores a
    state directory before training. ``stop_after`` ends the run early after that many steps
    (used by tests that interrupt and resume).

    ``cfg.sharding`` ("fsdp" / "hsdp") shards the frozen base of ``method.models`` (the method's
    ``AdapterModel``) across the ranks before the first step (:func:`shard_frozen_base`); adapters,
    optimiser state, EMA and checkpoints are unchanged by it. ``cfg.shard_optimizer`` (several processes)
    splits the AdamW moments and the EMA across the ranks (ZeRO-1, :func:`make_optimizer`); checkpoints and
    the returned EMA are whole. Under bf16 mixed precision frozen adapters are stored in bf16 while the
    loop runs and restored to their exact values after it (:meth:`AdapterModel.frozen_adapters_stored_in`).
    ``cfg.deepspeed`` (a built-in name or a DeepSpeed JSON file) gives each optimiser group its own DeepSpeed
    ZeRO-1/2 engine (:mod:`anyflow.train.deepspeed_zero`) instead; checkpoints and the EMA are unchanged by it.
    Launching under an accelerate DeepSpeed config, or an accelerate FSDP config with ``sharding="none"``,
    is refused (``ConfigError``).
    """
    accelerator = accelerator or make_accelerator(cfg)
    _check_launch(cfg, accelerator, method)
    # frozen adapters in bf16 while the loop runs (every call is under bf16 autocast), fp32 again after it
    bf16_frozen = (method.models.frozen_adapters_stored_in(torch.bfloat16)
                   if accelerator.mixed_precision == "bf16" and getattr(method, "models", None) is not None
                   else nullcontext())
    shard = shard_frozen_base(method.models, cfg.sharding, accelerator) if cfg.sharding != "none" else {}
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # re-seeded per micro-batch from (seed, step, global micro-batch) by TrainContext.next_batch
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    groups = method.optim_groups()
    ema_group = method.ema_group()
    ds: dict[str, Any] = {}
    if cfg.deepspeed:  # one DeepSpeed ZeRO engine per optimiser group; it replaces torch's ZeRO-1 below
        from anyflow.train.deepspeed_zero import make_groups

        ds = make_groups(cfg.deepspeed, groups, micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum,
                         device=accelerator.device, ema_group=ema_group)
    zero = cfg.shard_optimizer and accelerator.num_processes > 1 and not ds
    # ZeRO-1's EMA gathers run on CPU tensors over gloo (over NCCL rank 0 would stage the whole EMA on its GPU)
    cpu_group = _cpu_group() if zero else None
    # what checkpoints save and restore (a DeepSpeed group gathers / scatters the whole AdamW state) ...
    optimizers: dict[str, Any] = dict(ds) or {
        name: make_optimizer(list(params.values()), oc, shard=zero) for name, (params, oc) in groups.items()
    }
    # ... and what the LR schedule drives (under DeepSpeed: torch AdamW over this rank's partition)
    schedulers = {
        name: torch.optim.lr_scheduler.LambdaLR(ds[name].optimizer if ds else optimizers[name],
                                                _warmup_constant(oc.warmup_steps))
        for name, (_, oc) in groups.items()
    }
    flat_params = {f"{g}/{n}": p for g, (ps, _) in groups.items() for n, p in ps.items()}
    # ZeRO-1 also splits the EMA: each rank averages the tensors whose moments it keeps (ema_owned); under
    # DeepSpeed the EMA group's engine keeps it beside the moments, over this rank's partition (none here)
    if ds:
        ema_owned: set[str] = set()
    else:
        ema_owned = _owned(optimizers[ema_group], groups[ema_group][0]) if zero else set(groups[ema_group][0])
    ema: dict[str, torch.Tensor] = {
        n: p.detach().float().clone() for n, p in groups[ema_group][0].items() if n in ema_owned
    }
    ctx = TrainContext(
        accelerator=accelerator,
        cfg=cfg,
        batches=batches,
        generator=generator,
        optimizers=optimizers,
        params={g: ps for g, (ps, _) in groups.items()},
        clip={g: oc.grad_clip for g, (_, oc) in groups.items()},
        deepspeed=ds,
        active_group=(lambda: method.models.active) if getattr(method, "models", None) is not None else None,
    )
    start = 0
    if resume_from is not None:
        restored = load_training_state(
            resume_from, params=flat_params, ema=ema, optimizers=optimizers, schedulers=schedulers,
            param_names={g: list(ps) for g, (ps, _) in groups.items()},
        )
        for opt in optimizers.values():
            if is_sharded_optimizer(opt):
                # torch's ZeroRedundancyOptimizer.load_state_dict also copies this rank's moments into the
                # wrapper's own (never used) state: on a GPU a second copy for the whole run. state_dict()
                # rebuilds from the rank-local optimisers, so nothing needs it.
                opt.state.clear()
        start = restored["step"]
        if ds:
            ds[ema_group].load_ema(ema)
        for name in [k for k in ema if k not in ema_owned]:  # the checkpoint holds the whole EMA
            del ema[name]
        batches.load_state_dict(restored["data"])
    ckpt_dir = work_dir / "checkpoint"
    log_path = work_dir / log_name
    if resume_from is not None and (Path(resume_from) / log_name).exists():
        # carry the log across the interruption, dropping records past the restored step
        kept = [ln for ln in (Path(resume_from) / log_name).read_text().splitlines() if json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    tb = _tensorboard(work_dir / "tensorboard") if accelerator.is_main_process else None
    last: dict[str, float] = {}
    last_ckpt: str = (resume_label or str(resume_from)) if resume_from else "none"
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    t0 = time.perf_counter()
    bar = _progress(progress and accelerator.is_main_process, start, cfg.steps, method.name)

    world = accelerator.num_processes

    def checkpoint(step: int) -> None:
        """Rank 0 writes (and publishes) one checkpoint for all ranks, in a layout that does not depend on the
        number of processes (docs/operations.md, "Resume on another number of processes"). Adapters and
        schedulers are identical on every rank, and so are the optimisers and EMA unless ZeRO-1 or DeepSpeed
        splits them, in which case every rank's part is gathered to rank 0 (whole per-parameter tensors). The
        data position is the loader's global sample cursor (the same on every rank at a step boundary: checked
        here) and the random draws are derived from (seed, step, micro-batch), so no per-rank state is saved.
        Every rank returns with the same label."""
        nonlocal last_ckpt
        data_state = batches.state_dict()
        if world > 1:
            import torch.distributed as dist

            cursors: list[Any] = [None] * world
            dist.all_gather_object(cursors, data_state.get("sample_cursor"))
            if len(set(cursors)) != 1:
                raise RuntimeError(f"{method.name}: the ranks' data cursors differ at step {step} ({cursors}): "
                                   "every rank must draw as many batches per step")
            for opt in optimizers.values():
                if is_sharded_optimizer(opt):  # every rank sends its moments to rank 0, which saves them all
                    opt.consolidate_state_dict(to=0)
        if ds:
            whole_ema = ds[ema_group].full_ema(keep=accelerator.is_main_process)
        else:
            whole_ema = _gather_ema(ema, accelerator, to=0, group=cpu_group) if zero else ema
        # DeepSpeed groups gather their whole AdamW state (collectives on every rank); rank 0 keeps and writes it
        saved = ({n: Snapshot(g.state_dict(keep=accelerator.is_main_process)) for n, g in ds.items()} if ds
                 else optimizers)
        if accelerator.is_main_process:
            save_training_state(
                ckpt_dir, step=step, params=flat_params, ema=whole_ema, optimizers=saved,
                schedulers=schedulers, data_state=data_state,
                param_names={g: list(ps) for g, (ps, _) in groups.items()},
                extra={"world_size": world, "grad_accum": cfg.grad_accum, "batch_size": cfg.batch_size},
            )
            log.flush()
            if log_path.exists():
                shutil.copy(log_path, ckpt_dir / log_name)
            last_ckpt = checkpoint_sync(ckpt_dir, step) if checkpoint_sync is not None else str(ckpt_dir)
            for opt in optimizers.values():
                if is_sharded_optimizer(opt):
                    # drop rank 0's consolidated copy (a second full set of moments, on the CPU) until the
                    # next checkpoint; torch keeps it in this private list and offers no call to free it
                    # (an assignment, which cannot raise here on rank 0 alone while the others wait)
                    opt._all_state_dicts = []
        if world > 1:  # also keeps the other ranks from running ahead while rank 0 publishes
            label = [last_ckpt]
            dist.broadcast_object_list(label, src=0)
            last_ckpt = label[0]

    def sigterm_seen() -> bool:
        """Whether any rank got SIGTERM (all ranks must agree, or one would wait in a collective forever)."""
        if world == 1:
            return sigterm.raised
        import torch.distributed as dist

        flag = torch.tensor([1.0 if sigterm.raised else 0.0], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    with _SigtermFlag() as sigterm, open(log_path, "a", encoding="utf-8") as log, bf16_frozen:
        for step in range(start, end):
            ctx.begin_step(step)
            ts = time.perf_counter()
            autocast = accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()
            with autocast:
                try:
                    metrics = method.train_step(ctx, step)
                except TrainingDiverged as exc:
                    raise TrainingDiverged(
                        f"{method.name}: {exc} at step {step + 1}; last good checkpoint: {last_ckpt}"
                    ) from exc
            bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
            if bad:
                raise TrainingDiverged(
                    f"{method.name}: {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step + 1};"
                    f" last good checkpoint: {last_ckpt}"
                )
            for sch in schedulers.values():
                sch.step()
            decay = cfg.ema_decay if step + 1 >= cfg.ema_warmup_step else 0.0
            _ema_update(ema, groups[ema_group][0], decay)
            if ds:
                ds[ema_group].update_ema(decay)
            dt = time.perf_counter() - ts
            samples = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
            record = {
                "step": step + 1,
                **metrics,
                **{f"grad_norm/{k}": v for k, v in ctx.last_grad_norm.items()},
                **{f"lr/{k}": s.get_last_lr()[0] for k, s in schedulers.items()},
            }
            # the throughput goes to the metrics and TensorBoard but not into log.jsonl: the log is part of the
            # published artifact, whose content digest keys every later stage (storage.content_digest), so it
            # holds only what a rerun of the same inputs reproduces
            rate = {"samples_per_s": samples / max(dt, 1e-9)}
            last = {k: float(v) for k, v in (record | rate).items() if k != "step"}
            if accelerator.is_main_process and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
                log.write(json.dumps(record) + "\n")
                log.flush()
                if tb is not None:
                    for k, v in (record | rate).items():
                        if k != "step":
                            tb.add_scalar(k, v, step + 1)
            if bar is not None:
                bar.update(1, detail=_loss_detail(metrics))
            # Without final_checkpoint none after the last step: the stage publishes its artifact instead, and a
            # retry that finds the artifact never trains. A run stopped early (``stop_after``) or by SIGTERM
            # writes one to resume from.
            due = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end
            saved = due and (final_checkpoint or step + 1 < cfg.steps)
            if saved:
                checkpoint(step + 1)
            if sigterm_seen():
                if not saved:
                    checkpoint(step + 1)
                raise Preempted(f"{method.name}: SIGTERM at step {step + 1}; checkpoint written to {last_ckpt}")
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    ema_params = sum(p.numel() for p in groups[ema_group][0].values())
    if ds:
        partition = {"params": sum(p.numel() for p in flat_params.values()),
                     "local_params": sum(g.local_params() for g in ds.values()),
                     "ema_params": ema_params, "local_ema_params": ds[ema_group].local_params()}
        ema = ds[ema_group].full_ema()  # every rank exports the whole EMA (CPU tensors) ...
        for g in ds.values():  # ... and the engines let go of the tensors
            g.destroy()
    else:
        partition = optimizer_partition(optimizers) | {
            "ema_params": ema_params, "local_ema_params": sum(v.numel() for v in ema.values())}
        if zero:  # every rank exports the whole EMA (CPU tensors)
            ema = _gather_ema(ema, accelerator, to=None, group=cpu_group)
    return FitResult(steps=end, resumed_from=start, last_metrics=last, ema=ema, seconds=time.perf_counter() - t0,
                     shard=shard, optimizer_shard=partition)


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], params: Mapping[str, nn.Parameter], decay: float) -> None:
    for name in ema:  # this rank's part of the EMA (all of it without ZeRO-1)
        ema_step(ema[name], params[name].detach().float(), decay)


@torch.no_grad()
def ema_step(ema: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * value`` in place; a plain copy at ``decay`` 0 (the warm-up). The one
    EMA update: per tensor here, over a DeepSpeed rank's flat partition in ``DeepSpeedGroup.update_ema``."""
    if decay == 0.0:
        ema.copy_(value)
    else:
        ema.mul_(decay).add_(value, alpha=1.0 - decay)


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a core dependency, but logging must never kill a run
        return None
    return SummaryWriter(str(path))


def _progress(enabled: bool, start: int, total: int, name: str) -> Any:
    """``[anyflow] <name>: step i/total (loss …) · elapsed · ETA …`` lines (:mod:`anyflow.progress`); the ETA
    counts the steps of this run only (a resumed run starts at ``start``)."""
    if not enabled:
        return None
    from anyflow.progress import Progress

    return Progress(name, total, unit="step", start=start)


def _loss_detail(metrics: dict[str, float]) -> str:
    """The step's loss for the progress line: ``loss`` when the method reports one, else each ``loss/*``."""
    keys = ["loss"] if "loss" in metrics else [k for k in metrics if k.startswith("loss")]
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)
