"""CLI handlers for the Kubeflow layer: ``run``, ``compile``, ``submit``, ``rerun``, ``schedule``,
``runs``, ``status``. Heavy imports (kfp, pipelines) happen inside the handlers."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_WORKDIR = "./anyflow-runs"
_MAX_METRICS = 16


class UserError(Exception):
    """An error a user fixes: printed as one sentence, exit code 2."""


def _overrides(args: argparse.Namespace, items: list[str] | None = None, *, over: dict[str, Any] | None = None,
               flag: str = "") -> dict[str, Any]:
    """Parse ``KEY=VALUE`` items (default: ``--set``) and validate them against the preset, applied over
    ``over``, before any stage runs; a bad key or value is a ``UserError`` (prefixed with ``flag``)."""
    from anyflow.config import ConfigError, apply_overrides, get_preset, parse_override_args

    if items is None:
        items = list(getattr(args, "set", None) or [])
    try:
        overrides = parse_override_args(items)
        apply_overrides(get_preset(args.preset), {**(over or {}), **overrides})  # unknown preset/key
    except ConfigError as exc:
        raise UserError(f"{flag}: {exc}" if flag else str(exc)) from None
    return overrides


def _store(store: str | None, workdir: str) -> str:
    store = store or os.path.join(workdir, "store")
    return store if "://" in store else os.path.abspath(store)


def _platform(args: argparse.Namespace):
    from pipelines.platform import Platform, PlatformError

    if not getattr(args, "platform", None):
        return Platform()
    try:
        return Platform.from_yaml(args.platform)
    except (OSError, PlatformError) as exc:
        raise UserError(str(exc)) from None


def _params(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"pipeline parameter {item!r} must look like name=value.")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _configure_s3(args: argparse.Namespace) -> None:
    if getattr(args, "s3_endpoint", None):
        from anyflow import storage

        os.environ["ANYFLOW_S3_ENDPOINT"] = args.s3_endpoint  # inherited by the stage subprocesses
        storage.configure(s3_endpoint=args.s3_endpoint)


def _print_run(run: Any, store: str) -> None:
    reused = sum(run.cached.values())
    for role, uri in run.artifacts.items():
        state = "cached" if run.cached.get(role) else "computed"
        print(f"  {role:<12} {state:<8} {uri}")
    print(f"{reused}/{len(run.artifacts)} outputs reused from the store cache.")
    shown = sorted(run.metrics.items())[:_MAX_METRICS]
    for name, value in shown:
        print(f"  metric {name} = {value:.6g}")
    if len(run.metrics) > len(shown):
        print(f"  … {len(run.metrics) - len(shown)} more metrics in the report")
    if "report" in run.artifacts:
        print(f"report (store): {run.artifacts['report'].rstrip('/')}/report.html")
    if run.report_html:
        print(f"report.html: {run.report_html}")
    if run.record:
        print(f"run record: {run.record}")
    if run.run_id:
        print(f"run id: {run.run_id} (stage records in {store}; reuse them with "
              f"'anyflow rerun --stage STAGE --run {run.run_id} --store {store}')")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the whole training pipeline (``anyflow-t2v``, or ``anyflow-far`` for a far-* preset) through KFP's
    local runner."""
    from anyflow.config import apply_overrides, get_preset
    from pipelines.anyflow_far import build_far_pipeline
    from pipelines.anyflow_t2v import build_t2v_pipeline
    from pipelines.local import run_local, save_record
    from pipelines.platform import Platform

    overrides = _overrides(args)
    far = apply_overrides(get_preset(args.preset), overrides).variant == "far"  # also validates before any stage
    build = build_far_pipeline if far else build_t2v_pipeline
    _configure_s3(args)
    store = _store(args.store, args.workdir)
    params = {"preset": args.preset, "overrides_json": json.dumps(overrides, sort_keys=True), "store": store,
              "finetune": bool(args.finetune)}
    if args.finetune_set:
        if not args.finetune:
            raise UserError("--finetune-set needs --finetune (it configures the fine-tuning dataset).")
        ft = _overrides(args, list(args.finetune_set), over=overrides, flag="--finetune-set")
        other = sorted(k for k in ft if not k.startswith("data."))
        if other:  # the branch's prepare_data reads only the data section; anything else would be ignored
            raise UserError(f"--finetune-set takes data.* keys only (the fine-tuning dataset); got {', '.join(other)}; "
                            "use --set for the stages.")
        params["finetune_data_overrides_json"] = json.dumps(ft, sort_keys=True)
    name = args.name or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    print(f"anyflow run: {'anyflow-far' if far else 'anyflow-t2v'} preset={args.preset} store={store} "
          f"(KFP local runner, workdir {args.workdir})", flush=True)
    # Platform.local(): no retries (the local runner honours set_retry and would back off for minutes).
    run = run_local(build(Platform.local(), image=args.image), params, args.workdir, name, verbose=args.verbose)
    save_record(run, args.workdir, params)
    _print_run(run, store)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a pipeline (or all of them) to YAML."""
    from pipelines.compile import CompileError, compile_all, compile_pipeline

    platform = _platform(args)
    try:
        if args.all:
            paths = compile_all(args.output or "compiled", platform, args.image)
        else:
            paths = [compile_pipeline(args.pipeline, args.output or f"{args.pipeline}.yaml", platform, args.image)]
    except (CompileError, ValueError) as exc:
        raise UserError(str(exc)) from None
    for path in paths:
        print(path)
    return 0


def _client(args: argparse.Namespace):
    from pipelines.client import make_client

    return make_client(args.host, namespace=args.namespace, existing_token=args.existing_token,
                       cookies=args.cookies, ssl_ca_cert=args.ssl_ca_cert)


def _compiled(pipeline_func: Any) -> str:
    from pipelines.compile import compile_pipeline_func

    path = os.path.join(tempfile.mkdtemp(prefix="anyflow-kfp-"), "pipeline.yaml")
    compile_pipeline_func(pipeline_func, path)
    return path


def _pipeline_params(args: argparse.Namespace, pipeline_func: Any = None) -> dict[str, Any]:
    """Run arguments: preset/overrides/store where the pipeline declares them, plus ``--param``s.

    A ``--param`` the pipeline does not declare is an error naming the declared ones.
    """
    params = {"preset": args.preset, "overrides_json": json.dumps(_overrides(args), sort_keys=True)}
    if args.store:
        params["store"] = args.store
    extra = _params(args.param)
    declared = set((getattr(getattr(pipeline_func, "component_spec", None), "inputs", None) or {}).keys())
    if declared:
        unknown = sorted(set(extra) - declared)
        if unknown:
            raise UserError(f"pipeline has no parameter(s) {', '.join(unknown)}; its parameters: {', '.join(sorted(declared))}.")
        params = {k: v for k, v in params.items() if k in declared}
    params.update(extra)
    return params


def _submit(args: argparse.Namespace, pipeline_func: Any, params: dict[str, Any]) -> int:
    from pipelines.client import friendly_errors

    package = _compiled(pipeline_func)
    client = _client(args)
    with friendly_errors(args.host or os.environ.get("KFP_HOST", "")):
        result = client.create_run_from_pipeline_package(
            package, arguments=params, run_name=args.run_name, experiment_name=args.experiment,
            namespace=args.namespace, service_account=args.service_account)
    print(f"submitted run {result.run_id} (experiment {args.experiment!r})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Compile and submit a pipeline to a KFP endpoint."""
    from pipelines.compile import CompileError, build

    try:
        func = build(args.pipeline, _platform(args), args.image)
    except (CompileError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return _submit(args, func, _pipeline_params(args, func))


@dataclass
class _RunInputs:
    """What ``--run`` resolved to: role → artifact URL and role → recorded manifest digest."""

    ref: str
    run_id: str | None
    store: str | None
    uris: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    entries: list[str] = field(default_factory=list)
    extra: dict[str, tuple[str, str]] = field(default_factory=dict)  # entry → (URL, digest), e.g. prepare_finetune_data

    def where(self) -> str:
        if self.run_id is None:
            return f"local run record {self.ref!r}"
        return f"run {self.run_id!r} in store {self.store}"


def _run_inputs(ref: str, args: argparse.Namespace) -> _RunInputs:
    """Resolve ``--run REF``: a local run name ('anyflow runs') gives its run id and store; anything else
    is a run id (a KFP run UUID) whose stage records are read from ``--store`` (default <workdir>/store)."""
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
        raise UserError(str(exc)) from None
    digests = {doc["output"]: doc["manifest_sha256"] for entry, doc in records.items() if entry == doc["stage"]}
    extra = {entry: (doc["uri"], doc["manifest_sha256"]) for entry, doc in records.items() if entry != doc["stage"]}
    return _RunInputs(ref, run_id, store, roles, digests, sorted(records), extra)


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
        run.uris["dataset"], run.digests["dataset"] = run.extra["prepare_finetune_data"]
    uris = {role: uri for role, uri in (run.uris if run else {}).items() if role in wanted}
    given: dict[str, str] = {}
    for item in args.from_ or []:
        role, sep, uri = item.partition("=")
        if not sep or not uri:
            raise UserError(f"--from {item!r} must look like role=URI, e.g. dataset=s3://bucket/artifacts/...")
        given[role] = uri
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
            raise UserError(f"{source}: the artifact changed since the run recorded it (manifest sha256 "
                            f"{recorded[:12]}… recorded, {digest[:12]}… now); pass --from {role}=URI explicitly.")
    return uris


def cmd_rerun(args: argparse.Namespace) -> int:
    """Run one stage on earlier artifacts (locally, or on a cluster with --host)."""
    from pipelines.local import run_local, save_record
    from pipelines.platform import Platform
    from pipelines.rerun import RerunError, build_rerun_pipeline

    _configure_s3(args)
    uris = _rerun_uris(args)
    try:
        platform = _platform(args) if args.host else Platform.local()
        func = build_rerun_pipeline(args.stage, uris, platform=platform, image=args.image)
    except RerunError as exc:
        raise UserError(str(exc)) from None
    if args.host:
        return _submit(args, func, _pipeline_params(args, func))
    store = _store(args.store, args.workdir)
    params = {"preset": args.preset, "overrides_json": json.dumps(_overrides(args), sort_keys=True), "store": store}
    name = time.strftime(f"rerun-{args.stage}-%Y%m%d-%H%M%S", time.gmtime())
    run = run_local(func, params, args.workdir, name, verbose=getattr(args, "verbose", False))
    save_record(run, args.workdir, params)
    _print_run(run, store)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """Create a KFP recurring run (cron converted to KFP's seconds-first form)."""
    from anyflow.cron import CronError, next_fire_times, to_kfp_cron
    from pipelines.client import friendly_errors
    from pipelines.compile import CompileError, build

    try:
        kfp_cron = to_kfp_cron(args.cron)
        times = next_fire_times(kfp_cron, args.show)
    except CronError as exc:
        raise UserError(str(exc)) from None
    print(f"KFP cron (seconds first): {kfp_cron}")
    for when in times:
        print(f"  next: {when.isoformat()}")
    if args.dry_run:
        return 0
    try:
        func = build(args.pipeline, _platform(args), args.image)
    except (CompileError, ValueError) as exc:
        raise UserError(str(exc)) from None
    params = _pipeline_params(args, func)
    package = _compiled(func)
    client = _client(args)
    with friendly_errors(args.host):
        experiment = client.create_experiment(args.experiment, namespace=args.namespace)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=args.run_name or f"{args.pipeline}-schedule",
            cron_expression=kfp_cron, max_concurrency=args.max_concurrency, no_catchup=True,
            service_account=args.service_account,
            params=params, pipeline_package_path=package)
    print(f"created recurring run {job.recurring_run_id}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List runs: KFP runs with --host, else the local run records."""
    from pipelines.client import friendly_errors
    from pipelines.local import list_records

    if not args.host:
        for rec in list_records(args.workdir):
            run_id = f"  run id {rec['run_id']}" if rec.get("run_id") else ""
            print(f"{rec['name']}  {rec.get('created', '')}  {len(rec.get('artifacts', {}))} artifacts{run_id}")
        return 0
    client = _client(args)
    with friendly_errors(args.host):
        resp = client.list_runs(page_size=args.limit, namespace=args.namespace, sort_by="created_at desc")
    for run in resp.runs or []:
        print(f"{run.run_id}  {run.state}  {run.created_at}  {run.display_name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show one run: a KFP run id with --host, else a local run record name."""
    from pipelines.client import friendly_errors
    from pipelines.local import load_record

    if not args.host:
        try:
            rec = load_record(args.run_id, args.workdir)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
        print(json.dumps(rec, indent=2, sort_keys=True))
        return 0
    client = _client(args)
    with friendly_errors(args.host):
        run = client.get_run(args.run_id)
    print(f"{run.run_id}  {run.state}  created {run.created_at}  finished {run.finished_at}  {run.display_name}")
    if run.error:
        print(f"error: {run.error}")
    return 0


#: errnos of "this place cannot be written": permission, read-only filesystem, a file where a folder should be.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


def _guard(handler):
    """Turn the errors users hit into one sentence on stderr and exit code 2."""

    def wrapped(args: argparse.Namespace) -> int:
        from anyflow.cron import CronError
        from pipelines.client import KfpClientError
        from pipelines.local import LocalRunError

        try:
            return handler(args)
        except (UserError, KfpClientError, LocalRunError, CronError) as exc:
            print(f"anyflow {args.command}: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # e.g. --workdir on a read-only root filesystem (a container's)
            if exc.errno not in _UNWRITABLE:
                raise
            where = exc.filename or getattr(args, "workdir", "") or "the output folder"
            hint = " (choose a writable folder with --workdir)" if getattr(args, "workdir", None) else ""
            print(f"anyflow {args.command}: cannot write {where}: {exc.strerror or os.strerror(exc.errno)}{hint}",
                  file=sys.stderr)
            return 2

    wrapped.__doc__ = handler.__doc__
    return wrapped


def _common(p: argparse.ArgumentParser, store: bool = True) -> None:
    p.add_argument("--preset", default="tiny", help="preset name (default: tiny)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable (e.g. distill.train.steps=2)")
    p.add_argument("--image", default=None, help="component image (default: $ANYFLOW_IMAGE or the release tag)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"local run folder (default: {DEFAULT_WORKDIR})")
    if store:
        p.add_argument("--store", default=None, help="artifact store: a folder or s3://bucket/prefix (default: <workdir>/store)")
        # SUPPRESS: do not overwrite the top-level ``anyflow --s3-endpoint`` when not given here.
        p.add_argument("--s3-endpoint", default=argparse.SUPPRESS,
                       help="S3 endpoint URL for --store s3://… (e.g. http://127.0.0.1:9000)")


def _kfp(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--host", required=required, default=None, help="KFP API endpoint, e.g. http://localhost:8080 (or $KFP_HOST)")
    p.add_argument("--namespace", default="kubeflow", help="Kubeflow namespace (default: kubeflow)")
    p.add_argument("--experiment", default="anyflow", help="experiment name (default: anyflow)")
    p.add_argument("--run-name", default=None, help="run name")
    p.add_argument("--existing-token", default=None, help="bearer token for the KFP API (or $KFP_TOKEN)")
    p.add_argument("--cookies", default=None, help="cookie header for the Kubeflow login (e.g. authservice_session=…)")
    p.add_argument("--ssl-ca-cert", default=None, help="CA bundle for the KFP endpoint")
    p.add_argument("--platform", default=None, help="platform YAML (GPUs, tolerations, secrets…; see pipelines/README.md)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="extra pipeline parameter, repeatable")
    p.add_argument("--service-account", default=None,
                   help="service account for the run's pods (anyflow-launcher for multi-node trainjob steps)")


def add_cli(subparsers: Any) -> None:
    """Register run, compile, submit, rerun, schedule, runs and status on an argparse subparsers object."""
    p = subparsers.add_parser("run", help="run the whole T2V pipeline locally through KFP's local runner",
                              description="Run prepare_data → … → evaluate on the tiny preset with procedural "
                              "data through KFP's local runner; stages already in the store are reused.")
    _common(p)
    p.add_argument("--finetune", action="store_true", help="also run the finetune → evaluate branch")
    p.add_argument("--finetune-set", action="append", metavar="KEY=VALUE",
                   help="override for the fine-tuning dataset, applied over --set (repeatable), e.g. "
                   "data.source=procedural:n=16,seed=1; data.* keys only (default: the training data)")
    p.add_argument("--name", default=None, help="run record name (default: run-<UTC time>)")
    p.add_argument("--verbose", action="store_true",
                   help="stream the local runner's full output (default: progress per stage; all of it goes to "
                   "<workdir>/runs/<name>.log)")
    p.set_defaults(func=_guard(cmd_run), command="run")

    p = subparsers.add_parser("compile", help="compile a pipeline to KFP YAML",
                              description="Compile a pipeline (deterministic YAML) for upload through the KFP UI.")
    p.add_argument("--pipeline", default="anyflow-t2v", help="pipeline name: anyflow-t2v (default), anyflow-far, anyflow-evaluate-only, anyflow-redistill, anyflow-rerun-<stage>")
    p.add_argument("--all", action="store_true", help="compile every pipeline into --output (a folder)")
    p.add_argument("--output", "-o", default=None, help="output file (or folder with --all)")
    p.add_argument("--platform", default=None, help="platform YAML (see pipelines/README.md)")
    p.add_argument("--image", default=None, help="component image (default: $ANYFLOW_IMAGE or the release tag)")
    p.set_defaults(func=_guard(cmd_compile), command="compile")

    p = subparsers.add_parser("submit", help="compile and submit a pipeline run to a KFP endpoint")
    _common(p)
    _kfp(p)
    p.add_argument("--pipeline", default="anyflow-t2v", help="pipeline name: anyflow-t2v (default), anyflow-far, anyflow-evaluate-only, anyflow-redistill, anyflow-rerun-<stage>")
    p.set_defaults(func=_guard(cmd_submit), command="submit")

    p = subparsers.add_parser("rerun", help="rerun one stage on earlier artifacts (dsl.importer)",
                              description="Rerun one stage with inputs imported by URI: locally through the KFP "
                              "local runner, or on a cluster with --host. Inputs come from --from ROLE=URI or from "
                              "an earlier run (--run): after every stage task a pipeline run records the task's artifact "
                              "URL and manifest digest under <store>/runs/<KFP run id>/ (also when KFP took the "
                              "task from its cache), e.g. "
                              "'anyflow rerun --stage distill --run <kfp-run-id> --store s3://bucket/prefix'.")
    _common(p)
    _kfp(p)
    p.add_argument("--stage", required=True, help="stage to rerun (prepare_data, train_teacher, train_flowmap, "
                   "distill, finetune, evaluate)")
    p.add_argument("--from", dest="from_", action="append", metavar="ROLE=URI", help="input artifact, repeatable")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="take the inputs from an earlier run: a KFP run id (its stage records under "
                   "<store>/runs/<id>/, so pass the run's --store) or a local run name or id from 'anyflow run' "
                   "(see 'anyflow runs'); --from overrides single roles")
    p.add_argument("--verbose", action="store_true", help="local rerun: stream the local runner's full output")
    p.set_defaults(func=_guard(cmd_rerun), command="rerun")

    p = subparsers.add_parser("schedule", help="create a KFP recurring run from a cron expression",
                              description="Accepts 5-field cron (min hour dom month dow) or KFP's 6-field "
                              "seconds-first form; prints the KFP form and the next fire times.")
    _common(p)
    _kfp(p)
    p.add_argument("--cron", required=True, help="cron expression, e.g. '0 3 * * *' (daily 03:00 UTC)")
    p.add_argument("--pipeline", default="anyflow-t2v", help="pipeline to schedule (default: anyflow-t2v)")
    p.add_argument("--max-concurrency", type=int, default=1, help="max concurrent runs (default: 1)")
    p.add_argument("--show", type=int, default=5, help="how many next fire times to print (default: 5)")
    p.add_argument("--dry-run", action="store_true", help="only validate and print the schedule")
    p.set_defaults(func=_guard(cmd_schedule), command="schedule")

    p = subparsers.add_parser("runs", help="list runs (KFP with --host, else local run records)")
    _kfp(p)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"local run folder (default: {DEFAULT_WORKDIR})")
    p.add_argument("--limit", type=int, default=20, help="how many runs (default: 20)")
    p.set_defaults(func=_guard(cmd_runs), command="runs")

    p = subparsers.add_parser("status", help="show one run (KFP run id with --host, else a local record)")
    _kfp(p)
    p.add_argument("run_id", help="KFP run id, or a local run record name")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"local run folder (default: {DEFAULT_WORKDIR})")
    p.set_defaults(func=_guard(cmd_status), command="status")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m anyflow.kfpctl …``) with only the Kubeflow commands."""
    parser = argparse.ArgumentParser(prog="anyflow", description="AnyFlow on Kubeflow Pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
