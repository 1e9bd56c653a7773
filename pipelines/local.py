"""Run a pipeline through KFP's local runner (``SubprocessRunner(use_venv=False)``) and collect
the anyflow artifact URIs of its outputs.

The local runner runs each component as a subprocess of the current Python; it ignores
kfp-kubernetes settings and has no cache of its own, so stage reuse comes from the content-addressed
store (``run_stage`` returns ``cached=True``). Outputs carry ``metadata["anyflow_uri"]``.

Run ids: the pipelines pass ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` to the ``record_stage`` task after
each stage task (:mod:`pipelines.records`); the local runner substitutes a random integer (one per
pipeline run) where a cluster substitutes the KFP run UUID, and the record tasks write
``<store>/runs/<run id>/<entry>.json`` either way (:mod:`anyflow.ops.record`). :func:`run_local` learns
that run id from the record tasks themselves: they append one line per record to the file named by
``$ANYFLOW_RECORD_LOG`` (``components._io.RECORD_LOG_ENV``), which it sets for the run. The local run
record ``<workdir>/runs/<name>.json`` maps a readable name to that run id and store.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anyflow.progress import INTERVAL_ENV as _PROGRESS_INTERVAL_ENV
from anyflow.progress import parse as parse_progress


class LocalRunError(RuntimeError):
    """A stage failed in the local runner; the message names it."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_PIPELINE = re.compile(r"(Running pipeline: '[^']+'|Pipeline '[^']+' finished with status \w+)")
#: Warnings of the local runner that do not apply to anyflow's use of it (it runs our own Python
#: components in this environment on purpose; platform settings only matter on a cluster).
_IRRELEVANT_WARNINGS = (r".*have no effect in the current local runner.*",
                        r".*may be attemping to run a task that uses custom or non-Python base image.*")


