"""``anyflow-evaluate-only``: evaluate an existing generator (imported by URI) against its teacher."""

from pipelines.platform import Platform
from pipelines.rerun import build_rerun_pipeline

PIPELINE_NAME = "anyflow-evaluate-only"


def build_evaluate_only_pipeline(platform: "Platform | None" = None, image: "str | None" = None,
                                 uris: "dict[str, str] | None" = None):
    """Evaluation only: importers for generator, teacher, dataset (+ flowmap when its URI is given)
    feed one ``evaluate`` task (then its ``record_stage`` task, :mod:`pipelines.records`); parameters
    ``generator_uri``, ``teacher_uri``, ``dataset_uri``."""
    return build_rerun_pipeline("evaluate", uris, platform=platform, image=image, name=PIPELINE_NAME)
