"""DeepSpeed ZeRO (stages 1 and 2, optional CPU offload) for the loop's optimiser groups.

``train.deepspeed`` names a DeepSpeed JSON config: a built-in (``zero1``, ``zero2``, ``zero2_offload``, in
``anyflow/train/deepspeed_configs/``) or a file path. A DeepSpeed engine owns one model and one optimiser,
while the on-policy stage steps two adapter groups (generator, critic) over one frozen base that switches
adapters per call. So each optimiser group gets its *own* engine whose "model" is only that group's
trainable tensors (:class:`_GroupTensors`); the forward passes keep running through the shared base,
outside the engines. DeepSpeed then does what ZeRO is for: it averages the group's gradients over the
ranks (stage 2: reduce-scattered, each rank keeps its partition), clips them, keeps the fp32 AdamW state
of 1/world of the tensors per rank (optionally in CPU memory: ``offload_optimizer``) and all-gathers the
updated tensors. The EMA group's engine also keeps the EMA of its tensors as one more optimiser-state entry
beside the moments: each rank averages its own fp32 partition, and it is gathered like the moments.

Gradient accumulation stays the loop's (``train.grad_accum``; methods may call backward several times per
micro-batch): :meth:`DeepSpeedGroup.accumulate` adds each backward's gradients into a buffer with
``torch.autograd.grad`` (no DeepSpeed hook runs), and :meth:`DeepSpeedGroup.step` hands the sum to the engine
in *one* ``engine.backward`` of the surrogate ``Σ <p, g>`` (whose gradient is exactly ``g``) followed by
``engine.step()``. Every rank backpropagates every tensor of the group in the same order, so DeepSpeed's
bucketed collectives stay matched even where a rank did not use a tensor.

What DeepSpeed config entries mean here:

* ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``gradient_clipping``: ``"auto"`` or
  absent (filled from ``train.batch_size``, 1, the group's ``grad_clip``); a number that disagrees with the
  anyflow config is an error naming both (anyflow's values are the ones that are used);
* ``bf16`` / ``fp16``: ``"auto"``, absent or disabled. anyflow keeps the trainable adapters in fp32 and
  computes in bf16 under autocast (``train.mixed_precision``); DeepSpeed's bf16 would store the adapters
  themselves in bf16;
* ``optimizer`` / ``scheduler``: not allowed (AdamW from the stage's optimiser config, the loop's warm-up);
  ``train_batch_size`` only ``"auto"``; ``communication_data_type`` only fp32; the old
  ``zero_optimization.cpu_offload`` is refused (use ``offload_optimizer``);
* ``zero_optimization.stage`` 1 or 2. Stage 3 partitions the parameters of the engine's model and gathers
  them in that model's forward hooks, which never run here (the base is called, not the engine); the frozen
  base is sharded with ``train.sharding=fsdp`` instead, which combines with ZeRO-1/2 here.

Checkpoints stay anyflow's own, layout-independent format (safetensors + JSON, no pickle): the whole AdamW
moments are gathered with ``deepspeed.utils.safe_get_full_optimizer_state`` and written exactly as a plain
AdamW run writes them, so a run can resume with or without DeepSpeed, and on another number of processes (each
rank keeps its fragments of the whole tensors; docs/operations.md, "Resume on another number of processes").

One difference from plain AdamW: DeepSpeed steps the flat partition as a whole, so a tensor that got no
gradient in a step (e.g. the causal generator's patch embedding before any clip had compressed context) is
still moved by weight decay and momentum, where plain AdamW skips it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyflow.config import ConfigError, OptimConfig

BUILTIN = ("zero1", "zero2", "zero2_offload")
_FIELD = "train.deepspeed"


def load_config(spec: str) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config ``spec`` names (a built-in or a JSON file), checked; and where it came from."""
    if spec in BUILTIN:
        source = f"built-in {spec!r}"
        text = resources.files("anyflow.train").joinpath("deepspeed_configs", f"{spec}.json").read_text()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"{_FIELD}={spec!r}: no such file; use a DeepSpeed JSON config file or one of {', '.join(BUILTIN)}"
            )
        source = str(path)
        text = path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{_FIELD}: {source} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{_FIELD}: {source} must hold a JSON object, not {type(raw).__name__}")
    _check(raw, source)
    return raw, source