class ProgressLog(io.TextIOBase):
    """Stand-in for ``sys.stdout`` while the local runner runs: everything goes to a log file, and a
    short progress view (task started / finished with its time, anyflow's one-line results, and the running
    stage's own progress lines, :mod:`anyflow.progress`) to ``echo``.

    On a terminal (``echo.isatty()``, or ``tty=True``) a stage's progress is one line rewritten in place
    (``\r``) and blanked when the next message comes; otherwise (a log) each progress report is a line.
    The KFP local runner prints each component's executor input/output JSON and logs (hundreds of lines
    per run); ``anyflow run --verbose`` shows those instead.
    """

    def __init__(self, path: Path, echo: Any, *, tty: bool | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._log = open(path, "w", encoding="utf-8")
        self._echo = echo
        self.tty = _isatty(echo) if tty is None else tty
        self._inplace = 0  # width of the progress line shown in place (0: none)
        self._pending = ""
        self._started: dict[str, float] = {}
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.failed: str | None = None  # the first task that finished with another status than SUCCESS

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            self._line(_ANSI.sub("", line).rstrip())
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        self._echo.flush()

    def close(self) -> None:
        if self.closed:
            return
        if self._pending:
            self._line(_ANSI.sub("", self._pending).rstrip())
            self._pending = ""
        self._clear_inplace()
        super().close()  # flushes
        self._log.close()

    def _clear_inplace(self) -> None:
        if self._inplace:
            self._echo.write("\r" + " " * self._inplace + "\r")
            self._inplace = 0

    def _show(self, text: str) -> None:
        self._clear_inplace()
        self._echo.write(text + "\n")
        self._echo.flush()

    def _show_progress(self, text: str) -> None:
        if not self.tty:
            self._show(text)
            return
        width = shutil.get_terminal_size((100, 24)).columns - 1
        if len(text) > width:  # a wrapped line cannot be rewritten in place
            text = text[: max(0, width - 1)] + "…"
        self._echo.write("\r" + text + " " * max(0, self._inplace - len(text)))
        self._echo.flush()
        self._inplace = max(len(text), 1)

    def _line(self, line: str) -> None:
        progress = parse_progress(line) is not None
        # tail: the current task's own lines, without the runner's executor JSON (kept in the log file), and
        # of its progress lines only the latest
        if line.strip() and line.strip()[0] not in '{}[]"':
            if progress and self.tail and parse_progress(self.tail[-1]) is not None:
                self.tail.pop()
            self.tail.append(line)
        if (m := _EXECUTING.search(line)) is not None:
            self.tail.clear()
            self.tail.append(line)
            self._started[m.group(1)] = time.perf_counter()
            if not m.group(1).startswith("record-stage"):
                self._show(f"▶ {m.group(1)}")
        elif (m := _FINISHED.search(line)) is not None:
            task, status = m.groups()
            took = time.perf_counter() - self._started.get(task, time.perf_counter())
            if status != "SUCCESS" and self.failed is None:
                self.failed = task
            if not (task.startswith("record-stage") and status == "SUCCESS"):
                self._show(f"  {task}: {status} in {took:.1f} s")
        elif (m := _PIPELINE.search(line)) is not None:
            self._show(m.group(1))
        elif progress:
            self._show_progress("  " + line.strip())
        elif "[anyflow]" in line and "[anyflow] record " not in line:
            self._show("  " + line.strip())


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


#: How often the stages report progress while the view is a terminal (rewritten in place, so often is cheap).
_TTY_PROGRESS_INTERVAL_S = "1"


@dataclass
class LocalRun:
    """What a local pipeline run produced: role → anyflow URI, role → cached flag, report path."""

    name: str
    artifacts: dict[str, str] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # role -> stage that produced it
    report_html: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    record: Path | None = None
    run_id: str | None = None  # what the runner substituted for dsl.PIPELINE_JOB_ID_PLACEHOLDER (from the records)


def ensure_importable() -> str:
    """Put the project root on ``PYTHONPATH`` so component subprocesses import anyflow and components."""
    import anyflow

    root = str(Path(anyflow.__file__).resolve().parent.parent)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return root


def init_local(workdir: str | Path) -> Path:
    """``kfp.local.init`` with the subprocess runner in the current environment."""
    from kfp import local

    root = Path(workdir).resolve() / "kfp-local"
    root.mkdir(parents=True, exist_ok=True)
    ensure_importable()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def _failed_task(message: str) -> str:
    import re

    match = re.search(r"[Tt]ask '([^']+)'", message)
    return match.group(1) if match else "a stage"


def _recorded_entries(log: Path) -> dict[str, tuple[str, bool]]:
    """Every stage task the record tasks of one local run recorded: entry -> (artifact URL, store cache hit).

    The pipeline's outputs name only the main DAG's artifacts; the records also hold the optional branches'
    (``prepare_finetune_data``, ``finetune``, ``evaluate_finetuned``)."""
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["entry"]: (r["uri"], bool(r.get("cached"))) for r in rows}


def _recorded_run_id(log: Path) -> str | None:
    """The run id the record tasks of one local run wrote their records under (``None``: none ran)."""
    if not log.is_file():
        return None
    ids = {json.loads(line)["run_id"] for line in log.read_text(encoding="utf-8").splitlines() if line.strip()}
    if len(ids) > 1:
        raise LocalRunError(f"the record tasks of one local run used {len(ids)} run ids ({', '.join(sorted(ids))}); "
                            f"the KFP local runner changed how it substitutes dsl.PIPELINE_JOB_ID_PLACEHOLDER.")
    return ids.pop() if ids else None


#: The environment variable that sets the torch (OpenMP) threads of each component process.
THREADS_ENV = "OMP_NUM_THREADS"


