"""Training-step cost of the methods, FMBS vs full rollouts, and shared-base vs three-copies memory.

Three tables (nothing here is asserted; ratios are printed):

1. time per training step of ``teacher`` (plain flow matching, §4) vs ``flowmap`` (forward flow-map loss,
   §6) vs ``onpolicy`` (FMBS + DMD + forward loss, then critic, §7);
2. FMBS rollout (≤ 3 calls, §7.2) vs the full N-step rollout, both with gradients, N ∈ {2,4,8,16,50}:
   forward + backward of a scalar loss on the sample;
3. parameter memory of one frozen base with three named LoRA adapters vs three copies: analytic
   for the Wan2.1 1.3B and 14B configs (counted on the ``meta`` device, LoRA rank 256; bytes as the
   on-policy stage keeps them: base and frozen teacher adapter bf16, trained adapters fp32), measured
   (bytes of the parameter storages actually allocated) on the tiny and mid configs.

Times: the compared cases of a table (the three methods; FMBS and full at one N) run in this one process,
each on its own copy of the base, one warm-up run each, then ``--rounds`` rounds that run every case once,
the order reversed every other round. Each ratio is printed as min / median of the per-round ratios with
the number of pairs. Next to each ratio, the FLOP bound: the FLOPs of one run of each case counted by
``torch.utils.flop_counter.FlopCounterMode`` on the same config, with gradient checkpointing off and on
(the recompute of checkpointed blocks counts), attention on SDPA's math backend while counting.

Peak memory (skipped with ``--quick``): each case in a subprocess of its own, so one case's allocator cache
cannot hide the next one's peak. On CPU the rise of the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs``) over its resident set at that point; on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocated bytes at that point.
The window opens after one no-grad base forward (one-time runtime initialisation stays out) and before
the first of two runs (optimiser state, gradients and activations all count). Models have random weights
built in code (no downloads).

    python -m benchmarks.bench_training --quick                  # mid CPU config, a smoke run (3 rounds)
    python -m benchmarks.bench_training --device cuda --shape 1.3b --frames 21
    python -m benchmarks.bench_training --variant far --device cuda --shape 1.3b   # causal FAR stages

``--variant far`` converts the base to AnyFlow-FAR (chunks [1,3,3,3,3,3,3,2] at 21 latent frames, [1,2,2] at
5) and times the causal methods (§8.4 teacher forcing with ``--far-chunks`` chunks, the §8.6 chunk-wise FMBS
rollout) next to the teacher step on the same base; table 2 is then skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
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
    common = {
        "patch_size": (1, 2, 2),
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
    }
    if shape == "mid":
        return {
            **common,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 64,
            "freq_dim": 64,
            "ffn_dim": 512,
            "num_layers": 4,
            "rope_max_seq_len": 64,
        }
    wan = {
        **common,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "rope_max_seq_len": 1024,
    }
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


def _build(
    shape: str, device: str, frames: int | None, variant: str = "bidirectional"
) -> tuple[Any, dict[str, Any]]:
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
        return {
            "latents": torch.randn((b, *self.spec["latent"]), generator=self.g).to(self.device),
            "text": torch.randn((b, *self.spec["text"]), generator=self.g).to(self.device),
        }

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _make_step_case(
    kind: str, arg: str, transformer: Any, spec: dict[str, Any], args: argparse.Namespace
) -> _Case:
    """One timed unit on its own copy of the base: a training step of method ``arg`` (``kind == "step"``) or a
    rollout with gradients (``kind == "rollout"``, ``arg`` = ``fmbs@N`` / ``full@N``)."""
    import torch

    from anyflow.config import DistillStage, FlowMapStage, TeacherStage, TrainConfig
    from anyflow.rollout import explicit_rollout, fmbs_rollout
    from anyflow.train.adapters import AdapterModel
    from anyflow.train.loop import TrainContext, make_accelerator
    from anyflow.train.methods import FlowMapMethod, OnPolicyMethod, TeacherMethod

    device, rank = args.device, spec["rank"]
    models = AdapterModel(transformer, rank=rank, alpha=float(rank), gradient_checkpointing=spec["ckpt"])
    neg = torch.zeros(1, *spec["text"], device=device)
    if kind == "step":
        tr = TrainConfig(
            steps=10**6, batch_size=spec["batch"], mixed_precision="bf16" if device == "cuda" else "no"
        )
        if arg == "teacher":
            method: Any = TeacherMethod(models, TeacherStage(train=tr), neg)
        elif args.variant == "far":
            from anyflow.config import FarConfig
            from anyflow.train.causal_methods import CausalFlowMapMethod, CausalOnPolicyMethod

            part = far_partition(spec["latent"][0])
            n = min(args.far_chunks, len(part))
            far = FarConfig(
                chunk_partition=part,
                long_context_ratio=0.0,
                min_chunks=n,
                max_chunks=n,
                bidirectional_prob=0.0,
            )
            if arg == "flowmap":
                method = CausalFlowMapMethod(models, FlowMapStage(train=tr), far, neg)
            else:
                gen = _synthetic_adapter(transformer, "generator", rank, 2)
                gen.update(
                    {
                        f"far_patch_embedding.{k}": v
                        for k, v in transformer.far_patch_embedding.state_dict().items()
                    }
                )
                method = CausalOnPolicyMethod(
                    models,
                    DistillStage(train=tr),
                    far,
                    neg,
                    teacher=_synthetic_adapter(transformer, "teacher", rank, 1),
                    generator=gen,
                )
        elif arg == "flowmap":
            method = FlowMapMethod(models, FlowMapStage(train=tr), neg)
        else:
            method = OnPolicyMethod(
                models,
                DistillStage(train=tr),
                neg,
                teacher=_synthetic_adapter(transformer, "teacher", rank, 1),
                generator=_synthetic_adapter(transformer, "generator", rank, 2),
            )
        groups = method.optim_groups()
        acc = make_accelerator(tr)
        ctx = TrainContext(
            accelerator=acc,
            cfg=tr,
            batches=_Batches(spec, device),
            generator=torch.Generator().manual_seed(0),
            optimizers={n: torch.optim.AdamW(list(ps.values()), lr=oc.lr) for n, (ps, oc) in groups.items()},
            params={n: ps for n, (ps, _) in groups.items()},
            clip={n: oc.grad_clip for n, (_, oc) in groups.items()},
        )
        autocast = acc.autocast if device == "cuda" else None
        count = [0]

        def one() -> None:
            ctx.step = count[0]
            count[0] += 1
            if autocast is None:
                method.train_step(ctx, ctx.step)
            else:
                with autocast():
                    method.train_step(ctx, ctx.step)

        return _Case(one, models, None)

    models.add("generator", "generator", init=_synthetic_adapter(transformer, "generator", rank, 2))
    n = int(arg.split("@")[1])
    batch = next(_Batches(spec, device))
    z = torch.randn_like(batch["latents"])
    fn = models.fn("generator")
    calls = [n]

    def rollout() -> None:
        ctx_ = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with ctx_:
            if arg.startswith("fmbs"):
                x, info = fmbs_rollout(
                    fn, z, batch["text"], n, n // 2
                )  # k in the middle: 3 calls (2 if N = 2)
                calls[0] = info.calls
            else:
                x = explicit_rollout(fn, z, batch["text"], n)
        models.backward("generator", x.float().square().mean(), torch.autograd.backward)
        for p in models.params("generator").values():
            p.grad = None

    return _Case(rollout, models, calls)


class _Case:
    """A timed unit: ``run()`` does one step; ``models`` is its AdapterModel; ``calls`` (rollouts) the
    transformer calls of the last run."""

    def __init__(self, run: Any, models: Any, calls: list[int] | None) -> None:
        self.run, self.models, self.calls = run, models, calls


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _base_forward(transformer: Any, spec: dict[str, Any], device: str) -> None:
    """One no-grad base forward: one-time runtime initialisation stays out of what is measured."""
    import torch

    with torch.no_grad():
        warm = next(_Batches(spec, device))
        t = torch.full(warm["latents"].shape[:2], 500.0, device=device)
        transformer(
            hidden_states=warm["latents"],
            timestep=t,
            r_timestep=t,
            encoder_hidden_states=warm["text"],
            return_dict=False,
        )


def count_flops(fn: Any) -> int:
    """FLOPs of one call of ``fn`` counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward, backward
    and any recompute of checkpointed blocks alike). Attention runs on SDPA's math backend while counting, so
    its matmuls are seen on every device (the fused CPU kernel is not registered with the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def counted_flops(case: _Case, device: str) -> dict[bool, int]:
    """Counted FLOPs of one run of ``case`` with gradient checkpointing off (False) and on (True); the
    case's own setting is restored afterwards."""
    base = case.models.transformer
    was = bool(getattr(base, "gradient_checkpointing", False))
    out = {}
    try:
        for ckpt in (False, True):
            base.enable_gradient_checkpointing() if ckpt else base.disable_gradient_checkpointing()
            out[ckpt] = count_flops(case.run)
            _sync(device)
    finally:
        base.enable_gradient_checkpointing() if was else base.disable_gradient_checkpointing()
    return out


def alternate(
    cases: dict[str, Any], *, rounds: int, warmup: int = 1, sync: Any = None
) -> dict[str, list[float]]:
    """Seconds per run of each case, the cases alternated in one process: ``warmup`` untimed runs each,
    then ``rounds`` rounds that run every case once, the order reversed every other round (so neither side
    always goes first). Returns the per-round times of each case (``rounds`` values each)."""
    sync = sync or (lambda: None)
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            cases[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, int]:
    """(min, median, pairs) of the per-round ratios num[i] / den[i]."""
    r = [a / b for a, b in zip(num, den, strict=True)]
    return min(r), statistics.median(r), len(r)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one case in a process of its own (one case's allocator cache cannot hide the next one's
    peak): the window opens after a no-grad base forward and before the first run, so optimiser state,
    gradients and activations all count; it closes after a second run."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    transformer, spec = _build(args.shape, args.device, args.frames, args.variant)
    _base_forward(transformer, spec, args.device)
    kind, _, arg = args.case.partition(":")
    case = _make_step_case(kind, arg, transformer, spec, args)
    peak = _Peak(args.device)
    peak.start()
    try:
        case.run()
        case.run()
        _sync(args.device)
    except torch.cuda.OutOfMemoryError:
        return {"peak_mib": float("nan"), "oom": True}
    return {"peak_mib": peak.stop()}


# ----------------------------------------------------------------------------------- parent process


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_training",
        "--child",
        case,
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--variant",
        args.variant,
        "--far-chunks",
        str(args.far_chunks),
    ]
    if args.frames:
        cmd += ["--frames", str(args.frames)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        print(f"  case {case} failed: {' | '.join(tail)}", file=sys.stderr)
        return {"peak_mib": float("nan"), "failed": True}
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
    """Parameter counts on ``meta`` (AnyFlow base, LoRA per role) and the parameter bytes of one base with the
    three adapters (``shared_bytes``) vs three copies of the base (``copies_bytes``), as the on-policy stage keeps
    them under bf16 mixed precision: base 2 bytes/parameter, the frozen teacher adapter 2, the trained critic and
    generator adapters 4 (fp32, ``AdapterModel`` keeps trained adapters in fp32)."""
    import torch
    from diffusers import AnyFlowTransformer3DModel

    from anyflow.models.convert import anyflow_config_from_wan

    with torch.device("meta"):
        model = AnyFlowTransformer3DModel(**anyflow_config_from_wan(wan_config(shape)))
    base = sum(p.numel() for p in model.parameters())
    adapters = {role: lora_params(model, role, rank) for role in ("teacher", "critic", "generator")}
    lora_total = sum(adapters.values())
    adapter_bytes = 2 * adapters["teacher"] + 4 * (adapters["critic"] + adapters["generator"])
    return {
        "base": base,
        **adapters,
        "shared": base + lora_total,
        "copies": 3 * base + lora_total,
        "shared_bytes": 2 * base + adapter_bytes,
        "copies_bytes": 3 * 2 * base + adapter_bytes,
    }


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


def _timed_cases(
    names: list[str], args: argparse.Namespace, transformer: Any, spec: dict[str, Any]
) -> dict[str, _Case]:
    import copy

    out = {}
    for name in names:
        kind, _, arg = name.partition(":")
        out[name] = _make_step_case(kind, arg, copy.deepcopy(transformer), spec, args)  # each on its own copy
    return out


def _peaks(names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Peak MiB per case, each in its own process; NaN when skipped (``--no-memory``)."""
    return {n: run_case(n, args)["peak_mib"] if args.memory else float("nan") for n in names}


def _bounds(cases: dict[str, _Case], device: str) -> dict[str, dict[bool, int]]:
    return {n: counted_flops(c, device) for n, c in cases.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 alternated rounds, N in {2, 8}, no per-case memory processes",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--shape",
        default=None,
        choices=("tiny", "mid", "1.3b"),
        help="model shape (default: mid on cpu, 1.3b on cuda)",
    )
    p.add_argument("--frames", type=int, default=None, help="latent frames (default 5 mid, 21 for 1.3b)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternated rounds after the warm-up, each running every compared case once (default 7, quick 3)",
    )
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="peak memory of each case in a process of its own (default: on, off with --quick)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument(
        "--variant",
        default="bidirectional",
        choices=("bidirectional", "far"),
        help="far: the causal methods on an AnyFlow-FAR base (per-step table only)",
    )
    p.add_argument(
        "--far-chunks",
        type=int,
        default=3,
        help="chunks per teacher-forced clip for --variant far (3 = the short context, 8 = the longest)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("1.3b" if args.device == "cuda" else "mid")
    args.rounds = args.rounds or (3 if args.quick else 7)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    args.memory = (not args.quick) if args.memory is None else args.memory
    if args.child:
        print(json.dumps(child(argparse.Namespace(**{**vars(args), "case": args.child}))))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = inputs_shape(args.shape, args.frames)
    where = (
        f"{args.shape} on {args.device}, batch {spec['batch']}, latent {spec['latent']}, LoRA rank {spec['rank']},"
        f" gradient checkpointing {'on' if spec['ckpt'] else 'off'}, torch threads {torch.get_num_threads()}"
    )
    if args.variant == "far":
        where += (
            f", FAR chunks {list(far_partition(spec['latent'][0]))}, {args.far_chunks} chunks teacher-forced"
        )
    print(f"# Training benchmark — {where}\n")
    print(
        f"Compared cases run in this one process, each on its own copy of the base, alternated run by run after"
        f" one warm-up run each; {args.rounds} rounds (order reversed every other round). Ratios: min / median of the"
        f" per-round ratios and the number of pairs. FLOP bound = FLOPs counted by torch FlopCounterMode on one run of"
        f" each case (attention on SDPA's math backend), with gradient checkpointing off / on; `*` marks the setting"
        f" this config uses.\n"
    )
    transformer, spec = _build(args.shape, args.device, args.frames, args.variant)
    _base_forward(transformer, spec, args.device)
    sync = functools.partial(_sync, args.device)
    ck = spec["ckpt"]

    def bound(fl: dict[str, dict[bool, int]], num: str, den: str) -> str:
        off, on = fl[num][False] / fl[den][False], fl[num][True] / fl[den][True]
        return f"{off:.2f}{'*' if not ck else ''} / {on:.2f}{'*' if ck else ''}"

    names = [f"step:{m}" for m in METHODS]
    cases = _timed_cases(names, args, transformer, spec)
    for c in cases.values():  # the warm-up run of alternate() would do this; here the FLOP count comes first
        c.run()
    flops = _bounds(cases, args.device)
    times = alternate({n: c.run for n, c in cases.items()}, rounds=args.rounds, sync=sync)
    peaks = _peaks(names, args)
    del cases
    print("## Per training step\n")
    print(
        "| method | s/step min | s/step median | time / teacher min | median | pairs | FLOP bound (ckpt off / on)"
        " | TFLOP counted (off / on) | peak MiB | peak / teacher |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    ref = "step:teacher"
    for n in names:
        lo, med, k = ratio_stats(times[n], times[ref])
        print(
            f"| {n.split(':')[1]} | {_fmt(min(times[n]))} | {_fmt(statistics.median(times[n]))} | {lo:.2f} | {med:.2f}"
            f" | {k} | {bound(flops, n, ref)} | {flops[n][False] / 1e12:.4g} / {flops[n][True] / 1e12:.4g}"
            f" | {_fmt(peaks[n])} | {_fmt(peaks[n] / peaks[ref])} |"
        )
    if not args.memory:
        print("\n(peak memory not measured: --quick or --no-memory; each case needs a process of its own)")

    if args.variant == "far":
        print(
            "\n(teacher: bidirectional flow matching on the FAR base; flowmap: §8.4 teacher forcing; onpolicy: §8.6"
            " chunk-wise FMBS + DMD + teacher-forced loss, then the critic)"
        )
        return 0
    ns = (2, 8) if args.quick else NS
    print("\n## Rollout with gradients (forward + backward), FMBS vs full, alternated per N\n")
    print(
        "| N | FMBS calls | full calls | FMBS s median | full s median | full/FMBS time min | median | pairs"
        " | FLOP bound full/FMBS (off / on) | FMBS MiB | full MiB | full/FMBS mem |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        pair = [f"rollout:fmbs@{n}", f"rollout:full@{n}"]
        try:
            cases = _timed_cases(pair, args, transformer, spec)
            for c in cases.values():
                c.run()
            fl = _bounds(cases, args.device)
            t = alternate({k: c.run for k, c in cases.items()}, rounds=args.rounds, sync=sync)
        except torch.cuda.OutOfMemoryError:
            print(f"| {n} | — | {n} | — | out of memory | — | — | 0 | — | — | — | — |")
            continue
        calls = {k: c.calls[0] for k, c in cases.items()}
        del cases
        pk = _peaks(pair, args)
        lo, med, k = ratio_stats(t[pair[1]], t[pair[0]])
        print(
            f"| {n} | {calls[pair[0]]} | {calls[pair[1]]} | {_fmt(statistics.median(t[pair[0]]))}"
            f" | {_fmt(statistics.median(t[pair[1]]))} | {lo:.2f} | {med:.2f} | {k} | {bound(fl, pair[1], pair[0])}"
            f" | {_fmt(pk[pair[0]])} | {_fmt(pk[pair[1]])} | {_fmt(pk[pair[1]] / pk[pair[0]])} |"
        )

    print("\n## Parameter memory: one base + 3 LoRA adapters vs three copies\n")
    print(
        "| shape | base params | LoRA teacher / critic / generator | shared GiB | 3 copies GiB | copies / shared |"
    )
    print("|---|---|---|---|---|---|")
    for shape in ("1.3b", "14b"):
        a = analytic_memory(shape)
        print(
            f"| {shape} (analytic, r=256) | {a['base'] / 1e9:.3f} B | {a['teacher'] / 1e6:.0f} M / {a['critic'] / 1e6:.0f} M /"
            f" {a['generator'] / 1e6:.0f} M | {a['shared_bytes'] / 2**30:.2f} | {a['copies_bytes'] / 2**30:.2f} |"
            f" {a['copies_bytes'] / a['shared_bytes']:.2f} |"
        )
    print(
        "\n(analytic bytes: base bf16, frozen teacher adapter bf16, trained critic and generator adapters fp32)"
    )
    print(
        "\n| shape (measured, fp32 storages) | shared MiB | 3 copies MiB | copies / shared |\n|---|---|---|---|"
    )
    for shape in ("tiny", "mid"):
        m = measured_memory(shape)
        print(
            f"| {shape} (r={inputs_shape(shape, None)['rank']}) | {m['shared'] / 2**20:.2f} | {m['copies'] / 2**20:.2f} |"
            f" {m['copies'] / m['shared']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
