"""Shared plumbing for the stage modules: models, datasets, checkpoint artifacts, resumable training."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anyflow import storage
from anyflow.config import ConfigError, Preset, StageInputError, TrainConfig

MODEL_JSON = "model.json"

TRAINING_SECTIONS = ("teacher", "flowmap", "distill", "finetune")


class NonFiniteWeights(ConfigError):
    """Trained weights hold NaN/inf and were not published: bad input (a setting), which a retry reproduces."""


def cache_dir(preset: Preset) -> Path:
    return Path(preset.model.cache_dir or os.environ.get("ANYFLOW_CACHE_DIR") or Path.home() / ".cache" / "anyflow")


def runtime_device() -> torch.device:
    """This process's device: ``cuda:$LOCAL_RANK`` when CUDA is available (torchrun sets it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype(mixed_precision: str = "auto") -> torch.dtype:
    """The frozen base's dtype: bf16 on CUDA unless mixed precision is off (``"no"``), fp32 on the CPU."""
    if not torch.cuda.is_available() or mixed_precision == "no":
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def load_models(preset: Preset, *, mixed_precision: str = "auto") -> Any:
    """The frozen base bundle (AnyFlow or AnyFlow-FAR transformer converted from Wan, VAE, text encoder),
    on :func:`runtime_device` in :func:`compute_dtype` (the VAE stays fp32)."""
    from anyflow.models.loading import load_base

    far = None
    if preset.variant == "far":
        f = preset.far
        far = {"chunk_partition": f.chunk_partition, "full_chunk_limit": f.full_chunk_limit, "attention": f.attention}
    return load_base(preset.model.base, cache_dir=cache_dir(preset), gate_value=preset.model.gate_value, far=far,
                     dtype=compute_dtype(mixed_precision), device=runtime_device())


def adapter_model(preset: Preset, transformer: torch.nn.Module) -> Any:
    from anyflow.train.adapters import AdapterModel

    m = preset.model
    return AdapterModel(transformer, rank=m.lora_rank, alpha=m.lora_alpha, gradient_checkpointing=m.gradient_checkpointing)


def open_dataset(url: str, tr: TrainConfig, preset: Preset, *, seed_offset: int = 0) -> Any:
    from anyflow.data.shards import DatasetError, LatentDataset

    try:
        return LatentDataset(
            url, batch_size=tr.batch_size, seed=tr.seed + seed_offset, cache_dir=cache_dir(preset),
            # torchrun / accelerate launch set these; one process otherwise
            rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    except (storage.ArtifactError, DatasetError, FileNotFoundError) as exc:
        raise StageInputError(f"dataset input {url}: {exc}") from exc


def require_inputs(stage: str, inputs: Mapping[str, str], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [r for r in required if r not in inputs]
    unknown = [r for r in inputs if r not in required + optional]
    if missing or unknown:
        raise StageInputError(
            f"stage {stage}: "
            + (f"missing input(s) {', '.join(missing)}; " if missing else "")
            + (f"unknown input(s) {', '.join(unknown)}; " if unknown else "")
            + f"expected {', '.join(required)}" + (f" (optional: {', '.join(optional)})" if optional else "")
        )


# ------------------------------------------------------------------------------ checkpoint artifacts


def write_checkpoint(
    out_dir: Path, preset: Preset, adapters: Mapping[str, tuple[str, Mapping[str, torch.Tensor]]], *, kind: str
) -> None:
    """Write trainable weights only (LoRA adapters); the base model is referenced, never copied."""
    (out_dir / "adapters").mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, (role, tensors) in adapters.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out_dir / "adapters" / f"{name}.safetensors"))
        entries[name] = {"role": role, "file": f"adapters/{name}.safetensors"}
    meta = {
        "kind": kind,
        "variant": preset.variant,
        "base": preset.model.base,
        "lora": {"rank": preset.model.lora_rank, "alpha": preset.model.lora_alpha},
        "adapters": entries,
    }
    from anyflow.models.tiny import builtin_assets_digest

    assets = builtin_assets_digest(preset.model.base)
    if assets is not None:  # a built-in base is a name, not files: record which shipped weights it was
        meta["base_assets"] = assets
    (out_dir / MODEL_JSON).write_text(json.dumps(meta, indent=1))


@dataclass
class Checkpoint:
    url: str
    meta: dict[str, Any]
    adapters: dict[str, dict[str, torch.Tensor]]
    log_path: Path | None


