"""Export a trained checkpoint to what the rest of the ecosystem loads (``anyflow export``).

Two formats, both published as one artifact (a manifest naming the checkpoint as its parent):

* ``diffusers``: a complete diffusers pipeline folder — ``model_index.json``, ``transformer/`` (the
  checkpoint's generator LoRA merged into the converted base, ``W + (α/r)·B·A``, docs/method.md §2.3; a causal
  generator's own compressed patch embedding swapped in, §8.1), ``vae/``, ``text_encoder/``, ``tokenizer/`` and
  ``scheduler/`` (``FlowMapEulerDiscreteScheduler`` with the shift the checkpoint was trained with, §1.2, §2.4).
  ``diffusers.AnyFlowPipeline.from_pretrained`` (bidirectional) or ``AnyFlowFARPipeline.from_pretrained``
  (causal) loads it without anyflow.
* ``lora``: the generator adapter alone, ``pytorch_lora_weights.safetensors`` in diffusers' PEFT LoRA naming
  (``transformer.<module>.lora_A.weight`` / ``lora_B``, rank and alpha in the file's metadata), loadable with
  ``pipe.load_lora_weights(DIR)``; beside it ``base/``, the converted base as a diffusers folder (plain Wan has no
  delta embedder, so the LoRA needs this AnyFlow base; with ``base_output`` it is published there once and only
  named by later exports of the same base, see :func:`base_key`), and for a causal generator
  ``non_lora.safetensors``: the tensors it trains in full (``far_patch_embedding.*``), which LoRA cannot express;
  load them with ``pipe.transformer.load_state_dict(load_file(...), strict=False)``.

Either way the artifact's ``config.json`` says how to sample it (shift, ``guidance_scale=1`` because CFG is
fused into the flow map (§2.4), the prompt length ``max_sequence_length``, the chunk partition of a causal model).
The checkpoint's manifest is verified (every file re-hashed) before any work; its ``config.json`` (the preset
it was trained with) says which base, variant and shift to use, so no preset is needed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("diffusers", "lora")
DTYPES = ("float32", "bfloat16")
KIND = "export"
BASE_KIND = "export-base"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
NON_LORA_FILE = "non_lora.safetensors"
BASE_DIR = "base"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` published: the artifact URL, its format and the sampling settings it records."""

    uri: str
    format: str
    info: dict[str, Any]


def _bad(message: str) -> Exception:
    from anyflow.config import StageInputError

    return StageInputError(message)


def check_request(checkpoint: str, fmt: str, output: str, dtype: str = "float32") -> None:
    """Refuse a bad request with one sentence naming the value (``StageInputError``: exit 2), before any work."""
    from anyflow import storage
    from anyflow.urls import LocationError, check_url

    if fmt not in FORMATS:
        raise _bad(f"export format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise _bad(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    for what, url in (("checkpoint", checkpoint), ("export output", output)):
        try:
            check_url(url, what)
        except LocationError as exc:
            raise _bad(str(exc)) from None
    if storage.is_remote(checkpoint) == storage.is_remote(output) and (
        str(checkpoint).rstrip("/") == str(output).rstrip("/")
        or (not storage.is_remote(output) and Path(checkpoint).resolve() == Path(output).resolve())
    ):
        raise _bad(f"export output {output} is the checkpoint itself; give another folder or s3:// prefix.")


def checkpoint_preset(checkpoint: str) -> Any:
    """Verify ``checkpoint``'s manifest (every file re-hashed) and return the preset it was trained with
    (``anyflow.stages.common.trained_config(checkpoint, checkpoint=True)``, shared with ``anyflow sample``).

    A missing, corrupted or non-checkpoint artifact is a ``StageInputError`` naming the URL (exit 2).
    """
    from anyflow.stages.common import trained_config

    return trained_config(checkpoint, checkpoint=True)


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _pipeline(cfg: Any, base: Any, transformer: Any) -> Any:
    """The diffusers pipeline object (AnyFlowPipeline or AnyFlowFARPipeline) around ``transformer``, with the
    checkpoint's FlowMap-Euler scheduler (shift of docs/method.md §1.2)."""
    from diffusers import AnyFlowFARPipeline, AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    cls = AnyFlowFARPipeline if cfg.variant == "far" else AnyFlowPipeline
    return cls(
        tokenizer=base.text.tokenizer,
        text_encoder=base.text.model,
        transformer=transformer,
        vae=base.vae.vae,
        scheduler=FlowMapEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=float(cfg.flowmap.loss.shift)
        ),
    )


