"""KFP component: source_fingerprint — what the data source holds now (CPU only, never cached)."""


def source_fingerprint(
    preset: str = "tiny",
    overrides_json: str = "{}",
    extra_overrides_json: str = "{}",
) -> str:
    """Digest of the data source's listing (ETags or size+mtime per file; an index's rows).

    Runs in every run with KFP caching off; its output is a parameter of the prepare_data task, so KFP's cache
    key of prepare_data changes when videos are added under the same prefix (KFP keys a task on its inputs,
    never on what a URL holds). The same digest is part of prepare_data's store key
    (``anyflow.stages.prepare_data.source_digest``). "" for a procedural source.

    Args:
        preset: Preset name.
        overrides_json: JSON object of dotted config overrides (``data.source`` among them).
        extra_overrides_json: Overrides applied on top (the fine-tuning dataset's own ``data.source``).
    """
    from anyflow.config import apply_overrides, get_preset, merge_overrides
    from anyflow.stages.prepare_data import source_digest
    from components._io import parse_overrides

    overrides = merge_overrides(parse_overrides(overrides_json), parse_overrides(extra_overrides_json))
    digest = source_digest(apply_overrides(get_preset(preset), overrides)) or ""
    print(f"[anyflow] source fingerprint: {digest or 'procedural (none)'}", flush=True)
    return digest
