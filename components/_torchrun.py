"""Run a stage with one process per GPU of the component's own pod (``anyflow.stages.processes``).

A training stage's pod has ``nproc_per_node`` GPUs (the platform's ``gpus`` for the stage, a compile-time
component parameter). With more than one, :func:`run_in_pod` runs the stage as that many torchrun processes and
returns what rank 0 published, read back from the store: the KFP executor writes the output artifact's metadata
in its own process, as the multi-node launcher (``components/trainjob``) does after its job.

Without a store (``store=""``: artifacts written into the KFP output itself) the ranks publish into a private
store in the pod's temporary folder, and rank 0's artifact is then moved into the KFP output path; nothing
resumes across pod restarts then (as for one process without a store). A failing rank fails the component with
that rank's exit code and the end of its output (:class:`anyflow.stages.processes.RankFailed`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any


def run_in_pod(stage: str, output: Any, store: str, *, nproc_per_node: int, preset: str,
               overrides: Mapping[str, Any], inputs: Mapping[str, str]) -> Any:
    """Run ``stage`` for the KFP output artifact ``output``: in this process when ``nproc_per_node`` <= 1,
    else as ``nproc_per_node`` torchrun processes in this pod (module docstring). Returns the ``StageResult``."""
    from anyflow.stages import run_stage
    from anyflow.stages.processes import run_processes
    from components._io import stage_target

    nproc = int(nproc_per_node)
    if nproc <= 1:
        store_url, out = stage_target(output, store)
        return run_stage(stage, preset=preset, overrides=overrides, inputs=inputs, store=store_url, out=out)
    with tempfile.TemporaryDirectory(prefix=f"anyflow-{stage}-store-") as tmp:
        target = store or os.path.join(tmp, "store")  # no store: a private one, moved into the KFP output below
        res = run_processes(stage, nproc, store=target, preset=preset, overrides=overrides, inputs=inputs)
        if store:
            return res
        if os.path.isdir(output.path):
            shutil.rmtree(output.path)
        elif os.path.lexists(output.path):
            os.remove(output.path)
        os.makedirs(os.path.dirname(output.path) or ".", exist_ok=True)
        shutil.move(res.uri, output.path)  # rank 0's artifact, manifest included (training stages have no report)
        return dataclasses.replace(res, uri=output.path)
