"""Worker for tests/test_train_resume_ranks.py: one stage through ``run_stage`` under torchrun, as a
TrainJob runs ``python -m anyflow.stages.<name>`` (every rank calls it).

    torchrun --nproc_per_node W stage_worker.py STAGE STORE DATASET OVERRIDES_JSON
"""

import json
import os
import sys

from anyflow import storage
from anyflow.stages import run_stage

stage, store, dataset, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
real_publish = storage.publish


def publish(src, dst, **kw):  # a spy: which rank publishes what (the real publish still runs)
    print(json.dumps({"published": kw.get("kind"), "rank": int(os.environ["RANK"])}), flush=True)
    return real_publish(src, dst, **kw)


storage.publish = publish
res = run_stage(stage, store=store, overrides=overrides, inputs={"dataset": dataset}, progress=False)
print(json.dumps({"uri": res.uri, "cached": res.cached}))
