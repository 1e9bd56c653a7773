"""The ``record_stage`` task after each stage task: how a pipeline run records its stage outputs.

Stage tasks take no run id (their KFP cache key is the same in every run, so KFP's cache can skip an
unchanged stage without starting its pod). Instead, :func:`record` adds after each stage task one
small CPU task (``components/record_stage``; platform profile ``record_stage``; KFP caching disabled)
that writes ``<store>/runs/<KFP run id>/<entry>.json`` from the stage's output artifact — the cached
one after a KFP cache hit — for ``anyflow rerun --run``. With ``store`` empty the record task does not
run (``dsl.If(store != "")``): the artifacts then live only in KFP, nothing could be recorded, and a
record pod would only download the checkpoint.
"""

from __future__ import annotations

from typing import Any

from pipelines.platform import RECORD_PROFILE, Platform


def record(component: Any, platform: Platform, artifact: Any, store: Any, entry: str) -> Any:
    """Add the record task of one stage output ``artifact`` as run-record entry ``entry``; returns it.

    ``component`` is :func:`components.build_record_component`'s; ``store`` the pipeline's ``store``
    parameter. Each task sits in its own ``dsl.If`` so it depends only on its own stage task (a record
    is written as soon as that stage finishes, even if a later stage fails).
    """
    from kfp import dsl

    with dsl.If(store != "", name=f"record-{entry.replace('_', '-')}"):
        task = component(artifact=artifact, store=store, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, entry=entry)
        platform.apply(task, RECORD_PROFILE).set_display_name(f"record_{entry}")
    return task
