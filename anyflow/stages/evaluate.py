"""Evaluation: sample every checkpoint at an NFE sweep from the same noise, compare with the teacher,
write metrics and a self-contained ``report.html`` (docs/method.md §9, §11, §15).

Inputs: ``generator`` and ``teacher`` (required); ``flowmap``, ``finetuned`` (optional checkpoints to
compare) and ``dataset`` (held-out latents for non-procedural data). Output: an evaluation artifact
(metrics.json, report.html, per-sample metrics). Reads preset sections: model, data, evaluate,
flowmap.loss (the fused guidance scale the teacher reference uses).

Protocol. Prompts and noise are fixed by ``evaluate.seed`` so every column is comparable. The
reference is the teacher's ``reference_steps``-step Euler ODE solution with CFG (uncond + g·(cond −
uncond), g = the fused guidance scale, i.e. the field the flow map was trained to follow, §6.2). The
teacher itself is also sampled with Euler + CFG at each NFE (2 calls per step) by our own sampler (so
the reference stays independent of the code under test), the flow-map checkpoints with the
FlowMap-Euler sampler through diffusers' ``AnyFlowPipeline`` with the checkpoint's LoRA merged (N calls,
no CFG).

Memory. Each (model, NFE) is sampled, decoded and measured ``evaluate.batch_size`` samples at a time (the VBench
videos too); per-sample quantities are accumulated so the metrics equal the unbatched ones
(tests/test_eval_batching.py). Only latents are kept for every sample: the reference (decoded again per batch)
and, when held-out data gives an energy distance, the row's own.

Causal (FAR) presets: the flow-map checkpoints are sampled chunk by chunk with the KV cache through diffusers'
``AnyFlowFARPipeline`` over the merged generator (N FlowMap-Euler steps per chunk; ``calls`` counts the
transformer's denoising calls + cache passes, §8.5; the pipeline equals :func:`anyflow.causal.causal_rollout`
to 2e-5, tests/test_far_rollout.py) in T2V mode against the same bidirectional teacher reference, and in **I2V** mode
(rows ``<checkpoint>/i2v``): the first latent frame of the held-out clip for each prompt is the context
(chunk 0, not denoised, §8.7); ``context_max_abs`` checks it is kept exactly and ``data_mse`` is the MSE of
the generated continuation to that clip's real frames.

VBench-I2V (docs/method.md §11; FAR presets with ``evaluate.vbench`` and ``evaluate.i2v_suite``): for every
flow-map checkpoint and NFE, each image of the suite's ``evaluate.i2v_ratio`` crop folder is resized (not
cropped) to the preset's size, scaled to [-1, 1] and VAE-encoded as the first latent frame (the context,
kept, §8.7); the causal rollout generates the rest from the pair's ``prompt_en`` (seed ``evaluate.seed`` +
the running sample index), and the videos are written as ``{prompt_en}-{i}.mp4`` and scored by
``vbench2_beta_i2v.VBenchI2V`` (:func:`anyflow.eval.vbench.run_vbench` with ``i2v=``), aggregated with
``kind="i2v"``: entries ``"<checkpoint>/i2v-nfe<N>"`` of the VBench section (docs/evaluation-vbench.md).
The suite is read and validated before any sampling, so a bad layout fails at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anyflow.config import Preset
from anyflow.progress import Progress
from anyflow.rollout import FlowMapFn, flowmap_euler_sample
from anyflow.stages import common

KIND = "evaluation"
INPUTS = ("generator", "teacher")
OPTIONAL = ("flowmap", "finetuned", "dataset")
SECTIONS = ("model", "data", "evaluate", "flowmap", "far")
REPORT = "report.html"
PREVIEW_PROMPTS = 3  # samples (prompts) tiled side by side in each report preview
CHECKPOINT_ROLES = ("flowmap", "generator", "finetuned")


def guided(u: FlowMapFn, c_neg: torch.Tensor, scale: float) -> FlowMapFn:
    """Classifier-free guidance ``u_∅ + scale·(u_c − u_∅)`` with the negative embedding as ∅."""

    def fn(z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        u_c = u(z, t, r, c)
        u_n = u(z, t, r, c_neg.expand(c.shape[0], -1, -1))
        return u_n + scale * (u_c - u_n)

    return fn


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] → (T, H, W, 3) uint8."""
    v = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def _prompts(cfg: Preset, base: Any, inputs: Mapping[str, str]) -> tuple[list[str], list[dict] | None, torch.Tensor | None]:
    """Evaluation prompts, their attributes (procedural) and held-out data latents."""
    ev, d = cfg.evaluate, cfg.data
    if ev.prompts == "procedural":
        from anyflow.data.procedural import make_clip
        from anyflow.data.sources import parse_procedural

        spec = parse_procedural(d.source) if d.source.startswith("procedural") else {"seed": 0}
        seed, simple = spec["seed"], bool(spec.get("simple", 0))  # held-out prompts of the training class set
        clips = [make_clip(seed + 7919, i, frames=d.frames, height=d.height, width=d.width, simple=simple)
                 for i in range(ev.num_prompts)]
        video = torch.stack([torch.from_numpy(c.video).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
        with torch.no_grad():
            heldout = base.vae.encode(video)
        return [c.caption for c in clips], [c.attributes for c in clips], heldout
    from anyflow.eval.vbench import load_prompts

    prompts = load_prompts(ev.prompts, n=ev.num_prompts, seed=ev.seed)[: ev.num_prompts]
    heldout = None
    if "dataset" in inputs:
        from anyflow.data.shards import LatentDataset

        ds = LatentDataset(inputs["dataset"], batch_size=min(16, ev.num_prompts), seed=ev.seed, shuffle=False,
                           cache_dir=common.cache_dir(cfg))
        heldout = next(iter(ds))["latents"]
    return prompts, None, heldout


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True) -> dict:
    from anyflow import storage
    from anyflow.eval import metrics as M
    from anyflow.eval.pipeline import build_pipeline, sample_with_pipeline
    from anyflow.eval.report import build_report
    from anyflow.models import lora
    from anyflow.models.text import WAN_NEGATIVE_PROMPT

    common.require_inputs("evaluate", inputs, INPUTS, OPTIONAL)
    ev = cfg.evaluate
    shift = cfg.flowmap.loss.shift
    far = cfg.variant == "far"
    i2v_suite = None
    if far and ev.vbench and ev.i2v_suite:  # read and validate before the (long) sampling
        from anyflow.eval.vbench import load_i2v_suite

        i2v_suite = load_i2v_suite(ev.i2v_suite, ratio=ev.i2v_ratio, dimensions=ev.i2v_dimensions,
                                   limit=ev.i2v_limit, cache_dir=common.cache_dir(cfg))
    base = common.load_models(cfg)
    models = common.adapter_model(cfg, base.transformer)
    teacher = common.read_checkpoint(inputs["teacher"], cfg, role="teacher", need=("teacher",), log=True)
    models.add("teacher", "teacher", init=teacher.adapters["teacher"], trainable=False)
    losses = {"train_teacher": _log(teacher.log_path)}
    roles = [r for r in CHECKPOINT_ROLES if r in inputs]
    for role in roles:
        ck = common.read_checkpoint(inputs[role], cfg, role=role, need=("generator",), log=True)  # loss curves
        models.add(role, "generator", init=ck.adapters["generator"], trainable=False,
                   extra=("far_patch_embedding",) if far else ())
        losses[role] = _log(ck.log_path)

    prompts, attributes, heldout = _prompts(cfg, base, inputs)
    k = ev.samples_per_prompt
    with torch.no_grad():
        # one embedding per prompt (sample i uses row i // k, prompts are expanded prompt-major below); kept on
        # the CPU and moved to the device one batch at a time
        c_rows = base.text.encode(prompts)
        c_neg = base.text.encode([WAN_NEGATIVE_PROMPT])
    device = c_rows.device
    c_rows = c_rows.cpu()
    prompts = [p for p in prompts for _ in range(k)]
    if attributes is not None:
        attributes = [a for a in attributes for _ in range(k)]
    num = len(prompts)
    prompt_of = torch.arange(num) // k  # sample -> its prompt's embedding row
    shape = base.vae.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
    g = torch.Generator().manual_seed(ev.seed)
    noise = torch.randn((num, *shape), generator=g)  # CPU; a batch's slice goes to the device when sampled
    # Memory: a (model, NFE) is sampled, decoded and measured ``evaluate.batch_size`` samples at a time; only
    # latents (the reference's, and a row's own when the energy distance needs them) are kept for all samples.
    batches = [slice(s, min(s + ev.batch_size, num)) for s in range(0, num, ev.batch_size)]

    def cond(sl: slice) -> torch.Tensor:
        return c_rows[prompt_of[sl]].to(device)

    def z0(sl: slice) -> torch.Tensor:
        return noise[sl].to(device)

    teacher_cfg = guided(models.fn("teacher"), c_neg, cfg.flowmap.loss.guidance_scale)
    # samplers[model](n, sl): the latents of samples ``sl`` (a slice of the fixed noise/prompts) at NFE n
    samplers: dict[str, Any] = {
        "teacher": lambda n, sl: flowmap_euler_sample(teacher_cfg, z0(sl), cond(sl), n, shift=shift,
                                                      use_mean_velocity=False)
    }
    # Flow-map checkpoints are sampled the way users sample released checkpoints: diffusers'
    # AnyFlowPipeline over the generator LoRA merged into a copy of the base (W + (α/r)·B·A, §2.3).
    # tests/test_eval_pipeline.py checks it equals flowmap_euler_sample over the unmerged adapter.
    # One merged copy is alive at a time (the sweep runs model by model).
    merged: dict[str, Any] = {}

    def pipeline_for(role: str) -> Any:
        if role not in merged:
            merged.clear()
            merged[role] = build_pipeline(base, lora.merge_adapter(models.transformer, role), shift=shift)
        return merged[role]

    calls: dict[str, Any] = {"teacher": lambda n: 2 * n}
    measured: dict[tuple, int] = {}
    i2v_clip: list[int] | None = None
    if far:
        from anyflow.causal import FarCausalModel, causal_rollout
        from anyflow.eval.pipeline import build_far_pipeline, sample_with_far_pipeline

        causal = FarCausalModel(models.transformer, cfg.far.chunk_partition)  # the VBench-I2V suite's sampler

        def far_pipeline_for(role: str) -> Any:
            # the generator LoRA and its own patch embedding merged into a copy of the FAR base, one at a time
            if role not in merged:
                merged.clear()
                models.activate(role)
                merged[role] = build_far_pipeline(base, lora.merge_adapter(models.transformer, role), shift=shift)
            return merged[role]

        def far_sample(role: str, n: int, sl: slice, i2v: bool = False) -> torch.Tensor:
            ctx = i2v_context(sl)[:, :1] if i2v else None
            lat, nfe = sample_with_far_pipeline(base, far_pipeline_for(role), cond(sl), z0(sl), n, context=ctx,
                                                shift=shift)
            measured[(role, i2v, n)] = nfe  # denoising calls + cache passes, counted (the same for every batch)
            return lat

        if heldout is not None:
            # prompts are expanded prompt-major (samples_per_prompt copies each): sample i is prompt i // spp
            clip = torch.arange(num) // k % heldout.shape[0]
            i2v_clip = clip.tolist()
        for role in roles:
            samplers[role] = lambda n, sl, role=role: far_sample(role, n, sl)
            calls[role] = lambda n, role=role: measured[(role, False, n)]
            if i2v_clip is not None:
                samplers[f"{role}/i2v"] = lambda n, sl, role=role: far_sample(role, n, sl, i2v=True)
                calls[f"{role}/i2v"] = lambda n, role=role: measured[(role, True, n)]
    else:
        for role in roles:
            samplers[role] = lambda n, sl, role=role: sample_with_pipeline(base, pipeline_for(role), cond(sl), z0(sl),
                                                                           n, shift=shift)
            calls[role] = lambda n: n

    def i2v_context(sl: slice) -> torch.Tensor:
        """The held-out clips of samples ``sl`` (their first latent frame is the I2V context)."""
        return heldout[clip[sl]].to(device)

    def decode(lat: torch.Tensor) -> torch.Tensor:
        return base.vae.decode(lat).float().cpu()  # frame metrics, previews and VBench run on the CPU

    todo = [(m, n) for m in samplers for n in ev.nfes]
    # progress: sweeps done of all (model, NFE); the ETA weighs each sample by its network calls (+1 decode)
    bar = Progress("evaluate", len(todo), unit="sweep", enabled=progress,
                   total_work=num * (2 * ev.reference_steps + sum(_cost(m, n) for m, n in todo)))
    with torch.no_grad():
        # the reference latents (small) for every sample; decoded again one batch at a time where needed
        ref_parts = []
        for i, sl in enumerate(batches, 1):
            ref_parts.append(flowmap_euler_sample(teacher_cfg, z0(sl), cond(sl), ev.reference_steps, shift=shift,
                                                  use_mean_velocity=False).cpu())
            bar.update(0, detail=f"reference {ev.reference_steps} steps" + _of(i, batches),
                       work=(sl.stop - sl.start) * 2 * ev.reference_steps)
        ref = torch.cat(ref_parts)
        ref_videos: dict[int, torch.Tensor] = {}  # cached only when a single batch holds every sample

        def ref_video(sl: slice) -> torch.Tensor:
            if sl.start in ref_videos:
                return ref_videos[sl.start]
            video = decode(ref[sl].to(device))
            if len(batches) == 1:
                ref_videos[sl.start] = video
            return video

        table: dict[str, dict[int, dict[str, float]]] = {}
        samples: dict[str, dict[int, Any]] = {}
        per_sample: dict[str, Any] = {}
        for model, n in todo:
            i2v = model.endswith("/i2v")
            mse: list[float] = []  # per-sample coupled (or data) MSE
            flicker: list[float] = []
            psnr_sum = ssim_sum = 0.0  # batch means weighted by the batch's samples (equal frames per sample)
            context_max_abs = 0.0
            colour_ok = motion_ok = 0
            lats: list[torch.Tensor] = []
            for i, sl in enumerate(batches, 1):
                lat = samplers[model](n, sl)
                video = decode(lat)
                frames = [_to_uint8(v) for v in video]
                b = len(frames)
                if i2v:
                    ctx = i2v_context(sl).to(lat.device)
                    mse += M.coupled_error(lat[:, 1:], ctx[:, 1:])["mse_per_sample"]
                    context_max_abs = max(context_max_abs, float((lat[:, :1] - ctx[:, :1]).abs().max()))
                else:
                    mse += M.coupled_error(lat, ref[sl].to(lat.device))["mse_per_sample"]
                    rv = ref_video(sl)
                    psnr_sum += M.psnr(video, rv) * b
                    ssim_sum += M.ssim(video, rv) * b
                flicker += [M.temporal_flicker(f) for f in frames]
                if heldout is not None:
                    lats.append(lat.cpu())
                if attributes is not None:
                    adh = M.prompt_adherence(frames, attributes[sl])
                    colour_ok += sum(p["colour_ok"] for p in adh["per_video"])
                    motion_ok += sum(p["motion_ok"] for p in adh["per_video"])
                if sl.start == 0:  # the first PREVIEW_PROMPTS samples, tiled left to right in the report
                    samples.setdefault(model, {})[n] = frames[:PREVIEW_PROMPTS]
                del video, frames
                bar.update(0, detail=f"{model} NFE {n}" + _of(i, batches), work=b * _cost(model, n))
            mean_mse = float(torch.tensor(mse, dtype=torch.float64).mean())
            if i2v:
                row = {"data_mse": mean_mse, "context_max_abs": context_max_abs}
            else:
                row = {"coupled_mse": mean_mse, "psnr": psnr_sum / num, "ssim": ssim_sum / num}
            row["flicker"] = float(np.mean(flicker))
            row["calls"] = float(calls[model](n))
            if heldout is not None:
                row["energy_distance"] = M.energy_distance(torch.cat(lats).flatten(1), heldout.flatten(1).cpu())
            if attributes is not None:
                row["adherence_colour"] = colour_ok / num
                row["adherence_motion"] = motion_ok / num
            table.setdefault(model, {})[n] = row
            per_sample[f"{model}/nfe{n}"] = mse
            bar.update(1, detail=f"{model} NFE {n}")
        bar.close()
        ref_videos.clear()

    vbench = _vbench(cfg, out_dir, samplers, decode, prompts)
    merged.clear()  # the sweep is done: release the merged copy (VBench-I2V samples the unmerged adapters)
    if i2v_suite is not None:
        def i2v_rollout(role: str, n: int, z: torch.Tensor, c_b: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            models.activate(role)
            return causal_rollout(causal, z, c_b, num_steps=n, context=ctx, shift=shift)[0]

        vbench.update(_vbench_i2v(cfg, out_dir, i2v_suite, roles, i2v_rollout, base, decode))
    metrics_doc = {"metrics": table, "per_sample_coupled_mse": per_sample, "prompts": prompts,
                   "reference": {"sampler": "teacher euler+cfg", "steps": ev.reference_steps,
                                 "guidance_scale": cfg.flowmap.loss.guidance_scale},
                   "vbench": vbench}
    if i2v_clip is not None:  # which held-out clip's first frame conditioned each I2V sample
        metrics_doc["i2v_heldout_clip"] = i2v_clip
    (out_dir / "metrics.json").write_text(json.dumps(metrics_doc, indent=1))
    lineage = storage.lineage(inputs["generator"])
    build_report(
        {
            "title": f"AnyFlow evaluation — preset {cfg.name}",
            "summary": {"prompts": len(prompts), "nfes": list(ev.nfes), "reference_steps": ev.reference_steps,
                        "checkpoints": {r: inputs[r] for r in ("teacher", *roles)}},
            "metrics": table,
            "samples": samples,
            # every preview tiles samples 0 .. k-1 (the first batch's first rows), the same prompts in every cell
            "sample_prompts": list(prompts[: min(PREVIEW_PROMPTS, ev.batch_size, len(prompts))]),
            "losses": losses,
            "lineage": lineage,
            "vbench": vbench,
            "notes": [
                "coupled_mse: latent MSE to the teacher's many-step Euler+CFG sample from the same noise (lower is better).",
                "teacher rows use Euler with CFG: 2 network calls per step; flow-map rows use N calls"
                + (" per chunk plus the KV-cache passes (causal FAR sampling, §8.5)." if far else "."),
                *(
                    ["*/i2v rows: image-to-video from the held-out clip's first latent frame; data_mse is the MSE of"
                     " the generated continuation to the clip's real frames, context_max_abs must be 0."]
                    if far and i2v_clip is not None else []
                ),
                *(
                    ["*/i2v-nfeN VBench entries: VBench-I2V on the suite's images (evaluate.i2v_suite, crop "
                     f"{ev.i2v_ratio}), each image VAE-encoded as the kept first latent frame; scored by "
                     "vbench2_beta_i2v, aggregated as Total = 0.5·I2V + 0.5·Quality (docs/method.md §11)."]
                    if i2v_suite is not None else []
                ),
                *(
                    ["builtin:tiny decodes with a small VAE trained on procedural clips (scripts/train_tiny_vae.py),"
                     " but its 40k-parameter transformer is trained for a few dozen steps from a random base: the"
                     " previews show coloured regions on the clips' backgrounds, not yet the prompts; the latent"
                     " metrics (coupled_mse, energy_distance) are the informative ones."]
                    if cfg.model.base == "builtin:tiny" and cfg.name != "demo" else []
                ),
                *(
                    ["demo preset: the tiny architecture on a pretrained base (builtin:demo, text-conditional flow"
                     " matching, scripts/pretrain_demo_base.py), trained for thousands of steps per stage on the small"
                     " procedural class set (red, green or blue shapes moving left or right or still, on black);"
                     " adherence_colour / adherence_motion read the colour and motion off the decoded frames"
                     " (anyflow.data.procedural.measure_attributes): a prompt-blind model scores about 1/3 on each."]
                    if cfg.name == "demo" else []
                ),
            ],
        },
        out_dir / REPORT,
    )
    return {f"{m}/nfe{n}/{k}": v for m, rows in table.items() for n, row in rows.items() for k, v in row.items()}


class _BatchedVideos(Sequence):
    """``num`` uint8 videos made ``batch_size`` at a time by ``make(slice)``: only the batch holding the last
    index read is alive (written in index order, every batch is made once)."""

    def __init__(self, num: int, batch_size: int, make: Any) -> None:
        self._num, self._bs, self._make = num, batch_size, make
        self._start, self._batch = -1, []

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not isinstance(i, int):
            raise TypeError("_BatchedVideos supports integer indices only")
        if i < 0:
            i += self._num
        if not 0 <= i < self._num:
            raise IndexError(i)
        if not self._start <= i < self._start + len(self._batch):
            self._batch = []  # release the previous batch before making the next
            self._start = i // self._bs * self._bs
            self._batch = self._make(slice(self._start, min(self._start + self._bs, self._num)))
        return self._batch[i - self._start]


def _vbench(cfg: Preset, out_dir: Path, samplers: Mapping[str, Any], decode: Any, prompts: Sequence[str]) -> dict:
    """VBench (T2V) for every flow-map checkpoint and NFE. ``samplers[model](n, sl)`` gives the latents of samples
    ``sl`` (a slice of ``prompts``); they are sampled, decoded and written ``evaluate.batch_size`` at a time."""
    ev = cfg.evaluate
    if not ev.vbench:
        reason = "evaluate.vbench is false in this preset (enable it and run in the eval image)"
        return {"all checkpoints": {"dimensions": {d: {"status": "not run", "reason": reason}
                                                   for d in ev.vbench_dimensions}}}
    from anyflow.eval.vbench import (
        aggregate,
        run_vbench,
        vbench_names,
        vbench_unavailable_reason,
        write_vbench_videos,
    )

    # docs/method.md §11: samples come from ``prompts`` (for "vbench-extended" the augmented text) but VBench
    # names and scores them by the original prompt_en. ``prompts`` is prompt-major, ``samples_per_prompt``
    # copies each, so sample i of a prompt is written as ``{name}-{i}.mp4``.
    k = ev.samples_per_prompt
    if len(prompts) % k or list(prompts) != [p for p in prompts[::k] for _ in range(k)]:
        raise ValueError(f"_vbench: prompts must hold {k} consecutive copies of each prompt (samples_per_prompt)")
    names = vbench_names(ev.prompts, prompts)
    why_not = vbench_unavailable_reason()
    if why_not is not None:  # nothing to score with: sample nothing
        return {"all checkpoints": {"dimensions": {d: {"status": "not run", "reason": why_not}
                                                   for d in ev.vbench_dimensions}}}
    results = {}
    for model in samplers:
        if model == "teacher" or model.endswith("/i2v"):  # I2V here uses held-out frames, not VBench-I2V's images
            continue
        for n in ev.nfes:
            vdir = out_dir / "vbench" / f"{model}-nfe{n}"

            def make(sl: slice, model: str = model, n: int = n) -> list[np.ndarray]:
                with torch.no_grad():
                    return [_to_uint8(v) for v in decode(samplers[model](n, sl))]

            # write_vbench_videos reads videos[p * k + i] in order: one batch is sampled and decoded at a time,
            # and the files (and prompt_file.json) are those of writing every video at once
            videos = _BatchedVideos(len(prompts), ev.batch_size, make)
            write_vbench_videos(videos, names[::k], vdir, samples_per_prompt=k, fps=cfg.data.fps)
            dims = run_vbench(vdir, list(ev.vbench_dimensions), output_dir=vdir / "results")
            results[f"{model}/nfe{n}"] = {"dimensions": dims, "aggregate": aggregate(dims)}
    return results


def encode_image(path: str | Path, cfg: Preset, base: Any) -> torch.Tensor:
    """A suite image → its (1, 1, C, h, w) latent: RGB, resized (not cropped; any size) to the preset's
    height × width with antialiased bilinear filtering, scaled to [-1, 1], VAE-encoded (docs/method.md §8.7)."""
    from PIL import Image

    from anyflow.data.video import VideoSpec, frames_to_tensor

    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))  # a writable copy
    except OSError as exc:
        raise ValueError(f"VBench-I2V image {path}: cannot be read as an image ({exc})") from None
    spec = VideoSpec(frames=1, fps=cfg.data.fps, height=cfg.data.height, width=cfg.data.width,
                     max_upscale=float("inf"))
    with torch.no_grad():
        return base.vae.encode(frames_to_tensor(rgb[None], spec)[None])


