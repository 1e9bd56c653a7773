"""KFP v2 components for AnyFlow: one thin Python component per stage (no maths).

Each ``components/<stage>/component.py`` defines a plain function whose body is one call of
``components._io.run_component`` (inputs as artifacts or ``<role>_uri`` strings, then
``anyflow.stages.run_stage``, in-process or under torchrun: ``components/_torchrun.py``);
``components/record_stage`` writes a run's stage record after each; :func:`make_component` turns it into a
KFP component bound to the project image. Building components from functions (rather than decorating at import time) lets
``anyflow compile --image …`` pick the image without import-order tricks.
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: Repository ``images/build.sh`` pushes to by default (``v<version>-<gitsha>`` tags; with ``--push`` it also prints
#: the digests). KFP's cache key contains the image string, so cluster runs pin an immutable reference.
IMAGE_REPOSITORY = "ghcr.io/anyflow/anyflow-train"
#: What the committed YAML (and ``anyflow compile`` without ``--image``) names: nothing is ever pushed under it, so
#: ``anyflow submit/schedule/rerun --host`` refuse it and ask for ``--image`` or ``$ANYFLOW_IMAGE``. The local runner
#: ignores the image (it runs the components in this Python environment).
IMAGE_PLACEHOLDER = f"{IMAGE_REPOSITORY}:unset-pass-image"

STAGE_NAMES: tuple[str, ...] = (
    "prepare_data", "train_teacher", "train_flowmap", "distill", "finetune", "evaluate",
)
#: The stages that train: on a pod with G GPUs their component runs G processes (``nproc_per_node``).
TRAINING_STAGES: tuple[str, ...] = ("train_teacher", "train_flowmap", "distill", "finetune")


def process_args(stage: str, gpus: int) -> dict[str, int]:
    """The compile-time process count of a one-pod ``stage`` task on a pod with ``gpus`` GPUs:
    ``{"nproc_per_node": G}`` for a training stage (one process per GPU, 1 without GPUs; the same rule as
    the multi-node launcher's ``procs_per_node``), ``{}`` for the others. It is part of the artifact's
    key (``world_size``), so it is fixed when the pipeline is compiled, from the platform."""
    from components.trainjob.launcher import procs_per_node

    return {"nproc_per_node": procs_per_node(gpus)} if stage in TRAINING_STAGES else {}


def default_image() -> str:
    """The train image reference: ``$ANYFLOW_IMAGE`` or :data:`IMAGE_PLACEHOLDER` (never ``latest``)."""
    image = os.environ.get("ANYFLOW_IMAGE") or IMAGE_PLACEHOLDER
    check_image(image)
    return image


def check_image(image: str) -> str:
    """Refuse mutable image references: an untagged name or ``:latest`` makes KFP caching dishonest."""
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return image
    if ":" not in last or last.endswith(":latest"):
        raise ValueError(
            f"image {image!r} has no immutable tag; use <repo>:v<version>-<gitsha> from images/build.sh "
            "(set ANYFLOW_IMAGE or pass --image)."
        )
    return image


def eval_image_for(image: str) -> str:
    """The image the evaluate step runs on, for a pipeline whose other steps run on ``image``.

    ``$ANYFLOW_EVAL_IMAGE`` if set; else ``image`` with its repository ``…/anyflow-train`` renamed
    ``…/anyflow-eval`` (images/build.sh gives both the same registry and tag). The eval image is the train
    image plus VBench in its own virtual environment (``images/eval/Dockerfile``), so the evaluate stage
    runs there unchanged and VBench is found through ``ANYFLOW_VBENCH_PYTHON``. Any other train image
    (another name, or pinned by digest) is used as is: VBench then reports "not run" unless it holds one.
    """
    explicit = os.environ.get("ANYFLOW_EVAL_IMAGE")
    if explicit:
        return check_image(explicit)
    check_image(image)
    repo, sep, tag = image.rpartition(":")
    if "@sha256:" not in image and repo.rsplit("/", 1)[-1] == "anyflow-train":
        return f"{repo[: -len('anyflow-train')]}anyflow-eval{sep}{tag}"
    return image


def make_component(func: Callable, image: str | None = None):
    """Wrap a component function as a KFP lightweight Python component on the project image.

    ``install_kfp_package=False``: the image already has kfp, and no ``packages_to_install`` —
    the image (or the current env for the local runner) holds everything.
    """
    from kfp import dsl

    return dsl.component(func, base_image=check_image(image or default_image()), install_kfp_package=False)


def stage_functions() -> dict[str, Callable]:
    """The plain component functions by stage name (a dict of real objects, no string dispatch)."""
    from components.distill.component import distill
    from components.evaluate.component import evaluate
    from components.finetune.component import finetune
    from components.prepare_data.component import prepare_data
    from components.train_flowmap.component import train_flowmap
    from components.train_teacher.component import train_teacher

    return {
        "prepare_data": prepare_data,
        "train_teacher": train_teacher,
        "train_flowmap": train_flowmap,
        "distill": distill,
        "finetune": finetune,
        "evaluate": evaluate,
    }


def build_components(image: str | None = None) -> dict[str, object]:
    """All stage components keyed by stage name: evaluate on :func:`eval_image_for` ``image``, the rest on ``image``."""
    img = check_image(image or default_image())
    return {name: make_component(fn, eval_image_for(img) if name == "evaluate" else img)
            for name, fn in stage_functions().items()}


def build_fingerprint_component(image: str | None = None):
    """The CPU-only ``source_fingerprint`` component (the digest of a data source's listing; see
    ``pipelines/fingerprint.py``)."""
    from components.source_fingerprint.component import source_fingerprint

    return make_component(source_fingerprint, image)


def build_record_component(image: str | None = None):
    """The CPU-only ``record_stage`` component (writes a run's stage record; see ``pipelines/records.py``)."""
    from components.record_stage.component import record_stage

    return make_component(record_stage, image)


def build_export_component(image: str | None = None):
    """The CPU-only ``export`` component (a checkpoint as a diffusers folder and LoRA file; ``anyflow export``)."""
    from components.export.component import export

    return make_component(export, image)
