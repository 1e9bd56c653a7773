"""ZeRO measured: optimiser-state and EMA bytes per rank, and step time, for plain AdamW, torch's ZeRO-1
(``train.shard_optimizer``) and DeepSpeed ZeRO-2 (``train.deepspeed=zero2``).

The on-policy stage (two optimisers: generator and critic) runs ``anyflow.train.loop.fit`` under torchrun
on W ranks, once with plain AdamW on every rank, once with ZeRO-1 and once with DeepSpeed ZeRO-2, side by
side in one invocation.
Every rank reports what it really holds, counted from the tensors (not from the configs):

* **moments**: the AdamW ``exp_avg`` / ``exp_avg_sq`` tensors in its (local) optimisers' state;
* **EMA**: the EMA tensors ``fit`` keeps on that rank during training (under DeepSpeed: the EMA entries
  beside the moments in the EMA group's optimiser state);
* **gradients**: the most gradient bytes alive at once over all trainable tensors (the generator and
  critic updates each step and free their own, so this is one group's, not both; under DeepSpeed the
  loop's summed gradients before the engine takes them);
* **fp32 master** (DeepSpeed): the fp32 copy of this rank's partition of the trainable tensors DeepSpeed
  steps (the tensors themselves are its flat buffer);
* **frozen teacher adapter**: the teacher LoRA tensors while the loop runs (bf16 under bf16 mixed
  precision, ``AdapterModel.frozen_adapters_stored_in``; fp32 otherwise);
* **step time**: mean seconds of a training step (the method's ``train_step``, which includes the gradient
  all-reduce and ZeRO-1's parameter broadcasts; checkpoints are not timed) after one warm-up step; on the
  CPU over gloo this says little about NCCL's cost.

Random weights built in code; nothing is asserted.

    python -m benchmarks.bench_zero                      # mid config, 2 gloo ranks on the CPU
    python -m benchmarks.bench_zero --device cuda --nproc 8 --shape 1.3b --frames 21
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def child(args: argparse.Namespace) -> None:
    import torch

    from anyflow.config import DistillStage, TrainConfig
    from anyflow.models import lora
    from anyflow.train import loop
    from anyflow.train.adapters import AdapterModel
    from anyflow.train.methods import OnPolicyMethod
    from benchmarks.bench_training import _Batches, _build, _synthetic_adapter

    rank = int(os.environ["RANK"])
    device = "cuda" if args.device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" is then this rank's GPU
    transformer, spec = _build(args.shape, device, args.frames)
    r = spec["rank"]
    models = AdapterModel(transformer, rank=r, alpha=float(r), gradient_checkpointing=spec["ckpt"])
    tr = TrainConfig(steps=args.steps + 1, batch_size=spec["batch"], checkpoint_every=10**9, log_every=10**9,
                     mixed_precision=args.mixed_precision, shard_optimizer=args.mode == "zero1",
                     deepspeed="zero2" if args.mode == "zero2" else "")
    method = OnPolicyMethod(models, DistillStage(train=tr), torch.zeros(1, *spec["text"], device=device),
                            teacher=_synthetic_adapter(transformer, "teacher", r, 1),
                            generator=_synthetic_adapter(transformer, "generator", r, 2))
    teacher = lora.trainable_parameters(transformer, "teacher")
    seen: dict[str, Any] = {"times": []}
    inner_step = method.train_step
    inner_clip = loop.TrainContext.clip_and_step

    def clip_and_step(ctx: Any, name: str) -> float:
        grads = _bytes(q.grad for ps in ctx.params.values() for q in ps.values() if q.grad is not None)
        grads += sum(_bytes(g._grads.values()) for g in ctx.deepspeed.values())  # the loop's sums under DeepSpeed
        seen["grads"] = max(seen.get("grads", 0), grads)  # every group's gradients alive at this moment
        norm = inner_clip(ctx, name)
        held = 0
        for local in map(loop.local_optimizer, ctx.optimizers.values()):
            held += _bytes(v for st in local.state.values() for k, v in st.items() if k.startswith("exp_avg"))
        seen["moments"] = max(seen.get("moments", 0), held)
        seen["master"] = sum(_bytes(g.zero.single_partition_of_fp32_groups) for g in ctx.deepspeed.values())
        # DeepSpeed keeps the EMA beside the moments, over the rank's partition
        seen["ds_ema"] = sum(_bytes(st["ema"] for st in g.optimizer.state.values() if "ema" in st)
                             for g in ctx.deepspeed.values())
        return norm

    def train_step(ctx: Any, step: int) -> dict[str, float]:
        seen["teacher"] = _bytes(teacher.values())
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = inner_step(ctx, step)
        if device == "cuda":
            torch.cuda.synchronize()
        seen["times"].append(time.perf_counter() - t0)
        return out

    loop.TrainContext.clip_and_step = clip_and_step  # type: ignore[method-assign]
    method.train_step = train_step  # type: ignore[method-assign]
    ema_local: list[int] = []
    inner_ema = loop._ema_update

    def ema_update(ema: Any, params: Any, decay: float) -> None:
        inner_ema(ema, params, decay)
        ema_local.append(_bytes(ema.values()))

    loop._ema_update = ema_update
    work = Path(tempfile.mkdtemp(prefix="bench-zero-"))
    try:
        t0 = time.perf_counter()
        result = loop.fit(method, tr, _Batches(spec, device, seed=rank), work_dir=work, progress=False)
        total = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    times = seen["times"][1:]  # after the warm-up step
    row = {
        "rank": rank, "moments": seen["moments"], "ema": max(ema_local) + seen["ds_ema"], "teacher": seen["teacher"],
        "step_s": sum(times) / len(times), "fit_s": total, "trainable": result.optimizer_shard["params"] * 4,
        "grads": seen["grads"], "master": seen["master"],
        "groups": {g: _bytes(ps.values()) for g, (ps, _) in method.optim_groups().items()},
    }
    # one file per rank (lines the ranks print to one stdout can interleave)
    (Path(args.out_dir) / f"rank{rank}.json").write_text(json.dumps(row))


def _launch(args: argparse.Namespace, mode: str) -> list[dict[str, Any]]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, "--standalone", "--nproc_per_node", str(args.nproc), "-m", "benchmarks.bench_zero", "--child",
           "--device", args.device, "--shape", args.shape, "--steps", str(args.steps),
           "--mixed-precision", args.mixed_precision, "--mode", mode]
    cmd += ["--frames", str(args.frames)] if args.frames else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="bench-zero-rows-") as rows_dir:
        res = subprocess.run([*cmd, "--out-dir", rows_dir], cwd=REPO, env=env, capture_output=True, text=True)
        files = sorted(Path(rows_dir).glob("rank*.json"))
        if res.returncode != 0 or len(files) != args.nproc:
            raise SystemExit(f"bench_zero: torchrun failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        rows = [json.loads(f.read_text()) for f in files]
    return sorted(rows, key=lambda row: row["rank"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks (gloo on CPU, NCCL on CUDA: one GPU each); default 2 on CPU, every GPU on CUDA")
    p.add_argument("--shape", default="mid", choices=("tiny", "mid", "1.3b", "14b"))
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the shape's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--mixed-precision", default=None, choices=("no", "bf16"),
                   help="default: bf16 on CUDA, no on CPU (bf16 also works on CPU, slowly)")
    p.add_argument("--mode", choices=("plain", "zero1", "zero2"), default="plain", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    if args.child:
        child(args)
        return 0
    if args.nproc is None:
        import torch

        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.nproc < 2:
        print(f"bench_zero: ZeRO needs at least 2 ranks ({args.nproc} {args.device} devices); skipped")
        return 0
    runs = {"plain": _launch(args, "plain"), "ZeRO-1": _launch(args, "zero1"), "DeepSpeed ZeRO-2": _launch(args, "zero2")}
    plain = runs["plain"]
    mib = 2**20
    print(f"## ZeRO on {args.nproc} {args.device} ranks, on-policy stage, {args.shape} config, "
          f"mixed precision {args.mixed_precision} (measured per rank)\n")
    groups = ", ".join(f"{g} {b / mib:.2f} MiB" for g, b in plain[0]["groups"].items())
    print(f"trainable tensors (fp32): {groups}; frozen teacher adapter {plain[0]['teacher'] / mib:.2f} MiB; most "
          "gradient bytes alive at once: " + ", ".join(f"{k} {max(r['grads'] for r in v) / mib:.2f} MiB"
                                                       for k, v in runs.items()) + "\n")
    print("| layout | rank | AdamW moments | ratio to plain | EMA | ratio | fp32 master copy | step | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        for a, b in zip(plain, rows, strict=True):
            print(f"| {name} | {b['rank']} | {b['moments'] / mib:.2f} MiB | {b['moments'] / a['moments']:.2f} "
                  f"| {b['ema'] / mib:.2f} MiB | {b['ema'] / a['ema']:.2f} | {b['master'] / mib:.2f} MiB "
                  f"| {b['step_s']:.3f} s | {b['step_s'] / a['step_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
