"""KFP components of a partitioned prepare_data (``data.partition_size`` > 0; anyflow/data/partitions.py):
``partition_plan`` lists the partitions still to encode, ``prepare_partition`` encodes one of them, inside a
``dsl.ParallelFor`` (pipelines/fingerprint.py)."""


def partition_plan(
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
    extra_overrides_json: str = "{}",
    source_fingerprint: str = "",
) -> list[str]:
    """The partitions of the data source that are not in the store yet, as ``"<index>:<listing fingerprint>"``.

    CPU only, never cached (it reads the store). Empty when ``data.partition_size`` is 0 or ``store`` is empty:
    the ``prepare_data`` task then encodes the whole source itself, as without partitions.

    Args:
        preset: Preset name.
        overrides_json: JSON object of dotted config overrides (``data.source``, ``data.partition_size``).
        store: Content-addressed store URL holding the partition artifacts.
        extra_overrides_json: Overrides applied on top (the fine-tuning dataset's own ``data.source``).
        source_fingerprint: The ``source_fingerprint`` task's output; not read (orders the tasks).
    """
    from anyflow.config import apply_overrides, get_preset, merge_overrides
    from anyflow.stages.prepare_data import partition_plan as plan
    from components._io import known_failures_exit, parse_overrides

    with known_failures_exit("prepare_data"):
        overrides = merge_overrides(parse_overrides(overrides_json), parse_overrides(extra_overrides_json))
        items = plan(apply_overrides(get_preset(preset), overrides), store)
    print(
        f"[anyflow] partition plan: {len(items)} partition(s) to encode: {', '.join(items) or 'none'}",
        flush=True,
    )
    return items


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
        partition: ``"<index>:<listing fingerprint>"`` from ``partition_plan``.
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
