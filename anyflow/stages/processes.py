"""One stage as several processes: torchrun on this machine, or any launcher, then collect what rank 0 published.

The KFP executor, a launcher pod and a re-distillation task all run a stage's processes elsewhere (child
processes under torchrun, or the pods of a Trainer job) and then need the stage's result in their own process:
:func:`launch_and_collect` checks the store first (a cached artifact starts nothing; a bad-input failure of this
KFP run's earlier attempt stops at once), launches, and reads the artifact back from the store as a cache hit
under the key of ``world_size`` processes, never computing the stage itself. :func:`run_processes` is the
torchrun launcher for one machine (``torch.distributed.run`` in this process: ``torchrun --standalone
--nproc-per-node G -m anyflow.stages.<stage>``).

Failures: a rank that exits non-zero raises :class:`RankFailed` with that rank's exit code (75, preempted,
included; a rank killed by signal N gives 128+N) and the end of its output (each rank's stdout and stderr are
also teed to this process's). A SIGTERM to this process is passed to the ranks, which checkpoint and stop;
the exit code is then 75 (preempted).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: anyflow's exit code for "preempted: checkpoint written, retry" (anyflow.train.loop.PREEMPTED_EXIT_CODE).
PREEMPTED = 75
#: torch's elastic agent replaces these handlers while it runs (and never puts them back).
_AGENT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n))
_TAIL_CHARS = 4000


class RankFailed(SystemExit):
    """A rank of the stage's processes failed: exits the component with that rank's exit code.

    A ``SystemExit`` so the KFP executor process ends with ``exit_code`` (no traceback over the rank's own).
    """

    def __init__(self, stage: str, rank: int, exit_code: int, tail: str) -> None:
        self.stage, self.rank, self.exit_code, self.tail = stage, rank, exit_code, tail
        what = "was preempted (checkpoint written; a retry resumes)" if exit_code == PREEMPTED else "failed"
        self.message = (f"[anyflow] {stage}: rank {rank} {what} with exit code {exit_code}; the end of its output:\n"
                        f"{tail or '(no output)'}")
        super().__init__(exit_code)


def launch_and_collect(stage: str, launch: Callable[[], None], *, store: str, world_size: int, preset: str,
                       overrides: Mapping[str, Any], inputs: Mapping[str, str], launched: str) -> Any:
    """Launch ``world_size`` processes that publish ``stage`` into ``store`` (unless the store already holds
    the artifact for that key), then return its ``StageResult`` from the store, never computing it here.

    Before: ``prelaunch_check`` (a cached artifact starts nothing; a bad-input failure of this KFP run's
    earlier attempt stops at once). After: the artifact must be in the store under the key of
    ``world_size`` processes, else a clear error naming ``launched``. ``cached`` in the result says whether
    ``launch`` was skipped.
    """
    from anyflow.stages import prelaunch_check, run_stage

    check = dict(preset=preset, overrides=dict(overrides), inputs=dict(inputs), store=store, world_size=world_size)
    t0 = time.perf_counter()
    cached = prelaunch_check(stage, **check) is not None
    if not cached:
        launch()
        if prelaunch_check(stage, **check) is None:
            raise RuntimeError(
                f"{stage}: {launched} succeeded but published no artifact for this stage's key in {store} "
                f"(did its processes run with WORLD_SIZE={world_size}?)")
    res = run_stage(stage, out=None, progress=False, **check)  # a store cache hit: collects metrics and report
    return dataclasses.replace(res, cached=cached, seconds=time.perf_counter() - t0)


def run_processes(stage: str, nproc: int, *, store: str, preset: str, overrides: Mapping[str, Any],
                  inputs: Mapping[str, str]) -> Any:
    """``stage`` as ``nproc`` torchrun processes on this machine publishing into ``store``; its ``StageResult``."""
    with tempfile.TemporaryDirectory(prefix=f"anyflow-{stage}-ranks-") as tmp:
        config = os.path.join(tmp, "overrides.yaml")
        _write_overrides(config, overrides)
        argv = torchrun_argv(stage, nproc, preset=preset, config=config, inputs=inputs, store=store,
                             log_dir=os.path.join(tmp, "logs"))
        return launch_and_collect(
            stage, lambda: run_torchrun(stage, argv, os.path.join(tmp, "logs")), store=store, world_size=nproc,
            preset=preset, overrides=overrides, inputs=inputs, launched=f"torchrun with {nproc} processes")


def _write_overrides(path: str, overrides: Mapping[str, Any]) -> None:
    """The overrides as the stage's ``--config`` file: YAML, which the stage reads back with the same library
    (``anyflow.config.load_overrides_file``), so every rank keys the stage with exactly this component's values
    (``--set`` would pass strings)."""
    import yaml

    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(dict(overrides), fh, sort_keys=False)


def torchrun_argv(stage: str, nproc: int, *, preset: str, config: str, inputs: Mapping[str, str], store: str,
                  log_dir: str) -> list[str]:
    """torchrun's arguments: one node, ``nproc`` processes, each rank's output teed to ``log_dir`` and the pod
    log, no restarts (a KFP retry resumes from the stage's checkpoints), ``python -m anyflow.stages.<stage>``."""
    argv = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(int(nproc)), "--max-restarts", "0",
            "--log-dir", log_dir, "--tee", "3", "-m", f"anyflow.stages.{stage}",
            "--preset", preset, "--config", config, "--store", store, "--no-progress"]
    for role, uri in sorted(inputs.items()):
        argv += ["--in", f"{role}={uri}"]
    return argv


def run_torchrun(stage: str, argv: Sequence[str], log_dir: str) -> None:
    """``torchrun ARGV`` in this process (``torch.distributed.run``, so a failed rank's exit code is known:
    the ``torchrun`` command itself exits 1 for any failure). Raises :class:`RankFailed`."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(list(argv))
    print(f"[anyflow] {stage}: torchrun {' '.join(argv)}", flush=True)
    saved = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS}
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        err = RankFailed(stage, rank, code, rank_output_tail(log_dir, failure.local_rank))
        print(err.message, file=sys.stderr, flush=True)
        raise err from None
    except SignalException as exc:  # this pod is being stopped: the agent sent the ranks the same signal
        code = PREEMPTED if exc.sigval == signal.SIGTERM else 128 + int(exc.sigval)
        err = RankFailed(stage, -1, code, f"(the component received {exc.sigval.name}; the ranks were stopped)")
        print(err.message, file=sys.stderr, flush=True)
        raise err from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def rank_output_tail(log_dir: str, local_rank: int, chars: int = _TAIL_CHARS) -> str:
    """The end of one rank's stdout and stderr as torchrun's log folder holds them
    (``<log_dir>/<run>/attempt_<n>/<local rank>/std{out,err}.log``; the last attempt)."""
    parts = []
    for name in ("stdout", "stderr"):
        files = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/{name}.log"), key=lambda p: p.stat().st_mtime)
        text = files[-1].read_text(encoding="utf-8", errors="replace") if files else ""
        if text.strip():
            parts.append(f"--- rank {local_rank} {name} (last {chars} characters) ---\n{text[-chars:]}")
    return "\n".join(parts)
