"""Worker for tests/test_far_training.py: causal on-policy steps on a FAR base under torchrun.

    torchrun --nproc_per_node 2 far_fsdp_worker.py DATASET OUT MODE

MODE none (data parallel, replicated base), fsdp (the frozen FAR base sharded with FSDP2, and the optimiser
state and EMA with ZeRO-1: the layout of the FAR presets) or fsdp-zero2 (FSDP2 for the base, DeepSpeed ZeRO-2
for the adapters: ``train.deepspeed=zero2``). All runs see the
same per-rank batches and draws, so their adapters must agree: sharding may not change the maths. Gradient
checkpointing is on (recomputation all-gathers the blocks again, under the adapter the graph was built with).
Each rank writes OUT/rankR.pt: final generator/critic tensors (incl. the far_patch_embedding extra), EMA, the
per-step metrics and the shard counts.
"""

import dataclasses
import sys

import torch

from anyflow.config import apply_overrides, get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models.loading import load_base
from anyflow.train.adapters import AdapterModel
from anyflow.train.causal_methods import FAR_EXTRA, CausalOnPolicyMethod
from anyflow.train.loop import fit, make_accelerator

dataset, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
p = apply_overrides(get_preset("far-tiny"), {"far.long_context_ratio": 1.0})
tr = dataclasses.replace(p.distill.train, steps=2, batch_size=1, checkpoint_every=100, ema_warmup_step=1,
                         sharding=mode.split("-")[0], shard_optimizer=mode == "fsdp",
                         deepspeed="zero2" if mode == "fsdp-zero2" else "")
acc = make_accelerator(tr)
rank, world = acc.process_index, acc.num_processes
far = {"chunk_partition": p.far.chunk_partition, "full_chunk_limit": 3, "attention": "dense"}


def base() -> AdapterModel:
    return AdapterModel(load_base("builtin:tiny", far=far, device=acc.device).transformer, rank=4, alpha=4.0,
                        gradient_checkpointing=True)


def random_state(models: AdapterModel, name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.05 for k, v in models.state(name).items()}


probe = base()
probe.add("t", "teacher")
probe.add("g", "generator", extra=FAR_EXTRA)
m = base()
m.transformer.train()
method = CausalOnPolicyMethod(
    m, dataclasses.replace(p.distill, train=tr, steps_list=(2, 4)), p.far,
    LatentDataset(dataset, batch_size=1, seed=0).negative_embedding(),
    teacher=random_state(probe, "t", 1), generator=random_state(probe, "g", 2),
)
metrics: list[dict] = []
inner = method.train_step
method.train_step = lambda ctx, step: metrics.append(inner(ctx, step)) or metrics[-1]
data = LatentDataset(dataset, batch_size=1, seed=0, rank=rank, world_size=world)
result = fit(method, tr, data, work_dir=f"{out}/{mode}-r{rank}", accelerator=acc, progress=False)
torch.save({
    "params": {f"{g}/{k}": q.detach().float().cpu().clone() for g, (ps, _) in method.optim_groups().items()
               for k, q in ps.items()},
    "ema": {k: v.cpu() for k, v in result.ema.items()},
    "metrics": metrics,
    "shard": result.shard,
    "optimizer_shard": result.optimizer_shard,
}, f"{out}/{mode}-rank{rank}.pt")
