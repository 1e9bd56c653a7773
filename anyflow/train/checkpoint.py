"""Training-state checkpoints without pickle.

Everything a run needs to continue — trainable weights, optimiser state, EMA, LR-scheduler counters, data
position, step — is written as safetensors (tensors) plus JSON (scalars). Optimiser state dicts are flattened
to ``state.<param name>.<key>`` tensors (one whole tensor per parameter and moment) and a JSON of the param
groups naming their parameters; ``torch.load`` is never used, so a checkpoint from an untrusted store cannot
execute code.

The layout does not depend on the number of processes that wrote it: whole per-parameter tensors (a sharded
optimiser or EMA is gathered before saving and re-sharded by the loading optimiser), one global data cursor
(``anyflow.data.shards``), and no random state (the loop derives every draw from (seed, step, micro-batch);
docs/operations.md, "Resume on another number of processes"). ``rng.safetensors`` keeps the writer's torch
CPU generator state, which the training methods do not draw from.
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


def optimizer_to_files(
    opt: torch.optim.Optimizer, names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``opt.state_dict()``. ``names``: the parameter names in the optimiser's order; the tensors are
    then keyed ``state.<name>.<key>`` and the param groups list names (without: positions, the older layout)."""
    sd = opt.state_dict()
    label = (lambda i: names[int(i)]) if names is not None else str
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{label(idx)}.{key}"] = val
            else:
                scalars.setdefault(label(idx), {})[key] = val
    groups = [{**g, "params": [label(i) for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "keys": "names" if names is not None else "index"}


def optimizer_from_files(
    opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping, names: list[str] | None = None
) -> None:
    """Restore what :func:`optimizer_to_files` wrote. A name-keyed state needs ``names`` (this optimiser's
    parameter names, in order) and must name exactly those parameters."""
    by_name = meta.get("keys") == "names"
    if by_name:
        if names is None:
            raise ValueError("this optimiser state is keyed by parameter name: pass the parameter names")
        saved = [n for g in meta["param_groups"] for n in g["params"]]
        if sorted(saved) != sorted(names):
            raise ValueError(f"the checkpoint's optimiser holds {len(saved)} tensors, this one {len(names)}; differing "
                             f"names: {sorted(set(saved) ^ set(names))[:3]}")
        index = {n: i for i, n in enumerate(names)}

        def idx(label: str) -> int:
            return index[label]
    else:
        idx = int
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        # the key part is ".<key>" after the parameter name, which may itself hold dots
        head, key = name[len("state."):].rsplit(".", 1)
        state.setdefault(idx(head), {})[key] = val
    for label, sc in meta.get("scalars", {}).items():
        state.setdefault(idx(label), {}).update(sc)
    # torch pairs a saved group's ids with the optimiser's current parameters by position, so list each group's
    # ids in the current order (this optimiser's parameters are ``names``, in order)
    groups = [{**g, "params": sorted(idx(p) if isinstance(p, str) else p for p in g["params"])} if by_name else g
              for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(
    directory: str | Path,
    *,
    step: int,
    params: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    data_state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
    param_names: Mapping[str, list[str]] | None = None,
) -> Path:
    """Write the state into ``directory`` atomically (a temp sibling renamed into place).

    ``param_names``: optimiser name -> its parameters' names in order (the optimiser files are then keyed by
    parameter name, whatever the writer's process count). ``generators``: random states to keep, if any.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(params), str(tmp / "params.safetensors"))
    save_file(_contiguous(ema), str(tmp / "ema.safetensors"))
    opt_meta = {}
    for name, opt in optimizers.items():
        tensors, meta = optimizer_to_files(opt, (param_names or {}).get(name))
        save_file(_contiguous(tensors), str(tmp / f"optim-{name}.safetensors"))
        opt_meta[name] = meta
    save_file(
        {f"rng.{k}": g.get_state() for k, g in (generators or {}).items()} | {"rng.torch_cpu": torch.get_rng_state()},
        str(tmp / "rng.safetensors"),
    )
    state = {
        "step": step,
        "optimizers": opt_meta,
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "data": dict(data_state),
        "extra": dict(extra or {}),
    }
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
    generators: Mapping[str, torch.Generator] | None = None,
    param_names: Mapping[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Restore in place, on any number of processes; returns ``{"step", "data", "extra"}``.

    Every rank reads the same whole state: the (global) data position, the whole optimiser state, which a
    sharded optimiser re-partitions over the ranks it has now (ZeRO-1: ``ZeroRedundancyOptimizer.load_state_dict``
    keeps this rank's tensors; DeepSpeed: ``DeepSpeedGroup.load_state_dict`` its fragments), and the whole EMA.
    ``generators`` named here are restored from the writer's state. A checkpoint of the older per-rank layout
    (``ranks`` in ``state.json``) is refused: its data positions belong to one process count.
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
    if "ranks" in state:
        raise ValueError(f"checkpoint {directory} holds per-rank random states and data positions (written by an "
                         "older anyflow); it can only be resumed by that version with the same number of processes")
    for name, opt in optimizers.items():
        optimizer_from_files(
            opt, load_file(str(directory / f"optim-{name}.safetensors")), state["optimizers"][name],
            (param_names or {}).get(name),
        )
    for name, sch in schedulers.items():
        sch.load_state_dict(state["schedulers"][name])
    rng = load_file(str(directory / "rng.safetensors"))
    for name, g in (generators or {}).items():
        g.set_state(rng[f"rng.{name}"])
    torch.set_rng_state(rng["rng.torch_cpu"])
    return {"step": state["step"], "data": state["data"], "extra": state["extra"]}