def _check(raw: Mapping[str, Any], source: str) -> None:
    if "train_batch_size" in raw and raw["train_batch_size"] != "auto":
        raise ConfigError(
            f"{_FIELD}: {source} sets train_batch_size={raw['train_batch_size']!r}; the batch is "
            "<stage>.train.batch_size (per rank) x grad_accum x processes: set it to \"auto\" or remove it"
        )
    for key in ("optimizer", "scheduler"):
        if key in raw:
            raise ConfigError(
                f"{_FIELD}: {source} sets {key!r}; anyflow builds AdamW from the stage's optimiser config and the LR "
                "warm-up itself: remove it"
            )
    for key in ("bf16", "fp16"):
        section = raw.get(key) or {}
        enabled = section.get("enabled", False) if isinstance(section, dict) else section
        if enabled not in (False, "auto"):
            raise ConfigError(
                f"{_FIELD}: {source} sets {key}.enabled={enabled!r}; anyflow keeps the trainable adapters in fp32 "
                "and computes in bf16 under autocast (<stage>.train.mixed_precision): set it to \"auto\" or false"
            )
    if raw.get("communication_data_type") not in (None, "fp32", "auto"):
        raise ConfigError(
            f"{_FIELD}: {source} sets communication_data_type={raw['communication_data_type']!r}; anyflow reduces the "
            "fp32 adapter gradients in fp32: remove it"
        )
    zero = raw.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{_FIELD}: {source} has zero_optimization={zero!r}; it must be an object")
    if zero.get("cpu_offload"):
        raise ConfigError(
            f"{_FIELD}: {source} sets the old zero_optimization.cpu_offload; use \"offload_optimizer\": "
            "{\"device\": \"cpu\"} (as the built-in zero2_offload does)"
        )
    stage = zero.get("stage", 0)
    if stage not in (1, 2):
        raise ConfigError(
            f"{_FIELD}: {source} has zero_optimization.stage={stage!r}; anyflow supports ZeRO stages 1 and 2 "
            "(stage 3 gathers parameters in the engine model's forward hooks, and the shared frozen base is called "
            "outside the engines: shard it with <stage>.train.sharding=fsdp instead)"
        )


def engine_config(
    raw: Mapping[str, Any], source: str, *, micro_batch: int, grad_clip: float, grad_accum: int
) -> dict[str, Any]:
    """The config one group's engine gets: ``raw`` with the "auto" values filled and precision off."""
    cfg = copy.deepcopy(dict(raw))

    def fill(key: str, ours: Any, what: str) -> None:
        theirs = cfg.get(key, "auto")
        if theirs == "auto":
            return
        if isinstance(theirs, bool) or not isinstance(theirs, (int, float)):
            raise ConfigError(f"{_FIELD}: {source} sets {key}={theirs!r}; use \"auto\" (anyflow fills it from {what})")
        if not math.isclose(float(theirs), float(ours)):
            raise ConfigError(
                f"{_FIELD}: {source} sets {key}={theirs!r} but {what} is {ours!r}; anyflow uses its own value: set "
                f"{key} to \"auto\" (or change {what})"
            )

    fill("train_micro_batch_size_per_gpu", micro_batch, "train.batch_size")
    fill("gradient_accumulation_steps", grad_accum, "train.grad_accum")
    fill("gradient_clipping", grad_clip, "the optimiser's grad_clip")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1  # the loop accumulates; the engine sees one backward per step
    cfg.pop("train_batch_size", None)  # "auto" or absent (_check): DeepSpeed derives it (micro batch x world)
    cfg["gradient_clipping"] = float(grad_clip)
    cfg["bf16"] = {"enabled": False}
    cfg["fp16"] = {"enabled": False}
    zero = dict(cfg.get("zero_optimization") or {})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]  # DeepSpeed's default
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        # AdamW from torch steps the offloaded partition on the CPU (DeepSpeedCPUAdam would need its C++ op
        # compiled at run time, which the slim image cannot do)
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg["zero_optimization"] = zero
    return cfg


class _GroupTensors(nn.Module):
    """The "model" of one group's engine: the group's trainable tensors, the very Parameter objects the shared
    base uses (DeepSpeed re-points their storage into its flat buffer; identity is kept)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(params)

    def forward(self) -> None:  # pragma: no cover - never called: the base is
        raise RuntimeError("a DeepSpeed group's engine is not called; the shared base model is")


def init_process_group(device: torch.device) -> None:
    """A one-process group where none exists (a single-process run): DeepSpeed's engine needs one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def _no_cpu_shm_op(device: torch.device) -> Iterator[None]:
    """On CPU, start DeepSpeed's communication backend without its shared-memory all-reduce extension.

    DeepSpeed's ``TorchBackend`` (deepspeed 0.19.8 ``deepspeed/comm/torch.py``: ``build_shm_op`` in ``__init__``)
    compiles the C++ op ``deepspeed_shm_comm`` with the machine's compiler the first time a process on the CPU
    accelerator starts it -- minutes on a 2-core machine, and a C++ toolchain in the image. The op serves only
    ``inference_all_reduce`` (DeepSpeed inference); ZeRO training's collectives go through ``torch.distributed``
    (gloo here), so nothing anyflow runs uses it. On CUDA the accelerator has no such builder: untouched."""
    if device.type != "cpu":
        yield
        return
    import importlib

    # by its module name: the attribute deepspeed.comm.torch is the torch package (comm/__init__.py imports it)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    built = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = built


