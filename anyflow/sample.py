"""``anyflow sample``: generate videos from a checkpoint at any number of steps (NFE)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def sample_videos(
    checkpoint: str, prompts: list[str], *, nfe: int, preset: str = "tiny", overrides: dict | None = None,
    seed: int = 0, adapter: str = "generator",
) -> Any:
    """Sample ``prompts`` with the FlowMap-Euler sampler at ``nfe`` steps; returns (B, 3, T, H, W) in [-1, 1]."""
    import torch

    from anyflow.config import apply_overrides, get_preset
    from anyflow.rollout import flowmap_euler_sample
    from anyflow.stages import common

    cfg = apply_overrides(get_preset(preset), overrides)
    ck = common.read_checkpoint(checkpoint, cfg, role="checkpoint", need=(adapter,))
    role = ck.meta["adapters"][adapter]["role"]
    base = common.load_models(cfg)
    models = common.adapter_model(cfg, base.transformer)
    models.add(adapter, role, init=ck.adapters[adapter], trainable=False)
    with torch.no_grad():
        c = base.text.encode(prompts)
        shape = base.vae.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
        noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed))
        lat = flowmap_euler_sample(models.fn(adapter), noise, c, nfe, shift=cfg.flowmap.loss.shift,
                                   use_mean_velocity=role == "generator")
        return base.vae.decode(lat).float()


def _handler(args: argparse.Namespace) -> int:
    from anyflow.config import parse_override_args
    from anyflow.data.video import write_video

    prompts = args.prompt or ["a red circle moving left on a black background"]
    videos = sample_videos(args.checkpoint, prompts, nfe=args.nfe, preset=args.preset,
                           overrides=parse_override_args(args.overrides), seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(videos):
        frames = ((v.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        path = out / f"sample-{i:03d}-nfe{args.nfe}.mp4"
        write_video(path, frames, fps=args.fps)
        print(path)
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("sample", help="generate videos from a checkpoint at any NFE",
                       description="Sample a generator checkpoint with the FlowMap-Euler sampler (N network calls).")
    p.add_argument("checkpoint", help="checkpoint artifact URL (a distill/finetune/train_flowmap output)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable; default: one procedural caption)")
    p.add_argument("--nfe", type=int, default=4, help="number of sampling steps = network calls (default 4)")
    p.add_argument("--preset", default="tiny", help="preset the checkpoint was trained with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="preset override")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the written mp4")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.set_defaults(func=_handler)
