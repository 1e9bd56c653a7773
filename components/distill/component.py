"""KFP component: distill — on-policy any-step distillation (DMD + FMBS + forward loss)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def distill(
    dataset: Input[Dataset],
    teacher: Input[Model],
    flowmap: Input[Model],
    generator: Output[Model],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
) -> None:
    """Distill the any-step generator from the teacher, initialised from the flow map.

    Wants 1 GPU per process on real presets (the 14B presets want multi-node: ``trainjob``).

    Args:
        dataset: Dataset artifact from prepare_data.
        teacher: Teacher checkpoint from train_teacher (the DMD real score).
        flowmap: Flow-map checkpoint from train_flowmap (generator initialisation).
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.

    Returns:
        generator: Output any-step generator checkpoint (with EMA weights).
        metrics: Output scalar training metrics for the KFP UI.
    """
    from anyflow.stages import run_stage
    from components._io import input_uri, log_metrics, parse_overrides, record_output, stage_target

    store_url, out = stage_target(generator, store)
    inputs = {"dataset": input_uri(dataset), "teacher": input_uri(teacher), "flowmap": input_uri(flowmap)}
    res = run_stage("distill", preset=preset, overrides=parse_overrides(overrides_json),
                    inputs=inputs, store=store_url, out=out)
    record_output(generator, res, store, "distill", inputs=inputs)
    log_metrics(metrics, res.metrics)
