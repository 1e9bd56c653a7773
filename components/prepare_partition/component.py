"""KFP component: prepare_partition -- encode one partition of a partitioned prepare_data (``data.partition_size``
> 0; anyflow/data/partitions.py), inside the ``dsl.ParallelFor`` over the ``source_fingerprint`` task's
partition list (its output ``Output``; pipelines/fingerprint.py)."""


def prepare_partition(
    partition: str,
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
    extra_overrides_json: str = "{}",
) -> str:
    """Encode one partition of the data source into its content-addressed artifact in ``store``.

    Runs with the platform's ``prepare_data`` settings (the VAE/UMT5 encoders: one GPU on large presets), one pod
    per partition, at most the pipeline's partition parallelism at a time. A partition already in the store is
    a cache hit. Returns the partition artifact's URL.

    Args:
        partition: ``"<index>:<listing fingerprint>"``, an item of the ``source_fingerprint`` task's ``Output``.
        preset: Preset name.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL.
        extra_overrides_json: Overrides applied on top.
    """
    from anyflow.config import apply_overrides, get_preset, merge_overrides
    from anyflow.stages.prepare_data import encode_partition_item
    from components._io import known_failures_exit, parse_overrides

    with known_failures_exit("prepare_data"):
        overrides = merge_overrides(parse_overrides(overrides_json), parse_overrides(extra_overrides_json))
        return str(
            encode_partition_item(apply_overrides(get_preset(preset), overrides), store, partition)["uri"]
        )
