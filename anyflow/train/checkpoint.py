"""Training-state checkpoints without pickle.

Everything a run needs to continue bit-for-bit — trainable weights, optimiser state, EMA, LR-scheduler
counters, RNG state, data position, step — is written as safetensors (tensors) plus JSON (scalars).
Optimiser state dicts are flattened to ``state.<param index>.<key>`` tensors and a JSON of the
param groups; ``torch.load`` is never used, so a checkpoint from an untrusted store cannot execute code.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(
    directory: str | Path,
    *,
    step: int,
    params: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    generators: Mapping[str, torch.Generator],
    data_state: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    ranks: list[Mapping[str, Any]] | None = None,
) -> Path:
    """Write the state into ``directory`` atomically (a temp sibling renamed into place).

    ``ranks`` (multi-process runs, written by rank 0 for all): each rank's own random state
    (``{"generators": {name: state}, "torch_cpu": state}``) and data-loader position (``"data"``), so
    every rank resumes its own stream; the rest of the state is the same on every rank.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(params), str(tmp / "params.safetensors"))
    save_file(_contiguous(ema), str(tmp / "ema.safetensors"))
    opt_meta = {}
    for name, opt in optimizers.items():
        tensors, meta = optimizer_to_files(opt)
        save_file(_contiguous(tensors), str(tmp / f"optim-{name}.safetensors"))
        opt_meta[name] = meta
    save_file(
        {f"rng.{k}": g.get_state() for k, g in generators.items()} | {"rng.torch_cpu": torch.get_rng_state()},
        str(tmp / "rng.safetensors"),
    )
    state = {
        "step": step,
        "optimizers": opt_meta,
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "data": dict(data_state),
        "extra": dict(extra or {}),
    }
    if ranks:
        rng_ranks = {}
        for r, rs in enumerate(ranks):
            rng_ranks |= {f"rank{r}.rng.{k}": v for k, v in rs["generators"].items()}
            rng_ranks[f"rank{r}.rng.torch_cpu"] = rs["torch_cpu"]
        save_file(rng_ranks, str(tmp / "rng-ranks.safetensors"))
        state["ranks"] = [{"data": dict(rs["data"])} for rs in ranks]
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__} in a training checkpoint")


def load_training_state(
    directory: str | Path,
    *,
    params: Mapping[str, torch.nn.Parameter],
    ema: dict[str, torch.Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    generators: Mapping[str, torch.Generator],
    rank: int = 0,
) -> dict[str, Any]:
    """Restore in place; returns ``{"step", "data", "extra"}``.

    In a multi-process run each rank restores its own random state and data position (``rank``) from
    the per-rank entries rank 0 wrote; a checkpoint without them (one process) restores rank 0's.
    """
    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    saved = load_file(str(directory / "params.safetensors"))
    missing = sorted(set(params) - set(saved))
    if missing:
        raise ValueError(
            f"checkpoint {directory} does not match this model: missing trainable tensors {missing[:3]}"
            " (was it written by another preset or stage?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ValueError(
                    f"checkpoint {directory}: tensor {name} has shape {tuple(saved[name].shape)},"
                    f" the model expects {tuple(p.shape)}"
                )
            p.copy_(saved[name])
    # safetensors loads on the CPU: keep each EMA tensor where the loop keeps it (the parameters' device;
    # an in-place EMA update across devices would fail on the first step after a GPU resume)
    devices = {k: v.device for k, v in ema.items()}
    loaded = load_file(str(directory / "ema.safetensors"))
    ema.clear()
    ema.update({k: v.to(devices.get(k, v.device)) for k, v in loaded.items()})
    for name, opt in optimizers.items():
        optimizer_from_files(
            opt, load_file(str(directory / f"optim-{name}.safetensors")), state["optimizers"][name]
        )
    for name, sch in schedulers.items():
        sch.load_state_dict(state["schedulers"][name])
    rng = load_file(str(directory / "rng.safetensors"))
    data = state["data"]
    per_rank = state.get("ranks")
    if per_rank is not None:
        if rank >= len(per_rank):
            raise ValueError(f"checkpoint {directory} was written by {len(per_rank)} processes; rank {rank} has no "
                             "state in it (resume with the same number of processes)")
        mine = load_file(str(directory / "rng-ranks.safetensors"))
        rng = {k[len(f"rank{rank}."):]: v for k, v in mine.items() if k.startswith(f"rank{rank}.")}
        data = per_rank[rank]["data"]
    for name, g in generators.items():
        g.set_state(rng[f"rng.{name}"])
    torch.set_rng_state(rng["rng.torch_cpu"])
    return {"step": state["step"], "data": data, "extra": state["extra"]}