def read_checkpoint(url: str, preset: Preset, *, role: str, need: tuple[str, ...], log: bool = False) -> Checkpoint:
    """Fetch and validate a checkpoint artifact; clear errors for the wrong kind or architecture.

    Only the files read are fetched from a remote store: ``model.json``, the adapters named in ``need`` and, with
    ``log``, ``log.jsonl`` (``log_path``; None without ``log`` or when the artifact has none) -- never the other
    adapters (a distill artifact's critic), the config or the log a caller does not read."""
    def fetch(files: Any) -> Path:
        try:
            return storage.fetch(url, cache_dir=cache_dir(preset), files=files)
        except storage.ArtifactError as exc:
            try:
                listed = storage.read_manifest(url)["files"]
            except storage.ArtifactError:
                listed = {MODEL_JSON: None}
            if MODEL_JSON not in listed:  # e.g. a dataset given as a checkpoint
                raise StageInputError(f"{role} input {url} is an artifact but not a model checkpoint (no {MODEL_JSON}); "
                                      f"pass a train_teacher/train_flowmap/distill/finetune output.") from None
            raise StageInputError(f"{role} input: {exc}") from exc

    def first(listed: Mapping[str, dict]) -> list[str]:
        """model.json and, if listed, the files write_checkpoint names for ``need`` (one manifest read in all
        when model.json names them, as it always does unless written by hand)."""
        usual = [f"adapters/{name}.safetensors" for name in need] + (["log.jsonl"] if log else [])
        return [MODEL_JSON, *(f for f in usual if f in listed)]

    local = fetch(first)
    listed = storage.read_manifest(local)["files"]  # the fetched copy
    try:  # files of a fetched artifact are opened through its manifest (storage.listed_file), never by bare path
        meta = json.loads(storage.listed_file(local, MODEL_JSON).read_text())
    except storage.ArtifactError as exc:
        raise StageInputError(f"{role} input {url} is an artifact but not a model checkpoint ({exc})") from exc
    hint = _preset_hint(local, preset)
    if meta.get("base") != preset.model.base:
        raise StageInputError(
            f"{role} input {url} was trained on base {meta.get('base')!r}, but the preset uses"
            f" {preset.model.base!r}; use the same preset (model.base) for every stage{hint}"
        )
    _check_base_assets(url, role, meta)
    lora_meta = {"rank": preset.model.lora_rank, "alpha": preset.model.lora_alpha}
    if meta.get("lora") != lora_meta:
        raise StageInputError(f"{role} input {url} has LoRA {meta.get('lora')}, the preset expects {lora_meta}{hint}")
    if "generator" in need and meta.get("variant", "bidirectional") != preset.variant:
        raise StageInputError(
            f"{role} input {url} is a {meta.get('variant', 'bidirectional')!r} generator, but preset {preset.name!r} is variant "
            f"{preset.variant!r}; causal (far) and bidirectional generators are different models{hint}"
        )
    for name in need:
        if name not in meta["adapters"]:
            raise StageInputError(
                f"{role} input {url} holds adapters {sorted(meta['adapters'])}, not {name!r} (kind {meta.get('kind')})"
            )
    wanted = [meta["adapters"][name]["file"] for name in need] + (["log.jsonl"] if log and "log.jsonl" in listed else [])
    # a local artifact was verified whole, in place, by the first fetch; a remote one may need files model.json
    # names elsewhere (listed_file below refuses an unlisted name, saying why)
    missing = [f for f in wanted if f in listed and not (local / f).is_file()]
    if storage.is_remote(url) and missing:
        local = fetch(missing)
    adapters = {}
    for name in need:
        try:
            adapters[name] = load_file(str(storage.listed_file(local, meta["adapters"][name]["file"])))
        except storage.ArtifactError as exc:
            raise StageInputError(f"{role} input {url}: adapter {name!r}: {exc}") from exc
        except Exception as exc:  # safetensors refuses the bytes (e.g. a pickle named .safetensors)
            raise StageInputError(f"{role} input {url}: adapter file {meta['adapters'][name]['file']!r} is not a "
                                  f"readable safetensors file ({type(exc).__name__}: {exc})") from None
    log_path: Path | None = None
    if log:
        try:
            log_path = storage.listed_file(local, "log.jsonl")
        except storage.ArtifactError:
            log_path = None
    return Checkpoint(url, meta, adapters, log_path)


