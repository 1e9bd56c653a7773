"""KFP component: source_fingerprint — what the data source holds now, and which of its partitions still need
encoding (CPU only, never cached)."""

from typing import NamedTuple


def source_fingerprint(
    preset: str = "tiny",
    overrides_json: str = "{}",
    extra_overrides_json: str = "{}",
    store: str = "",
    fanout: bool = False,
) -> NamedTuple("FingerprintOutputs", [("digest", str), ("Output", list[str])]):
    """Digest of the data source's listing (ETags or size+mtime per file; an index's rows), and the partitions to
    encode.

    Runs in every run with KFP caching off; its ``digest`` is a parameter of the prepare_data task, so KFP's cache
    key of prepare_data changes when videos are added under the same prefix (KFP keys a task on its inputs,
    never on what a URL holds). The same digest is part of prepare_data's store key
    (``anyflow.stages.prepare_data.source_digest``). "" for a procedural source. ``Output`` (the partitions): with
    ``data.partition_size`` > 0 and a store, ``"<index>:<listing fingerprint>"`` of each partition not in the store
    yet (``anyflow.stages.prepare_data.partition_plan``), which the pipeline's ``ParallelFor`` of
    ``prepare_partition`` pods encodes; empty otherwise. It is named ``Output`` because KFP's local runner (kfp
    2.17.3 ``kfp/local/orchestrator/enhanced_dag_orchestrator.py``) finds a ``ParallelFor``'s items only in an
    output of that name, and ``anyflow run`` runs the same graph through it.

    Args:
        preset: Preset name.
        overrides_json: JSON object of dotted config overrides (``data.source`` among them).
        extra_overrides_json: Overrides applied on top (the fine-tuning dataset's own ``data.source``).
        store: Content-addressed store URL holding the partition artifacts ("" = no partitions).
        fanout: The pipeline was compiled with ``prepare_fanout`` (the task after the loop only merges): a run
            without ``data.partition_size`` > 0 and a store fails here, before any encoding pod starts.
    """
    from collections import namedtuple

    from anyflow.config import apply_overrides, get_preset, merge_overrides
    from anyflow.stages.prepare_data import partition_plan, source_digest
    from components._io import known_failures_exit, parse_overrides

    with known_failures_exit("prepare_data"):
        overrides = merge_overrides(parse_overrides(overrides_json), parse_overrides(extra_overrides_json))
        cfg = apply_overrides(get_preset(preset), overrides)
        digest = source_digest(cfg) or ""
        partitions = partition_plan(cfg, store, fanout=fanout)
    print(f"[anyflow] source fingerprint: {digest or 'procedural (none)'}; partitions to encode: "
          f"{', '.join(partitions) or 'none'}", flush=True)
    return namedtuple("FingerprintOutputs", ["digest", "Output"])(digest, partitions)
