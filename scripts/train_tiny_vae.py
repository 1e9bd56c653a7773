#!/usr/bin/env python
"""Train the tiny preset's ``AutoencoderKLWan`` on procedural clips and write it as a diffusers folder.

    .venv/bin/python scripts/train_tiny_vae.py [--out anyflow/models/assets/tiny_vae] [--steps N]

Deterministic on the CPU (one thread, seeded init and data): the same command writes the same weights.
The architecture is :func:`anyflow.models.tiny.tiny_vae_config` (Wan's VAE class at base_dim 8, z_dim 4,
factors 4×8×8, Wan2.2-style 2×2 patches and residual shortcuts); the training clips are ``procedural`` dataset seed 12345 (9×32×32, as the tiny preset's),
disjoint from the seeds the presets and tests use. Loss: pixel MSE + L1 of the reconstruction from the
posterior mean, with the pixels that differ from the clip's background (its median colour) weighted 10x (the mean is all anyflow ever uses, docs/method.md §1.3) plus a small L2 pull on the
mean so the latent scale stays bounded. After training the per-channel mean/std of the latents over the
training clips become the config's ``latents_mean`` / ``latents_std`` (the normalisation of §1.3), so the
normalised latents the transformer sees have unit scale.

The shipped VAE is two runs of this script (about 7 + 3 min on one loaded core):

    .venv/bin/python scripts/train_tiny_vae.py --out /tmp/vae800
    .venv/bin/python scripts/train_tiny_vae.py --init /tmp/vae800 --steps 1000 --lr 1e-3 --fg-weight 20 --chroma 3

The first (800 steps, shapes weighted 10x) reconstructs backgrounds and positions but desaturates the shapes to
grey (held out, procedural seed 4242, 32 clips: PSNR 16.9 dB, mean |error| on the shapes' pixels 82 / 68 / 83
uint8 levels in R / G / B, colour read back 4/32); the second weights the shapes 20x and adds a chroma term (the
weighted MSE of each pixel's error minus its mean over R, G, B), which keeps the colours (shapes' |error|
30 / 36 / 21, colour read back 21/32, motion 26/32 from 19/32) at the cost of colour halos around them
(PSNR 14.8 dB): a 4-channel latent per 8×8×4 block has no room for both at this width.

Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (``save_pretrained``, safetensors only)
and prints the held-out reconstruction error against a randomly initialised VAE of the same config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify  # noqa: E402

from anyflow.data.procedural import make_clip  # noqa: E402
from anyflow.models.tiny import TINY_VAE_DIR, build_tiny_vae, tiny_vae_config  # noqa: E402

TRAIN_SEED = 12345  # procedural dataset seed of the training clips
HELDOUT_SEED = 777  # procedural dataset seed of the clips the script reports on
FRAMES, SIZE = 9, 32


def clips(seed: int, n: int, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """(n, 3, T, H, W) float in [-1, 1] of procedural dataset ``seed``, clips 0..n-1."""
    vids = [make_clip(seed, i, frames=frames, height=size, width=size).video for i in range(n)]
    x = torch.from_numpy(np.stack(vids)).float().div(127.5).sub(1.0)  # (n, T, H, W, 3)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` without its final clamp to [-1, 1] (diffusers' ``AutoencoderKLWan._decode``
    loop, frame by frame with its causal feature cache): a clamped pixel has no gradient, and a decoder that
    overshoots early would stay stuck there."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(
            vae.decoder(
                x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
            )
        )
    vae.clear_cache()
    out = torch.cat(outs, 2)
    return unpatchify(out, patch_size=vae.config.patch_size) if vae.config.patch_size is not None else out


@torch.no_grad()
def recon_mse(vae, x: torch.Tensor, batch: int = 16) -> float:
    """Mean squared error in [-1, 1] pixel units of ``decode(encode(x).mean)`` (clamped like anyflow)."""
    err = 0.0
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        y = vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1)
        err += float(((y - xb) ** 2).sum())
    return err / x.numel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(TINY_VAE_DIR), help="output folder (default: the packaged one)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--clips", type=int, default=1024, help="training clips (procedural seed 12345)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--fg-weight", type=float, default=10.0, help="loss weight of the shapes' pixels (background 1)"
    )
    ap.add_argument(
        "--chroma",
        type=float,
        default=0.0,
        help="weight of the chroma term: the same weighted MSE on each pixel minus its mean over R, G, B",
    )
    ap.add_argument(
        "--init", default="", help="start from this AutoencoderKLWan folder instead of a fresh init"
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from diffusers import AutoencoderKLWan

    cfg = tiny_vae_config()
    vae = AutoencoderKLWan(**cfg)  # diffusers' own init, seeded above
    if args.init:
        vae = AutoencoderKLWan.from_pretrained(args.init, use_safetensors=True, local_files_only=True)
    data = clips(TRAIN_SEED, args.clips)
    held = clips(HELDOUT_SEED, 32)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    vae.train()
    for step in range(args.steps):
        lr = (
            args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            if step >= 20
            else args.lr * (step + 1) / 20
        )
        for g in opt.param_groups:
            g["lr"] = lr
        if step % 2:  # single frames: a ninth of a clip's cost, trains the spatial path on 4x the samples
            idx = torch.randint(len(data), (4 * args.batch,), generator=gen)
            t = torch.randint(FRAMES, (4 * args.batch,), generator=gen)
            x = data[idx, :, t].unsqueeze(2)
        else:  # whole clips: the temporal path (causal convs, temporal down/upsampling)
            x = data[torch.randint(len(data), (args.batch,), generator=gen)]
        flip = torch.rand(len(x), generator=gen) < 0.5  # horizontal flips: left/right motions alike
        x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
        mu = vae.encode(x).latent_dist.mean
        y = decode_unclamped(vae, mu)
        # the shapes cover ~10 % of a frame: weighted 10x, or the plain loss settles on the background alone
        bg = x.flatten(2).median(dim=2).values[:, :, None, None, None]
        w = 1.0 + (args.fg_weight - 1.0) * ((x - bg).abs().sum(1, keepdim=True) > 0.2).float()
        err = y - x
        chroma = err - err.mean(1, keepdim=True)  # colour error with the brightness error taken out
        loss = (
            (w * err**2).mean()
            + 0.5 * (w * err.abs()).mean()
            + args.chroma * (w * chroma**2).mean()
            + 1e-4 * (mu**2).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            vae.eval()
            print(
                f"step {step:4d}  loss {loss.item():.4f}  held-out MSE {recon_mse(vae, held[:8]):.4f}  lr {lr:.2e}  "
                f"{time.time() - t0:6.0f} s",
                flush=True,
            )
            vae.train()
    vae.eval()

    with torch.no_grad():  # the normalisation statistics of docs/method.md §1.3, over the training clips
        mus = torch.cat([vae.encode(data[i : i + 32]).latent_dist.mean for i in range(0, len(data), 32)])
    mean = mus.mean(dim=(0, 2, 3, 4))
    std = mus.std(dim=(0, 2, 3, 4))
    vae.register_to_config(
        latents_mean=[round(float(v), 4) for v in mean], latents_std=[round(float(v), 4) for v in std]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    # --init's from_pretrained recorded its folder in the config: not part of the shipped one
    cfg_file = out / "config.json"
    saved = json.loads(cfg_file.read_text(encoding="utf-8"))
    if saved.pop("_name_or_path", None) is not None:
        cfg_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    trained = recon_mse(vae, held)
    random = recon_mse(build_tiny_vae(0), held)
    print(f"latents_mean {vae.config.latents_mean}  latents_std {vae.config.latents_std}")
    print(
        f"held-out reconstruction MSE (procedural seed {HELDOUT_SEED}, 32 clips): trained {trained:.4f}, "
        f"random {random:.4f}; {time.time() - t0:.0f} s; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
