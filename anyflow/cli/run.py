"""``anyflow run``, ``anyflow stage`` and ``anyflow rerun``: the pipeline locally, one stage as a plain
process, one stage on earlier artifacts (locally or on a cluster). Heavy imports happen in the handlers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from anyflow.cli._common import (
    UserError,
    _client,
    _cluster_image,
    _common,
    _configure_s3,
    _guard,
    _kfp,
    _overrides,
    _pipeline_params,
    _platform,
    _print_run,
    _store,
    _submit,
    check_fanout,
)
from anyflow.urls import role_url_argument


def _check_sources(cfg: Any) -> None:
    """List the data source before the local runner starts (what the pipeline's fingerprint task does first): a
    missing or unreadable source is one sentence and exit 2, not a failed KFP task after seconds of start-up."""
    from anyflow.config import StageInputError
    from anyflow.stages.prepare_data import source_digest

    try:
        source_digest(cfg)
    except StageInputError as exc:
        raise UserError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    """Run the whole training pipeline (``anyflow-t2v``, or ``anyflow-far`` for a far-* preset) through KFP's
    local runner."""
    from anyflow.config import apply_overrides, get_preset
    from pipelines.anyflow_far import build_far_pipeline
    from pipelines.anyflow_t2v import build_t2v_pipeline
    from pipelines.local import local_env, run_local, save_record
    from pipelines.platform import Platform

    overrides = _overrides(args)
    cfg = apply_overrides(get_preset(args.preset), overrides)  # also validates before any stage
    far = cfg.variant == "far"
    build = build_far_pipeline if far else build_t2v_pipeline
    _configure_s3(args)
    store = _store(args.store, args.workdir)
    params = {"preset": args.preset, "overrides_json": json.dumps(overrides, sort_keys=True), "store": store,
              "finetune": bool(args.finetune)}
    if args.export:  # the export step after evaluate (components/export)
        params["export"] = True
    if args.finetune_set:
        if not args.finetune:
            raise UserError("--finetune-set needs --finetune (it configures the fine-tuning dataset).")
        ft = _overrides(args, list(args.finetune_set), over=overrides, flag="--finetune-set")
        other = sorted(k for k in ft if not k.startswith("data."))
        if other:  # the branch's prepare_data reads only the data section; anything else would be ignored
            raise UserError(f"--finetune-set takes data.* keys only (the fine-tuning dataset); got {', '.join(other)}; "
                            "use --set for the stages.")
        params["finetune_data_overrides_json"] = json.dumps(ft, sort_keys=True)
        _check_sources(apply_overrides(cfg, ft))  # the fine-tuning dataset's own source
    _check_sources(cfg)
    name = args.name or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    print(f"anyflow run: {'anyflow-far' if far else 'anyflow-t2v'} preset={args.preset} store={store} "
          f"(KFP local runner, workdir {args.workdir})", flush=True)
    # no retries (the local runner honours set_retry and would back off for minutes), no cluster endpoint
    # one torch thread per component process on the tiny model (pipelines.local.local_env)
    run = run_local(build(Platform.local_runner(), image=args.image), params, args.workdir, name,
                    verbose=args.verbose, env=local_env(cfg))
    save_record(run, args.workdir, params)
    _print_run(run, store, args.workdir)
    if args.export:
        from anyflow.export import FORMATS, export_url
        from pipelines.local import load_record

        generator = load_record(name, args.workdir)["artifacts"].get("generator")
        for fmt in FORMATS if generator else ():
            print(f"export ({fmt}): {export_url(store, fmt, generator)}")
    return 0


@dataclass
class _RunInputs:
    """What ``--run`` resolved to: role → artifact URL and role → recorded manifest digest."""

    ref: str
    run_id: str | None
    store: str | None
    uris: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    contents: dict[str, str] = field(default_factory=dict)  # role → recorded content sha256 (newer records only)
    entries: list[str] = field(default_factory=list)
    # entry → (URL, manifest digest, content digest or ""), e.g. prepare_finetune_data
    extra: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def where(self) -> str:
        if self.run_id is None:
            return f"local run record {self.ref!r}"
        return f"run {self.run_id!r} in store {self.store}"


def _run_inputs(ref: str, args: argparse.Namespace) -> _RunInputs:
    """Resolve ``--run REF``: a local run's name or run id ('anyflow runs') gives its run id and store; anything
    else is a run id (a KFP run UUID) whose stage records are read from ``--store`` (default <workdir>/store) or,
    with ``--host`` and no records under that id, the name of a KFP run (looked up by name: KFP's API knows runs
    by id)."""
    from anyflow.ops.record import RunRecordError, run_artifacts
    from pipelines.local import find_record

    local = find_record(ref, args.workdir)
    if local is not None and not local.get("run_id"):  # written before runs kept stage records
        return _RunInputs(ref, None, local.get("store"), dict(local.get("artifacts", {})),
                          entries=sorted(local.get("artifacts", {})))
    run_id = local["run_id"] if local is not None else ref
    store = (local.get("store") if local is not None else None) or _store(args.store, args.workdir)
    try:
        roles, records = run_artifacts(store, run_id)
    except RunRecordError as exc:
        if local is not None or not getattr(args, "host", None):
            raise UserError(str(exc)) from None
        run_id = _kfp_run_id(ref, args)  # a KFP run name
        if run_id == ref:
            raise UserError(str(exc)) from None
        try:
            roles, records = run_artifacts(store, run_id)
        except RunRecordError as exc2:
            raise UserError(f"KFP run {ref!r} is run id {run_id}: {exc2}") from None
    digests = {doc["output"]: doc["manifest_sha256"] for entry, doc in records.items() if entry == doc["stage"]}
    contents = {doc["output"]: doc["content_sha256"] for entry, doc in records.items()
                if entry == doc["stage"] and doc.get("content_sha256")}
    extra = {entry: (doc["uri"], doc["manifest_sha256"], doc.get("content_sha256", ""))
             for entry, doc in records.items() if entry != doc["stage"]}
    return _RunInputs(ref, run_id, store, roles, digests, contents, sorted(records), extra)


def _kfp_run_id(ref: str, args: argparse.Namespace) -> str:
    """The run id of the KFP run named (or with the id) ``ref`` at ``--host``."""
    from anyflow.cli.kfp import find_kfp_run
    from pipelines.client import friendly_errors

    client = _client(args)
    with friendly_errors(args.host):
        return find_kfp_run(client, ref, args.namespace, args.host).run_id


def _rerun_uris(args: argparse.Namespace) -> dict[str, str]:
    """Input role → artifact URL for ``rerun``: the ``--run`` records first, then every ``--from``."""
    from anyflow import storage
    from pipelines.rerun import OPTIONAL_INPUTS, STAGE_INPUTS

    if args.stage not in STAGE_INPUTS:
        raise UserError(f"unknown stage {args.stage!r}; valid stages: {', '.join(STAGE_INPUTS)}.")
    wanted = {**STAGE_INPUTS[args.stage], **OPTIONAL_INPUTS.get(args.stage, {})}
    run = _run_inputs(args.run, args) if args.run else None
    if run is not None and args.stage == "finetune" and "prepare_finetune_data" in run.extra:
        # the run fine-tuned on its second dataset, not on the training one
        run.uris["dataset"], run.digests["dataset"], content = run.extra["prepare_finetune_data"]
        run.contents.pop("dataset", None)
        if content:
            run.contents["dataset"] = content
    uris = {role: uri for role, uri in (run.uris if run else {}).items() if role in wanted}
    given = dict(item.partition("=")[::2] for item in args.from_ or [])  # ROLE=URL checked by role_url_argument
    uris.update(given)
    missing = [r for r in STAGE_INPUTS[args.stage] if r not in uris]
    if missing and run is not None:
        raise UserError(f"{run.where()} recorded the stage(s) {', '.join(run.entries) or 'none'} "
                        f"(roles: {', '.join(sorted(run.uris)) or 'none'}); stage {args.stage!r} also needs "
                        f"role(s) {', '.join(missing)}: add --from ROLE=URI.")
    if missing:
        raise UserError(f"stage {args.stage!r} needs --from for role(s) {', '.join(missing)} (or --run RUN).")
    for role, uri in uris.items():
        source = f"--from {role}={uri}" if role in given else f"{role}={uri} (from {run.where()})"
        try:
            storage.read_manifest(uri)
            digest = storage.manifest_digest(uri)
        except Exception as exc:  # ArtifactError or an I/O error: either way not a readable artifact
            raise UserError(f"{source} is not an anyflow artifact ({exc}).") from None
        recorded = run.digests.get(role) if run is not None and role not in given else None
        if recorded and recorded != digest:
            # published again since (a forced rerun of its stage): the same files are the same input
            same = run.contents.get(role) and run.contents[role] == storage.content_digest(uri)
            if not same:
                raise UserError(f"{source}: the artifact changed since the run recorded it (manifest sha256 "
                                f"{recorded[:12]}… recorded, {digest[:12]}… now, and its files differ too); pass "
                                f"--from {role}=URI explicitly.")
            print(f"note: {role}={uri} was published again since {run.where()} recorded it, with the same files "
                  "(content sha256 equal): using it", file=sys.stderr, flush=True)
    return uris


def _discard(args: argparse.Namespace, uris: dict[str, str], platform: Any, store: str) -> None:
    """``--force``: remove the stage's cached artifact and training checkpoints for these inputs and this config
    (the key the stage task will compute: :func:`anyflow.stages.discard`), so it is computed anew from step 0."""
    from anyflow.stages import discard
    from components import TRAINING_STAGES, process_args

    spec = platform.for_stage(args.stage)
    world_size = process_args(args.stage, spec.gpus).get("nproc_per_node", 1)
    if args.stage in TRAINING_STAGES and spec.num_nodes > 1:
        world_size *= spec.num_nodes
    removed = discard(args.stage, preset=args.preset, overrides=_overrides(args), inputs=uris, store=store,
                      world_size=world_size)
    what = ", ".join(removed) if removed else "nothing cached"
    print(f"--force: removed {what}; {args.stage} is computed anew (stages run on it are keyed by its content)",
          flush=True)


def cmd_rerun(args: argparse.Namespace) -> int:
    """Run one stage on earlier artifacts (locally, or on a cluster with --host)."""
    from pipelines.local import run_local, save_record
    from pipelines.platform import Platform
    from pipelines.rerun import RerunError, build_rerun_pipeline

    _configure_s3(args)
    uris = _rerun_uris(args)
    if args.run and not args.store:  # a local run's store is in its record: the rerun writes beside its artifacts
        from pipelines.local import find_record

        local = find_record(args.run, args.workdir)
        args.store = (local or {}).get("store") or None
    try:
        platform = _platform(args) if args.host else Platform.local_runner()
        image = _cluster_image(args) if args.host else args.image
        if args.force:  # KFP's cache must not skip the stage task either (its key is the task's inputs)
            platform = dataclasses.replace(platform, caching=False)
        func = build_rerun_pipeline(args.stage, uris, platform=platform, image=image)
    except RerunError as exc:
        raise UserError(str(exc)) from None
    if args.host and args.force and not args.store:
        raise UserError("--force on a cluster needs the run's --store (the cached artifact to remove is there).")
    store = args.store if args.host else _store(args.store, args.workdir)
    if args.force:
        _discard(args, uris, platform, store)
    if args.host:
        params = _pipeline_params(args, func)
        if args.stage == "prepare_data":
            check_fanout(platform, params, f"anyflow rerun --stage prepare_data --platform {args.platform}")
        return _submit(args, func, params)
    params = {"preset": args.preset, "overrides_json": json.dumps(_overrides(args), sort_keys=True), "store": store}
    name = time.strftime(f"rerun-{args.stage}-%Y%m%d-%H%M%S", time.gmtime())
    from anyflow.config import apply_overrides, get_preset
    from pipelines.local import local_env

    cfg = apply_overrides(get_preset(args.preset), _overrides(args))
    run = run_local(func, params, args.workdir, name, verbose=getattr(args, "verbose", False), env=local_env(cfg))
    save_record(run, args.workdir, params)
    _print_run(run, store, args.workdir)
    return 0


def add_run(subparsers: Any) -> None:
    """Register ``run``."""
    p = subparsers.add_parser("run", help="run the whole T2V pipeline locally through KFP's local runner",
                              description="Run prepare_data → … → evaluate with procedural data through KFP's local "
                              "runner (the tiny preset, minutes on CPU; --preset demo: about 5 minutes, a report "
                              "that shows learning); stages already in the store are reused.")
    _common(p)
    p.add_argument("--finetune", action="store_true", help="also run the finetune → evaluate branch")
    p.add_argument("--finetune-set", action="append", metavar="KEY=VALUE",
                   help="override for the fine-tuning dataset, applied over --set (repeatable), e.g. "
                   "data.source=procedural:n=16,seed=1; data.* keys only (default: the training data)")
    p.add_argument("--export", action="store_true",
                   help="also export the distilled generator as a diffusers folder and a LoRA file (the export "
                   "step; into <store>/exports/, see anyflow export)")
    p.add_argument("--name", default=None, help="run record name (default: run-<UTC time>)")
    p.add_argument("--verbose", action="store_true",
                   help="stream the local runner's full output (default: progress per stage; all of it goes to "
                   "<workdir>/runs/<name>.log)")
    p.set_defaults(func=_guard(cmd_run), command="run")


def add_stage(subparsers: Any) -> None:
    """Register ``stage`` (its arguments and handler live with the stages: ``python -m anyflow.stages.<name>``
    takes the same ones)."""
    from anyflow.stages import add_stage_arguments, stage_from_args

    p = subparsers.add_parser("stage", help="run one stage as a plain process (no KFP)",
                              description="Run one stage; inputs and output are artifact URLs (local or s3://).")
    add_stage_arguments(p)
    p.set_defaults(func=stage_from_args)


def add_rerun(subparsers: Any) -> None:
    """Register ``rerun``."""
    p = subparsers.add_parser("rerun", help="rerun one stage on earlier artifacts (given by store URL)",
                              description="Rerun one stage with inputs given by store URL (<role>_uri parameters): locally through the KFP "
                              "local runner, or on a cluster with --host. Inputs come from --from ROLE=URI or from "
                              "an earlier run (--run): after every stage task a pipeline run records the task's artifact "
                              "URL and manifest digest under <store>/runs/<KFP run id>/ (also when KFP took the "
                              "task from its cache), e.g. "
                              "'anyflow rerun --stage distill --run <kfp-run-id> --store s3://bucket/prefix'.")
    _common(p)
    _kfp(p)
    p.add_argument("--stage", required=True, help="stage to rerun (prepare_data, train_teacher, train_flowmap, "
                   "distill, finetune, evaluate)")
    p.add_argument("--from", dest="from_", action="append", metavar="ROLE=URI", type=role_url_argument, help="input artifact, repeatable")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="take the inputs from an earlier run: a local run's name or run id from 'anyflow run' "
                   "(see 'anyflow runs'; its store, from its record, is also the rerun's unless --store is given), "
                   "or a KFP run id or, with --host, a KFP run name (its stage records under <store>/runs/<id>/, "
                   "so pass the run's --store); --from overrides single roles")
    p.add_argument("--force", action="store_true",
                   help="recompute the stage even if the store (or KFP's cache) holds it: its cached artifact and "
                   "training checkpoints for these inputs and settings are removed first and it trains from step 0; "
                   "stages later run on it are keyed by its content, so they are computed anew when its bytes "
                   "differ and none is served stale")
    p.add_argument("--verbose", action="store_true", help="local rerun: stream the local runner's full output")
    p.set_defaults(func=_guard(cmd_rerun), command="rerun")
