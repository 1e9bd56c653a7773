"""Worker for tests/test_train_resize.py: stage-1 training under torchrun with preemption-safe checkpoints in a
store folder, exactly as the stages run it (``anyflow.stages.common.train_resumable``), with a chosen gradient
accumulation, so that runs on different numbers of ranks train on the same global batch.

    torchrun --nproc_per_node W resize_worker.py DATASET CKPT_URL OUT STEPS GRAD_ACCUM [zero | ds:NAME] [keep]

Trains to ``STEPS`` with micro-batches of one sample (resuming from the newest checkpoint under ``CKPT_URL`` if
there is one) and writes OUT/rankR.pt: the trained adapter, the EMA, the step it resumed from, this rank's
loader state, the keys of every batch this rank drew, in order, and how many trainable elements' AdamW moments
this rank held. ``zero``: ``train.shard_optimizer`` (ZeRO-1: moments and EMA split over the ranks); ``ds:NAME``:
``train.deepspeed=NAME`` (a DeepSpeed ZeRO engine per optimiser group, flat partitions). ``keep``: each checkpoint
the run prunes (``step-XXXXXXXX`` under CKPT_URL, deleted once a newer one is published) is first copied to
OUT/kept/step-XXXXXXXX, so one uninterrupted run also leaves the checkpoint a run preempted there would resume from.
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch
from keep_pruned import keep_pruned

from anyflow.config import get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models.convert import wan_to_anyflow
from anyflow.models.tiny import build_tiny_wan
from anyflow.stages.common import train_resumable
from anyflow.train.adapters import AdapterModel
from anyflow.train.methods import FlowMapMethod

dataset, ckpt_url, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
steps, accum = int(sys.argv[4]), int(sys.argv[5])
flags = sys.argv[6:]
keep = "keep" in flags
mode = next((f for f in flags if f != "keep"), "")
zero = mode == "zero"
deepspeed = mode.removeprefix("ds:") if mode.startswith("ds:") else ""
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
p = get_preset("tiny")
tr = dataclasses.replace(
    p.flowmap.train,
    steps=steps,
    batch_size=1,
    grad_accum=accum,
    checkpoint_every=2,
    ema_warmup_step=1,
    shard_optimizer=zero,
    deepspeed=deepspeed,
)
# the tiny base transformer as load_base("builtin:tiny") converts it (the VAE and text encoder are not needed)
transformer = wan_to_anyflow(build_tiny_wan(0), copy=False).eval().requires_grad_(False)
models = AdapterModel(transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
data = LatentDataset(dataset, batch_size=tr.batch_size, seed=tr.seed, rank=rank, world_size=world)


class Recording:
    """The loader, recording the keys of every batch drawn through it."""

    def __init__(self, inner: LatentDataset) -> None:
        self.inner, self.keys = inner, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.keys.append(list(batch["keys"]))
        return batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


if keep:
    keep_pruned(out / "kept")
batches = Recording(data)
method = FlowMapMethod(models, dataclasses.replace(p.flowmap, train=tr), data.negative_embedding())
(out / f"r{rank}").mkdir(parents=True, exist_ok=True)
result = train_resumable(method, tr, batches, out_dir=out / f"r{rank}", ckpt_url=ckpt_url, progress=False,
                         final_checkpoint=True)  # a shorter run stands for a preempted one
torch.save(
    {
        "params": {k: v.detach().clone() for k, v in models.params("generator").items()},
        "ema": {k: v.detach().clone() for k, v in result.ema.items()},
        "resumed_from": result.resumed_from,
        "data": data.state_dict(),
        "keys": batches.keys,
        "optimizer_shard": result.optimizer_shard,
    },
    out / f"rank{rank}.pt",
)
