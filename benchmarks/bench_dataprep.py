"""Data-preparation throughput (clips/s) for the tiny VAE and a mid-size Wan VAE, printed as a table.

    python -m benchmarks.bench_dataprep                 # both VAEs, procedural + mp4 sources
    python -m benchmarks.bench_dataprep --clips 16 --vaes mid --device cuda

For each VAE it runs ``anyflow.data.prepare.prepare`` end to end (source → decode/resample/resize →
VAE encode → text encode → shards) on the same clips from two sources: ``procedural`` (rendered in
memory) and ``mp4`` (the same clips written as H.264 files first, so the row includes ffmpeg
decoding), and also times the VAE encode alone on one batch, so the table shows where the time goes.
Numbers are wall-clock on whatever machine runs it; compare rows of one run, not across machines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from anyflow.data.prepare import prepare
from anyflow.data.procedural import make_clip
from anyflow.data.video import VideoSpec, frames_to_tensor, write_video
from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_vae
from anyflow.models.vae import VideoVAE

# name -> (AutoencoderKLWan kwargs or None for the tiny preset VAE, frames, height, width)
VAES: dict[str, tuple[dict | None, int, int, int]] = {
    "tiny": (None, 9, 32, 32),
    # A mid-size Wan VAE: a third of Wan2.1's width (base_dim 32 vs 96), 16 latent channels, 17 frames at 128².
    "mid": ({"base_dim": 32, "z_dim": 16, "num_res_blocks": 2}, 17, 128, 128),
}
FPS = 16


def _vae(name: str, device: str) -> VideoVAE:
    kwargs = VAES[name][0]
    if kwargs is None:
        model = build_tiny_vae(seed=0)
    else:
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan(**kwargs).eval()  # random weights: throughput does not depend on them
    return VideoVAE(model.to(device))


def _bench(name: str, clips: int, batch: int, device: str, work: Path) -> list[tuple]:
    _, frames, height, width = VAES[name]
    vae, text = _vae(name, device), build_tiny_text_encoder(seed=0).to(device)
    spec = VideoSpec(frames=frames, fps=FPS, height=height, width=width)
    mp4s = work / f"{name}-mp4"
    mp4s.mkdir()
    for i in range(clips):  # the procedural clips as files, one source frame per target frame
        clip = make_clip(0, i, frames=frames, height=height, width=width)
        write_video(mp4s / f"{i:04d}.mp4", clip.video, fps=FPS)
        (mp4s / f"{i:04d}.txt").write_text(clip.caption)

    def encode_video(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x.to(device))

    rows = []
    x = torch.stack([frames_to_tensor(make_clip(0, i, frames=frames, height=height, width=width).video, spec)
                     for i in range(batch)])
    encode_video(x)  # warm-up
    text.encode(["warm up"])
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    encode_video(x)
    if device == "cuda":
        torch.cuda.synchronize()
    vae_rate = batch / (time.perf_counter() - t)
    params = sum(p.numel() for p in vae.vae.parameters()) / 1e6
    for source in ("procedural", "mp4"):
        spec_str = f"procedural:n={clips},seed=0" if source == "procedural" else str(mp4s)
        summary = prepare(spec_str, encode_video=encode_video, encode_text=text.encode, negative_prompt="",
                          out_dir=work / f"{name}-{source}", frames=frames, height=height, width=width, fps=FPS,
                          samples_per_shard=64, progress=False, batch_size=batch)
        assert summary["clips_written"] == clips, summary
        rows.append((name, f"{params:.2f}M", f"{frames}x{height}x{width}", source, clips, summary["seconds"],
                     summary["clips_per_s"], round(vae_rate, 3)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4, help="clips per run (default 4)")
    parser.add_argument("--batch", type=int, default=4, help="clips per VAE call (default 4)")
    parser.add_argument("--vaes", default="tiny,mid", help="comma-separated subset of: " + ", ".join(VAES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.vaes.split(",") if n.strip()]
    unknown = [n for n in names if n not in VAES]
    if unknown:
        parser.error(f"unknown VAE {unknown}; choose from {list(VAES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dataprep-") as tmp:
        for name in names:
            rows += _bench(name, args.clips, args.batch, args.device, Path(tmp))
    header = ("vae", "params", "T x H x W", "source", "clips", "seconds", "clips/s", "vae-only clips/s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"device={args.device} torch threads={torch.get_num_threads()}")
    for r in [header, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
