"""Worker for tests/test_train_zero.py: on-policy training (two optimisers: generator and critic) under
torchrun with preemption-safe checkpoints in a store folder, as the stages run it
(``anyflow.stages.common.train_resumable``), with plain AdamW, torch's ZeRO-1 (``train.shard_optimizer``) or
DeepSpeed ZeRO (``train.deepspeed``).

    torchrun --nproc_per_node W zero_worker.py DATASET CKPT_URL OUT STEPS MODE [keep]

Trains to ``STEPS`` (resuming from the newest checkpoint under ``CKPT_URL`` if there is one); MODE is ``plain``,
``zero1`` (torch) or ``ds:<train.deepspeed value>``, e.g. ``ds:zero2``. ``keep``: each checkpoint the run prunes
is first copied to OUT/kept/step-XXXXXXXX (helpers/keep_pruned.py).
Writes OUT/rankR.pt: the trained adapters, the EMA, the step it resumed from, the optimiser partition
counts and the number of moment elements this rank's optimisers really hold.
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch
from keep_pruned import keep_pruned
from states import random_adapter_state as random_state

from anyflow.config import get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models.loading import load_base
from anyflow.stages.common import train_resumable
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import TrainContext, is_sharded_optimizer, local_optimizer
from anyflow.train.methods import OnPolicyMethod

dataset, ckpt_url, out, steps, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
p = get_preset("tiny")
tr = dataclasses.replace(p.distill.train, steps=steps, batch_size=1, checkpoint_every=2, ema_warmup_step=2,
                         shard_optimizer=mode == "zero1", deepspeed=mode.removeprefix("ds:") if mode.startswith("ds:") else "")
models = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
probe = AdapterModel(load_base("builtin:tiny").transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
probe.add("t", "teacher")
probe.add("g", "generator")
data = LatentDataset(dataset, batch_size=tr.batch_size, seed=tr.seed, rank=rank, world_size=world)
method = OnPolicyMethod(
    models,
    dataclasses.replace(  # an LR warm-up and weight decay, so the wrapper must pass both to the local AdamW
        p.distill, train=tr, steps_list=(2, 4),
        generator_optim=dataclasses.replace(p.distill.generator_optim, warmup_steps=3),
        critic_optim=dataclasses.replace(p.distill.critic_optim, weight_decay=0.01),
    ),
    data.negative_embedding(),
    teacher=random_state(probe, "t", 1), generator=random_state(probe, "g", 2),
)
held: list[int] = []  # after every optimiser step: moment elements this rank's optimisers really hold


def _spied(clip_and_step):
    def wrapper(self, name):
        norm = clip_and_step(self, name)
        n = 0
        for inner in map(local_optimizer, self.optimizers.values()):
            n += sum(v.numel() for st in inner.state.values() for k, v in st.items() if k.startswith("exp_avg"))
        held.append(n)
        wrapper.stage = max([g.stage for g in self.deepspeed.values()], default=0)
        # the ZeRO wrapper's own state must stay empty (a resume used to leave a copy of the moments there)
        wrapper.extra = max(wrapper.extra, sum(len(o.state) for o in self.optimizers.values() if is_sharded_optimizer(o)))
        return norm
    wrapper.extra = 0
    wrapper.stage = 0  # the DeepSpeed ZeRO stage that ran (0: none)
    return wrapper


TrainContext.clip_and_step = _spied(TrainContext.clip_and_step)
if sys.argv[6:] == ["keep"]:
    keep_pruned(out / "kept")
(out / f"r{rank}").mkdir(parents=True, exist_ok=True)
result = train_resumable(method, tr, data, out_dir=out / f"r{rank}", ckpt_url=ckpt_url, progress=False,
                         final_checkpoint=True)  # a shorter run stands for a preempted one
torch.save(
    {
        "params": {f"{g}/{k}": v.detach().clone() for g in ("generator", "critic") for k, v in models.params(g).items()},
        "ema": {k: v.detach().clone() for k, v in result.ema.items()},
        "resumed_from": result.resumed_from,
        "optimizer_shard": result.optimizer_shard,
        "moments_held": max(held),
        "wrapper_state": TrainContext.clip_and_step.extra,
        "zero_stage": TrainContext.clip_and_step.stage,
    },
    out / f"rank{rank}.pt",
)
