"""``anyflow sample``: videos from a checkpoint at any number of steps (``anyflow.sample`` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from anyflow.cli._common import UserError, _guard
from anyflow.urls import url_argument


def _handler(args: argparse.Namespace) -> int:
    from anyflow.config import load_overrides_file, merge_overrides, parse_override_args

    prompts = args.prompt or ["a red circle moving left on a black background"]
    out = Path(args.out)
    mode = "i2v" if args.image else "v2v" if args.video else "t2v"
    paths = [out / f"sample-{i:03d}-{mode}-nfe{args.nfe}-seed{args.seed}.mp4" for i in range(len(prompts))]
    taken = [p for p in paths if p.exists()]
    if taken and not args.overwrite:  # before any model is loaded
        raise UserError(f"{taken[0]} exists ({len(taken)} of the {len(paths)} output files do); pass --overwrite "
                        "to replace them, or another --out folder or --seed.")
    overrides = merge_overrides(load_overrides_file(args.config) if args.config else {},
                                parse_override_args(args.overrides))

    from anyflow.data.video import write_video
    from anyflow.sample import sample_videos

    videos = sample_videos(args.checkpoint, prompts, nfe=args.nfe, preset=args.sample_preset, overrides=overrides,
                           seed=args.seed, image=args.image, video=args.video, video_frames=args.video_frames)
    out.mkdir(parents=True, exist_ok=True)
    for path, v in zip(paths, videos, strict=True):
        frames = ((v.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        write_video(path, frames, fps=args.fps)
        print(path)
    return 0


def _positive_int(text: str) -> int:
    """``--nfe``: a whole number of network calls, at least 1 (0 or less used to end in a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} steps: sampling needs at least 1 network call")
    return value


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "sample", help="generate videos from a checkpoint at any NFE (T2V; I2V/V2V for FAR checkpoints)",
        description="Sample a generator checkpoint with the FlowMap-Euler sampler (N network calls; causal FAR "
                    "checkpoints: N calls per chunk plus the KV-cache passes). --image / --video condition a FAR "
                    "checkpoint on an image (I2V) or the first frames of a video (V2V).")
    p.add_argument("checkpoint", type=url_argument, help="checkpoint artifact URL (a distill/finetune/train_flowmap output)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable; default: one procedural caption)")
    p.add_argument("--nfe", type=_positive_int, default=4, help="number of sampling steps = network calls (default 4)")
    p.add_argument("--preset", dest="sample_preset", default=None,  # not 'preset': _guard defaults that to tiny
                   help="preset to sample with (default: the config the checkpoint was trained with, from its "
                   "config.json; far-* for causal checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="preset override")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file of preset overrides, applied before --set")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--image", help="I2V (FAR only): image file whose VAE latent is the first, kept frame")
    p.add_argument("--video", help="V2V (FAR only): video whose first frames are kept and continued")
    p.add_argument("--video-frames", type=int, default=None,
                   help="V2V context length in video frames; must fill whole chunks (default: the first three "
                        "chunks, 25 frames for the Wan presets)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the written mp4")
    p.add_argument("--out", default="samples", help="output folder (default ./samples); files are named "
                   "sample-<i>-<t2v|i2v|v2v>-nfe<N>-seed<S>.mp4")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that exist (default: refuse, naming the first, before sampling)")
    p.set_defaults(func=_guard(_handler), command="sample")
