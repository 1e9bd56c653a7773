"""KFP component: export — a generator checkpoint as a diffusers folder and a diffusers LoRA file."""

from kfp.dsl import Artifact, Input, Model, Output


def export(
    exports: Output[Artifact],
    store: str = "",
    formats: str = "diffusers,lora",
    checkpoint: Input[Model] = None,
    checkpoint_uri: str = "",
    promoted_config_json: str = "",
    dtype: str = "float32",
) -> str:
    """Export a generator checkpoint for use without anyflow (``anyflow export``; CPU only).

    ``diffusers``: a folder ``diffusers.AnyFlowPipeline.from_pretrained`` (``AnyFlowFARPipeline`` for far
    presets) loads; ``lora``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` beside the
    converted base folder. The checkpoint's manifest is verified first; each export is an artifact naming it.

    Args:
        store: Store URL; exports go to ``{store}/exports/{format}/{checkpoint digest}`` (reused when there).
            Empty writes them into the KFP output ``exports``.
        formats: Comma-separated formats: ``diffusers``, ``lora`` or both.
        checkpoint: Generator checkpoint artifact (distill, finetune or train_flowmap output).
            Not needed when ``checkpoint_uri`` or ``promoted_config_json`` is given.
        checkpoint_uri: Store URL of the checkpoint, instead of the ``checkpoint`` input artifact.
        promoted_config_json: A RedistillConfig JSON: export the model its ``name`` has promoted in ``store``
            (the ``anyflow-redistill`` step after a promotion).
        dtype: ``float32`` (default: the trained weights exactly) or ``bfloat16`` (half the size; the VAE and
            diffusers' ``_keep_in_fp32_modules`` stay float32).

    Returns:
        exports: Output pointer file ``{"anyflow_uri": {format: URL}}`` (the exports themselves when no store).
        Output: JSON object {format: export URL}.
    """
    import json
    import os

    from components._io import POINTER_KEY, input_uri, known_failures_exit

    with known_failures_exit("export"):
        from anyflow.export import export_to_store

        if promoted_config_json:
            from anyflow import registry
            from anyflow.config import StageInputError

            name = json.loads(promoted_config_json).get("name", "anyflow-t2v")
            live = registry.promoted(store, name) if store else None
            if live is None:
                raise StageInputError(f"export: model {name!r} has nothing promoted in store {store!r}.")
            source = live["uri"]
        else:
            source = input_uri(checkpoint, checkpoint_uri)
        urls = export_to_store(
            source, store=store or None, formats=formats, out_dir=None if store else exports.path, dtype=dtype
        )
    exports.metadata[POINTER_KEY] = json.dumps(urls, sort_keys=True)
    exports.metadata["anyflow_source"] = source
    if store:
        os.makedirs(os.path.dirname(exports.path) or ".", exist_ok=True)
        with open(exports.path, "w", encoding="utf-8") as fh:
            json.dump({POINTER_KEY: urls, "source": source}, fh)
    for fmt, url in urls.items():
        print(f"[anyflow] export {fmt}: {url}", flush=True)
    return json.dumps(urls, sort_keys=True)