class DeepSpeedGroup:
    """One optimiser group (name -> trainable tensors) driven by its own DeepSpeed ZeRO engine."""

    def __init__(
        self, name: str, params: Mapping[str, nn.Parameter], oc: OptimConfig, raw: Mapping[str, Any], source: str,
        *, micro_batch: int, grad_accum: int, device: torch.device, ema: bool = False,
    ) -> None:
        import deepspeed

        init_process_group(device)
        self.name = name
        self.params = dict(params)
        self.config = engine_config(raw, source, micro_batch=micro_batch, grad_clip=oc.grad_clip, grad_accum=grad_accum)
        holder = _GroupTensors(list(self.params.values()))
        adamw = torch.optim.AdamW(holder.parameters(), lr=oc.lr, betas=(oc.beta1, oc.beta2),
                                  weight_decay=oc.weight_decay)
        # DeepSpeed reads LOCAL_RANK at start; a one-process run without a launcher has none: rank 0's, meanwhile
        unset = "LOCAL_RANK" not in os.environ
        if unset:
            os.environ["LOCAL_RANK"] = "0"
        try:
            with _no_cpu_shm_op(device):
                self.engine, self.zero, _, _ = deepspeed.initialize(
                    model=holder, optimizer=adamw, config=self.config, dist_init_required=False
                )
        finally:
            if unset:
                del os.environ["LOCAL_RANK"]
        # torch AdamW over this rank's flat fp32 partition: what the LR scheduler drives
        self.optimizer: torch.optim.Optimizer = self.zero.optimizer
        self._grads: dict[str, torch.Tensor] = {}
        self.has_ema = ema
        self._init_state()

    def _partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 partitions (the master copy AdamW steps; one per param group)."""
        return list(self.zero.single_partition_of_fp32_groups)

    @torch.no_grad()
    def _init_state(self) -> None:
        """Create AdamW's state now, exactly as its first step would (step 0, zero moments), plus the EMA entry,
        and let DeepSpeed link each tensor to its slice of every entry. Torch creates the state lazily and
        DeepSpeed links only after the first step, which leaves nothing to restore a checkpoint into and no way
        to gather an EMA kept beside the moments."""
        for flat in self._partitions():
            st = self.optimizer.state[flat]
            if not st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
            if self.has_ema:
                st["ema"] = flat.detach().clone()
        self.zero._lazy_init_hp_params_optimizer_state()

    @property
    def stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def accumulate(self, loss: torch.Tensor) -> None:
        """Add d loss / d (this group's tensors) to the step's gradient (autograd.grad: DeepSpeed's gradient
        hooks do not run here; the other groups get nothing, as they should)."""
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
        if all(g is None for g in grads):  # the same on every rank: a wrong group, not a rank's data
            raise RuntimeError(
                f"backward for optimiser group {self.name!r}: the loss depends on none of its tensors (another "
                "adapter was active? pass ctx.backward(loss, group=...))"
            )
        for n, g in zip(names, grads, strict=True):
            if g is None:
                continue
            if n in self._grads:
                self._grads[n] += g
            else:
                # a copy of our own: autograd may hand back one tensor for two inputs, or a broadcast view
                self._grads[n] = g.detach().clone(memory_format=torch.contiguous_format)

    def step(self) -> float:
        """Average over ranks, clip, step (all by DeepSpeed); return the gradient norm before clipping."""
        with torch.autocast(self.engine.device.type, enabled=False):
            surrogate = torch.zeros((), device=self.engine.device)
            for n, p in self.params.items():
                g = self._grads.get(n)
                surrogate = surrogate + (p * (g if g is not None else torch.zeros_like(p)).to(p.dtype)).sum()
            self._grads.clear()
            self.engine.backward(surrogate)
            self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def destroy(self) -> None:
        """Detach the engine from the group's tensors (its gradient hooks and fragment links), freeing its state.
        The tensors keep their values."""
        self.engine.destroy()

    def local_params(self) -> int:
        """Elements of this group's tensors whose AdamW moments (and EMA, if kept) this rank keeps (DeepSpeed's
        per-tensor fragments of this rank's partition; the partition's alignment padding not counted)."""
        return sum(p._hp_mapping.hp_fragment_address.numel for p in self.params.values()
                   if getattr(p, "_hp_mapping", None) is not None)

    # -- the EMA of the group's tensors (``ema=True``): split like the moments, each rank averages its partition --

    def update_ema(self, decay: float) -> None:
        """The loop's EMA step (:func:`anyflow.train.loop.ema_step`) on this rank's partition: element for
        element what the replicated EMA computes."""
        from anyflow.train.loop import ema_step  # the loop imports this module

        for flat in self._partitions():
            ema_step(self.optimizer.state[flat]["ema"], flat, decay)

    def full_ema(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The whole EMA, by tensor name, as CPU tensors; ``{}`` where ``keep`` is false (a rank that writes no
        checkpoint holds no copy). Collective: every rank must call it."""
        from deepspeed.utils import safe_get_full_optimizer_state

        out = {}
        for n, p in self.params.items():
            whole = safe_get_full_optimizer_state(p, "ema")  # an all-reduce: on every rank, tensor by tensor
            if keep:
                out[n] = whole.detach().cpu().reshape(p.shape)
        return out

    @torch.no_grad()
    def load_ema(self, whole: Mapping[str, torch.Tensor]) -> None:
        """Keep this rank's partition of ``whole`` (a checkpoint's EMA; every rank calls it with the whole EMA and
        keeps its own fragment, no communication)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        missing = sorted(set(self.params) - set(whole))
        if missing:
            raise ValueError(f"the checkpoint's EMA has no {missing[:3]} (group {self.name!r})")
        for n, p in self.params.items():
            safe_set_full_optimizer_state(p, whole[n].to(p.device, torch.float32).reshape(p.shape), "ema")

    # -- checkpoints: whole AdamW state in the plain-AdamW layout (every rank must call these, in order) --

    def _group_hparams(self) -> dict[str, Any]:
        return {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}

    def state_dict(self, keep: bool = True) -> dict[str, Any]:
        """The whole AdamW state as ``torch.optim.AdamW.state_dict()`` over the group's tensors would give it
        (tensors on the CPU; none kept where ``keep`` is false). Collective: every rank must call it."""
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self.optimizer.state[self._partitions()[0]]["step"]
        state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self.params.values()):
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}  # all-reduces
            if keep and float(step) > 0:  # AdamW has no state before its first step
                state[i] = {"step": step.detach().clone().cpu(),
                            **{k: v.detach().cpu().reshape(p.shape) for k, v in moments.items()}}
        group = self._group_hparams() | {"params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore a plain-AdamW-layout state (from :meth:`state_dict` or a run without DeepSpeed), and the fp32
        master copy of the group's tensors from their current values (the checkpoint loader set them first).
        Every rank calls it with the whole state and keeps its own fragments (no communication)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        saved_group = sd["param_groups"][0]
        if len(saved_group["params"]) != len(self.params):
            raise ValueError(f"optimiser {self.name!r}: the checkpoint has {len(saved_group['params'])} tensors, "
                             f"this group {len(self.params)}")
        for k, v in saved_group.items():
            if k in self.optimizer.param_groups[0] and k not in ("params", "foreach", "fused", "capturable",
                                                                 "differentiable"):
                self.optimizer.param_groups[0][k] = v
        state = {int(k): v for k, v in sd["state"].items()}
        steps = [st["step"] for st in state.values() if "step" in st]
        with torch.no_grad():
            for i, p in enumerate(self.params.values()):
                safe_set_full_fp32_param(p, p.detach().clone())
                for key in ("exp_avg", "exp_avg_sq"):
                    value = state.get(i, {}).get(key)
                    value = torch.zeros_like(p) if value is None else value.to(p.device, torch.float32)
                    safe_set_full_optimizer_state(p, value.reshape(p.shape), key)
            # one step count for the flat partition: the most any tensor took (a plain multi-rank run skips a
            # tensor no rank used, so its counts can differ)
            step = max(float(s) for s in steps) if steps else 0.0
            for flat in self._partitions():
                st = self.optimizer.state[flat]
                st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)


class Snapshot:
    """A gathered optimiser state, to hand to the checkpoint writer (which calls ``state_dict()``)."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self._sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self._sd


def make_groups(
    spec: str, groups: Mapping[str, tuple[Mapping[str, nn.Parameter], OptimConfig]], *, micro_batch: int,
    grad_accum: int, device: torch.device, ema_group: str | None = None,
) -> dict[str, DeepSpeedGroup]:
    """One :class:`DeepSpeedGroup` per optimiser group, for the config ``spec`` names; ``ema_group`` keeps the
    EMA of its tensors beside its moments."""
    raw, source = load_config(spec)
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"{_FIELD}={spec!r} needs the deepspeed package (installed with anyflow on Linux): {exc}"
        ) from exc
    return {
        name: DeepSpeedGroup(name, params, oc, raw, source, micro_batch=micro_batch, grad_accum=grad_accum,
                             device=device, ema=name == ema_group)
        for name, (params, oc) in groups.items()
    }
