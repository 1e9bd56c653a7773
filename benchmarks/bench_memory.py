"""Parameter memory per GPU with the frozen base replicated vs sharded (``train.sharding``) — analytic.

Nothing here is measured on a GPU: the numbers are computed from the model configs of the presets
(``wan2.1-t2v-1.3b`` / ``wan2.1-t2v-14b``: the AnyFlow transformer built on the ``meta`` device, LoRA
rank from the preset) and from how ``anyflow.train.loop.shard_frozen_base`` lays parameters out:

* **frozen base**: loaded in bf16 with Wan's fp32 modules (time embedder, norms, scale-shift tables)
  kept fp32, as ``anyflow.stages.common.load_models`` does on CUDA. Replicated: all of it on every GPU.
  FSDP2 over W GPUs: each parameter is split on dim 0 into W chunks; the table uses the largest chunk
  (rank 0, ⌈d₀/W⌉ rows). HSDP over nodes of W GPUs holds the same as FSDP over W.
* **gathered while computing** (sharded only): the root group stays all-gathered after its first
  forward (FSDP2 ``reshard_after_forward`` is False for the root), plus two all-gathered blocks (the
  block running and the one prefetched). Transient, but it is part of the peak.
* **adapter state** of the on-policy stage (the largest): three LoRA adapters (teacher, critic,
  generator), the gradients of one trained adapter at a time (each update steps and frees its own
  before the next backward), AdamW moments of the two trained ones, the generator's fp32 EMA. The trained
  adapters, gradients, moments and EMA are fp32; the frozen teacher is kept in bf16 under bf16 mixed
  precision (``AdapterModel.frozen_adapters_stored_in``). Replicated on every GPU, except the moments and
  the EMA with ZeRO-1 (``train.shard_optimizer``, on in the Wan presets): each rank holds them for the
  tensors ``ZeroRedundancyOptimizer`` assigns it (greedy by size, computed here exactly; the table uses
  the largest rank).
* **DeepSpeed ZeRO-2** (``train.deepspeed=zero2``, one engine per trained adapter,
  ``anyflow/train/deepspeed_zero.py``): moments and EMA split evenly by flat range (⌈n/W⌉ per rank), plus
  DeepSpeed's fp32 master copy of the rank's partition and its gradient buckets (two buffers of
  ``reduce_bucket_size`` fp32 elements per engine with ``overlap_comm``, as in the built-in config). With
  ``zero2_offload`` the moments, EMA and master copy live in CPU memory; the buckets stay on the GPU.

Activations are not counted (gradient checkpointing keeps them per block). GB = 10⁹ bytes.

    python -m benchmarks.bench_memory
"""

from __future__ import annotations

import argparse
import math
from typing import Any

PRESETS = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b"}
LAYOUTS = (("replicated", 1, ""), ("fsdp", 8, ""), ("fsdp + zero1", 8, "zero1"), ("fsdp + zero1", 16, "zero1"),
           ("fsdp + deepspeed zero2", 8, "zero2"), ("fsdp + deepspeed zero2_offload", 8, "zero2_offload"))
GB = 1e9


def _model(shape: str) -> Any:
    import torch
    from diffusers import AnyFlowTransformer3DModel

    from anyflow.models.convert import anyflow_config_from_wan
    from anyflow.models.loading import _cast_like_from_pretrained
    from benchmarks.bench_training import wan_config

    with torch.device("meta"):
        model = AnyFlowTransformer3DModel(**anyflow_config_from_wan(wan_config(shape)))
    return _cast_like_from_pretrained(model, torch.bfloat16)


def _bytes(params: list[Any], world: int) -> int:
    """Largest per-rank bytes of ``params`` sharded on dim 0 over ``world`` ranks (world 1: all)."""
    total = 0
    for p in params:
        rows = p.shape[0] if p.dim() > 0 else 1
        rest = p.numel() // max(rows, 1)
        total += math.ceil(rows / world) * rest * p.element_size()
    return total


def _ds_bucket() -> int:
    """``reduce_bucket_size`` of the built-in ``zero2`` DeepSpeed config (elements)."""
    from anyflow.train.deepspeed_zero import load_config

    return int(load_config("zero2")[0]["zero_optimization"]["reduce_bucket_size"])


