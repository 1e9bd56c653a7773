"""``anyflow`` — the command line, on top of everything else.

One module per command group, each importing the domain modules it drives (nothing outside this package
imports it):

* ``run``       — ``run`` (the pipeline through KFP's local runner), ``stage`` (one stage, no KFP), ``rerun``
* ``kfp``       — ``compile``, ``submit``, ``schedule``, ``runs``, ``status``
* ``sample``, ``export``, ``artifacts``, ``models``, ``presets``, ``bench``, ``redistill``
* ``_common``   — argument groups, validation and the user-error guard they share

The exit-code contract lives below the stages in :mod:`anyflow.errors`. Heavy imports (torch, kfp,
diffusers) happen inside handlers so ``anyflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from anyflow import __version__
from anyflow.errors import run_with_exit_codes

EPILOG = """\
quick start:
  anyflow run                         the whole pipeline on the tiny preset, on CPU, through KFP's local runner
  anyflow stage train_flowmap --in dataset=DIR --store DIR      one stage as a plain process
  anyflow compile --output anyflow-t2v.yaml                      compile the pipeline for the KFP UI
Exit codes: 0 ok, 1 failure, 2 bad input/usage, 75 preempted (retryable).
"""


def build_parser() -> argparse.ArgumentParser:
    from anyflow.cli import artifacts, bench, export, kfp, models, presets, redistill, run, sample

    parser = argparse.ArgumentParser(
        prog="anyflow",
        description="Train and evaluate AnyFlow any-step video flow-map models as Kubeflow Pipelines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"anyflow {__version__}")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL for MinIO/Ceph/SeaweedFS (default: $ANYFLOW_S3_ENDPOINT, "
                        "else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_run(sub)
    kfp.add_cli(sub)
    run.add_rerun(sub)
    run.add_stage(sub)
    sample.add_cli(sub)
    export.add_cli(sub)
    artifacts.add_cli(sub)
    models.add_cli(sub)
    presets.add_cli(sub)
    bench.add_cli(sub)
    redistill.add_cli(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser ``args`` came through, e.g. ``anyflow models promote``'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse reports these from the top-level parser ('anyflow: error:'); name the command instead
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.s3_endpoint:
        from anyflow import storage

        storage.configure(s3_endpoint=args.s3_endpoint)
    from anyflow.cli._common import prog

    return run_with_exit_codes(args.func, args, prog=prog(args))


__all__ = ["build_parser", "main", "run_with_exit_codes"]
