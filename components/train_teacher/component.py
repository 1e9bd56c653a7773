"""KFP component: train_teacher — LoRA flow-matching teacher on the dataset."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_teacher(
    dataset: Input[Dataset],
    teacher: Output[Model],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
) -> None:
    """Fine-tune the teacher (LoRA flow matching, shift 5) on the prepared dataset.

    Wants 1 GPU per process on real presets (multi-node: use the ``trainjob`` launcher).

    Args:
        dataset: Dataset artifact from prepare_data.
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.

    Returns:
        teacher: Output teacher checkpoint artifact (trainable weights only).
        metrics: Output scalar training metrics (final loss etc.) for the KFP UI.
    """
    from anyflow.stages import run_stage
    from components._io import input_uri, log_metrics, parse_overrides, record_output, stage_target

    store_url, out = stage_target(teacher, store)
    inputs = {"dataset": input_uri(dataset)}
    res = run_stage("train_teacher", preset=preset, overrides=parse_overrides(overrides_json),
                    inputs=inputs, store=store_url, out=out)
    record_output(teacher, res, store, "train_teacher", inputs=inputs)
    log_metrics(metrics, res.metrics)