def _save(pipe: Any, folder: Path) -> None:
    """``save_pretrained`` (safetensors) of a pipeline, without anyflow's attention processors in the files."""
    pipe.save_pretrained(folder, safe_serialization=True)


def sampling_info(cfg: Any, base: Any, fmt: str, checkpoint: str, dtype: str) -> dict[str, Any]:
    """What the export's ``config.json`` records: how to call the pipeline so that it samples what anyflow does."""
    far = cfg.variant == "far"
    info: dict[str, Any] = {
        "format": fmt,
        "source": str(checkpoint),
        "preset": cfg.name,
        "variant": cfg.variant,
        "base": cfg.model.base,
        "dtype": dtype,
        "pipeline": "AnyFlowFARPipeline" if far else "AnyFlowPipeline",
        "shift": float(cfg.flowmap.loss.shift),
        "guidance_scale": 1.0,  # CFG is fused into the distilled flow map (docs/method.md §2.4)
        "max_sequence_length": int(base.text.max_length),
        "num_frames": int(cfg.data.frames),
        "height": int(cfg.data.height),
        "width": int(cfg.data.width),
        "lora": {"rank": int(cfg.model.lora_rank), "alpha": float(cfg.model.lora_alpha)},
    }
    if far:
        info["chunk_partition"] = [int(n) for n in cfg.far.chunk_partition]
    if fmt == "lora":
        info["lora_file"] = LORA_FILE
        info["base_folder"] = BASE_DIR
        if far:
            info["non_lora_file"] = NON_LORA_FILE
    return info


