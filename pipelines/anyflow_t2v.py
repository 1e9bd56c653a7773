"""``anyflow-t2v``: prepare_data → train_teacher → train_flowmap → distill → evaluate [→ export],
with an optional finetune → evaluate branch (pipeline parameter ``finetune``) and an optional export of the
distilled generator (pipeline parameter ``export``: a diffusers folder and a LoRA file, components/export); a ``record_stage`` task
after each stage task writes the run's stage records (:mod:`pipelines.records`)."""

# No ``from __future__ import annotations``: KFP reads real type annotations of pipeline functions.
from typing import NamedTuple

from pipelines.platform import EXPORT_PROFILE, Platform

PIPELINE_NAME = "anyflow-t2v"

_DOC = """Train and evaluate an any-step generator{what}.

        Args:
            preset: Preset name ({presets}).
            overrides_json: JSON object of dotted config overrides applied to every stage.
            store: Content-addressed store URL (s3://bucket/prefix); empty keeps artifacts in KFP.
            finetune: Also fine-tune the generator on a second dataset and evaluate it.
            finetune_data_overrides_json: Overrides for the fine-tuning dataset's prepare_data, applied
                over overrides_json (e.g. its own data.source).
            export: After evaluate, export the distilled generator as a diffusers folder and a diffusers
                LoRA file (components/export; into store/exports/ with a store).
        """


def multinode_task(launcher, platform: Platform, stage: str, image: str, *, preset, overrides_json, store,
                   **inputs):
    """The ``trainjob`` launcher task of a stage the platform runs on ``num_nodes > 1`` nodes (shared by the
    training DAG and the rerun pipelines): its workers get the stage's platform settings, the launcher pod the
    ``trainjob`` profile. ``inputs``: artifacts (``dataset=…``) or store URLs (``dataset_uri=…``)."""
    import json

    res = platform.for_stage(stage)
    task = launcher(stage=stage, store=store, image=image, preset=preset, overrides_json=overrides_json,
                    num_nodes=res.num_nodes, gpus_per_node=res.gpus,
                    workers_json=json.dumps(platform.worker_settings(stage), sort_keys=True),
                    api=platform.trainjob_api, runtime=platform.trainjob_runtime, timeout_s=res.timeout_s, **inputs)
    return platform.apply(task, "trainjob").set_display_name(f"{stage} ({res.num_nodes} nodes)")


def build_t2v_pipeline(platform: "Platform | None" = None, image: "str | None" = None):
    """Return the ``anyflow-t2v`` pipeline function bound to ``platform`` and ``image``."""
    return build_training_pipeline(
        platform, image, name=PIPELINE_NAME, default_preset="tiny",
        description="AnyFlow any-step T2V: data, teacher, flow map, distill, evaluate.",
        doc=_DOC.format(what="", presets="tiny, demo, wan2.1-t2v-1.3b, wan2.1-t2v-14b"),
    )


def build_training_pipeline(
    platform: "Platform | None", image: "str | None", *, name: str, default_preset: str, description: str, doc: str
):
    """The training DAG (shared by ``anyflow-t2v`` and ``anyflow-far``; the preset's variant picks the methods)."""
    from kfp import dsl
    from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

    from components import (
        build_components,
        build_export_component,
        build_fingerprint_component,
        build_record_component,
        check_image,
        default_image,
        make_component,
        process_args,
    )
    from components.trainjob.component import trainjob
    from pipelines.fingerprint import build_partition_component, prepared
    from pipelines.records import record

    img = check_image(image or default_image())
    comps = build_components(img)
    launcher = make_component(trainjob, img)
    recorder = build_record_component(img)
    fingerprint = build_fingerprint_component(img)
    exporter = build_export_component(img)
    partition = build_partition_component(img)  # data.partition_size > 0: prepare_data fans out (ParallelFor)
    plat = platform or Platform()

    def train(stage: str, out_key: str, common: dict, **inputs):
        """A training stage: one pod, or a multi-node Trainer job when the platform asks for num_nodes > 1."""
        res = plat.for_stage(stage)
        if res.num_nodes <= 1:
            # one pod: one process per GPU of it (torchrun inside the component, components/_torchrun.py)
            task = comps[stage](**inputs, **common, **process_args(stage, res.gpus))
            return plat.apply(task, stage).outputs[out_key]
        return multinode_task(launcher, plat, stage, img, **common, **inputs).outputs["result"]

    class Outputs(NamedTuple):
        dataset: Dataset
        teacher: Model
        flowmap: Model
        generator: Model
        report: Artifact
        eval_metrics: Metrics
        report_html: HTML

    def anyflow_t2v(
        preset: str = default_preset,
        overrides_json: str = "{}",
        store: str = "",
        finetune: bool = False,
        finetune_data_overrides_json: str = "{}",
        export: bool = False,
    ) -> Outputs:
        # Stage tasks take no run id (stable KFP cache keys); a record_stage task after each writes
        # <store>/runs/<KFP run id>/<entry>.json (anyflow rerun --run ID), also after a KFP cache hit.
        common = {"preset": preset, "overrides_json": overrides_json, "store": store}

        def recorded(artifact, entry: str):
            record(recorder, plat, artifact, store, entry)
            return artifact

        data = prepared(comps["prepare_data"], fingerprint, plat, name="prepare_data", partition=partition, **common)
        dataset = recorded(data.outputs["dataset"], "prepare_data")
        teacher = recorded(train("train_teacher", "teacher", common, dataset=dataset), "train_teacher")
        flowmap = recorded(train("train_flowmap", "flowmap", common, dataset=dataset), "train_flowmap")
        generator = recorded(train("distill", "generator", common, dataset=dataset, teacher=teacher, flowmap=flowmap),
                             "distill")
        ev = plat.apply(comps["evaluate"](generator=generator, teacher=teacher, dataset=dataset, flowmap=flowmap,
                                          **common), "evaluate")
        recorded(ev.outputs["report"], "evaluate")
        with dsl.If(export == True, name="export-enabled"):  # noqa: E712 (KFP condition syntax)
            exp = exporter(checkpoint=generator, store=store)
            plat.apply(exp, EXPORT_PROFILE).after(ev).set_display_name("export")
        with dsl.If(finetune == True, name="finetune-enabled"):  # noqa: E712 (KFP condition syntax)
            ft_data = prepared(comps["prepare_data"], fingerprint, plat, name="prepare_finetune_data", partition=partition,
                               extra_overrides_json=finetune_data_overrides_json, **common)
            ft_dataset = recorded(ft_data.outputs["dataset"], "prepare_finetune_data")
            finetuned = recorded(train("finetune", "finetuned", common, dataset=ft_dataset, generator=generator),
                                 "finetune")
            ft_ev = plat.apply(comps["evaluate"](generator=finetuned, teacher=teacher, dataset=ft_dataset, **common),
                               "evaluate")
            ft_ev.set_display_name("evaluate_finetuned")
            recorded(ft_ev.outputs["report"], "evaluate_finetuned")
        return Outputs(dataset=dataset, teacher=teacher, flowmap=flowmap, generator=generator,
                       report=ev.outputs["report"], eval_metrics=ev.outputs["metrics"], report_html=ev.outputs["html"])

    anyflow_t2v.__doc__ = doc  # KFP reads the parameter descriptions from the docstring
    anyflow_t2v.__name__ = name.replace("-", "_")
    return dsl.pipeline(name=name, description=description)(anyflow_t2v)
