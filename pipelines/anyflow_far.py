"""``anyflow-far``: the causal AnyFlow-FAR variant (docs/method.md §8) — the training DAG of ``anyflow-t2v`` with a
``far-*`` preset: teacher-forced forward flow-map training (stage 1b), chunk-wise on-policy distillation with
a KV cache of the generator's own chunks (stage 2b), and an evaluation that samples T2V and I2V chunk by chunk.
"""

from pipelines.anyflow_t2v import _DOC, build_training_pipeline
from pipelines.platform import Platform

PIPELINE_NAME = "anyflow-far"
FAR_PRESETS = ("far-tiny", "far-1.3b", "far-14b")


def build_far_pipeline(platform: "Platform | None" = None, image: "str | None" = None):
    """Return the ``anyflow-far`` pipeline function bound to ``platform`` and ``image``."""
    return build_training_pipeline(
        platform, image, name=PIPELINE_NAME, default_preset="far-tiny",
        description="AnyFlow-FAR causal any-step video: data, teacher, causal flow map, causal distill, T2V/I2V evaluate.",
        doc=_DOC.format(what=" (causal FAR: T2V, I2V, V2V from one model)", presets=", ".join(FAR_PRESETS)),
    )