def export(
    checkpoint: str,
    *,
    fmt: str,
    output: str,
    dtype: str = "float32",
    adapter: str = "generator",
    base_output: str | None = None,
    progress: bool = True,
) -> ExportResult:
    """Export ``checkpoint``'s generator to ``output`` in ``fmt`` (``diffusers`` or ``lora``); see the module doc.

    The checkpoint is verified first; the base is loaded on the CPU in ``dtype`` (the VAE stays fp32). The
    artifact is published with ``storage.publish`` (kind ``export``, parent: the checkpoint).

    ``base_output`` (``lora`` only): publish the converted base there (kind ``export-base``) instead of into
    ``output/base/``, and only if no base with the same :func:`base_key` is there already (then it is named, not
    rewritten); the LoRA export's ``config.json`` names it as ``base_url`` and its manifest lists it as a parent.
    """
    from safetensors.torch import save_file

    from anyflow import storage
    from anyflow.models import lora
    from anyflow.models.loading import load_base
    from anyflow.stages import common

    check_request(checkpoint, fmt, output, dtype)
    cfg = checkpoint_preset(checkpoint)
    ck = common.read_checkpoint(checkpoint, cfg, role="checkpoint", need=(adapter,))
    role = ck.meta["adapters"][adapter]["role"]
    if role != "generator":
        raise _bad(
            f"checkpoint {checkpoint}: adapter {adapter!r} is a {role}, not a flow-map generator; export a "
            "train_flowmap, distill or finetune output."
        )
    far = cfg.variant == "far"
    far_spec = None
    if far:
        f = cfg.far
        far_spec = {
            "chunk_partition": f.chunk_partition,
            "full_chunk_limit": f.full_chunk_limit,
            "attention": "dense",
        }
    if progress:
        print(f"export: loading base {cfg.model.base} ({cfg.variant})", flush=True)
    base = load_base(
        cfg.model.base,
        cache_dir=common.cache_dir(cfg),
        gate_value=cfg.model.gate_value,
        far=far_spec,
        dtype=_torch_dtype(dtype),
        device="cpu",
    )
    info = sampling_info(cfg, base, fmt, checkpoint, dtype)
    staging = Path(tempfile.mkdtemp(prefix="anyflow-export-"))
    try:
        if fmt == "diffusers":
            models = common.adapter_model(cfg, base.transformer)
            models.add(
                adapter,
                role,
                init=ck.adapters[adapter],
                trainable=False,
                extra=("far_patch_embedding",) if far else (),
            )
            models.activate(adapter)  # swaps a causal generator's own patch embedding into the base module
            merged = lora.merge_adapter(models.transformer, adapter)  # docs/method.md §2.3: W + (α/r)·B·A
            _save(_pipeline(cfg, base, merged), staging)
            del merged
        else:
            # The adapter tensors straight from the checkpoint (keys without the adapter name).
            state = ck.adapters[adapter]
            lora_t = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
            rest = {k: v for k, v in state.items() if k not in lora_t}
            targets = sorted({k.rsplit(".lora_", 1)[0] for k in lora_t})
            meta = {
                "r": int(cfg.model.lora_rank),
                "lora_alpha": float(cfg.model.lora_alpha),
                "target_modules": targets,
                "lora_dropout": 0.0,
                "bias": "none",
            }
            cls = type(_pipeline(cfg, base, base.transformer))
            cls.save_lora_weights(
                staging,
                transformer_lora_layers={k: v.contiguous() for k, v in lora_t.items()},
                transformer_lora_adapter_metadata=meta,
                weight_name=LORA_FILE,
                safe_serialization=True,
            )
            if rest:
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in rest.items()}, str(staging / NON_LORA_FILE)
                )
            elif "non_lora_file" in info:
                del info["non_lora_file"]
            if base_output is None:
                _save(_pipeline(cfg, base, base.transformer), staging / BASE_DIR)
            else:
                key = base_key(cfg, dtype)
                info.pop("base_folder", None)
                info["base_url"] = str(base_output)
                if _reusable_base(base_output, key):
                    if progress:
                        print(f"export: the converted base is already at {base_output}", flush=True)
                else:
                    base_staging = staging.parent / (staging.name + "-base")
                    try:
                        _save(_pipeline(cfg, base, base.transformer), base_staging)
                        base_info = {k: v for k, v in info.items() if k not in ("format", "source", "lora")}
                        base_info.update(format="base", base_key=key)
                        storage.publish(
                            base_staging,
                            base_output,
                            kind=BASE_KIND,
                            config=base_info,
                            extra={"base_key": key},
                        )
                    finally:
                        shutil.rmtree(base_staging, ignore_errors=True)
        if progress:
            print(f"export: publishing {fmt} export to {output}", flush=True)
        storage.publish(
            staging,
            output,
            kind=KIND,
            parents=[checkpoint] + ([str(base_output)] if fmt == "lora" and base_output else []),
            config=info,
            extra={"format": fmt, "source": str(checkpoint)},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(str(output), fmt, info)


def base_key(cfg: Any, dtype: str) -> str:
    """What identifies the converted base of a LoRA export: the base model (for a built-in, also the digest of its
    shipped weights), the conversion settings (gate, FAR layout), the scheduler shift, the dtype and the code version
    (sha256 hex)."""
    import hashlib

    from anyflow.models.tiny import builtin_assets_digest
    from anyflow.storage import code_version

    spec = {
        "base": cfg.model.base,
        "builtin_assets": builtin_assets_digest(cfg.model.base),  # the shipped weights of builtin:demo / tiny
        "variant": cfg.variant,
        "gate_value": float(cfg.model.gate_value),
        "shift": float(cfg.flowmap.loss.shift),
        "dtype": dtype,
        "code": code_version(),
    }
    if cfg.variant == "far":
        spec["far"] = [list(cfg.far.chunk_partition), int(cfg.far.full_chunk_limit)]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _reusable_base(url: str, key: str) -> bool:
    from anyflow import storage

    try:
        manifest = storage.read_manifest(url)
        if manifest.get("kind") != BASE_KIND or manifest.get("extra", {}).get("base_key") != key:
            return False
        storage.verify(url)
        return True
    except (storage.ArtifactError, FileNotFoundError):
        return False


def export_formats(text: str) -> tuple[str, ...]:
    """``"diffusers,lora"`` → ``("diffusers", "lora")``; an unknown or empty list is a ``StageInputError``."""
    names = tuple(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))
    bad = [n for n in names if n not in FORMATS]
    if not names or bad:
        raise _bad(f"export formats {text!r}: give a comma-separated list of {', '.join(FORMATS)}.")
    return names


