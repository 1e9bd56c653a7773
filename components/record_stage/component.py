"""KFP component: record_stage — write one stage task's run record (CPU only, never cached)."""

from kfp.dsl import Artifact, Input


def record_stage(
    artifact: Input[Artifact],
    store: str,
    run_id: str,
    entry: str = "",
) -> None:
    """Record ``artifact`` as entry ``entry`` of run ``run_id``: ``<store>/runs/<run_id>/<entry>.json``.

    Runs after every stage task, with KFP caching disabled, so a run whose stage tasks KFP skipped
    from its cache still records the (cached) artifacts it used. Reads the store URL, stage and
    inputs from the artifact's metadata and the manifest digest from the store; computes nothing.

    Args:
        artifact: The stage task's output artifact (Dataset, Model or Artifact).
        store: Content-addressed store URL the stage published to; empty: nothing is recorded.
        run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``).
        entry: Name of the record (default: the stage that produced the artifact), e.g.
            ``prepare_finetune_data`` for a second task of the same stage.
    """
    from components._io import write_run_record

    write_run_record(artifact, store, run_id, entry)
