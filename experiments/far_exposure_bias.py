"""Exposure bias of the causal (FAR) model at toy scale (docs/method.md §15 H, §8.4-8.6).

Data: procedural latent "videos" of 10 frames (partition [1, 3, 3, 3]), 4 channels, 8×8: a travelling
sinusoid per channel, x[f, ch, h, w] = sin(2π(k_ch·(h, w))/8 + φ + ω·f), with φ ~ U(0, 2π) and
ω ~ U(0.3, 0.8) rad/frame drawn per video. A later chunk is fully determined by (φ, ω), which the model must
read off its history, so errors in the history propagate.

Stages (all with the package's maths; unconditional, so no CFG):
0. teacher: the tiny bidirectional Wan, flow matching on whole videos (``flow_matching_loss``);
1. teacher-forced FAR: the tiny FAR model (converted from the teacher), causal forward flow-map loss
   (``forward_flowmap_loss`` on ``teacher_forced_fn``, §8.4);
2a. control: stage 1 continued for the same number of steps;
2b. causal on-policy: chunk-wise FMBS rollouts (``causal_rollout`` with k, cache of the generator's own chunks,
   no gradient across chunks, §8.6), DMD against the bidirectional teacher with a critic trained on rollouts
   (``dmd_generator_loss``, ``critic_loss``), co-trained with the stage-1 loss.
Metric (per chunk j, 4-step sampling): the MSE of chunk j to the reference video (of 4096) that best matches
the prefix of frames up to chunk j, for free-running rollouts (own history) and for chunks generated from the
ground-truth history (teacher-forced condition). Exposure bias = free-running error growing with j faster
than the teacher-forced one.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python experiments/far_exposure_bias.py --out experiments/results_far``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from anyflow.causal import (
    FarCausalModel,
    causal_rollout,
    chunk_bounds,
    split_teacher_forcing,
    teacher_forced_fn,
)
from anyflow.dmd import critic_loss, dmd_generator_loss
from anyflow.flowmap import FlowMapLossConfig, flow_matching_loss, forward_flowmap_loss
from anyflow.models.callable import velocity_fn_wan
from anyflow.models.far import convert_wan_to_far, set_far_attention
from anyflow.models.tiny import build_tiny_wan
from anyflow.rollout import sample_rollout_plan

P = (1, 3, 3, 3)
FRAMES, CH, HW = 10, 4, 8


def make_videos(n: int, gen: torch.Generator) -> torch.Tensor:
    """n procedural videos (n, 10, 4, 8, 8)."""
    phi = torch.rand(n, generator=gen) * 2 * math.pi
    omega = 0.3 + 0.5 * torch.rand(n, generator=gen)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # spatial wave vector per channel
    h = torch.arange(HW).float()
    spatial = 2 * math.pi * (k[:, 0, None, None] * h[:, None] + k[:, 1, None, None] * h[None, :]) / HW  # (4,8,8)
    f = torch.arange(FRAMES).float()
    arg = spatial[None, None] + (phi[:, None] + omega[:, None] * f[None])[:, :, None, None, None]
    return torch.sin(arg)


def cond(b: int) -> torch.Tensor:
    return torch.zeros(b, 4, 32)  # unconditional: a fixed (zero) text embedding


def train_teacher(steps: int, gen: torch.Generator, seed: int):
    wan = build_tiny_wan(seed).train()
    opt = torch.optim.Adam(wan.parameters(), lr=1e-3)
    v = velocity_fn_wan(wan)
    for _ in range(steps):
        x = make_videos(16, gen)
        loss, _ = flow_matching_loss(v, x, cond(16), gen, shift=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return wan.eval()


def forward_loss(far, gen, cfg, batch: int) -> torch.Tensor:
    """Causal teacher-forced forward flow-map loss (§8.4) on fresh data; n_chunks ∈ {3, 4} (§8.2 capped at 4)."""
    x = make_videos(batch, gen)
    n = 3 if float(torch.rand((), generator=gen)) >= 0.5 else 4
    split = split_teacher_forcing(x, P, n)
    loss, _ = forward_flowmap_loss(teacher_forced_fn(far, split), split.window, cond(batch), cond(batch), gen, cfg)
    return loss


def _step(model, opt, loss_fn) -> None:
    opt.zero_grad()
    loss_fn()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def onpolicy_step(far, critic, teacher, opt_g, opt_c, gen, cfg, batch: int, steps_list) -> None:
    """§8.6 / §7.7: generator (chunk-wise FMBS + DMD + co-trained forward loss), then the critic."""
    real_v, fake_v = velocity_fn_wan(teacher), velocity_fn_wan(critic)

    def generator_losses() -> None:
        n_steps, k = sample_rollout_plan(gen, steps_list)
        noise = torch.randn(batch, FRAMES, CH, HW, HW, generator=gen)
        x_hat, _ = causal_rollout(FarCausalModel(far, P), noise, cond(batch), num_steps=n_steps, k=k,
                                  shift=cfg.shift)
        l_dmd, _ = dmd_generator_loss(x_hat, real_v, fake_v, cond(batch), cond(batch), gen,
                                      real_guidance_scale=0.0, shift=cfg.shift)
        l_dmd.backward()
        forward_loss(far, gen, cfg, batch).backward()  # §7.5 co-training, gradients accumulate

    def critic_losses() -> None:
        n_steps, k = sample_rollout_plan(gen, steps_list)
        with torch.no_grad():
            noise = torch.randn(batch, FRAMES, CH, HW, HW, generator=gen)
            x2, _ = causal_rollout(FarCausalModel(far, P), noise, cond(batch), num_steps=n_steps, k=k,
                                   shift=cfg.shift)
        critic_loss(fake_v, x2, cond(batch), gen, shift=cfg.shift)[0].backward()

    _step(far, opt_g, generator_losses)
    _step(critic, opt_c, critic_losses)


def chunk_error(videos: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per chunk j: MSE of chunk j's frames to the reference video that best matches the prefix [0, end_j).

    Small only if chunk j is a consistent continuation of the frames before it (the same φ, ω).
    """
    out = []
    for a, e in chunk_bounds(P):
        nn_idx = torch.cdist(videos[:, :e].flatten(1), ref[:, :e].flatten(1)).argmin(dim=1)
        out.append(float((videos[:, a:e] - ref[nn_idx, a:e]).pow(2).mean()))
    return out