def _check_base_assets(url: str, role: str, meta: Mapping[str, Any]) -> None:
    """A checkpoint of a built-in base (``builtin:demo``) names the base by that string only; its ``base_assets``
    (the sha256 of the shipped weights it was trained on, :func:`anyflow.models.tiny.builtin_assets_digest`) must
    be this installation's, or its adapters would be applied (sampled, exported, trained on) to other weights
    without a word. Checkpoints written before the field existed carry none and are not checked."""
    recorded = meta.get("base_assets")
    if recorded is None:
        return
    from anyflow.models.tiny import builtin_assets_digest

    installed = builtin_assets_digest(str(meta.get("base")))
    if installed != recorded:
        raise StageInputError(
            f"{role} input {url} was trained on {meta.get('base')!r} with shipped weights sha256 {str(recorded)[:16]}…, "
            f"but this anyflow installation ships {'none' if installed is None else installed[:16] + '…'}; its adapters "
            "only fit the weights they were trained on: use the anyflow version that trained it (the manifest's "
            "code_version)"
        )


def _preset_hint(local: Any, preset: Preset) -> str:
    """``: pass --preset far-tiny (the preset it was trained with)`` from the artifact's own record of its
    preset (the manifest's ``extra.preset``); empty when it names none or the same one."""
    try:
        trained = storage.read_manifest(local).get("extra", {}).get("preset")
    except storage.ArtifactError:
        return ""
    if not isinstance(trained, str) or not trained or trained == preset.name:
        return ""
    return f": pass --preset {trained} (the preset it was trained with)"


def trained_config(url: str, *, checkpoint: bool = False) -> Preset:
    """The resolved config a checkpoint artifact was trained with (its ``config.json``, read through its manifest),
    for commands that take a checkpoint without ``--preset`` (``anyflow sample``). One sentence naming the artifact
    when it holds none this code can read.

    ``checkpoint=True`` (``anyflow export``, which has no ``--preset``): every file is re-hashed first
    (``storage.verify``), the artifact must be a model checkpoint (list ``model.json``), and the errors name the
    checkpoint without a ``--preset`` hint."""
    from anyflow.config import from_dict

    try:  # not an artifact at all (missing, corrupt): say that, without a --preset hint that cannot help
        if checkpoint:
            storage.verify(url)
        manifest = storage.read_manifest(url)
    except (storage.ArtifactError, FileNotFoundError) as exc:
        raise StageInputError(f"checkpoint {url} is refused: {exc}" if checkpoint else str(exc)) from None
    if checkpoint and MODEL_JSON not in manifest.get("files", {}):
        raise StageInputError(
            f"checkpoint {url} is a {manifest.get('kind')!r} artifact, not a model checkpoint "
            "(no model.json); export a train_flowmap, distill or finetune output.")
    try:  # on S3 a file lives under its publisher's object name, not at url/config.json (storage.file_url)
        doc = json.loads(storage.read_bytes(storage.file_url(url, "config.json", manifest=manifest)))
        if checkpoint:
            return from_dict(doc)
    except (storage.ArtifactError, OSError, ValueError, ConfigError) as exc:
        if checkpoint:
            raise StageInputError(f"checkpoint {url}: its config.json is not a preset this version reads ({exc}).") \
                from None
        raise StageInputError(f"{url}: no readable config.json to take the preset from ({exc}); pass --preset") from None
    if not isinstance(doc, dict) or not doc:
        raise StageInputError(f"{url}: its config.json names no preset; pass --preset (e.g. --preset tiny)")
    try:
        return from_dict(doc)
    except ConfigError as exc:
        hint = manifest.get("extra", {}).get("preset") or "PRESET"
        raise StageInputError(f"{url}: its config.json does not fit this version of anyflow ({exc}); pass "
                              f"--preset {hint}") from None


# ------------------------------------------------------------------------------ training stages


def training_section(cfg: Preset, tr: TrainConfig) -> str:
    """The preset section (``teacher``, ``flowmap``, ``distill``, ``finetune``) whose ``train`` is ``tr``."""
    return next((s for s in TRAINING_SECTIONS if getattr(cfg, s).train is tr), "<stage>")


def training_setup(cfg: Preset, dataset_url: str, tr: TrainConfig) -> tuple[Any, Any]:
    """The dataset loader and one frozen base with room for named adapters."""
    if tr.mixed_precision == "fp16" and runtime_device().type != "cuda":
        raise ConfigError(f"{training_section(cfg, tr)}.train.mixed_precision='fp16' needs a CUDA GPU and this "
                          "process has none; use 'auto' (bf16 on CUDA, fp32 on the CPU) or 'no'")
    data = open_dataset(dataset_url, tr, cfg)
    return data, adapter_model(cfg, load_models(cfg, mixed_precision=tr.mixed_precision).transformer)


