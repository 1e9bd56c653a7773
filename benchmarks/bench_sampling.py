"""Sampling cost per NFE: our evaluate path and diffusers' AnyFlowPipeline vs a bare transformer loop.

    python -m benchmarks.bench_sampling                      # tiny + mid configs, NFE 1..32, CPU
    python -m benchmarks.bench_sampling --quick              # < 1 min on CPU
    python -m benchmarks.bench_sampling --e2e                # + `anyflow run`-style seconds per stage (tiny)
    python -m benchmarks.bench_sampling --device cuda        # + 1.3B fwd/bwd throughput and MFU (bf16)

Sampling paths, all N transformer calls from the same noise, timed side by side in one run:

* ``bare``: a loop calling the merged transformer directly with precomputed (B, F) τ tensors.
* ``evaluate``: exactly what the evaluate stage runs (``anyflow/stages/evaluate.py``):
  ``anyflow.eval.pipeline.sample_with_pipeline`` over the ``AnyFlowPipeline`` built once around the
  transformer with the generator LoRA merged.
* ``bare+lora``: the bare loop on the peft model with the generator adapter active (unmerged LoRA).
* ``fn``: ``flowmap_euler_sample`` over ``AdapterModel.fn("generator")`` (the training-time sampler, unmerged).

Every path runs once per round (order reversed every other round), ``--repeats`` rounds per NFE after one
warm-up. The table prints the median ``bare`` milliseconds, ``evaluate/bare`` as min / median of the
per-round ratios with the number of pairs (> 1 = overhead: Python, the scheduler, the pipeline's
bookkeeping), the median fixed cost evaluate − bare per call, and the medians of the other two ratios.
Times are wall-clock on whatever machine runs it: compare rows of one run, not across machines.
The e2e and MFU sections are in :mod:`benchmarks.sampling_extras`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from anyflow.timesteps import flowmap_euler_sigmas

NFES = (1, 2, 4, 8, 16, 32)
SHIFT = 5.0


@dataclass(frozen=True)
class SamplingConfig:
    """A transformer size and the latent it samples (F, C, h, w); text is (text_len, text_dim)."""

    name: str
    dim_heads: int
    head_dim: int
    layers: int
    ffn: int
    text_dim: int
    text_len: int
    latent: tuple[int, int, int, int]
    batch: int
    lora_rank: int

    def wan_config(self) -> dict:
        from anyflow.models.tiny import tiny_transformer_config

        cfg = tiny_transformer_config()
        cfg.update(
            num_attention_heads=self.dim_heads,
            attention_head_dim=self.head_dim,
            num_layers=self.layers,
            ffn_dim=self.ffn,
            text_dim=self.text_dim,
            in_channels=self.latent[1],
            out_channels=self.latent[1],
            freq_dim=max(32, min(256, self.dim_heads * self.head_dim)),
            rope_max_seq_len=1024,
        )
        return cfg

    def tokens(self) -> int:
        f, _, h, w = self.latent
        return f * (h // 2) * (w // 2)


CONFIGS = {
    # the tiny preset's transformer (40k parameters) and latent (9×32×32 video -> 3×4×4×4)
    "tiny": SamplingConfig("tiny", 2, 16, 2, 64, 32, 16, (3, 4, 4, 4), batch=2, lora_rank=4),
    # a mid-size model: 384 wide (3 heads × 128, as Wan), 4 layers, 16 latent channels, 180 tokens
    "mid": SamplingConfig("mid", 3, 128, 4, 1536, 256, 64, (5, 16, 12, 12), batch=1, lora_rank=32),
}


@dataclass
class Bench:
    cfg: SamplingConfig
    base: object  # anyflow.models.loading.BaseModel (pipeline components)
    models: object  # AdapterModel with a random "generator" adapter
    merged: torch.nn.Module
    pipe: object
    noise: torch.Tensor
    c: torch.Tensor


def build(cfg: SamplingConfig, device: str) -> Bench:
    """Random-weight AnyFlow transformer (converted from Wan) + a random generator LoRA, on ``device``."""
    from diffusers import WanTransformer3DModel

    from anyflow.eval.pipeline import build_pipeline
    from anyflow.models import lora
    from anyflow.models.convert import wan_to_anyflow
    from anyflow.models.loading import BaseModel
    from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_vae
    from anyflow.models.vae import VideoVAE
    from anyflow.train.adapters import AdapterModel

    gen = torch.Generator().manual_seed(0)
    wan = WanTransformer3DModel(**cfg.wan_config())
    with torch.no_grad():  # weights do not change the cost; draw them from an explicit generator anyway
        for p in wan.parameters():
            p.copy_(
                (torch.rand(p.shape, generator=gen) * 2 - 1)
                / max(p[0].numel() if p.ndim > 1 else p.numel(), 1) ** 0.5
            )
    transformer = wan_to_anyflow(wan, copy=False).to(device).eval().requires_grad_(False)
    models = AdapterModel(
        transformer, rank=cfg.lora_rank, alpha=float(cfg.lora_rank), gradient_checkpointing=False
    )
    models.add("generator", "generator", trainable=False)
    with torch.no_grad():
        for p in models.params("generator").values():
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.02)
    merged = lora.merge_adapter(transformer, "generator")
    # The pipeline only reads the VAE's scale factors and the tokenizer when given latents + embeddings.
    base = BaseModel(
        transformer=merged, vae=VideoVAE(build_tiny_vae(0)), text=build_tiny_text_encoder(0), source="bench"
    )
    pipe = build_pipeline(base, merged, shift=SHIFT)
    noise = torch.randn((cfg.batch, *cfg.latent), generator=gen).to(device)
    c = torch.randn((cfg.batch, cfg.text_len, cfg.text_dim), generator=gen).to(device)
    return Bench(cfg, base, models, merged, pipe, noise, c)


def bare_loop(transformer: torch.nn.Module, noise: torch.Tensor, c: torch.Tensor, nfe: int) -> torch.Tensor:
    """§2.4 written as plainly as possible: precomputed τ tensors, one transformer call per step."""
    sig = flowmap_euler_sigmas(nfe, SHIFT).tolist()
    bf = noise.shape[:2]
    taus = [torch.full(bf, 1000.0 * s, dtype=torch.float32, device=noise.device) for s in sig]
    z = noise
    for i in range(nfe):
        u = transformer(
            hidden_states=z,
            timestep=taus[i],
            r_timestep=taus[i + 1],
            encoder_hidden_states=c,
            return_dict=False,
        )[0]
        z = z - (sig[i] - sig[i + 1]) * u
    return z


def paths(b: Bench) -> dict[str, Callable[[int], torch.Tensor]]:
    from anyflow.eval.pipeline import sample_with_pipeline
    from anyflow.rollout import flowmap_euler_sample

    def bare_lora(n: int) -> torch.Tensor:
        b.models.activate("generator")
        return bare_loop(b.models.transformer, b.noise, b.c, n)

    return {
        "bare": lambda n: bare_loop(b.merged, b.noise, b.c, n),
        "bare+lora": bare_lora,
        "fn": lambda n: flowmap_euler_sample(b.models.fn("generator"), b.noise, b.c, n, shift=SHIFT),
        # what anyflow/stages/evaluate.py runs: sample_with_pipeline over the pipeline built once per role
        # around the transformer with the generator LoRA merged
        "evaluate": lambda n: sample_with_pipeline(b.base, b.pipe, b.c, b.noise, n, shift=SHIFT),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_paths(b: Bench, nfes: tuple[int, ...], repeats: int, device: str) -> list[dict]:
    """Seconds of each path per round and NFE: every path runs once per round (order reversed every other
    round, so machine noise and ordering hit all alike), ``repeats`` rounds after one warm-up each."""
    fns = paths(b)
    names = list(fns)
    rows = []
    with torch.no_grad():
        ref = {name: fn(1) for name, fn in fns.items()}  # warm-up (and a sanity check of agreement below)
        spread = max((ref[k] - ref["bare"]).abs().max().item() for k in ref)
        for n in nfes:
            times: dict[str, list[float]] = {k: [] for k in names}
            for i in range(repeats):
                for name in names if i % 2 == 0 else reversed(names):
                    _sync(device)
                    t0 = time.perf_counter()
                    fns[name](n)
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
            rows.append({"config": b.cfg.name, "nfe": n, "times": times, "agree": spread})
    return rows


def ratio(r: dict, num: str, den: str = "bare") -> tuple[float, float, int]:
    """(min, median, pairs) of the per-round ratios of path ``num`` over path ``den``."""
    q = [a / d for a, d in zip(r["times"][num], r["times"][den], strict=True)]
    return min(q), statistics.median(q), len(q)


def print_table(rows: list[dict]) -> None:
    header = (
        "config",
        "NFE",
        "bare ms (median)",
        "ms/call",
        "evaluate/bare min",
        "median",
        "pairs",
        "evaluate fixed ms (median)",
        "bare+lora/bare median",
        "fn/bare median",
    )
    out = [header]
    for r in rows:
        t = r["times"]
        lo, med, k = ratio(r, "evaluate")
        bare = statistics.median(t["bare"])
        fixed = statistics.median([e - b for e, b in zip(t["evaluate"], t["bare"], strict=True)])
        out.append(
            (
                r["config"],
                str(r["nfe"]),
                f"{1e3 * bare:.2f}",
                f"{1e3 * bare / r['nfe']:.2f}",
                f"{lo:.2f}",
                f"{med:.2f}",
                str(k),
                f"{1e3 * fixed:.2f}",
                f"{ratio(r, 'bare+lora')[1]:.2f}",
                f"{ratio(r, 'fn')[1]:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in out) for i in range(len(header))]
    for row in out:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", default="tiny,mid", help="comma-separated subset of: " + ", ".join(CONFIGS)
    )
    parser.add_argument(
        "--nfes", default=",".join(map(str, NFES)), help="NFEs to time (default 1,2,4,8,16,32)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="alternated rounds per NFE, each running every path once (default 7, quick 5)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds the 1.3B MFU section)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 5 rounds, NFE ≤ 8 on tiny and ≤ 4 on mid (< 1 min on CPU)",
    )
    parser.add_argument(
        "--e2e", action="store_true", help="also time each stage of an `anyflow run` on the tiny preset"
    )
    parser.add_argument(
        "--mfu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="transformer fwd/bwd throughput and MFU (default: on with --device cuda)",
    )
    parser.add_argument(
        "--mfu-shape", default="1.3b", help="1.3b (Wan2.1-T2V-1.3B) or small (a CPU smoke shape)"
    )
    parser.add_argument(
        "--mfu-frames",
        type=int,
        default=None,
        help="latent frames for the MFU run (default 21, fewer on OOM)",
    )
    parser.add_argument(
        "--mfu-grad-ckpt", action="store_true", help="MFU: gradient checkpointing in forward+backward"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown}; choose from {list(CONFIGS)}")
    nfes = tuple(int(x) for x in args.nfes.split(","))
    print(f"device={args.device} torch threads={torch.get_num_threads()} dtype=fp32 shift={SHIFT:g}")
    rows = []
    for name in names:
        cfg = CONFIGS[name]
        # quick: NFE ≤ 8 on tiny, NFE ≤ 4 on mid, 5 rounds (unless --repeats is given)
        run_nfes = tuple(n for n in nfes if n <= (8 if name == "tiny" else 4)) if args.quick else nfes
        repeats = args.repeats or (5 if args.quick else 7)
        b = build(cfg, args.device)
        params = sum(p.numel() for p in b.merged.parameters()) / 1e6
        print(
            f"{name}: {params:.2f}M params, latent {cfg.latent} x batch {cfg.batch} ({cfg.tokens()} tokens), "
            f"text {cfg.text_len}x{cfg.text_dim}, LoRA rank {cfg.lora_rank}"
        )
        rows += time_paths(b, run_nfes, repeats, args.device)
        print(f"  max |path − bare| at NFE 1: {rows[-1]['agree']:.2e} (merged vs unmerged LoRA, same maths)")
    print_table(rows)
    if args.e2e:
        from benchmarks.sampling_extras import e2e_stage_times

        e2e_stage_times(quick=args.quick)
    if args.mfu or (args.mfu is None and args.device.startswith("cuda")):
        from benchmarks.sampling_extras import mfu_bench

        mfu_bench(args.device, shape=args.mfu_shape, frames=args.mfu_frames, grad_ckpt=args.mfu_grad_ckpt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
