"""Single-stage rerun: one stage whose inputs are earlier artifacts imported by URI (``dsl.importer``).

``anyflow-rerun-<stage>`` takes one ``<role>_uri`` parameter per input role. Each importer also puts
the URI in ``metadata["anyflow_uri"]`` so the component reads the artifact through the anyflow
storage layer (verified manifest) instead of relying on the launcher's download.

``anyflow rerun --run RUN_ID --store URL`` fills those parameters from the stage records an earlier
run left under ``<store>/runs/<RUN_ID>/`` (:mod:`anyflow.ops.record`); the rerun's own output is
recorded under its own run id the same way (a ``record_stage`` task after the stage: :mod:`pipelines.records`).
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
#: Optional roles a rerun may also import when a URI is given.
OPTIONAL_INPUTS: dict[str, dict[str, str]] = {"evaluate": {"flowmap": "Model"}}


class RerunError(ValueError):
    """Bad stage name or input roles for a rerun."""


def rerun_pipeline_name(stage: str) -> str:
    """``anyflow-rerun-<stage>`` with KFP-friendly dashes."""
    return f"anyflow-rerun-{stage.replace('_', '-')}"


def check_roles(stage: str, uris: Mapping[str, str]) -> dict[str, str]:
    """Validate ``uris`` against the stage's roles; returns the roles to import (required + given optional)."""
    if stage not in STAGE_INPUTS:
        raise RerunError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGE_INPUTS)}.")
    roles = dict(STAGE_INPUTS[stage])
    optional = OPTIONAL_INPUTS.get(stage, {})
    for role in uris:
        if role not in roles and role not in optional:
            raise RerunError(f"stage {stage!r} has no input role {role!r}; its roles: {', '.join([*roles, *optional])}.")
        if role in optional:
            roles[role] = optional[role]
    return roles


def build_rerun_pipeline(stage: str, uris: "Mapping[str, str] | None" = None,
                         platform: "Platform | None" = None, image: "str | None" = None,
                         name: "str | None" = None):
    """Return a pipeline running only ``stage``; ``uris`` (role → artifact URL) become the defaults
    of the ``<role>_uri`` parameters (without them each parameter is required at submit time)."""
    from kfp import dsl
    from kfp.dsl import Artifact, Dataset, Model

    from components import build_components, build_record_component
    from pipelines.records import record

    uris = dict(uris or {})
    roles = check_roles(stage, uris)
    classes = {"Dataset": Dataset, "Model": Model, "Artifact": Artifact}
    out_name, out_cls = STAGE_OUTPUT[stage]
    comp = build_components(image)[stage]
    recorder = build_record_component(image)
    plat = platform or Platform()

    def body(preset: str, overrides_json: str, store: str, **role_uris: str) -> None:
        inputs = {}
        for role, cls_name in roles.items():
            uri = role_uris[f"{role}_uri"]
            imp = dsl.importer(artifact_uri=uri, artifact_class=classes[cls_name], reimport=False,
                               metadata={"anyflow_uri": uri})
            imp.set_display_name(f"import_{role}")
            inputs[role] = imp.output
        task = comp(preset=preset, overrides_json=overrides_json, store=store, **inputs)
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
        default = uris.get(role, inspect.Parameter.empty)
        params.append(inspect.Parameter(f"{role}_uri", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=str))
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)

    names = [p.name for p in params]

    def pipeline_func(*args, **kwargs):
        kwargs.update(zip(names, args, strict=False))
        return body(**kwargs)

    pipeline_func.__signature__ = inspect.Signature(params, return_annotation=classes[out_cls])
    pipeline_func.__annotations__ = {**{p.name: str for p in params}, "return": classes[out_cls]}
    pipeline_func.__name__ = (name or rerun_pipeline_name(stage)).replace("-", "_")
    pipeline_func.__doc__ = f"Rerun {stage} on artifacts imported by URI ({', '.join(roles) or 'no inputs'})."
    return dsl.pipeline(name=name or rerun_pipeline_name(stage),
                        description=f"AnyFlow: rerun the {stage} stage on earlier artifacts.")(pipeline_func)
