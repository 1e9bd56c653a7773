"""``anyflow sample``: generate videos from a checkpoint at any number of steps (NFE).

Bidirectional checkpoints: the FlowMap-Euler sampler over the whole clip (N calls). Causal (FAR) checkpoints
(presets ``far-*``): chunk by chunk with the KV cache (N calls per chunk + cache passes, docs/method.md §8.5), as
T2V, as **I2V** (``--image``: the image is VAE-encoded to the first latent frame, which is kept and not
denoised) or as **V2V** continuation (``--video``: its first frames fill whole chunks, §8.7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def video_frames_for(latent_frames: int) -> int:
    """Video frames that encode to ``latent_frames`` latent frames with the Wan VAE (4k + 1)."""
    return 4 * (latent_frames - 1) + 1


def load_context(path: str, cfg: Any, base: Any, *, video_frames: int, flag: str = "context") -> Any:
    """Decode ``video_frames`` frames of an image/video file at the preset's fps and size and VAE-encode them
    → (1, F_ctx, C, h, w) latents. Errors are one sentence naming the option (``flag``), the file, what is
    wrong with it and what to change -- not prepare_data's skip-reason words."""
    import torch

    from anyflow.data import video as v

    spec = v.VideoSpec(frames=video_frames, fps=cfg.data.fps, height=cfg.data.height, width=cfg.data.width)
    try:
        video = v.decode_video(path, spec)
    except v.ClipError as exc:
        from anyflow.config import StageInputError

        if exc.reason == v.MISSING_VIDEO or not Path(path).exists():
            why = "no such file"
        elif exc.reason == v.TOO_SHORT:
            why = f"too short ({exc.detail}); pass a longer clip" + (
                " or a smaller --video-frames" if flag == "--video" else "")
        elif exc.reason == v.UNDECODABLE:
            why = f"cannot be decoded as an image or video ({exc.detail})"
        else:
            why = exc.detail or exc.reason
        raise StageInputError(f"{flag} {path}: {why}") from None
    with torch.no_grad():
        return base.vae.encode(video[None])


def sample_latents(
    checkpoint: str, prompts: list[str], *, nfe: int, preset: str | None = None, overrides: dict | None = None,
    seed: int = 0, adapter: str = "generator", image: str | None = None, video: str | None = None,
    video_frames: int | None = None,
) -> tuple[Any, Any, Any]:
    """Sample ``prompts`` at ``nfe`` steps; returns (latents (B, F, C, h, w), context latents or None, base).

    ``preset`` ``None``: the config the checkpoint was trained with (its ``config.json``), so a far-tiny checkpoint
    samples as far-tiny without being told; ``overrides`` apply over either."""
    import torch

    from anyflow.config import StageInputError, apply_overrides, get_preset
    from anyflow.rollout import flowmap_euler_sample
    from anyflow.stages import common

    cfg = apply_overrides(common.trained_config(checkpoint) if preset is None else get_preset(preset), overrides)
    if (image or video) and cfg.variant != "far":
        raise StageInputError(f"--image/--video (I2V/V2V) need a causal FAR checkpoint and preset; {cfg.name!r} is "
                              f"{cfg.variant}")
    if image and video:
        raise StageInputError("give --image (I2V) or --video (V2V), not both")
    ck = common.read_checkpoint(checkpoint, cfg, role="checkpoint", need=(adapter,))
    role = ck.meta["adapters"][adapter]["role"]
    base = common.load_models(cfg)
    models = common.adapter_model(cfg, base.transformer)
    far = cfg.variant == "far" and role == "generator"
    if (image or video) and not far:
        raise StageInputError(f"--image/--video need a generator adapter; {checkpoint} adapter {adapter!r} is a {role} "
                         "(the bidirectional teacher/critic)")
    models.add(adapter, role, init=ck.adapters[adapter], trainable=False,
               extra=("far_patch_embedding",) if far else ())
    context = None
    if image:
        context = load_context(image, cfg, base, video_frames=1, flag="--image")
    elif video:
        from anyflow.causal import chunk_bounds

        ends = [e for _, e in chunk_bounds(cfg.far.chunk_partition)][:-1]
        if video_frames is None:  # default: the frames of the first three chunks (25 at 16 fps for Wan, §8.7)
            video_frames = video_frames_for(ends[min(2, len(ends) - 1)])
        latent = (video_frames - 1) // 4 + 1
        if (video_frames - 1) % 4 or latent not in ends:
            raise StageInputError(
                f"--video-frames {video_frames}: V2V context must fill whole chunks of far.chunk_partition "
                f"{list(cfg.far.chunk_partition)}; use one of {[video_frames_for(e) for e in ends]}"
            )
        context = load_context(video, cfg, base, video_frames=video_frames, flag="--video")
    with torch.no_grad():
        c = base.text.encode(prompts)
        shape = base.vae.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
        noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed)).to(c.device)
        shift = cfg.flowmap.loss.shift
        if far:
            from anyflow.causal import FarCausalModel, causal_rollout

            models.activate(adapter)
            ctx = None if context is None else context.to(noise.device).expand(len(prompts), -1, -1, -1, -1)
            lat, _ = causal_rollout(FarCausalModel(models.transformer, cfg.far.chunk_partition), noise, c,
                                    num_steps=nfe, context=ctx, shift=shift)
        else:
            lat = flowmap_euler_sample(models.fn(adapter), noise, c, nfe, shift=shift,
                                       use_mean_velocity=role == "generator")
    return lat, context, base


def sample_videos(checkpoint: str, prompts: list[str], *, nfe: int, **kwargs: Any) -> Any:
    """:func:`sample_latents` decoded by the VAE: (B, 3, T, H, W) in [-1, 1]."""
    import torch

    lat, _, base = sample_latents(checkpoint, prompts, nfe=nfe, **kwargs)
    with torch.no_grad():
        return base.vae.decode(lat).float().cpu()