def flowmap_method(cfg: Preset, models: Any, stage: Any, negative: torch.Tensor, *,
                   init: Mapping[str, torch.Tensor] | None = None, name: str = "train_flowmap") -> Any:
    """The forward flow-map method of the preset's variant (bidirectional §6, causal §8.4)."""
    if cfg.variant == "far":
        from anyflow.train.causal_methods import CausalFlowMapMethod

        return CausalFlowMapMethod(models, stage, cfg.far, negative, init=init, name=name,
                                   bidirectional=name == "train_flowmap")  # §8.4: stage 1b only
    from anyflow.train.methods import FlowMapMethod

    return FlowMapMethod(models, stage, negative, init=init, name=name)


def onpolicy_method(cfg: Preset, models: Any, stage: Any, negative: torch.Tensor, **adapters: Any) -> Any:
    """The on-policy method of the preset's variant (bidirectional §7, causal §8.6); ``adapters`` are the
    ``teacher``, ``generator`` and optional ``critic`` initial tensors."""
    if cfg.variant == "far":
        from anyflow.train.causal_methods import CausalOnPolicyMethod

        return CausalOnPolicyMethod(models, stage, cfg.far, negative, **adapters)
    from anyflow.train.methods import OnPolicyMethod

    return OnPolicyMethod(models, stage, negative, **adapters)


def train_and_export(
    cfg: Preset, tr: TrainConfig, data: Any, models: Any, method: Any, *, out_dir: Path, ckpt_url: str | None,
    progress: bool, kind: str, ema_adapter: str, export: Mapping[str, str],
) -> dict:
    """Train (resumably), put the EMA into ``ema_adapter``, write adapters ``export`` ({name: role})."""
    result = train_resumable(method, tr, data, out_dir=out_dir, ckpt_url=ckpt_url, progress=progress)
    trained_finite = all(bool(torch.isfinite(p).all()) for p in models.params(ema_adapter).values())
    models.load_params(ema_adapter, result.ema)
    states = {name: models.state(name) for name in export}
    refuse_non_finite(cfg, tr, method, states, steps=result.steps, ema=ema_adapter if trained_finite else None)
    write_checkpoint(out_dir, cfg, {name: (role, states[name]) for name, role in export.items()}, kind=kind)
    trained = result.steps - result.resumed_from  # the steps this attempt ran (a resumed run starts later)
    # processes and the global sample cursor: what the run trained on, now that its checkpoints are deleted
    return {"steps": result.steps, "processes": int(os.environ.get("WORLD_SIZE", "1") or 1),
            "samples": int(data.state_dict().get("sample_cursor", 0)),
            **{k: v for k, v in result.last_metrics.items() if "loss" in k},
            "train_seconds": round(result.seconds, 3),
            "steps_per_s": round(trained / result.seconds, 4) if result.seconds > 0 and trained > 0 else 0.0}


def refuse_non_finite(cfg: Preset, tr: TrainConfig, method: Any, states: Mapping[str, Mapping[str, torch.Tensor]],
                      *, steps: int, ema: str | None = None) -> None:
    """:class:`NonFiniteWeights` naming the first exported tensor holding NaN/inf and the setting likely at fault,
    so that no stage publishes weights nothing downstream can use. ``ema``: the adapter whose trained weights
    were finite before its EMA replaced them (then the EMA is at fault, else the adapter's learning rate)."""
    for adapter, tensors in states.items():
        for key, t in tensors.items():
            bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
            if not bad:
                continue
            section = training_section(cfg, tr)
            oc = method.optim_groups().get(adapter, (None, None))[1]
            stage = getattr(cfg, section, None)
            field = next((f for f in ("optim", "generator_optim", "critic_optim") if getattr(stage, f, None) is oc), None)
            if adapter == ema:
                cause = (f"the trained weights were finite, so the EMA is at fault: check "
                         f"{section}.train.ema_decay={tr.ema_decay:g}")
            elif field:
                cause = f"the optimiser's updates overflowed: lower {section}.{field}.lr={oc.lr:g}"
            else:
                cause = "the adapter came from an input checkpoint that is likely already non-finite"
            raise NonFiniteWeights(
                f"{section}: refusing to publish adapter {adapter!r}: tensor {key!r} has {bad} of {t.numel()} values "
                f"NaN or infinite after {steps} steps; {cause}"
            )


# ------------------------------------------------------------------------------ resumable training


def _step_dirs(ckpt_url: str) -> list[tuple[int, str]]:
    """``[(step, url)]`` of the ``step-XXXXXXXX`` checkpoint folders under ``ckpt_url``, newest first."""
    steps = {}
    for url in storage.list_prefix(ckpt_url) if storage.exists(ckpt_url) else []:
        rel = url[len(ckpt_url.rstrip("/")) + 1 :]
        head = rel.split("/", 1)[0]
        if head.startswith("step-") and head[5:].isdigit():
            steps[int(head[5:])] = storage.join(ckpt_url, head)
    return sorted(steps.items(), reverse=True)


