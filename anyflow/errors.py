"""The exit-code contract of every anyflow process: the command line and the stage entry points.

Below both ``anyflow.cli`` and ``anyflow.stages`` (the stages' ``python -m`` entry points need it, and the
command line sits on top of the stages), so no domain module imports the command line.

0 ok; 1 failure a retry may fix or that is a verdict (an artifact refused by ``verify``, training diverged,
S3 failing transiently after its retries, a lost conditional write); 2 bad input (config, stage inputs --
including an input artifact whose manifest or files are refused --, a missing file, the data source, S3
settings that cannot work: no or wrong credentials, a malformed endpoint, a missing bucket); 75 preempted
(SIGTERM after a checkpoint: retryable); 130 interrupted. Every known failure prints one line,
``anyflow: error: <sentence>`` (``anyflow <command>: error: <sentence>`` from the command line, argparse's
form); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

BAD_INPUT = 2


def run_with_exit_codes(func: Callable[..., int | None], *args: Any, prog: str = "anyflow") -> int:
    """Call ``func`` and map known failures (:func:`classify_failure`) to one line on stderr and an exit code.

    Shared by ``anyflow`` (``anyflow.cli``) and ``python -m anyflow.stages.<name>`` (what a Trainer job runs),
    which is why it lives below both. ``prog`` leads the line: the command line passes the command as argparse
    names it (``anyflow sample``), so its failures read ``anyflow sample: error: …`` like its usage errors.
    """
    try:
        return int(func(*args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one clear sentence for known failures
        known = classify_failure(exc)
        if known is None:
            raise
        code, message = known
        print(prog + message.removeprefix("anyflow") if message.startswith("anyflow:") else message, file=sys.stderr)
        return code


def classify_failure(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, one line)`` for a known failure, ``None`` for an unexpected one (a bug: traceback)."""
    from anyflow.config import ConfigError, StageInputError

    if isinstance(exc, (ConfigError, StageInputError, FileNotFoundError)):
        return BAD_INPUT, _line(exc)
    from anyflow.train.loop import PREEMPTED_EXIT_CODE, Preempted

    if isinstance(exc, Preempted):
        return PREEMPTED_EXIT_CODE, f"anyflow: {exc}"
    from anyflow.data.prepare import DataPrepError

    if isinstance(exc, DataPrepError):  # bad input data (strict mode, or nothing usable)
        return BAD_INPUT, _line(exc)
    s3 = _s3_failure(exc)
    if s3 is not None:
        return s3
    from anyflow import storage
    from anyflow.train.loop import TrainingDiverged

    if isinstance(exc, (storage.ArtifactError, TrainingDiverged)):
        return 1, _line(exc)
    return None


def _line(exc: BaseException) -> str:
    return "anyflow: error: " + " ".join(str(exc).split())


def _s3_failure(exc: BaseException) -> tuple[int, str] | None:
    """S3 failures: the store's own errors (permanent: 2; transient after all retries, a lost race: 1) and
    botocore's settings errors, which name no URL (no credentials, a malformed endpoint URL): 2."""
    from anyflow import _storage_s3

    if isinstance(exc, _storage_s3.StorageError):
        if isinstance(exc, _storage_s3.PreconditionFailed):
            return 1, _line(exc)
        cause = exc.__cause__
        retryable = cause is not None and _storage_s3.classify(cause) == "transient"
        return (1 if retryable else BAD_INPUT), _line(exc)
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # pragma: no cover - boto3 is a core dependency
        return None
    for e in _chain(exc):
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return BAD_INPUT, (
                f"anyflow: error: S3 at {_storage_s3.endpoint() or 'AWS'}: {e}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the store"
            )
        if isinstance(e, ValueError) and str(e).startswith("Invalid endpoint:") and _raised_in(e, "botocore"):
            return BAD_INPUT, (
                f"anyflow: error: S3 endpoint {_storage_s3.endpoint()!r} (--s3-endpoint, ANYFLOW_S3_ENDPOINT, "
                "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) is not a valid URL; use e.g. http://minio.kubeflow:9000"
            )
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _raised_in(exc: BaseException, package: str) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith(package + ".")