@torch.no_grad()
def evaluate(far, ref: torch.Tensor, gt: torch.Tensor, n_steps: int, shift: float, seed: int) -> dict:
    """Free-running prefix error (own history) and teacher-forced error (ground-truth history) per chunk."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n = gt.shape[0]
    noise = torch.randn(n, FRAMES, CH, HW, HW, generator=g)
    fm = FarCausalModel(far, P)
    free, _ = causal_rollout(fm, noise, cond(n), num_steps=n_steps, shift=shift)
    teacher_forced = [chunk_error(free, ref)[0]]  # chunk 0 has no history
    for i in range(1, len(P)):  # chunk i generated from the ground-truth history gt[:, :a] (V2V mode, §8.7)
        a = chunk_bounds(P)[i][0]
        x, _ = causal_rollout(fm, noise, cond(n), num_steps=n_steps, context=gt[:, :a], shift=shift)
        teacher_forced.append(chunk_error(x, ref)[i])
    return {"free_running": chunk_error(free, ref), "teacher_forced": teacher_forced}


def run(args: argparse.Namespace) -> dict:
    results = {"config": vars(args), "seeds": {}}
    cfg = FlowMapLossConfig(guidance_scale=1.0, text_dropout=0.0, adaptive_scaling=True, shift=args.shift)
    for seed in args.seeds:
        t0 = time.time()
        gen = torch.Generator().manual_seed(seed)
        teacher = train_teacher(args.teacher_steps, gen, seed)
        print(f"seed {seed}: teacher trained ({time.time() - t0:.0f} s)", flush=True)
        far = convert_wan_to_far(teacher, chunk_partition=P)
        set_far_attention(far, "dense")
        far.train()
        opt = torch.optim.Adam(far.parameters(), lr=args.lr)
        for _ in range(args.stage1_steps):
            _step(far, opt, lambda: forward_loss(far, gen, cfg, args.batch).backward())  # noqa: B023
        ref = make_videos(args.n_ref, torch.Generator().manual_seed(777))
        gt = make_videos(args.n_eval, torch.Generator().manual_seed(888))
        far.eval()
        print(f"seed {seed}: stage 1 trained ({time.time() - t0:.0f} s)", flush=True)
        res = {"stage1": evaluate(far, ref, gt, args.eval_steps, args.shift, seed)}
        print(f"seed {seed}: stage 1 {res['stage1']} ({time.time() - t0:.0f} s)", flush=True)
        control = copy.deepcopy(far).train()
        control_opt = torch.optim.Adam(control.parameters(), lr=args.lr_onpolicy)
        onp = copy.deepcopy(far).train()
        critic = copy.deepcopy(teacher).train()
        opt_g = torch.optim.Adam(onp.parameters(), lr=args.lr_onpolicy, betas=(0.0, 0.999))
        opt_c = torch.optim.Adam(critic.parameters(), lr=args.lr_onpolicy, betas=(0.0, 0.999))
        gen_c, gen_o = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
        for _ in range(args.onpolicy_steps):
            _step(control, control_opt, lambda: forward_loss(control, gen_c, cfg, args.batch).backward())  # noqa: B023
            onpolicy_step(onp, critic, teacher.eval(), opt_g, opt_c, gen_o, cfg, args.batch, args.steps_list)
        res["stage1_continued"] = evaluate(control.eval(), ref, gt, args.eval_steps, args.shift, seed)
        res["onpolicy"] = evaluate(onp.eval(), ref, gt, args.eval_steps, args.shift, seed)
        res["data_floor"] = chunk_error(gt, ref)  # NN error of real videos (reference-set resolution)
        res["seconds"] = time.time() - t0
        results["seeds"][str(seed)] = res
        print(json.dumps({"seed": seed, **res}, indent=1), flush=True)
    return results


def table(results: dict) -> str:
    rows = ["| model | metric | chunk 0 | chunk 1 | chunk 2 | chunk 3 | growth 3−1 |", "|---|---|---|---|---|---|---|"]
    seeds = list(results["seeds"].values())
    for name in ("stage1", "stage1_continued", "onpolicy"):
        for metric in ("free_running", "teacher_forced"):
            vals = torch.tensor([s[name][metric] for s in seeds])
            m, sd = vals.mean(0), vals.std(0) if len(seeds) > 1 else torch.zeros(vals.shape[1])
            cells = [f"{a:.4f}±{b:.4f}" for a, b in zip(m.tolist(), sd.tolist(), strict=True)]
            rows.append(f"| {name} | {metric} | " + " | ".join(cells) + f" | {float(m[3] - m[1]):+.4f} |")
    floor = torch.tensor([s["data_floor"] for s in seeds]).mean(0)
    rows.append("| real videos | floor | " + " | ".join(f"{v:.4f}" for v in floor.tolist()) + " | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results_far")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--stage1-steps", type=int, default=400)
    p.add_argument("--onpolicy-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-onpolicy", type=float, default=2e-4)
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--steps-list", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--eval-steps", type=int, default=4)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--n-ref", type=int, default=4096)
    p.add_argument("--merge", nargs="+", default=None, help="combine the results.json of these runs into --out")
    args = p.parse_args(argv)
    if args.merge:
        runs = [json.loads((Path(d) / "results.json").read_text()) for d in args.merge]
        results = {"config": [r["config"] for r in runs], "seeds": {k: v for r in runs for k, v in r["seeds"].items()}}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
        (Path(args.out) / "results.md").write_text(table(results) + "\n")
        print(table(results))
        return 0
    torch.manual_seed(0)  # diffusers' constructors draw their init from the global RNG before we overwrite it
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
