"""Training-step cost of the methods, FMBS vs full rollouts, and shared-base vs three-copies memory.

Three tables, measured side by side in one run (nothing here is asserted; ratios are printed):

1. time and peak memory per training step of ``teacher`` (plain flow matching, §4) vs ``flowmap``
   (forward flow-map loss, §6) vs ``onpolicy`` (FMBS + DMD + forward loss, then critic, §7);
2. FMBS rollout (≤ 3 calls, §7.2) vs the full N-step rollout, both with gradients, N ∈ {2,4,8,16,50}:
   forward + backward of a scalar loss on the sample;
3. parameter memory of one frozen base with three named LoRA adapters vs three copies: analytic
   for the Wan2.1 1.3B and 14B configs (counted on the ``meta`` device, LoRA rank 256), measured
   (bytes of the parameter storages actually allocated) on the tiny and mid configs.

Every case of tables 1–2 runs in its own subprocess, so one case's allocator cache cannot hide the
next one's peak. Peak memory: on CPU the rise of the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` after the model is built) over its resident set at that point; on
CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (model already resident),
minus the allocated bytes at that point. The window opens after one no-grad base forward (one-time runtime
initialisation stays out) and before a warm-up step (so optimiser state, gradients and activations all
count); times are the mean of the steps after it. Models have random weights built in code (no downloads).

    python -m benchmarks.bench_training --quick                  # mid CPU config, a few minutes
    python -m benchmarks.bench_training --device cuda --shape 1.3b --frames 21
    python -m benchmarks.bench_training --variant far --device cuda --shape 1.3b   # causal FAR stages

``--variant far`` converts the base to AnyFlow-FAR (chunks [1,3,3,3,3,3,3,2] at 21 latent frames, [1,2,2] at
5) and times the causal methods (§8.4 teacher forcing with ``--far-chunks`` chunks, the §8.6 chunk-wise FMBS
rollout) next to the teacher step on the same base; table 2 is then skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NS = (2, 4, 8, 16, 50)
METHODS = ("teacher", "flowmap", "onpolicy")


def wan_config(shape: str) -> dict[str, Any]:
    """WanTransformer3DModel kwargs: tiny (tests), mid (CPU benchmark), 1.3b / 14b (Wan2.1 T2V)."""
    from anyflow.models.tiny import tiny_transformer_config

    if shape == "tiny":
        return tiny_transformer_config()
    common = {"patch_size": (1, 2, 2), "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
              "image_dim": None, "added_kv_proj_dim": None}
    if shape == "mid":
        return {**common, "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 16, "out_channels": 16,
                "text_dim": 64, "freq_dim": 64, "ffn_dim": 512, "num_layers": 4, "rope_max_seq_len": 64}
    wan = {**common, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
           "freq_dim": 256, "rope_max_seq_len": 1024}
    if shape == "1.3b":
        return {**wan, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    if shape == "14b":
        return {**wan, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
    raise SystemExit(f"unknown shape {shape!r}; use tiny, mid, 1.3b (or 14b for the analytic table)")


def inputs_shape(shape: str, frames: int | None) -> dict[str, Any]:
    """Latent (F, C, H, W), text (L, D), batch, LoRA rank and checkpointing per shape."""
    if shape == "tiny":
        return {"latent": (frames or 3, 4, 4, 4), "text": (16, 32), "batch": 2, "rank": 4, "ckpt": False}
    if shape == "mid":
        return {"latent": (frames or 5, 16, 8, 8), "text": (32, 64), "batch": 2, "rank": 16, "ckpt": False}
    return {"latent": (frames or 21, 16, 60, 104), "text": (512, 4096), "batch": 1, "rank": 256, "ckpt": True}


# ------------------------------------------------------------------------------------ child process


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _Peak:
    """Peak extra memory (MiB) of the code run between start() and stop() (see module docstring)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self.base = _rss_kib("VmRSS") * 1024

    def stop(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def _synthetic_adapter(model: Any, role: str, rank: int, seed: int) -> dict[str, Any]:
    """A non-zero adapter state for ``role`` (keys as ``lora.adapter_state_dict``), built without peft."""
    import torch

    from anyflow.models.lora import lora_target_modules

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in lora_target_modules(model, role):
        lin = model.get_submodule(name)
        out[f"{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.01
        out[f"{name}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.01
    return out


def far_partition(frames: int) -> tuple[int, ...]:
    """The FAR chunk partition for ``frames`` latent frames: §8.1's [1, 3, …, 3, rest]."""
    rest, part = frames - 1, [1]
    while rest > 0:
        part.append(min(3, rest))
        rest -= part[-1]
    return tuple(part)


def _build(shape: str, device: str, frames: int | None, variant: str = "bidirectional") -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import WanTransformer3DModel

    from anyflow.models.convert import wan_to_anyflow

    spec = inputs_shape(shape, frames)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        wan = WanTransformer3DModel(**wan_config(shape))  # random weights; values do not matter for cost
    keep = tuple(wan._keep_in_fp32_modules or ())
    wan.to(dtype)
    for name, p in wan.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    if variant == "far":
        from anyflow.models.far import convert_wan_to_far, set_far_attention

        far = convert_wan_to_far(wan, chunk_partition=far_partition(spec["latent"][0]))
        for name, p in far.named_parameters():
            p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
        set_far_attention(far, "flex" if device == "cuda" else "dense")
        return far.eval().requires_grad_(False), spec
    return wan_to_anyflow(wan, copy=False).eval().requires_grad_(False), spec


class _Batches:
    """Random latents/text of the shape's batch, from ``seed``; the resumable-loader interface ``fit`` calls
    (nothing to resume)."""

    def __init__(self, spec: dict[str, Any], device: str, seed: int = 0) -> None:
        import torch

        self.g = torch.Generator().manual_seed(seed)
        self.spec, self.device = spec, device

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        import torch

        b = self.spec["batch"]
        return {"latents": torch.randn((b, *self.spec["latent"]), generator=self.g).to(self.device),
                "text": torch.randn((b, *self.spec["text"]), generator=self.g).to(self.device)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from anyflow.config import DistillStage, FlowMapStage, TeacherStage, TrainConfig
    from anyflow.rollout import explicit_rollout, fmbs_rollout
    from anyflow.train.adapters import AdapterModel
    from anyflow.train.loop import TrainContext, make_accelerator
    from anyflow.train.methods import FlowMapMethod, OnPolicyMethod, TeacherMethod

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    transformer, spec = _build(args.shape, device, args.frames, args.variant)
    rank = spec["rank"]
    models = AdapterModel(transformer, rank=rank, alpha=float(rank), gradient_checkpointing=spec["ckpt"])
    neg = torch.zeros(1, *spec["text"], device=device)
    peak = _Peak(device)
    kind, _, arg = args.case.partition(":")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():  # one base forward first: one-time runtime initialisation stays out of the peak
        warm = next(_Batches(spec, device))
        t = torch.full(warm["latents"].shape[:2], 500.0, device=device)
        models.fn(None)(warm["latents"], t, t, warm["text"])

    if kind == "step":
        tr = TrainConfig(steps=10**6, batch_size=spec["batch"], mixed_precision="bf16" if device == "cuda" else "no")
        if arg == "teacher":
            method: Any = TeacherMethod(models, TeacherStage(train=tr), neg)
        elif args.variant == "far":
            from anyflow.config import FarConfig
            from anyflow.train.causal_methods import CausalFlowMapMethod, CausalOnPolicyMethod

            part = far_partition(spec["latent"][0])
            n = min(args.far_chunks, len(part))
            far = FarConfig(chunk_partition=part, long_context_ratio=0.0, min_chunks=n, max_chunks=n,
                            bidirectional_prob=0.0)
            if arg == "flowmap":
                method = CausalFlowMapMethod(models, FlowMapStage(train=tr), far, neg)
            else:
                gen = _synthetic_adapter(transformer, "generator", rank, 2)
                gen.update({f"far_patch_embedding.{k}": v for k, v in transformer.far_patch_embedding.state_dict().items()})
                method = CausalOnPolicyMethod(models, DistillStage(train=tr), far, neg,
                                              teacher=_synthetic_adapter(transformer, "teacher", rank, 1), generator=gen)
        elif arg == "flowmap":
            method = FlowMapMethod(models, FlowMapStage(train=tr), neg)
        else:
            method = OnPolicyMethod(models, DistillStage(train=tr), neg,
                                    teacher=_synthetic_adapter(transformer, "teacher", rank, 1),
                                    generator=_synthetic_adapter(transformer, "generator", rank, 2))
        groups = method.optim_groups()
        acc = make_accelerator(tr)
        ctx = TrainContext(
            accelerator=acc, cfg=tr, batches=_Batches(spec, device), generator=torch.Generator().manual_seed(0),
            optimizers={n: torch.optim.AdamW(list(ps.values()), lr=oc.lr) for n, (ps, oc) in groups.items()},
            params={n: ps for n, (ps, _) in groups.items()}, clip={n: oc.grad_clip for n, (_, oc) in groups.items()},
        )
        autocast = acc.autocast if device == "cuda" else None

        def one(step: int) -> None:
            ctx.step = step
            if autocast is None:
                method.train_step(ctx, step)
            else:
                with autocast():
                    method.train_step(ctx, step)

        peak.start()  # before the warm-up: optimiser state, gradients and activations all count
        one(0)
        sync()
        t0 = time.perf_counter()
        for s in range(1, args.steps + 1):
            one(s)
        sync()
        return {"seconds": (time.perf_counter() - t0) / args.steps, "peak_mib": peak.stop()}

    models.add("generator", "generator", init=_synthetic_adapter(transformer, "generator", rank, 2))
    n = int(arg.split("@")[1])
    batch = next(_Batches(spec, device))
    z = torch.randn_like(batch["latents"])
    fn = models.fn("generator")

    calls = [0]

    def rollout() -> None:
        ctx_ = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
        with ctx_:
            if arg.startswith("fmbs"):
                x, info = fmbs_rollout(fn, z, batch["text"], n, n // 2)  # k in the middle: 3 calls (2 if N = 2)
                calls[0] = info.calls
            else:
                x = explicit_rollout(fn, z, batch["text"], n)
                calls[0] = n
        models.backward("generator", x.float().square().mean(), torch.autograd.backward)
        for p in models.params("generator").values():
            p.grad = None

    peak.start()
    try:
        rollout()  # warm-up, inside the peak window
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            rollout()
        sync()
    except torch.cuda.OutOfMemoryError:
        return {"seconds": float("nan"), "peak_mib": float("nan"), "oom": True}
    return {"seconds": (time.perf_counter() - t0) / args.steps, "peak_mib": peak.stop(), "calls": calls[0]}


# ----------------------------------------------------------------------------------- parent process


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_training", "--child", case, "--shape", args.shape,
           "--device", args.device, "--steps", str(args.steps), "--threads", str(args.threads),
           "--variant", args.variant, "--far-chunks", str(args.far_chunks)]
    if args.frames:
        cmd += ["--frames", str(args.frames)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        print(f"  case {case} failed: {' | '.join(tail)}", file=sys.stderr)
        return {"seconds": float("nan"), "peak_mib": float("nan"), "failed": True}
    return json.loads(lines[-1])


def lora_sizes(model: Any, role: str, rank: int) -> list[int]:
    """Elements of each LoRA tensor of adapter ``role`` at ``rank`` (lora_A, lora_B per target module)."""
    from anyflow.models.lora import lora_target_modules

    out = []
    for name in lora_target_modules(model, role):
        m = model.get_submodule(name)
        out += [rank * m.in_features, rank * m.out_features]
    return out


def lora_params(model: Any, role: str, rank: int) -> int:
    return sum(lora_sizes(model, role, rank))


def analytic_memory(shape: str, rank: int = 256) -> dict[str, float]:
    """Parameter counts on ``meta``: AnyFlow base, LoRA per role; GiB at 2 bytes/parameter (bf16)."""
    import torch
    from diffusers import AnyFlowTransformer3DModel

    from anyflow.models.convert import anyflow_config_from_wan

    with torch.device("meta"):
        model = AnyFlowTransformer3DModel(**anyflow_config_from_wan(wan_config(shape)))
    base = sum(p.numel() for p in model.parameters())
    adapters = {role: lora_params(model, role, rank) for role in ("teacher", "critic", "generator")}
    lora_total = sum(adapters.values())
    return {"base": base, **adapters, "shared": base + lora_total, "copies": 3 * base + lora_total}


def measured_memory(shape: str) -> dict[str, float]:
    """Bytes of distinct parameter/buffer storages: one AdapterModel with 3 adapters vs 3 copies."""
    import copy

    from anyflow.train.adapters import AdapterModel

    transformer, spec = _build(shape, "cpu", None)
    rank = spec["rank"]

    def nbytes(modules: list[Any]) -> int:
        seen, total = set(), 0
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    copies = [copy.deepcopy(transformer) for _ in range(3)]
    shared = AdapterModel(transformer, rank=rank, alpha=float(rank), gradient_checkpointing=False)
    for role in ("teacher", "critic", "generator"):
        shared.add(role, role)
    for m, role in zip(copies, ("teacher", "critic", "generator"), strict=True):
        AdapterModel(m, rank=rank, alpha=float(rank), gradient_checkpointing=False).add(role, role)
    return {"shared": nbytes([shared.transformer]), "copies": nbytes(copies)}


def _fmt(x: float, unit: str = "") -> str:
    return "—" if x != x else f"{x:.3f}{unit}" if abs(x) < 100 else f"{x:.0f}{unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one timed step per case, N in {2, 8, 50}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shape", default=None, choices=("tiny", "mid", "1.3b"),
                   help="model shape (default: mid on cpu, 1.3b on cuda)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default 5 mid, 21 for 1.3b)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5, quick 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each case (0: torch default)")
    p.add_argument("--variant", default="bidirectional", choices=("bidirectional", "far"),
                   help="far: the causal methods on an AnyFlow-FAR base (per-step table only)")
    p.add_argument("--far-chunks", type=int, default=3,
                   help="chunks per teacher-forced clip for --variant far (3 = the short context, 8 = the longest)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("1.3b" if args.device == "cuda" else "mid")
    args.steps = args.steps or (1 if args.quick else 5)
    if args.child:
        print(json.dumps(child(argparse.Namespace(**{**vars(args), "case": args.child}))))
        return 0

    spec = inputs_shape(args.shape, args.frames)
    where = f"{args.shape} on {args.device}, batch {spec['batch']}, latent {spec['latent']}, LoRA rank {spec['rank']}"
    if args.variant == "far":
        where += f", FAR chunks {list(far_partition(spec['latent'][0]))}, {args.far_chunks} chunks teacher-forced"
    print(f"# Training benchmark — {where}; mean of {args.steps} timed step(s) after 1 warm-up\n")
    rows = {m: run_case(f"step:{m}", args) for m in METHODS}
    t0, m0 = rows["teacher"]["seconds"], rows["teacher"]["peak_mib"]
    print("## Per training step\n")
    print("| method | s/step | peak MiB | time / teacher | peak / teacher |\n|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {_fmt(r['seconds'])} | {_fmt(r['peak_mib'])} | {_fmt(r['seconds'] / t0)} | {_fmt(r['peak_mib'] / m0)} |")

    if args.variant == "far":
        print("\n(teacher: bidirectional flow matching on the FAR base; flowmap: §8.4 teacher forcing; onpolicy: §8.6"
              " chunk-wise FMBS + DMD + teacher-forced loss, then the critic)")
        return 0
    ns = (2, 8, 50) if args.quick else NS
    print("\n## Rollout with gradients (forward + backward)\n")
    print("| N | FMBS calls | FMBS s | FMBS MiB | full calls | full s | full MiB | full/FMBS time | full/FMBS mem"
          " | FMBS time / FMBS(first N) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = None
    for n in ns:
        f, e = run_case(f"rollout:fmbs@{n}", args), run_case(f"rollout:full@{n}", args)
        first = first or f["seconds"]
        oom = " (OOM)" if e.get("oom") else ""
        print(f"| {n} | {f.get('calls', '—')} | {_fmt(f['seconds'])} | {_fmt(f['peak_mib'])} | {e.get('calls', n)}"
              f" | {_fmt(e['seconds'])}{oom} | {_fmt(e['peak_mib'])} | {_fmt(e['seconds'] / f['seconds'])}"
              f" | {_fmt(e['peak_mib'] / f['peak_mib'])}"
              f" | {_fmt(f['seconds'] / first)} |")

    print("\n## Parameter memory: one base + 3 LoRA adapters vs three copies\n")
    print("| shape | base params | LoRA teacher / critic / generator | shared GiB (bf16) | 3 copies GiB (bf16) | copies / shared |")
    print("|---|---|---|---|---|---|")
    for shape in ("1.3b", "14b"):
        a = analytic_memory(shape)
        print(f"| {shape} (analytic, r=256) | {a['base'] / 1e9:.3f} B | {a['teacher'] / 1e6:.0f} M / {a['critic'] / 1e6:.0f} M /"
              f" {a['generator'] / 1e6:.0f} M | {a['shared'] * 2 / 2**30:.2f} | {a['copies'] * 2 / 2**30:.2f} |"
              f" {a['copies'] / a['shared']:.2f} |")
    print("\n| shape (measured, fp32 storages) | shared MiB | 3 copies MiB | copies / shared |\n|---|---|---|---|")
    for shape in ("tiny", "mid"):
        m = measured_memory(shape)
        print(f"| {shape} (r={inputs_shape(shape, None)['rank']}) | {m['shared'] / 2**20:.2f} | {m['copies'] / 2**20:.2f} |"
              f" {m['copies'] / m['shared']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