def _vbench_i2v(cfg: Preset, out_dir: Path, suite: Any, roles: Sequence[str], rollout: Any, base: Any,
                decode: Any) -> dict:
    """VBench-I2V for each checkpoint and NFE (see the module docstring): ``{"<role>/i2v-nfe<N>": entry}``."""
    from anyflow.data.video import write_video
    from anyflow.eval.vbench import (
        I2V_MAX_SAMPLES,
        aggregate,
        i2v_video_name,
        run_vbench,
        vbench_unavailable_reason,
    )

    ev = cfg.evaluate
    k = min(ev.samples_per_prompt, I2V_MAX_SAMPLES)
    dims = list(ev.i2v_dimensions)
    why_not = vbench_unavailable_reason()
    if why_not is not None:  # nothing to score with: sample nothing
        not_run = {d: {"status": "not run", "reason": why_not} for d in dims}
        return {f"{role}/i2v-nfe{n}": {"kind": "i2v", "dimensions": not_run, "aggregate": aggregate(not_run, kind="i2v"),
                                       "samples_per_pair": k, "suite": suite.summary()}
                for role in roles for n in ev.nfes}
    shape = base.vae.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
    latents = {p.image_name: encode_image(p.image, cfg, base) for p in suite.pairs}
    # prompt-major, as the T2V sweep: sample j is index j % k of pair j // k, seeded with evaluate.seed + j
    samples = [(p, i) for p in suite.pairs for i in range(k)]
    results: dict[str, Any] = {}
    for role in roles:
        for n in ev.nfes:
            vdir = out_dir / "vbench-i2v" / f"{role}-nfe{n}"
            videos_dir = vdir / "videos"  # only the mp4s: VBench-I2V takes the extension from its first file
            videos_dir.mkdir(parents=True, exist_ok=True)
            context_max_abs = 0.0
            for start in range(0, len(samples), ev.batch_size):  # seeds follow the sample index, not the batch
                batch = samples[start:start + ev.batch_size]
                with torch.no_grad():
                    c = base.text.encode([p.prompt for p, _ in batch])
                    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(ev.seed + start + j))
                                     for j in range(len(batch))]).to(c.device)
                    ctx = torch.cat([latents[p.image_name] for p, _ in batch]).to(z.device)
                    lat = rollout(role, n, z, c, ctx)
                    context_max_abs = max(context_max_abs, float((lat[:, :1] - ctx).abs().max()))
                    video = decode(lat)
                for (p, i), v in zip(batch, video, strict=True):
                    write_video(videos_dir / i2v_video_name(p.prompt, i), _to_uint8(v), fps=cfg.data.fps)
            dim_scores = run_vbench(videos_dir, dims, output_dir=vdir / "results", i2v=suite)
            results[f"{role}/i2v-nfe{n}"] = {
                "kind": "i2v", "dimensions": dim_scores, "aggregate": aggregate(dim_scores, kind="i2v"),
                "context_max_abs": context_max_abs, "samples_per_pair": k, "suite": suite.summary(),
            }
    return results


def _log(path: Path | None) -> list[dict]:
    """Loss curves of a stage's JSONL log (the loss columns only; lr, throughput etc. stay in the log)."""
    if path is None:
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k == "step" or "loss" in k} for r in rows]


def _cost(model: str, n: int) -> float:
    """The relative cost of one sample of a (model, NFE) sweep, for the progress ETA: its network calls (the
    teacher's CFG makes two per step) and one decode."""
    return (2 * n if model == "teacher" else n) + 1.0


def _of(i: int, batches: Sequence[slice]) -> str:
    """``, batch i/B`` when the samples take more than one batch."""
    return f", batch {i}/{len(batches)}" if len(batches) > 1 else ""


def main(argv: Sequence[str] | None = None) -> int:
    from anyflow.stages import stage_main

    return stage_main("evaluate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
