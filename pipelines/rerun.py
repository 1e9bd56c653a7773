"""Single-stage rerun: one stage whose inputs are earlier artifacts named by store URL.

``anyflow-rerun-<stage>`` takes one ``<role>_uri`` string parameter per input role and passes it
straight to the stage component's ``<role>_uri`` parameter; the component reads the artifact from the
store itself (manifest-verified, :func:`components._io.input_uri`). No ``dsl.importer``: the KFP backend
copies an importer's metadata verbatim (a pipeline parameter there would reach the component as the literal
placeholder; kubeflow/pipelines 2.17.0 backend/src/v2/component/importer_launcher.go), and an imported
artifact would be downloaded whole into the pod before the component starts.

``anyflow rerun --run RUN_ID --store URL`` fills those parameters from the stage records an earlier
run left under ``<store>/runs/<RUN_ID>/`` (:mod:`anyflow.ops.record`); the rerun's own output is
recorded under its own run id the same way (a ``record_stage`` task after the stage: :mod:`pipelines.records`).
A training stage runs one process per GPU of its pod (``nproc_per_node`` from the platform), as in the full
pipeline.
"""
# No ``from __future__ import annotations``: KFP reads real type annotations of pipeline functions.

import inspect
from collections.abc import Mapping

from pipelines.platform import Platform

#: Input roles of each stage: role → KFP artifact class name (a dict of real data, no dispatch).
STAGE_INPUTS: dict[str, dict[str, str]] = {
    "prepare_data": {},
    "train_teacher": {"dataset": "Dataset"},
    "train_flowmap": {"dataset": "Dataset"},
    "distill": {"dataset": "Dataset", "teacher": "Model", "flowmap": "Model"},
    "finetune": {"dataset": "Dataset", "generator": "Model"},
    "evaluate": {"generator": "Model", "teacher": "Model", "dataset": "Dataset"},
}
#: The stage's main output (returned by the rerun pipeline) and its KFP artifact class name.
STAGE_OUTPUT: dict[str, tuple[str, str]] = {
    "prepare_data": ("dataset", "Dataset"), "train_teacher": ("teacher", "Model"),
    "train_flowmap": ("flowmap", "Model"), "distill": ("generator", "Model"),
    "finetune": ("finetuned", "Model"), "evaluate": ("report", "Artifact"),
}
#: Optional roles: always a ``<role>_uri`` parameter of the rerun, empty (not given) unless a URI is.
OPTIONAL_INPUTS: dict[str, dict[str, str]] = {"evaluate": {"flowmap": "Model"}}


class RerunError(ValueError):
    """Bad stage name or input roles for a rerun."""


def rerun_pipeline_name(stage: str) -> str:
    """``anyflow-rerun-<stage>`` with KFP-friendly dashes."""
    return f"anyflow-rerun-{stage.replace('_', '-')}"


def check_roles(stage: str, uris: Mapping[str, str]) -> dict[str, str]:
    """Validate ``uris`` against the stage's roles; returns every role of the stage (required, then optional)."""
    if stage not in STAGE_INPUTS:
        raise RerunError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGE_INPUTS)}.")
    roles = {**STAGE_INPUTS[stage], **OPTIONAL_INPUTS.get(stage, {})}
    for role in uris:
        if role not in roles:
            raise RerunError(f"stage {stage!r} has no input role {role!r}; its roles: {', '.join(roles)}.")
    return roles


def build_rerun_pipeline(stage: str, uris: "Mapping[str, str] | None" = None,
                         platform: "Platform | None" = None, image: "str | None" = None,
                         name: "str | None" = None):
    """Return a pipeline running only ``stage``; ``uris`` (role → artifact URL) become the defaults
    of the ``<role>_uri`` parameters (without them a required role's parameter is required at submit
    time; an optional role's defaults to empty: not given)."""
    from kfp import dsl
    from kfp.dsl import Artifact, Dataset, Model

    from components import (
        TRAINING_STAGES,
        build_components,
        build_fingerprint_component,
        build_record_component,
        check_image,
        default_image,
        make_component,
        process_args,
    )
    from components.trainjob.component import trainjob
    from pipelines.anyflow_t2v import multinode_task
    from pipelines.fingerprint import build_partition_component, prepared
    from pipelines.records import record

    uris = dict(uris or {})
    roles = check_roles(stage, uris)
    optional = OPTIONAL_INPUTS.get(stage, {})
    classes = {"Dataset": Dataset, "Model": Model, "Artifact": Artifact}
    out_name, out_cls = STAGE_OUTPUT[stage]
    comp = build_components(image)[stage]
    recorder = build_record_component(image)
    fingerprint = build_fingerprint_component(image) if stage == "prepare_data" else None
    plat = platform or Platform()
    procs = process_args(stage, plat.for_stage(stage).gpus)
    # a training stage the platform runs on several nodes: the same Trainer job as in the full DAG (the same
    # process count, so the same artifact key)
    multinode = stage in TRAINING_STAGES and plat.for_stage(stage).num_nodes > 1
    img = check_image(image or default_image())
    launcher = make_component(trainjob, img) if multinode else None

    def body(preset: str, overrides_json: str, store: str, **role_uris: str) -> None:
        # plain string parameters, bound to the pipeline's own: the component opens the store URLs itself
        if fingerprint is not None:  # KFP's cache must see new data under the same source (pipelines/fingerprint.py)
            task = prepared(comp, fingerprint, plat, name=stage, preset=preset, overrides_json=overrides_json,
                            store=store, partition=build_partition_component(img))  # fans out like the DAG
        elif launcher is not None:
            task = multinode_task(launcher, plat, stage, img, preset=preset, overrides_json=overrides_json,
                                  store=store, **role_uris)
            record(recorder, plat, task.outputs["result"], store, stage)
            return task.outputs["result"]
        else:
            task = comp(preset=preset, overrides_json=overrides_json, store=store, **role_uris, **procs)
            plat.apply(task, stage).set_display_name(stage)
        # the rerun's own output is recorded under <store>/runs/<its KFP run id>/ like any run's
        record(recorder, plat, task.outputs[out_name], store, stage)
        return task.outputs[out_name]

    # Build an explicit signature (KFP reads parameters and defaults from it).
    params = [
        inspect.Parameter("preset", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="tiny", annotation=str),
        inspect.Parameter("overrides_json", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="{}", annotation=str),
        inspect.Parameter("store", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="", annotation=str),
    ]
    for role in roles:
        default = uris.get(role, "" if role in optional else inspect.Parameter.empty)
        params.append(inspect.Parameter(f"{role}_uri", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=str))
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)

    names = [p.name for p in params]

    def pipeline_func(*args, **kwargs):
        kwargs.update(zip(names, args, strict=False))
        return body(**kwargs)

    pipeline_func.__signature__ = inspect.Signature(params, return_annotation=classes[out_cls])
    pipeline_func.__annotations__ = {**{p.name: str for p in params}, "return": classes[out_cls]}
    pipeline_func.__name__ = (name or rerun_pipeline_name(stage)).replace("-", "_")
    pipeline_func.__doc__ = (f"Rerun {stage} on earlier artifacts given by store URL "
                             f"({', '.join(f'{r}_uri' for r in roles) or 'no inputs'}).")
    return dsl.pipeline(name=name or rerun_pipeline_name(stage),
                        description=f"AnyFlow: rerun the {stage} stage on earlier artifacts.")(pipeline_func)
