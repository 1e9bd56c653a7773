"""Worker for tests/test_train_sharding.py: on-policy steps under torchrun with ``train.sharding``.

    torchrun --nproc_per_node W fsdp_worker.py DATASET OUT MODE ACCUM [nockpt] [zero]

MODE is none / fsdp / hsdp (hsdp treats every 2 ranks as one node: LOCAL_WORLD_SIZE=2). On CPU (gloo) the
base is fp32; on CUDA (NCCL, one GPU per rank) it is bf16 with Wan's fp32 modules, as the stages load it.
Each rank writes OUT/rankR.pt: its recorded random draws and batches (tests/helpers/replay.py), the
gradients of every optimiser step, per-step metrics, final adapters and EMA, the shard counts, and a
checkpoint-recomputation control (generator gradients when backward runs under the generator vs the
critic adapter: they must differ, or checkpointing did not recompute under the sharded base).
"""

import dataclasses
import os
import sys

import torch
from replay import Recorder, SegmentedBatches, record_optimizer_grads, record_step_metrics
from states import random_adapter_state as random_state

from anyflow.config import get_preset
from anyflow.data.shards import LatentDataset
from anyflow.dmd import dmd_generator_loss
from anyflow.models.loading import load_base
from anyflow.rollout import fmbs_rollout
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import fit, make_accelerator
from anyflow.train.methods import OnPolicyMethod

STEPS, BATCH, STEPS_LIST = 3, 1, (2, 4, 50)
dataset, out, mode, accum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ckpt = "nockpt" not in sys.argv[5:]
zero = "zero" in sys.argv[5:]  # also train.shard_optimizer (ZeRO-1)
if mode == "hsdp":
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # two "nodes" of two ranks on one machine

p = get_preset("tiny")
tr = dataclasses.replace(
    p.distill.train,
    steps=STEPS,
    batch_size=BATCH,
    grad_accum=accum,
    checkpoint_every=100,
    ema_warmup_step=2,
    sharding=mode,
    shard_optimizer=zero,
)
acc = make_accelerator(tr)
device = acc.device
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
rank, world = acc.process_index, acc.num_processes



m = AdapterModel(
    load_base("builtin:tiny", dtype=dtype, device=device).transformer,
    rank=4,
    alpha=4.0,
    gradient_checkpointing=ckpt,
)
probe = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
probe.add("t", "teacher")
probe.add("g", "generator")
data = LatentDataset(dataset, batch_size=BATCH, seed=0, rank=rank, world_size=world)
method = OnPolicyMethod(
    m,
    dataclasses.replace(p.distill, train=tr, steps_list=STEPS_LIST),
    data.negative_embedding(),
    teacher=random_state(probe, "t", 1),
    generator=random_state(probe, "g", 2),
)
lora_names = {n for n, _ in m.transformer.named_parameters() if ".lora_" in n}
full_base = sum(q.numel() for n, q in m.transformer.named_parameters() if n not in lora_names)

grads, kept = [], []
metrics = record_step_metrics(method)
rec = Recorder()
with rec.active(), record_optimizer_grads(grads):
    result = fit(
        method,
        tr,
        SegmentedBatches(data, rec, kept),
        work_dir=f"{out}/r{rank}",
        accelerator=acc,
        progress=False,
    )

from torch.distributed.tensor import DTensor  # noqa: E402

named = dict(m.transformer.named_parameters())
base = {n: q for n, q in named.items() if n not in lora_names}
local = sum(q.to_local().numel() if isinstance(q, DTensor) else q.numel() for q in base.values())
layout = {
    "base_dtensors": sum(isinstance(q, DTensor) for q in base.values()),
    "base_tensors": len(base),
    "lora_dtensors": sum(isinstance(named[n], DTensor) for n in lora_names),
}

# checkpoint-recomputation control on the (possibly sharded) base: same loss, backward under two adapters
g = torch.Generator().manual_seed(5)
z = torch.randn(2, 3, 4, 4, 4, generator=g).to(device)
c = torch.randn(2, 16, 32, generator=g).to(device)
c_neg = torch.randn(1, 16, 32, generator=g).to(device)


def gen_grads(backward_adapter: str) -> list[torch.Tensor]:
    x_hat, _ = fmbs_rollout(m.fn("generator"), z, c, 8, 3)
    loss, _ = dmd_generator_loss(
        x_hat, m.fn("teacher"), m.fn("critic"), c, c_neg, torch.Generator().manual_seed(1)
    )
    m.backward(backward_adapter, loss, torch.autograd.backward)
    out_ = [q.grad.detach().float().cpu().clone() for q in m.params("generator").values()]
    for q in m.params("generator").values():
        q.grad = None
    return out_


right, wrong = gen_grads("generator"), gen_grads("critic")
control = max(float((a - b).abs().max()) for a, b in zip(right, wrong, strict=True))

torch.save(
    {
        "world": world,
        "rank": rank,
        "segments": rec.segments,
        "batches": kept,
        "grads": grads,
        "metrics": metrics,
        "params": {
            f"{gname}/{k}": q.detach().float().cpu().clone()
            for gname, (ps, _) in method.optim_groups().items()
            for k, q in ps.items()
        },
        "ema": {k: v.cpu() for k, v in result.ema.items()},
        "shard": result.shard,
        "local_measured": local,
        "full_base": full_base,
        "layout": layout,
        "ckpt": bool(m.transformer.gradient_checkpointing),
        "control": control,
        "right": right,
    },
    f"{out}/rank{rank}.pt",
)
