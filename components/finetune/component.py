"""KFP component: finetune — adapt the any-step generator to a new domain."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def finetune(
    dataset: Input[Dataset],
    generator: Input[Model],
    finetuned: Output[Model],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
) -> None:
    """Fine-tune the generator on new data with the forward flow-map loss (keeps any-step).

    Wants 1 GPU per process on real presets.

    Args:
        dataset: Dataset artifact of the new domain.
        generator: Generator checkpoint from distill.
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.

    Returns:
        finetuned: Output fine-tuned generator checkpoint.
        metrics: Output scalar training metrics for the KFP UI.
    """
    from anyflow.stages import run_stage
    from components._io import input_uri, log_metrics, parse_overrides, record_output, stage_target

    store_url, out = stage_target(finetuned, store)
    inputs = {"dataset": input_uri(dataset), "generator": input_uri(generator)}
    res = run_stage("finetune", preset=preset, overrides=parse_overrides(overrides_json),
                    inputs=inputs, store=store_url, out=out)
    record_output(finetuned, res, store, "finetune", inputs=inputs)
    log_metrics(metrics, res.metrics)
