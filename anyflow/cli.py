"""``anyflow`` — the command-line front door.

Every subcommand is a thin handler over the library; heavy imports (torch, kfp, diffusers) happen
inside handlers so ``anyflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from anyflow import __version__

EPILOG = """\
quick start:
  anyflow run                         the whole pipeline on the tiny preset, on CPU, through KFP's local runner
  anyflow stage train_flowmap --in dataset=DIR --store DIR      one stage as a plain process
  anyflow compile --output anyflow-t2v.yaml                      compile the pipeline for the KFP UI
Exit codes: 0 ok, 1 failure, 2 bad input/usage, 75 preempted (retryable).
"""


def _add_stage(sub: argparse._SubParsersAction) -> None:
    from anyflow.stages import add_stage_arguments, stage_from_args

    p = sub.add_parser("stage", help="run one stage as a plain process (no KFP)",
                       description="Run one stage; inputs and output are artifact URLs (local or s3://).")
    add_stage_arguments(p)
    p.set_defaults(func=stage_from_args)


def _presets(args: argparse.Namespace) -> int:
    from anyflow.config import PRESETS, apply_overrides, get_preset, parse_override_args, to_dict

    if args.name is None:
        width = max(map(len, PRESETS))
        for name, fn in PRESETS.items():
            print(f"{name:<{width}}  {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    preset = apply_overrides(get_preset(args.name), parse_override_args(args.overrides))
    print(json.dumps(to_dict(preset), indent=1))
    return 0


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list presets or print one fully resolved",
                       description="Without NAME: list presets. With NAME: print its resolved configuration.")
    p.add_argument("name", nargs="?", help="preset to print")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value (validated strictly)")
    p.set_defaults(func=_presets)


def build_parser() -> argparse.ArgumentParser:
    from anyflow import bench, kfpctl, ops, registry, storage
    from anyflow import sample as sample_cmd

    parser = argparse.ArgumentParser(
        prog="anyflow",
        description="Train and evaluate AnyFlow any-step video flow-map models as Kubeflow Pipelines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"anyflow {__version__}")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL for MinIO/Ceph/SeaweedFS (default: AWS_ENDPOINT_URL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    kfpctl.add_cli(sub)
    _add_stage(sub)
    sample_cmd.add_cli(sub)
    storage.add_cli(sub)
    registry.add_cli(sub)
    _add_presets(sub)
    bench.add_cli(sub)
    ops.add_cli(sub)
    return parser


def run_with_exit_codes(func: Callable[..., int | None], *args: Any) -> int:
    """Call ``func`` and map known failures to one clear sentence and an exit code.

    0 ok; 1 failure (artifact refused, training diverged); 2 bad input (config, stage inputs, missing
    file); 75 preempted (SIGTERM after a checkpoint: retryable); 130 interrupted. Shared by ``anyflow``
    and ``python -m anyflow.stages.<name>`` (what a Trainer job runs).
    """
    from anyflow.config import ConfigError, StageInputError

    try:
        return int(func(*args) or 0)
    except (ConfigError, StageInputError, FileNotFoundError) as exc:
        print(f"anyflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anyflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one clear sentence for known failures
        from anyflow import storage
        from anyflow.train.loop import PREEMPTED_EXIT_CODE, Preempted, TrainingDiverged

        if isinstance(exc, Preempted):
            print(f"anyflow: {exc}", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        from anyflow.data.prepare import DataPrepError

        if isinstance(exc, DataPrepError):  # bad input data (strict mode, or nothing usable)
            print(f"anyflow: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, (storage.ArtifactError, TrainingDiverged)):
            print(f"anyflow: error: {exc}", file=sys.stderr)
            return 1
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.s3_endpoint:
        from anyflow import storage

        storage.configure(s3_endpoint=args.s3_endpoint)
    return run_with_exit_codes(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
