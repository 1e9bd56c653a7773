"""Worker for tests/test_train_resume_ranks.py: stage-1 training under torchrun with preemption-safe
checkpoints in a store folder, exactly as the stages run it (``anyflow.stages.common.train_resumable``).

    torchrun --nproc_per_node W resume_worker.py DATASET CKPT_URL OUT STEPS

Trains to ``STEPS`` (resuming from the newest checkpoint under ``CKPT_URL`` if there is one) and writes
OUT/rankR.pt: the trained adapter, the EMA, the step it resumed from and what this rank's data loader and
random generator are at.
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch

from anyflow.config import get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models.loading import load_base
from anyflow.stages.common import train_resumable
from anyflow.train.adapters import AdapterModel
from anyflow.train.methods import FlowMapMethod

dataset, ckpt_url, out, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
p = get_preset("tiny")
tr = dataclasses.replace(p.flowmap.train, steps=steps, batch_size=2, checkpoint_every=2, ema_warmup_step=1)
models = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
data = LatentDataset(dataset, batch_size=tr.batch_size, seed=tr.seed, rank=rank, world_size=world)
method = FlowMapMethod(models, dataclasses.replace(p.flowmap, train=tr), data.negative_embedding())
(out / f"r{rank}").mkdir(parents=True, exist_ok=True)
result = train_resumable(method, tr, data, out_dir=out / f"r{rank}", ckpt_url=ckpt_url, progress=False,
                         final_checkpoint=True)  # a shorter run stands for a preempted one
torch.save(
    {
        "params": {k: v.detach().clone() for k, v in models.params("generator").items()},
        "ema": {k: v.detach().clone() for k, v in result.ema.items()},
        "resumed_from": result.resumed_from,
        "data": data.state_dict(),
        "noise": torch.randn(4, generator=torch.Generator().manual_seed(0)),
    },
    out / f"rank{rank}.pt",
)
