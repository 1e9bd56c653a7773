"""KFP component: evaluate — metrics per NFE, sample videos and report.html."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(
    report: Output[Artifact],
    metrics: Output[Metrics],
    html: Output[HTML],
    generator: Input[Model] = None,
    teacher: Input[Model] = None,
    dataset: Input[Dataset] = None,
    flowmap: Input[Model] = None,
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
    generator_uri: str = "",
    teacher_uri: str = "",
    dataset_uri: str = "",
    flowmap_uri: str = "",
) -> None:
    """Evaluate the generator at every NFE of the preset and write the report.

    Wants 1 GPU on real presets (VBench runs in the separate eval image).

    Args:
        generator: Generator checkpoint to evaluate (from distill or finetune); or ``generator_uri``.
        teacher: Teacher checkpoint (the multi-step reference); or ``teacher_uri``.
        dataset: Dataset artifact (evaluation prompts / reference latents); or ``dataset_uri``.
        flowmap: Optional flow-map checkpoint, evaluated alongside when given (or ``flowmap_uri``).
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.
        generator_uri: Store URL of the generator, instead of the ``generator`` artifact (evaluate-only, reruns).
        teacher_uri: Store URL of the teacher, instead of the ``teacher`` artifact.
        dataset_uri: Store URL of the dataset, instead of the ``dataset`` artifact.
        flowmap_uri: Store URL of a flow-map checkpoint to evaluate alongside (optional).

    Returns:
        report: Output evaluation artifact (metrics JSON, samples, report.html).
        metrics: Output metrics per NFE (``nfe<N>/<metric>``) for the KFP UI.
        html: Output report.html rendered by the KFP UI.
    """
    from components._io import copy_report, run_component

    roles = {"generator": (generator, generator_uri), "teacher": (teacher, teacher_uri),
             "dataset": (dataset, dataset_uri), "flowmap": (flowmap, flowmap_uri)}
    res = run_component("evaluate", report, metrics=metrics, preset=preset, overrides_json=overrides_json,
                        store=store, artifacts={r: a for r, (a, _) in roles.items()},
                        uris={r: u for r, (_, u) in roles.items()})
    copy_report(html, res.report, str(res.uri), res.report_bytes)
