"""KFP component: train_teacher — LoRA flow-matching teacher on the dataset."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_teacher(
    teacher: Output[Model],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
    dataset: Input[Dataset] = None,
    dataset_uri: str = "",
    nproc_per_node: int = 1,
) -> None:
    """Fine-tune the teacher (LoRA flow matching, shift 5) on the prepared dataset.

    Wants 1 GPU per process on real presets (multi-node: use the ``trainjob`` launcher).

    Args:
        dataset: Dataset artifact from prepare_data.
            Not needed when ``dataset_uri`` is given.
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.
        dataset_uri: Store URL of the dataset artifact, instead of the ``dataset`` input artifact (reruns).
        nproc_per_node: Processes to run in this pod, one per GPU (the platform's GPUs of the stage);
            more than one runs the stage under torchrun (components/_torchrun.py).

    Returns:
        teacher: Output teacher checkpoint artifact (trainable weights only).
        metrics: Output scalar training metrics (final loss etc.) for the KFP UI.
    """
    from components._io import run_component

    run_component("train_teacher", teacher, metrics=metrics, preset=preset, overrides_json=overrides_json, store=store,
                  artifacts={"dataset": dataset},
                  uris={"dataset": dataset_uri},
                  nproc_per_node=nproc_per_node)
