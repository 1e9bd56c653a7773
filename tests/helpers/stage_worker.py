"""Worker for tests/test_train_resume_ranks.py: one stage through ``run_stage`` under torchrun, as a
TrainJob runs ``python -m anyflow.stages.<name>`` (every rank calls it).

    torchrun --nproc_per_node W stage_worker.py STAGE STORE DATASET OVERRIDES_JSON

Each rank appends its records (JSON lines: what it published, the result) to ``STORE/../records-rankR.jsonl``:
lines the ranks print to one stdout can interleave.
"""

import json
import os
import sys
from pathlib import Path

from anyflow import storage
from anyflow.stages import run_stage

stage, store, dataset, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
rank = int(os.environ["RANK"])
records = Path(store).parent / f"records-rank{rank}.jsonl"
real_publish = storage.publish


def record(obj: dict) -> None:
    with records.open("a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")


def publish(src, dst, **kw):  # a spy: which rank publishes what (the real publish still runs)
    record({"published": kw.get("kind"), "rank": rank})
    return real_publish(src, dst, **kw)


storage.publish = publish
res = run_stage(stage, store=store, overrides=overrides, inputs={"dataset": dataset}, progress=False)
record({"uri": res.uri, "cached": res.cached})
