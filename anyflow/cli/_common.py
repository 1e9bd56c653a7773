"""Helpers shared by the command modules: argument groups, validation of ``--set``/``--platform``/
``--param``, the KFP client, and the guard that turns user errors into one sentence and exit code 2."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import sys
import tempfile
from typing import Any

from anyflow.urls import url_argument

DEFAULT_WORKDIR = "./anyflow-runs"
DEFAULT_PRESET = "tiny"


class UserError(Exception):
    """An error a user fixes: printed as one sentence, exit code 2."""


def _overrides(args: argparse.Namespace, items: list[str] | None = None, *, over: dict[str, Any] | None = None,
               flag: str = "") -> dict[str, Any]:
    """Parse ``KEY=VALUE`` items (default: the ``--config`` file's overrides, then ``--set`` over them) and
    validate them against the preset, applied over ``over``, before any stage runs; a bad key or value is a
    ``UserError`` (prefixed with ``flag``)."""
    from anyflow.config import (
        ConfigError,
        apply_overrides,
        get_preset,
        load_overrides_file,
        merge_overrides,
        parse_override_args,
    )

    config = None
    if items is None:
        items = list(getattr(args, "set", None) or [])
        config = getattr(args, "config", None)
    try:
        overrides = merge_overrides(load_overrides_file(config) if config else {}, parse_override_args(items))
        apply_overrides(get_preset(args.preset), merge_overrides(over, overrides))  # unknown preset/key
    except OSError as exc:  # the --config file cannot be read (a bad YAML or key is a ConfigError)
        raise UserError(f"--config {config}: {exc.strerror or exc}") from None
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


#: The headline quality metrics printed at the end of a run (the rest are in the report).
_HEADLINE = ("coupled_mse", "energy_distance")
#: Evaluate entries whose report is printed, with what they evaluated.
_REPORTS = {"report": "the distilled generator", "evaluate_finetuned": "the fine-tuned generator"}


def _headline(metrics: Any) -> list[str]:
    """``generator/nfe<N>/<metric>`` lines of the evaluated generator, by metric then NFE."""
    import re

    rows = []
    for name, value in metrics.items():
        m = re.fullmatch(r"generator/nfe(\d+)/(\w+)", name)
        if m and m.group(2) in _HEADLINE and isinstance(value, (int, float)):
            rows.append((_HEADLINE.index(m.group(2)), int(m.group(1)), name, float(value)))
    return [f"  {name} = {value:.6g}" for *_, name, value in sorted(rows)]


def _print_run(run: Any, store: str, workdir: str = DEFAULT_WORKDIR) -> None:
    """The run's artifacts (optional branches included), its headline metrics, and the report path(s), last.

    The run is named by its name only (``status``, ``rerun --run`` take it, or the run id its record holds)."""
    from anyflow import storage
    from components._io import flatten_metrics

    reused = sum(run.cached.values())
    for role, uri in run.artifacts.items():
        state = "cached" if run.cached.get(role) else "computed"
        print(f"  {role:<12} {state:<8} {uri}")
    print(f"{reused}/{len(run.artifacts)} outputs reused from the store cache.")
    if run.run_id:
        where = "" if os.path.normpath(workdir) == os.path.normpath(DEFAULT_WORKDIR) else f" --workdir {workdir}"
        print(f"run: {run.name} (show it with 'anyflow status {run.name}{where}'; rerun a stage on its artifacts "
              f"with 'anyflow rerun --stage STAGE --run {run.name}{where}'; stage records in {store})")
    if run.record:
        print(f"run record: {run.record}")
    reports = []
    for entry, what in _REPORTS.items():
        if entry not in run.artifacts:
            continue
        try:
            manifest = storage.read_manifest(run.artifacts[entry])
            lines = _headline(flatten_metrics(manifest.get("metrics", {})))
            reports.append((what, storage.file_url(run.artifacts[entry], "report.html", manifest=manifest)))
        except (storage.ArtifactError, OSError) as exc:  # never fail a finished run over printing
            lines = [f"  (metrics unreadable: {exc})"]
        if lines:
            print(f"{what} (lower is better; all metrics in the report):")
            print("\n".join(lines))
    for what, url in reports[1:]:
        print(f"report of {what}: {url}")
    if run.report_html:
        print(f"report.html: {run.report_html}")  # the last line: what to open
    elif reports:
        print(f"report.html: {reports[0][1]}")


def _client(args: argparse.Namespace):
    """A ``kfp.Client`` for ``--host``; ``args.namespace`` becomes the namespace the run's pods use (the
    profile namespace on multi-user KFP, KFP's own on standalone: ``pipelines.client.resolve_namespace``)."""
    from pipelines.client import connect

    conn = connect(args.host, namespace=args.namespace, existing_token=args.existing_token,
                   existing_token_file=getattr(args, "existing_token_file", None),
                   cookies=args.cookies, ssl_ca_cert=args.ssl_ca_cert)
    args.namespace = conn.namespace
    return conn.client


def _cluster_image(args: argparse.Namespace) -> str:
    """The image a cluster run pulls: ``--image`` or ``$ANYFLOW_IMAGE``; the placeholder the committed YAML
    names is refused (nothing is ever pushed under it)."""
    from components import IMAGE_PLACEHOLDER, check_image, default_image

    image = args.image or default_image()
    if image == IMAGE_PLACEHOLDER:
        raise UserError("a cluster run needs the image its pods pull: pass --image REPO@sha256:DIGEST (or REPO:TAG; "
                        "'images/build.sh --push' prints both) or set ANYFLOW_IMAGE. A digest is safest: KFP's "
                        "cache key contains the image string.")
    try:
        return check_image(image)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _compiled(pipeline_func: Any) -> str:
    from pipelines.compile import compile_pipeline_func

    path = os.path.join(tempfile.mkdtemp(prefix="anyflow-kfp-"), "pipeline.yaml")
    compile_pipeline_func(pipeline_func, path)
    return path


def _pipeline_params(args: argparse.Namespace, pipeline_func: Any = None) -> dict[str, Any]:
    """Run arguments: preset/overrides/store where the pipeline declares them, plus ``--param``s.

    Errors, before anything is submitted: a ``--param`` the pipeline does not declare; ``--preset``, ``--set`` or
    ``--store`` given for a pipeline that has no such parameter (they would be dropped silently); a required
    parameter left without a value.
    """
    params = {"preset": args.preset, "overrides_json": json.dumps(_overrides(args), sort_keys=True)}
    given = {}  # pipeline input -> the flag that set it explicitly
    if getattr(args, "preset_given", False):
        given["preset"] = "--preset"
    if args.set or getattr(args, "config", None):
        given["overrides_json"] = "--set" if args.set else "--config"
    if args.store:
        params["store"] = args.store
        given["store"] = "--store"
    extra = _params(args.param)
    inputs = getattr(getattr(pipeline_func, "component_spec", None), "inputs", None) or {}
    if inputs:
        name = getattr(getattr(pipeline_func, "component_spec", None), "name", None) or "the pipeline"
        declared = sorted(inputs)
        unknown = sorted(set(extra) - set(declared))
        if unknown:
            raise UserError(f"pipeline {name} has no parameter(s) {', '.join(unknown)}; its parameters: "
                            f"{', '.join(declared)}.")
        dropped = [flag for key, flag in given.items() if key not in inputs]
        if dropped:
            raise UserError(f"pipeline {name} has no parameter for {', '.join(dropped)}; its parameters: "
                            f"{', '.join(declared)} (give them with --param NAME=VALUE).")
        params = {k: v for k, v in params.items() if k in inputs}
        params.update(extra)
        missing = sorted(k for k, spec in inputs.items() if k not in params and not _optional(spec))
        if missing:
            raise UserError(f"pipeline {name} needs --param for {', '.join(missing)} (required, no default).")
        return params
    params.update(extra)
    return params


def _optional(spec: Any) -> bool:
    """Whether a KFP pipeline input has a default (``InputSpec.optional``; a default value implies it)."""
    return bool(getattr(spec, "optional", False) or getattr(spec, "default", None) is not None)


def check_fanout(platform: Any, params: dict[str, Any], what: str) -> None:
    """A platform with ``prepare_fanout`` compiles a prepare_data that only merges: refuse here, before anything
    is submitted, the run its fingerprint task would refuse on the cluster (no ``data.partition_size`` > 0 or no
    store) -- the same rule, :func:`anyflow.stages.prepare_data.partition_plan`."""
    if not getattr(platform, "prepare_fanout", False) or "overrides_json" not in params:
        return
    from anyflow.config import ConfigError, StageInputError, apply_overrides, get_preset
    from anyflow.stages.prepare_data import partition_plan

    try:
        cfg = apply_overrides(get_preset(params.get("preset", "tiny")), json.loads(params["overrides_json"]))
    except (ConfigError, ValueError):
        return  # the stage task names a bad config itself
    if not (cfg.data.partition_size and params.get("store")):
        try:
            partition_plan(cfg, params.get("store", ""), fanout=True)
        except StageInputError as exc:
            raise UserError(f"{what}: {exc} (--set data.partition_size=N, --store URL)") from None


def _submit(args: argparse.Namespace, pipeline_func: Any, params: dict[str, Any]) -> int:
    from pipelines.client import friendly_errors

    package = _compiled(pipeline_func)
    client = _client(args)
    with friendly_errors(args.host):
        result = client.create_run_from_pipeline_package(
            package, arguments=params, run_name=args.run_name, experiment_name=args.experiment,
            namespace=args.namespace, service_account=args.service_account)
    print(f"submitted run {result.run_id} (experiment {args.experiment!r}, namespace {args.namespace})")
    return 0


#: errnos of "this place cannot be written": permission, read-only filesystem, a file where a folder should be.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


def prog(args: argparse.Namespace) -> str:
    """The command as argparse names it in its own errors (``anyflow run``, ``anyflow models promote``): every
    error of a command is one line ``<prog>: error: <sentence>``, the form argparse uses for usage errors."""
    return getattr(args, "cli_prog", None) or f"anyflow {getattr(args, 'command', None) or ''}".rstrip()


def _guard(handler):
    """Turn the errors users hit into one sentence on stderr (``<prog>: error: …``, :func:`prog`) and exit code 2."""

    def wrapped(args: argparse.Namespace) -> int:
        from anyflow.cron import CronError
        from pipelines.client import KfpClientError
        from pipelines.local import LocalRunError

        if hasattr(args, "host") and not args.host:
            args.host = os.environ.get("KFP_HOST") or None  # the same default for every KFP command
        if hasattr(args, "preset"):
            args.preset_given = args.preset is not None
            args.preset = args.preset or DEFAULT_PRESET
        try:
            return handler(args)
        except (UserError, KfpClientError, LocalRunError, CronError) as exc:
            print(f"{prog(args)}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # e.g. --workdir on a read-only root filesystem (a container's)
            if exc.errno not in _UNWRITABLE:
                raise
            where = exc.filename or getattr(args, "workdir", "") or "the output folder"
            hint = " (choose a writable folder with --workdir)" if getattr(args, "workdir", None) else ""
            print(f"{prog(args)}: error: cannot write {where}: {exc.strerror or os.strerror(exc.errno)}{hint}",
                  file=sys.stderr)
            return 2

    return functools.update_wrapper(wrapped, handler)


def _common(p: argparse.ArgumentParser, store: bool = True, cluster: bool = False) -> None:
    """Preset, overrides, image, store. ``cluster`` (submit, schedule): no ``--workdir`` (nothing runs here) and
    ``--store`` has no local default (the pipeline's ``store`` parameter: empty keeps artifacts in KFP)."""
    p.add_argument("--preset", default=None,
                   help=f"preset name (default: {DEFAULT_PRESET}; 'demo': the ~10-minute CPU run whose report shows "
                   "learning; 'anyflow presets' lists them all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable (e.g. distill.train.steps=2)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML file of config overrides (nested or dotted keys), applied before --set")
    p.add_argument("--image", default=None,
                   help="component image, best by digest (REPO@sha256:…; default: $ANYFLOW_IMAGE); required on a cluster")
    if not cluster:
        p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"local run folder (default: {DEFAULT_WORKDIR})")
    if store:
        p.add_argument("--store", default=None, type=url_argument,
                       help="artifact store: s3://bucket/prefix (default: the pipeline's own 'store' parameter; empty in "
                       "anyflow-t2v and anyflow-far: the run keeps its artifacts in KFP's storage)" if cluster else
                       "artifact store: a folder or s3://bucket/prefix (default: <workdir>/store)")
        # SUPPRESS: do not overwrite the top-level ``anyflow --s3-endpoint`` when not given here.
        p.add_argument("--s3-endpoint", default=argparse.SUPPRESS,
                       help="S3 endpoint URL for --store s3://… (e.g. http://127.0.0.1:9000; default: "
                            "$ANYFLOW_S3_ENDPOINT, else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL)")


def _kfp(p: argparse.ArgumentParser, required: bool = False) -> None:
    """Every KFP option of a command that creates runs: the connection (:func:`_kfp_connection`) and what the
    run is created with (experiment, run name, platform, parameters, service account)."""
    _kfp_connection(p, required)
    p.add_argument("--experiment", default="anyflow", help="experiment name (default: anyflow)")
    p.add_argument("--run-name", default=None, help="run name")
    p.add_argument("--platform", default=None, help="platform YAML (GPUs, tolerations, secrets…; see pipelines/README.md)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="extra pipeline parameter, repeatable")
    p.add_argument("--service-account", default=None,
                   help="service account for the run's pods (default: the install's runner account, pipeline-runner "
                   "standalone or default-editor multi-user, which manifests/ binds the launcher Role to)")


def _kfp_connection(p: argparse.ArgumentParser, required: bool = False) -> None:
    """How to reach the KFP API (host, namespace, credentials): all that ``runs`` and ``status`` use."""
    p.add_argument("--host", required=required, default=None, help="KFP API endpoint, e.g. http://localhost:8080 (or $KFP_HOST)")
    p.add_argument("--namespace", default=None,
                   help="namespace the run's pods run in: multi-user KFP: your profile namespace (default: "
                   "$ANYFLOW_NAMESPACE, else the kube context's); standalone KFP: where it is installed (default: "
                   "$ANYFLOW_NAMESPACE, else kubeflow). The S3 secret must be there (docs/cluster.md)")
    p.add_argument("--existing-token-file", default=None, metavar="PATH",
                   help="read the bearer token for the KFP API from this file (e.g. a mounted secret); or set $KFP_TOKEN")
    p.add_argument("--existing-token", default=None, metavar="TOKEN",
                   help="bearer token for the KFP API on the command line: other users of this machine can read it "
                   "(ps, /proc); prefer --existing-token-file or $KFP_TOKEN")
    p.add_argument("--cookies", default=None, help="cookie header for the Kubeflow login (e.g. authservice_session=…)")
    p.add_argument("--ssl-ca-cert", default=None, help="CA bundle for the KFP endpoint")

