"""KFP component: evaluate — metrics per NFE, sample videos and report.html."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(
    generator: Input[Model],
    teacher: Input[Model],
    dataset: Input[Dataset],
    report: Output[Artifact],
    metrics: Output[Metrics],
    html: Output[HTML],
    flowmap: Input[Model] = None,
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
) -> None:
    """Evaluate the generator at every NFE of the preset and write the report.

    Wants 1 GPU on real presets (VBench runs in the separate eval image).

    Args:
        generator: Generator checkpoint to evaluate (from distill or finetune).
        teacher: Teacher checkpoint (the multi-step reference).
        dataset: Dataset artifact (evaluation prompts / reference latents).
        flowmap: Optional flow-map checkpoint, evaluated alongside when given.
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.

    Returns:
        report: Output evaluation artifact (metrics JSON, samples, report.html).
        metrics: Output metrics per NFE (``nfe<N>/<metric>``) for the KFP UI.
        html: Output report.html rendered by the KFP UI.
    """
    from anyflow.stages import run_stage
    from components._io import (
        copy_report,
        input_uri,
        log_metrics,
        parse_overrides,
        record_output,
        stage_target,
    )

    inputs = {"generator": input_uri(generator), "teacher": input_uri(teacher), "dataset": input_uri(dataset)}
    if flowmap is not None:
        inputs["flowmap"] = input_uri(flowmap)
    store_url, out = stage_target(report, store)
    res = run_stage("evaluate", preset=preset, overrides=parse_overrides(overrides_json),
                    inputs=inputs, store=store_url, out=out)
    record_output(report, res, store, "evaluate", inputs=inputs)
    log_metrics(metrics, res.metrics)
    copy_report(html, res.report, str(res.uri))
