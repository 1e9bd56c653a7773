"""``anyflow-redistill``: the periodic re-distillation run, meant for a KFP recurring run.

plan (window + prepare the new data, warm start) → [if there is something to do] distill →
evaluate (candidate and live model, same protocol) → decide (gate at every NFE, atomic promotion or
recorded rejection, report) → [if promoted and the ``export`` parameter is set] export (the promoted model as a
diffusers folder and a LoRA file, components/export); an exit handler (``finish``) records failures and releases the run lease.
The component bodies are one call each into :mod:`anyflow.ops.steps` (the logic and its tests live
in the library). Tasks pass one URL (the run's ``plan.json``); artifacts stay in ``store``.

Schedule it with ``anyflow schedule --pipeline anyflow-redistill --cron '0 3 * * *' --max-concurrency 1``
(KFP cron is seconds-first; ``max_concurrency=1`` keeps recurring runs from overlapping, the lease
and the alias compare-and-swap keep manual runs safe too). See docs/operations.md.
"""
# No ``from __future__ import annotations``: KFP reads real type annotations of components/pipelines.
from typing import NamedTuple

from kfp.dsl import Markdown, Output

from pipelines.platform import Platform

PIPELINE_NAME = "anyflow-redistill"
#: The run lease's TTL: every task beats it every ttl/3 while it runs and hands it on renewed, so a
#: hard-killed run blocks the next one for at most this long. Keep it above the longest wait for a
#: task's pod to start (GPU scale-up, image pull): a later task takes the lease back even after it ran
#: out, unless another run took it meanwhile. (Component defaults repeat the literal: KFP serialises
#: each component function on its own, without this module's globals.)
DEFAULT_CONFIG_JSON = '{"lease_ttl_s": 900}'


def redistill_plan(store: str, source: str, teacher_uri: str, run_id: str, flowmap_uri: str = "",
                   eval_dataset_uri: str = "", config_json: str = '{"lease_ttl_s": 900}',
                   ) -> NamedTuple("PlanOutputs", [("action", str), ("plan_url", str)]):
    """Plan a re-distillation run: data window since the live model, prepared dataset, warm start.

    CPU only. Takes the model's run lease (``config_json`` ``run_lease``/``lease_ttl_s``) and beats it
    while planning; the later tasks of the run take it back and beat it in turn.

    Args:
        store: Store URL holding artifacts/, models/ and redistill/ (s3://bucket/prefix).
        source: Data source spec (folder or s3:// prefix of videos, index, webdataset tars, procedural).
        teacher_uri: The current teacher artifact.
        run_id: Unique run id (the KFP job id).
        flowmap_uri: Flow-map artifact for the first run or after a teacher change.
        eval_dataset_uri: Fixed held-out dataset artifact for evaluation (optional).
        config_json: RedistillConfig fields as JSON (name, preset, overrides, metrics, margins,
            lease_ttl_s, ...).
    """
    from collections import namedtuple

    from anyflow.ops.steps import plan_step

    action, plan_url = plan_step(store, source, teacher_uri, flowmap=flowmap_uri, eval_dataset=eval_dataset_uri,
                                 config_json=config_json, run_id=run_id)
    print(f"[anyflow] redistill plan: {action} ({plan_url})", flush=True)
    return namedtuple("PlanOutputs", ["action", "plan_url"])(action, plan_url)


def redistill_distill(plan_url: str, nproc_per_node: int = 1) -> str:
    """Distill the candidate, warm-started from the live generator and critic (GPU pool of ``distill``).

    Holds the run lease with a heartbeat while training; stops with LeaseLost if another run took it. With
    ``nproc_per_node`` > 1 (the pod's GPUs, fixed at compile time from the platform) the stage runs as that
    many torchrun processes in the pod (``anyflow.stages.processes``).

    Args:
        plan_url: The run's plan.json written by redistill_plan.
        nproc_per_node: Processes (= GPUs) of this pod.
    """
    from anyflow.ops.steps import distill_step

    return distill_step(plan_url, nproc_per_node=nproc_per_node)


def redistill_evaluate(plan_url: str, candidate_url: str) -> str:
    """Evaluate the candidate and the live model on the same prompts, seeds and NFE sweep (1 GPU).

    Holds the run lease with a heartbeat while evaluating; stops with LeaseLost if another run took it.

    Args:
        plan_url: The run's plan.json.
        candidate_url: candidate.json written by redistill_distill.
    """
    from anyflow.ops.steps import evaluate_step

    return evaluate_step(plan_url, candidate_url)


