"""KFP component: finetune — adapt the any-step generator to a new domain."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def finetune(
    finetuned: Output[Model],
    metrics: Output[Metrics],
    preset: str = "tiny",
    overrides_json: str = "{}",
    store: str = "",
    dataset: Input[Dataset] = None,
    generator: Input[Model] = None,
    dataset_uri: str = "",
    generator_uri: str = "",
    nproc_per_node: int = 1,
) -> None:
    """Fine-tune the generator on new data with the forward flow-map loss (keeps any-step).

    Wants 1 GPU per process on real presets.

    Args:
        dataset: Dataset artifact of the new domain.
            Not needed when ``dataset_uri`` is given.
        generator: Generator checkpoint from distill.
            Not needed when ``generator_uri`` is given.
        preset: Preset name, e.g. ``tiny``.
        overrides_json: JSON object of dotted config overrides.
        store: Content-addressed store URL; empty writes into the KFP output.
        dataset_uri: Store URL of the dataset artifact, instead of the ``dataset`` input artifact (reruns).
        generator_uri: Store URL of the generator artifact, instead of the ``generator`` input artifact (reruns).
        nproc_per_node: Processes to run in this pod, one per GPU (the platform's GPUs of the stage);
            more than one runs the stage under torchrun (components/_torchrun.py).

    Returns:
        finetuned: Output fine-tuned generator checkpoint.
        metrics: Output scalar training metrics for the KFP UI.
    """
    from components._io import run_component

    run_component("finetune", finetuned, metrics=metrics, preset=preset, overrides_json=overrides_json, store=store,
                  artifacts={"dataset": dataset, "generator": generator},
                  uris={"dataset": dataset_uri, "generator": generator_uri},
                  nproc_per_node=nproc_per_node)
