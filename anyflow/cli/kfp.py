"""``anyflow compile``, ``submit``, ``schedule``, ``runs`` and ``status``: the Kubeflow Pipelines layer.
Heavy imports (kfp, pipelines) happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from anyflow.cli._common import (
    DEFAULT_WORKDIR,
    UserError,
    _client,
    _cluster_image,
    _common,
    _compiled,
    _guard,
    _kfp,
    _kfp_connection,
    _pipeline_params,
    _platform,
    _submit,
    check_fanout,
)


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a pipeline (or all of them) to YAML."""
    from components import IMAGE_PLACEHOLDER, default_image
    from pipelines.compile import CompileError, compile_all, compile_pipeline

    platform = _platform(args)
    try:
        if args.all:
            paths = compile_all(args.output or "compiled", platform, args.image)
        else:
            paths = [compile_pipeline(args.pipeline, args.output or f"{args.pipeline}.yaml", platform, args.image)]
    except (CompileError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if (args.image or default_image()) == IMAGE_PLACEHOLDER:  # after compiling: a refused one gets one line
        print(f"anyflow compile: note: the YAML names the placeholder image {IMAGE_PLACEHOLDER}; pass --image "
              "REPO@sha256:DIGEST (or set ANYFLOW_IMAGE) before uploading it to a cluster.", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Compile and submit a pipeline to a KFP endpoint."""
    from pipelines.compile import CompileError, build

    platform = _platform(args)
    try:
        func = build(args.pipeline, platform, _cluster_image(args))
    except (CompileError, ValueError) as exc:
        raise UserError(str(exc)) from None
    params = _pipeline_params(args, func)
    if args.pipeline in ("anyflow-t2v", "anyflow-far"):  # their prepare_data tasks fan out (pipelines/fingerprint.py)
        check_fanout(platform, params, f"anyflow submit --pipeline {args.pipeline} --platform {args.platform}")
    return _submit(args, func, params)


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
        func = build(args.pipeline, _platform(args), _cluster_image(args))
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
    print(f"created recurring run {job.recurring_run_id} (experiment {args.experiment!r}, namespace {args.namespace})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List runs: KFP runs with --host, else the local run records (by name, the one identifier they show)."""
    from pipelines.client import friendly_errors
    from pipelines.local import list_records

    if not args.host:
        records = list_records(args.workdir)[-args.limit:] if args.limit > 0 else []
        for rec in records:
            print(f"{rec['name']}  {rec.get('created', '')}  {rec.get('status', 'succeeded')}  "
                  f"{len(rec.get('artifacts', {}))} artifacts")
        if not records:
            print(f"no local runs in {args.workdir} (start one with 'anyflow run')")
        return 0
    client = _client(args)
    with friendly_errors(args.host):
        resp = client.list_runs(page_size=args.limit, namespace=args.namespace, sort_by="created_at desc")
    for run in resp.runs or []:
        print(f"{run.run_id}  {run.state}  {run.created_at}  {run.display_name}")
    return 0


def find_kfp_run(client: Any, ref: str, namespace: str | None, host: str) -> Any:
    """The KFP run ``ref`` names: its display name (KFP's API addresses runs by id only, so a name is looked up
    with ``list_runs`` filtered on ``display_name``; two runs of that name are an error naming their ids), else its
    run id (``get_run``). Call inside ``friendly_errors``."""
    from kfp_server_api.exceptions import ApiException

    flt = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "stringValue": ref}]})
    resp = client.list_runs(page_size=20, namespace=namespace, sort_by="created_at desc", filter=flt)
    named = [run for run in resp.runs or [] if run.display_name == ref]
    if len(named) > 1:
        raise UserError(f"{len(named)} KFP runs are named {ref!r} ({', '.join(r.run_id for r in named)}); give "
                        "its run id instead.")
    if named:
        return named[0]
    try:
        return client.get_run(ref)
    except ApiException as exc:
        if exc.status not in (400, 404):
            raise
        raise UserError(f"no KFP run has the id or name {ref!r} at {host} (namespace {namespace}); list them with "
                        "'anyflow runs --host …'.") from None


