"""Worker for tests/test_train_distributed.py: 3 flow-map steps under torchrun (gloo, CPU)."""

import dataclasses
import hashlib
import json
import sys

from anyflow.config import get_preset
from anyflow.data.shards import LatentDataset
from anyflow.models.loading import load_base
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import fit, make_accelerator
from anyflow.train.methods import FlowMapMethod

dataset, out = sys.argv[1], sys.argv[2]
p = get_preset("tiny")
tr = dataclasses.replace(p.flowmap.train, steps=3, checkpoint_every=100)
acc = make_accelerator(tr)
base = load_base("builtin:tiny")
m = AdapterModel(base.transformer, rank=4, alpha=4.0, gradient_checkpointing=False)
data = LatentDataset(dataset, batch_size=2, seed=0, rank=acc.process_index, world_size=acc.num_processes)
meth = FlowMapMethod(m, dataclasses.replace(p.flowmap, train=tr), data.negative_embedding())
seen = []
class Recording:
    def __init__(self, it):
        self.it = it
    def __next__(self):
        batch = next(self.it)
        seen.extend(batch["keys"])
        return batch
    def state_dict(self):
        return self.it.state_dict()
    def load_state_dict(self, s):
        self.it.load_state_dict(s)
fit(meth, tr, Recording(data), work_dir=f"{out}/r{acc.process_index}", accelerator=acc, progress=False)
h = hashlib.sha256(b"".join(v.detach().numpy().tobytes() for v in m.params("generator").values())).hexdigest()
with open(f"{out}/rank{acc.process_index}.json", "w") as fh:
    json.dump({"hash": h, "keys": seen, "world": acc.num_processes}, fh)
