"""Run a stage with one process per GPU of the component's own pod, and collect what rank 0 published.

A training stage's pod has ``nproc_per_node`` GPUs (the platform's ``gpus`` for the stage, a
compile-time component parameter). With more than one, :func:`run_in_pod` runs

    torchrun --standalone --nproc-per-node G -m anyflow.stages.<stage> --store … --in … --config …

(torch's own launcher, in this process: ``torch.distributed.run``, the module behind the ``torchrun``
command), then resolves the artifact the ranks published as a store cache hit with ``world_size=G``:
the KFP executor writes the output artifact's metadata in its own process, so the result is read back
from the store, as the multi-node launcher (``components/trainjob``) does after its job. Both go through
:func:`launch_and_collect`.

Without a store (``store=""``: artifacts written into the KFP output itself) the ranks publish into a
private store in the pod's temporary folder, and rank 0's artifact is then moved into the KFP output
path; nothing resumes across pod restarts then (as for one process without a store).

Failures: a rank that exits non-zero fails the component with that rank's exit code (75, preempted,
included; a rank killed by signal N gives 128+N) and the end of its output (each rank's stdout and
stderr are also teed to the pod log). A SIGTERM to the component (the pod is being stopped) is passed
to the ranks, which checkpoint and stop; the component then exits 75 (preempted).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
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


def run_in_pod(stage: str, output: Any, store: str, *, nproc_per_node: int, preset: str,
               overrides: Mapping[str, Any], inputs: Mapping[str, str]) -> Any:
    """Run ``stage`` for the KFP output artifact ``output``: in this process when ``nproc_per_node`` <= 1,
    else as ``nproc_per_node`` torchrun processes in this pod (module docstring). Returns the ``StageResult``."""
    from anyflow.stages import run_stage
    from components._io import stage_target

    nproc = int(nproc_per_node)
    if nproc <= 1:
        store_url, out = stage_target(output, store)
        return run_stage(stage, preset=preset, overrides=overrides, inputs=inputs, store=store_url, out=out)
    with tempfile.TemporaryDirectory(prefix=f"anyflow-{stage}-ranks-") as tmp:
        target = store or os.path.join(tmp, "store")  # no store: a private one, moved into the KFP output below
        config = os.path.join(tmp, "overrides.yaml")
        _write_overrides(config, overrides)
        argv = torchrun_argv(stage, nproc, preset=preset, config=config, inputs=inputs, store=target,
                             log_dir=os.path.join(tmp, "logs"))
        res = launch_and_collect(
            stage, lambda: run_torchrun(stage, argv, os.path.join(tmp, "logs")), store=target, world_size=nproc,
            preset=preset, overrides=overrides, inputs=inputs, launched=f"torchrun with {nproc} processes")
        if store:
            return res
        if os.path.isdir(output.path):
            shutil.rmtree(output.path)
        elif os.path.lexists(output.path):
            os.remove(output.path)
        os.makedirs(os.path.dirname(output.path) or ".", exist_ok=True)
        shutil.move(res.uri, output.path)  # rank 0's artifact, manifest included (training stages have no report)
        return dataclasses.replace(res, uri=output.path)


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
