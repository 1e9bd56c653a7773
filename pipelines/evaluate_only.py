"""``anyflow-evaluate-only``: evaluate an existing generator (given by store URL) against its teacher."""

from pipelines.platform import Platform
from pipelines.rerun import build_rerun_pipeline

PIPELINE_NAME = "anyflow-evaluate-only"


def build_evaluate_only_pipeline(platform: "Platform | None" = None, image: "str | None" = None,
                                 uris: "dict[str, str] | None" = None):
    """Evaluation only: one ``evaluate`` task (then its ``record_stage`` task, :mod:`pipelines.records`)
    whose ``generator_uri``, ``teacher_uri``, ``dataset_uri`` and optional ``flowmap_uri`` string parameters
    are the pipeline's own; the component reads the artifacts from the store (no importers:
    :mod:`pipelines.rerun`)."""
    return build_rerun_pipeline("evaluate", uris, platform=platform, image=image, name=PIPELINE_NAME)