def local_env(cfg: Any) -> dict[str, str]:
    """Environment for the component processes of a local run of preset ``cfg``: one torch thread per process
    (``OMP_NUM_THREADS=1``) when the model is the built-in tiny one (``builtin:tiny``, ``builtin:demo``), unless
    ``OMP_NUM_THREADS`` is set already (the user's choice wins); nothing otherwise.

    The tiny model's ops are a few kilobytes each, so a second OpenMP thread only adds synchronisation (and
    spin-waiting on a busy machine); the local runner runs one component at a time. Measured in
    benchmarks/RESULTS.md ("anyflow run wall time"). Only the local runner gets it: a cluster pod is
    configured by the compiled pipeline, which this does not change."""
    from anyflow.models.loading import BUILTIN_DEMO, BUILTIN_TINY

    if os.environ.get(THREADS_ENV) or cfg.model.base not in (BUILTIN_TINY, BUILTIN_DEMO):
        return {}
    return {THREADS_ENV: "1"}


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Any:
    """Set ``env`` in ``os.environ`` (inherited by the component subprocesses) and restore it afterwards."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_local(pipeline_func: Any, params: Mapping[str, Any], workdir: str | Path, name: str, *,
              verbose: bool = False, env: Mapping[str, str] | None = None) -> LocalRun:
    """Run ``pipeline_func(**params)`` locally and return the anyflow URIs of its outputs.

    The runner's full output goes to ``<workdir>/runs/<name>.log``; the terminal gets a progress view
    (:class:`ProgressLog`), or everything with ``verbose``. On a failure the log's tail is printed.
    ``env``: environment variables the component processes run with (e.g. :func:`local_env`).
    """
    with _environment(env or {}):
        return _run_local(pipeline_func, params, workdir, name, verbose=verbose)


def _run_local(pipeline_func: Any, params: Mapping[str, Any], workdir: str | Path, name: str, *,
               verbose: bool) -> LocalRun:
    import tempfile

    from components._io import RECORD_LOG_ENV

    init_local(workdir)
    previous = os.environ.get(RECORD_LOG_ENV)
    log_path = Path(workdir).resolve() / "runs" / f"{name}.log"
    progress = None if verbose else ProgressLog(log_path, sys.stdout)
    previous_interval = os.environ.get(_PROGRESS_INTERVAL_ENV)
    if progress is not None and progress.tty and previous_interval is None:
        # the stages report progress every second: the view rewrites one line, so the terminal stays short
        os.environ[_PROGRESS_INTERVAL_ENV] = _TTY_PROGRESS_INTERVAL_S
    with tempfile.TemporaryDirectory(prefix="anyflow-records-") as tmp:
        log = Path(tmp) / "records.jsonl"
        os.environ[RECORD_LOG_ENV] = str(log)  # inherited by the component subprocesses
        real_stdout = sys.stdout
        try:
            with warnings.catch_warnings():
                for pattern in _IRRELEVANT_WARNINGS:
                    warnings.filterwarnings("ignore", message=pattern)
                if progress is not None:
                    sys.stdout = progress
                    print(f"(full log: {log_path})", file=real_stdout, flush=True)
                task = pipeline_func(**params)
        except RuntimeError as exc:
            run_id = _recorded_run_id(log)
            if run_id:  # the name answers for the stages that finished, as for a run that succeeded
                done = {entry: uri for entry, (uri, _) in _recorded_entries(log).items()}
                with contextlib.suppress(OSError):  # never hide the stage's failure behind this one
                    save_record(LocalRun(name=name, run_id=run_id, artifacts=done), workdir, params, status="failed")
            kept = (f" The stages that finished are recorded under run {name} "
                    f"('anyflow rerun --stage STAGE --run {name}')." if run_id else "")
            where, task = "its log is printed above", _failed_task(str(exc))
            if progress is not None:
                print("\n".join(progress.tail), file=real_stdout, flush=True)
                where = f"the end of its log is printed above (all of it: {log_path})"
                task = f"task '{progress.failed}'" if progress.failed else task
            raise LocalRunError(f"{task} failed in the local KFP runner; {where}.{kept}") from exc
        finally:
            sys.stdout = real_stdout
            if progress is not None:
                progress.close()
            if previous is None:
                os.environ.pop(RECORD_LOG_ENV, None)
            else:
                os.environ[RECORD_LOG_ENV] = previous
            if previous_interval is None:
                os.environ.pop(_PROGRESS_INTERVAL_ENV, None)
        run = LocalRun(name=name, run_id=_recorded_run_id(log))
        recorded = _recorded_entries(log)
    outputs = getattr(task, "outputs", None) or {}
    if not outputs and getattr(task, "output", None) is not None:
        outputs = {"output": task.output}
    for role, art in outputs.items():
        meta = getattr(art, "metadata", {}) or {}
        if meta.get("anyflow_uri"):
            role = meta.get("anyflow_stage", role) if role.lower() == "output" else role
            run.artifacts[role] = meta["anyflow_uri"]
            run.cached[role] = bool(meta.get("anyflow_cached"))
            run.stages[role] = meta.get("anyflow_stage", role)
        if getattr(art, "schema_title", "") == "system.HTML":
            run.report_html = art.path
        if getattr(art, "schema_title", "") == "system.Metrics":
            run.metrics = {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = set(run.artifacts.values())
    for entry, (uri, cached) in recorded.items():  # what the pipeline's outputs do not name (optional branches)
        if uri not in shown:
            run.artifacts[entry], run.cached[entry], run.stages[entry] = uri, cached, entry
    return run


def save_record(run: LocalRun, workdir: str | Path, params: Mapping[str, Any], status: str = "succeeded") -> Path:
    """Write ``<workdir>/runs/<name>.json``: the name → (run id, store) of the run, its artifacts and report
    (``status`` ``failed``: the stages that finished before a failure).

    ``anyflow rerun --run NAME`` reads the run id and store here and resolves the inputs from the stage
    records under ``<store>/runs/<run id>/``, exactly as for a cluster run id.
    """
    path = Path(workdir).resolve() / "runs" / f"{run.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if run.report_html and Path(run.report_html).is_file():
        # The KFP HTML output has no extension; keep a browsable copy beside the record.
        copy = path.with_suffix(".report.html")
        copy.write_bytes(Path(run.report_html).read_bytes())
        run.report_html = str(copy)
    body = {"name": run.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": dict(params), "artifacts": run.artifacts, "cached": run.cached,
            "report_html": run.report_html, "run_id": run.run_id, "store": params.get("store"), "status": status}
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    run.record = path
    return path


def find_record(ref: str, workdir: str | Path) -> dict[str, Any] | None:
    """The local run record ``ref`` (a file path or a name under ``<workdir>/runs``), or ``None``."""
    try:
        return load_record(ref, workdir)
    except FileNotFoundError:
        return None


def load_record(ref: str, workdir: str | Path) -> dict[str, Any]:
    """A local run record by file path, by run name (``<workdir>/runs/<name>.json``) or by the run id its record
    holds (what the local runner substituted for the KFP run id): a run answers to either."""
    path = Path(ref)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    folder = Path(workdir).resolve() / "runs"
    path = folder / f"{ref}.json"
    if path.is_file() and "/" not in ref and "\\" not in ref:
        return json.loads(path.read_text(encoding="utf-8"))
    by_id = [rec for rec in list_records(workdir) if str(rec.get("run_id") or "") == ref]
    if by_id:
        return by_id[-1]  # one run id per local run (the newest record if a copy exists)
    where = "" if os.path.normpath(str(workdir)) == "anyflow-runs" else f" --workdir {workdir}"  # the CLI default
    raise FileNotFoundError(f"no local run named {ref!r} or with that run id in {folder}; list them with "
                            f"'anyflow runs{where}'.")


def list_records(workdir: str | Path) -> list[dict[str, Any]]:
    """All local run records, oldest first."""
    folder = Path(workdir).resolve() / "runs"
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted(records, key=lambda r: r.get("created", ""))