def _remove_checkpoint(url: str) -> None:
    """Delete a pruned ``step-*`` checkpoint: its files, and on a local store the folder itself (an emptied
    folder would otherwise stay behind for every checkpoint ever pruned)."""
    storage.delete(storage.list_prefix(url))
    if not storage.is_remote(url):
        shutil.rmtree(storage.local_path(url), ignore_errors=True)


def _work_root(stage: str) -> Path:
    """The stage's own work folder: ``$ANYFLOW_WORK_DIR/<stage>``, else ``<temp dir>/anyflow-work-<uid>/<stage>``
    (the temp dir honours ``$TMPDIR``). The per-user folder must be a real folder owned by this user (0700); a
    shared or planted one is not used (a fresh temporary folder is, as before)."""
    explicit = os.environ.get("ANYFLOW_WORK_DIR", "").strip()
    top = Path(explicit) if explicit else Path(tempfile.gettempdir()) / f"anyflow-work-{os.getuid()}"
    try:
        top.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = top.lstat()
        if not explicit and (not top.is_dir() or top.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077):
            raise PermissionError(f"{top} is not a private folder of this user")
        root = top / stage
        root.mkdir(exist_ok=True)
        return root
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"anyflow-work-{stage}-"))


@contextlib.contextmanager
def _run_folder(stage: str) -> Iterator[Path]:
    """A private folder for one training run's state (checkpoint copies, the resume download) under the stage's
    own work folder, locked while the run lives and removed at its end; folders of runs killed before they
    could remove theirs are removed when the next run of the stage starts."""
    from anyflow._storage_io import private_dir  # the same locked-folder protocol as the publish staging

    with private_dir(_work_root(stage), "run-") as work:
        yield work


def train_resumable(
    method: Any,
    tr: TrainConfig,
    batches: Any,
    *,
    out_dir: Path,
    ckpt_url: str | None,
    progress: bool,
    final_checkpoint: bool = False,
) -> Any:
    """Run the loop with preemption-safe checkpoints under ``ckpt_url`` (deterministic per stage inputs).

    Each save is published to a new ``step-XXXXXXXX`` folder (manifest last) and older folders are
    deleted only after it is complete, so a kill during an upload leaves the previous checkpoint valid.
    A rerun resumes from the newest folder whose manifest verifies. No checkpoint is written after the final
    step (the stage publishes its artifact instead; ``final_checkpoint=True`` writes one, as a run preempted
    right after its last step would leave: the multi-process resume tests stop a run that way), and
    :func:`anyflow.stages.run_stage` deletes the stage's checkpoints once the artifact is published. The local copies (the newest state, the
    resume download) live in a locked run folder under the stage's own work folder (:func:`_run_folder`), so a
    killed run's copy is removed by the next run instead of filling the temp dir.
    """
    with _run_folder(getattr(method, "name", "train")) as work:
        return _train_in(method, tr, batches, work=work, out_dir=out_dir, ckpt_url=ckpt_url, progress=progress,
                         final_checkpoint=final_checkpoint)


def _train_in(method: Any, tr: TrainConfig, batches: Any, *, work: Path, out_dir: Path, ckpt_url: str | None,
              progress: bool, final_checkpoint: bool = False) -> Any:
    from anyflow.train.loop import fit

    resume, resume_url = None, None
    for _, url in _step_dirs(ckpt_url) if ckpt_url else []:
        try:
            resume, resume_url = storage.fetch(url, cache_dir=work / "resume"), url
            break
        except storage.ArtifactError:
            continue  # torn by a kill mid-upload: fall back to the previous one
    sync: Callable[[Path, int], str] | None = None
    if ckpt_url:
        def sync(path: Path, step: int) -> str:
            url = storage.join(ckpt_url, f"step-{step:08d}")
            storage.publish(path, url, kind="train-state", extra={"step": step})
            stale = [u for s, u in _step_dirs(ckpt_url) if s != step]
            for old in stale:
                _remove_checkpoint(old)
            return url
    result = fit(method, tr, batches, work_dir=work, checkpoint_sync=sync, resume_from=resume,
                 resume_label=resume_url, progress=progress, final_checkpoint=final_checkpoint)
    log_src = work / "log.jsonl"
    if log_src.exists():
        shutil.copy(log_src, out_dir / "log.jsonl")
    return result