def _zero1_largest(sizes: list[int], world: int) -> int:
    """Elements on the busiest rank when ``ZeroRedundancyOptimizer`` partitions tensors of ``sizes``: largest
    first, each to the rank with the fewest elements so far (its algorithm, per parameter group)."""
    load = [0] * world
    for n in sorted(sizes, reverse=True):
        load[load.index(min(load))] += n
    return max(load)


def analytic_table(shape: str) -> dict[str, Any]:
    from anyflow.config import get_preset
    from benchmarks.bench_training import lora_sizes

    preset = get_preset(PRESETS[shape])
    model = _model(shape)
    rank = preset.model.lora_rank
    blocks = [list(b.parameters()) for b in model.blocks]
    in_blocks = {id(p) for ps in blocks for p in ps}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    every = [*root, *(p for ps in blocks for p in ps)]
    sizes = {role: lora_sizes(model, role, rank) for role in ("teacher", "critic", "generator")}
    lora = {role: sum(v) for role, v in sizes.items()}
    trained = lora["critic"] + lora["generator"]
    # adapters; gradients of one trained adapter at a time (the generator update steps and frees its gradients
    # before the critic update's backward; DMD evaluates the critic and teacher without autograd)
    fixed = 2 * lora["teacher"] + 4 * trained + 4 * max(lora["critic"], lora["generator"])
    rows = []
    for layout, world, zero in LAYOUTS:
        base = _bytes(every, world)
        gathered = 0 if world == 1 else _bytes(root, 1) + 2 * max(_bytes(ps, 1) for ps in blocks)
        extra = 0  # DeepSpeed: fp32 master partition + gradient buckets
        if zero.startswith("zero2"):  # flat ranges: ceil(n / W) of each engine's tensors per rank
            part = {g: math.ceil(lora[g] / world) for g in ("critic", "generator")}
            moments, ema = 8 * sum(part.values()), 4 * part["generator"]
            extra = 2 * 2 * 4 * _ds_bucket()  # 2 engines x 2 buffers (overlap_comm) x fp32 x elements
            if zero == "zero2_offload":
                moments = ema = 0  # in CPU memory, with the master copy
            else:
                extra += 4 * sum(part.values())
        else:
            # AdamW: exp_avg + exp_avg_sq per trained tensor; ZeRO-1 partitions each optimiser separately
            moments = 8 * (sum(_zero1_largest(sizes[g], world) for g in ("critic", "generator")) if zero else trained)
            ema = 4 * (_zero1_largest(sizes["generator"], world) if zero else lora["generator"])
        rows.append(
            {
                "layout": layout,
                "gpus": world,
                "base": base,
                "gathered": gathered,
                "adapters": fixed + moments + ema + extra,
                "moments": moments + ema,
                "total": base + gathered + fixed + moments + ema + extra,
            }
        )
    return {
        "shape": shape,
        "base_params": sum(p.numel() for p in every),
        "lora": lora,
        "rank": rank,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", choices=sorted(PRESETS), help="model shape (default: both)")
    args = p.parse_args(argv)
    print("## Parameter memory per GPU, on-policy stage, bf16 base (analytic, from the preset configs)\n")
    print("| model | layout | GPUs | frozen base | gathered while computing | adapter state | of which AdamW moments + EMA"
          " | total |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shape or ("1.3b", "14b"):
        t = analytic_table(shape)
        for r in t["rows"]:
            gpus = "any" if r["layout"] == "replicated" else str(r["gpus"])
            print(
                f"| {shape} ({t['base_params'] / 1e9:.2f} B, LoRA {t['rank']}) | {r['layout']} | {gpus} "
                f"| {r['base'] / GB:.2f} GB | {r['gathered'] / GB:.2f} GB | {r['adapters'] / GB:.1f} GB "
                f"| {r['moments'] / GB:.1f} GB | {r['total'] / GB:.1f} GB |"
            )
    print(
        "\nHSDP with nodes of 8 GPUs holds the base as FSDP over 8 does (zero1 always partitions over every GPU of the job). Adapter state = 3 LoRA adapters (teacher bf16,"
        " critic and generator fp32) + gradients of one of them at a time + AdamW moments (fp32) of generator and"
        " critic + generator EMA (fp32); zero1 = train.shard_optimizer (moments and EMA partitioned across the GPUs);"
        " deepspeed rows add DeepSpeed's fp32 master partition and gradient buckets to the adapter state (offload:"
        " moments, EMA and master copy in CPU memory); activations not counted."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
