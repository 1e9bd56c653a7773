"""KFP component: train_flowmap — flow-map model trained with the forward flow-map loss."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_flowmap(
    dataset: Input[Dataset],
    flowmap: Output[Model],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
) -> None:
    """Train the flow-map model (forward flow-map loss, fused CFG) on the dataset.

    Wants 1 GPU per process on real presets (multi-node: use the ``trainjob`` launcher).

    Args:
        dataset: Dataset artifact from prepare_data.
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.

    Returns:
        flowmap: Output flow-map checkpoint artifact.
        metrics: Output scalar training metrics for the KFP UI.
    """
    from anyflow.stages import run_stage
    from components._io import input_uri, log_metrics, parse_overrides, record_output, stage_target

    store_url, out = stage_target(flowmap, store)
    inputs = {"dataset": input_uri(dataset)}
    res = run_stage("train_flowmap", preset=preset, overrides=parse_overrides(overrides_json),
                    inputs=inputs, store=store_url, out=out)
    record_output(flowmap, res, store, "train_flowmap", inputs=inputs)
    log_metrics(metrics, res.metrics)