def cmd_status(args: argparse.Namespace) -> int:
    """Show one run, by run id or name: a KFP run with --host, else a local run record."""
    from pipelines.client import friendly_errors
    from pipelines.local import load_record

    if not args.host:
        try:
            rec = load_record(args.run, args.workdir)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
        print(json.dumps(rec, indent=2, sort_keys=True))
        return 0
    client = _client(args)
    with friendly_errors(args.host):
        run = find_kfp_run(client, args.run, args.namespace, args.host)
    print(f"{run.run_id}  {run.state}  created {run.created_at}  finished {run.finished_at}  {run.display_name}")
    if run.error:
        print(f"run error: {run.error}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register compile, submit, schedule, runs and status on an argparse subparsers object."""
    p = subparsers.add_parser("compile", help="compile a pipeline to KFP YAML",
                              description="Compile a pipeline (deterministic YAML) for upload through the KFP UI.")
    p.add_argument("--pipeline", default="anyflow-t2v", help="pipeline name: anyflow-t2v (default), anyflow-far, anyflow-evaluate-only, anyflow-redistill, anyflow-rerun-<stage>")
    p.add_argument("--all", action="store_true", help="compile every pipeline into --output (a folder)")
    p.add_argument("--output", "-o", default=None, help="output file (or folder with --all)")
    p.add_argument("--platform", default=None, help="platform YAML (see pipelines/README.md)")
    p.add_argument("--image", default=None, help="component image (default: $ANYFLOW_IMAGE or the release tag)")
    p.set_defaults(func=_guard(cmd_compile), command="compile")

    p = subparsers.add_parser("submit", help="compile and submit a pipeline run to a KFP endpoint",
                              description="Compile a pipeline and start one run of it on a KFP endpoint (--host or "
                              "$KFP_HOST) with the image its pods pull (--image or $ANYFLOW_IMAGE); prints the KFP "
                              "run id, which 'anyflow status' and 'anyflow rerun --run' take (as does the run name).")
    _common(p, cluster=True)
    _kfp(p)
    p.add_argument("--pipeline", default="anyflow-t2v", help="pipeline name: anyflow-t2v (default), anyflow-far, anyflow-evaluate-only, anyflow-redistill, anyflow-rerun-<stage>")
    p.set_defaults(func=_guard(cmd_submit), command="submit")
    p = subparsers.add_parser("schedule", help="create a KFP recurring run from a cron expression",
                              description="Accepts 5-field cron (min hour dom month dow) or KFP's 6-field "
                              "seconds-first form; prints the KFP form and the next fire times.")
    _common(p, cluster=True)
    _kfp(p)
    p.add_argument("--cron", required=True, help="cron expression, e.g. '0 3 * * *' (daily 03:00 UTC)")
    p.add_argument("--pipeline", default="anyflow-t2v", help="pipeline to schedule (default: anyflow-t2v)")
    p.add_argument("--max-concurrency", type=int, default=1, help="max concurrent runs (default: 1)")
    p.add_argument("--show", type=int, default=5, help="how many next fire times to print (default: 5)")
    p.add_argument("--dry-run", action="store_true", help="only validate and print the schedule")
    p.set_defaults(func=_guard(cmd_schedule), command="schedule")

    p = subparsers.add_parser("runs", help="list runs (KFP with --host, else local run records)",
                              description="List runs: with --host (or $KFP_HOST) the newest KFP runs (run id, state, "
                              "created, name); else the local runs of 'anyflow run' and 'anyflow rerun' under "
                              "--workdir (name, created, outcome, artifacts).")
    _kfp_connection(p)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"local run folder (default: {DEFAULT_WORKDIR})")
    p.add_argument("--limit", type=int, default=20, help="how many runs, newest (default: 20)")
    p.set_defaults(func=_guard(cmd_runs), command="runs")

    p = subparsers.add_parser("status", help="show one run, by run id or name (KFP with --host, else a local record)",
                              description="Show one run. RUN is a run id or a run name: with --host (or $KFP_HOST) "
                              "a KFP run (its name is looked up among the runs of the namespace; KFP's API knows runs "
                              "by id); else a local run of 'anyflow run' under --workdir, printed as its JSON record.")
    _kfp_connection(p)
    p.add_argument("run", metavar="RUN", help="run id or run name (KFP's with --host, else a local run's)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"local run folder (default: {DEFAULT_WORKDIR})")
    p.set_defaults(func=_guard(cmd_status), command="status")