def redistill_decide(plan_url: str, candidate_url: str, evals_url: str, decision: Output[Markdown]) -> str:
    """Gate at every NFE; promote atomically (compare-and-swap) or record the rejection; write the report.

    CPU only. Fails without promoting if the run lost its lease.

    Args:
        plan_url: The run's plan.json.
        candidate_url: candidate.json written by redistill_distill.
        evals_url: evals.json written by redistill_evaluate.

    Returns:
        decision: Markdown for the KFP UI: the outcome, the gate's reasons and the candidate-vs-promoted table
            per NFE and metric (``anyflow.ops.record.markdown_summary``).
    """
    import os

    from anyflow.ops.record import markdown_summary
    from anyflow.ops.steps import decide_step

    rec = decide_step(plan_url, candidate_url, evals_url)
    os.makedirs(os.path.dirname(decision.path) or ".", exist_ok=True)
    with open(decision.path, "w", encoding="utf-8") as fh:
        fh.write(markdown_summary(rec))
    print(f"[anyflow] redistill {rec['run_id']}: {rec['status']}; report {rec.get('report')}", flush=True)
    return str(rec["status"])


def redistill_finish(store: str, run_id: str, config_json: str = '{"lease_ttl_s": 900}') -> str:
    """Exit handler: record a failed run (alias untouched) and release the run lease.

    Args:
        store: Store URL.
        run_id: The run id given to redistill_plan.
        config_json: The same RedistillConfig JSON.
    """
    from anyflow.ops.steps import finish_step

    return finish_step(store, config_json, run_id)


def build_redistill_pipeline(platform: "Platform | None" = None, image: "str | None" = None):
    """Return the ``anyflow-redistill`` pipeline function bound to ``platform`` and ``image``."""
    from kfp import dsl

    from components import (
        build_export_component,
        check_image,
        default_image,
        eval_image_for,
        make_component,
        process_args,
    )
    from pipelines.platform import EXPORT_PROFILE

    plat = platform or Platform()
    img = check_image(image or default_image())
    plan_c, distill_c, decide_c, finish_c = (
        make_component(f, img) for f in (redistill_plan, redistill_distill, redistill_decide, redistill_finish)
    )
    eval_c = make_component(redistill_evaluate, eval_image_for(img))  # candidate vs live, VBench included
    export_c = build_export_component(img)  # the optional export of a promoted model (components/export)

    @dsl.pipeline(name=PIPELINE_NAME, description="AnyFlow periodic re-distillation: new data, warm start, "
                  "evaluation gate at every NFE, atomic promotion.")
    def anyflow_redistill(
        store: str,
        source: str,
        teacher_uri: str,
        flowmap_uri: str = "",
        eval_dataset_uri: str = "",
        config_json: str = DEFAULT_CONFIG_JSON,
        export: bool = False,
    ) -> None:
        """Re-distill on the data that is new since the live model and promote only a non-worse candidate.

        Args:
            store: Store URL (s3://bucket/prefix) with artifacts/, models/<name>/promoted.json and redistill/.
            source: Data source spec; items new since the live model's window are prepared (+ replay).
            teacher_uri: The current teacher artifact (a different digest than the live model's = teacher changed).
            flowmap_uri: Flow-map artifact: generator init for the first run or after a teacher change.
            eval_dataset_uri: Fixed held-out dataset artifact for evaluation (optional).
            config_json: RedistillConfig as JSON (name, preset, overrides, metrics, margin, relative_margin,
                lease_ttl_s: the run lease's TTL, renewed by every task while it runs, ...).
            export: After a promotion, export the promoted model as a diffusers folder and a diffusers LoRA file
                into store/exports/ (components/export).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        # plan releases the lease and records the run itself when it skips or fails
        plan = plan_c(store=store, source=source, teacher_uri=teacher_uri, run_id=run_id, flowmap_uri=flowmap_uri,
                      eval_dataset_uri=eval_dataset_uri, config_json=config_json)
        plat.apply(plan, "prepare_data").set_caching_options(enable_caching=False)
        finish = finish_c(store=store, run_id=run_id, config_json=config_json)
        plat.apply(finish, "trainjob").set_caching_options(enable_caching=False)
        with dsl.ExitHandler(finish, name="redistill-train-and-decide"):
            # nothing new: no GPU pod is scheduled (plan already wrote the "skipped" record)
            with dsl.If(plan.outputs["action"] == "run", name="something-to-distill"):
                procs = process_args("distill", plat.for_stage("distill").gpus)  # one process per GPU of the pod
                cand = plat.apply(distill_c(plan_url=plan.outputs["plan_url"], **procs), "distill")
                cand.set_caching_options(enable_caching=False)
                ev = plat.apply(eval_c(plan_url=plan.outputs["plan_url"], candidate_url=cand.output), "evaluate")
                ev.set_caching_options(enable_caching=False)
                dec = decide_c(plan_url=plan.outputs["plan_url"], candidate_url=cand.output, evals_url=ev.output)
                plat.apply(dec, "trainjob").set_caching_options(enable_caching=False)
                with dsl.If(export == True, name="export-enabled"):  # noqa: E712 (KFP condition syntax)
                    with dsl.If(dec.outputs["Output"] == "promoted", name="promoted"):
                        exp = export_c(store=store, promoted_config_json=config_json)
                        # reads the alias, not its inputs: never a KFP cache hit (the store's exports are reused)
                        plat.apply(exp, EXPORT_PROFILE).set_display_name("export").set_caching_options(
                            enable_caching=False)

    return anyflow_redistill
