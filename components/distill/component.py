"""KFP component: distill — on-policy any-step distillation (DMD + FMBS + forward loss)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def distill(
    generator: Output[Model],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
    dataset: Input[Dataset] = None,
    teacher: Input[Model] = None,
    flowmap: Input[Model] = None,
    dataset_uri: str = "",
    teacher_uri: str = "",
    flowmap_uri: str = "",
    nproc_per_node: int = 1,
) -> None:
    """Distill the any-step generator from the teacher, initialised from the flow map.

    Wants 1 GPU per process on real presets (the 14B presets want multi-node: ``trainjob``).

    Args:
        dataset: Dataset artifact from prepare_data.
            Not needed when ``dataset_uri`` is given.
        teacher: Teacher checkpoint from train_teacher (the DMD real score).
            Not needed when ``teacher_uri`` is given.
        flowmap: Flow-map checkpoint from train_flowmap (generator initialisation).
            Not needed when ``flowmap_uri`` is given.
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.
        dataset_uri: Store URL of the dataset artifact, instead of the ``dataset`` input artifact (reruns).
        teacher_uri: Store URL of the teacher artifact, instead of the ``teacher`` input artifact (reruns).
        flowmap_uri: Store URL of the flowmap artifact, instead of the ``flowmap`` input artifact (reruns).
        nproc_per_node: Processes to run in this pod, one per GPU (the platform's GPUs of the stage);
            more than one runs the stage under torchrun (components/_torchrun.py).

    Returns:
        generator: Output any-step generator checkpoint (with EMA weights).
        metrics: Output scalar training metrics for the KFP UI.
    """
    from components._io import run_component

    run_component("distill", generator, metrics=metrics, preset=preset, overrides_json=overrides_json, store=store,
                  artifacts={"dataset": dataset, "teacher": teacher, "flowmap": flowmap},
                  uris={"dataset": dataset_uri, "teacher": teacher_uri, "flowmap": flowmap_uri},
                  nproc_per_node=nproc_per_node)