def export_to_store(
    checkpoint: str,
    *,
    store: str | None,
    formats: str = "diffusers,lora",
    out_dir: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, str]:
    """Export ``checkpoint`` in each of ``formats``; returns ``{format: export URL}`` (the KFP ``export`` step).

    With ``store`` the exports go to ``{store}/exports/{format}/{key}``, ``key`` = the first 20 hex digits of the
    checkpoint's manifest sha256: an export already there whose manifest names this checkpoint (same digest) and
    verifies is reused, not redone. Without ``store`` they go to ``{out_dir}/{format}``. ``dtype="bfloat16"``
    writes ``{format}-bfloat16`` instead of ``{format}``. A LoRA export in a store names the converted base at
    ``{store}/exports/base/{base_key}``, written by the first export that needs it (``export(base_output=…)``).
    """
    from anyflow import storage

    names = export_formats(formats)
    if dtype not in DTYPES:
        raise _bad(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if not store and not out_dir:
        raise _bad("export needs a store URL or an output folder.")
    # verify first: a corrupted checkpoint is refused before anything is written
    checkpoint_preset(checkpoint)
    digest = storage.manifest_digest(checkpoint)
    urls = {}
    for fmt in names:
        sub = fmt if dtype == "float32" else f"{fmt}-{dtype}"
        url = (
            export_url(store, fmt, checkpoint, dtype, digest=digest) if store else storage.join(out_dir, sub)
        )
        if store and _reusable(url, digest):
            if progress:
                print(f"export: reusing {fmt} export {url}", flush=True)
        else:
            base_out = None
            if fmt == "lora" and store:  # one converted base per (base, settings, dtype, code) in the store
                key = base_key(checkpoint_preset(checkpoint), dtype)
                base_out = storage.join(store, "exports", "base", key[:20])
            export(checkpoint, fmt=fmt, output=url, dtype=dtype, base_output=base_out, progress=progress)
        urls[fmt] = url
    return urls


def export_url(
    store: str, fmt: str, checkpoint: str, dtype: str = "float32", *, digest: str | None = None
) -> str:
    """Where :func:`export_to_store` puts ``checkpoint``'s ``fmt`` export in ``store``."""
    from anyflow import storage

    digest = digest or storage.manifest_digest(checkpoint)
    sub = fmt if dtype == "float32" else f"{fmt}-{dtype}"
    return storage.join(store, "exports", sub, digest[:20])


def _reusable(url: str, digest: str) -> bool:
    from anyflow import storage

    try:
        manifest = storage.read_manifest(url)
        parents = [p.get("manifest_sha256") for p in manifest.get("parents", [])]
        if manifest.get("kind") != KIND or parents[:1] != [
            digest
        ]:  # the checkpoint first (a LoRA's base next)
            return False
        storage.verify(url)
        return True
    except (storage.ArtifactError, FileNotFoundError):
        return False
