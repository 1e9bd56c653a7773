#!/usr/bin/env python
"""Pretrain the ``demo`` preset's base transformer (``builtin:demo``) and write it as safetensors in the package.

    .venv/bin/python scripts/pretrain_demo_base.py [--out anyflow/models/assets/demo_wan] [--steps N]

Why: the tiny base (:func:`anyflow.models.tiny.build_tiny_wan`) is random, and AnyFlow's LoRA never adapts the
cross-attention (docs/method.md §2.3), so a teacher LoRA on it stays nearly prompt-blind (measured on the demo's
teacher after 5000 steps: its velocity for "a red square …" and "a blue square …" differs by 0.5 %, and its samples'
colours follow the noise, not the prompt). Wan's base is *pretrained*; this script gives the demo the same
situation at CPU scale: every parameter of the tiny ``WanTransformer3DModel`` (seed 0) is trained by plain
text-conditional flow matching (docs/method.md §3: x_t = (1-σ)·x + σ·ε, target ε - x, σ logit-normal shifted by 5,
10 % of prompts replaced by Wan's negative prompt) on procedural clips of the small class set (``simple=1``),
dataset seed 99 (disjoint from the demo's training set, seed 0, and its evaluation prompts, seed 7919), encoded
with the shipped tiny VAE. The pipeline's teacher, flow map and generator are then LoRA adapters on it.

Deterministic on the CPU (one thread, seeded): the same command writes the same weights. Writes
``diffusion_pytorch_model.safetensors`` (the transformer's state dict; its config is
:func:`anyflow.models.tiny.tiny_transformer_config`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anyflow.data.procedural import make_clip  # noqa: E402
from anyflow.models.tiny import (  # noqa: E402
    DEMO_WAN_DIR,
    build_tiny_text_encoder,
    build_tiny_wan,
    load_tiny_vae,
)

DATA_SEED = 99


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEMO_WAN_DIR), help="output folder (default: the packaged one)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clips", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    from anyflow.models.text import WAN_NEGATIVE_PROMPT
    from anyflow.models.vae import VideoVAE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.time()
    vae, text = VideoVAE(load_tiny_vae()), build_tiny_text_encoder(0)
    clips = [make_clip(DATA_SEED, i, frames=9, height=32, width=32, simple=True) for i in range(args.clips)]
    video = (
        torch.from_numpy(np.stack([c.video for c in clips])).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)
    )
    with torch.no_grad():
        x = torch.cat([vae.encode(video[i : i + 64]) for i in range(0, len(video), 64)])  # (N, F, C, h, w)
        c = text.encode([c.caption for c in clips])
        c_neg = text.encode([WAN_NEGATIVE_PROMPT])
    x = x.permute(0, 2, 1, 3, 4).contiguous()  # the Wan transformer's (B, C, F, h, w)
    print(f"encoded {len(clips)} clips in {time.time() - t0:.0f} s", flush=True)

    model = build_tiny_wan(0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        x0, cond = x[idx], c[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        cond[drop] = c_neg[0]
        s = torch.sigmoid(torch.randn(args.batch, generator=gen))
        sigma = 5.0 * s / (1 + 4.0 * s)  # shift 5
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * eps
        pred = model(
            hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=cond, return_dict=False
        )[0]
        loss = ((pred - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - t0:5.0f} s", flush=True
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
    print(f"wrote {out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
