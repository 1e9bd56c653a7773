"""KFP component: prepare_data — build the dataset artifact (latent + text-embedding shards)."""

from kfp.dsl import Dataset, Metrics, Output


def prepare_data(
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
    extra_overrides_json: str = "{}",
    source_fingerprint: str = "",
    merge_only: bool = False,
) -> None:
    """Prepare the training dataset (procedural for ``tiny``; videos + captions otherwise).

    CPU only (text and VAE encoders may use one GPU on large presets).

    Args:
        preset: Preset name, e.g. ``tiny`` or ``wan2.1-t2v-1.3b``.
        overrides_json: JSON object of dotted config overrides, e.g. ``{"data.num_videos": 8}``.
        store: Content-addressed artifact store URL (``s3://bucket/prefix`` or a folder); empty
            writes the artifact into the KFP output itself.
        extra_overrides_json: Overrides applied over ``overrides_json`` (the pipeline's fine-tuning
            dataset: the run's common overrides, then its own data source and settings).
        source_fingerprint: What the data source holds now (the ``source_fingerprint`` task's output). Not
            read here: it is an input so that KFP's cache key changes when videos are added under the same
            source (the stage's store key holds the same digest).
        merge_only: Only merge partitions the ``prepare_partition`` pods already encoded (``Platform.prepare_fanout``:
            this task then runs on the CPU-only ``prepare_merge`` profile); a partition missing from the store
            fails the task instead of being encoded here.

    Returns:
        dataset: Output dataset artifact (or a pointer to it in the store).
        metrics: Output dataset summary for the KFP UI (clips read and written, shards, seconds, clips/s).
    """
    import contextlib

    from anyflow.stages.prepare_data import merge_only as merging
    from components._io import run_component

    with merging() if merge_only else contextlib.nullcontext():
        run_component("prepare_data", dataset, metrics=metrics, preset=preset, overrides_json=overrides_json,
                      store=store, extra_overrides_json=extra_overrides_json)
