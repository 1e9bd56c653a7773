"""Shared helpers for the component bodies: resolve input artifacts, record outputs, log metrics.

These run *inside* the component process (KFP local runner subprocess or a pod on the cluster), so
they import only the standard library at module level; ``anyflow`` is imported lazily.

Pointer convention: when a component writes into the content-addressed store (``store`` set), the
KFP output artifact carries ``metadata["anyflow_uri"]`` and a small pointer file
``{"anyflow_uri": …}`` at its path; downstream components resolve
``metadata["anyflow_uri"] or <pointer file> or artifact.path``.

Two ways in: every stage component takes each input role either as a KFP input artifact (the full DAG:
a small pointer file in store mode) or as a ``<role>_uri`` string parameter (single-stage reruns and
evaluate-only). The string wins. Reruns pass strings only, never ``dsl.importer``: the KFP backend copies
an importer's ``metadata`` into the artifact verbatim (a pipeline parameter placed there reaches the
component as the literal placeholder; kubeflow/pipelines 2.17.0 backend/src/v2/component/importer_launcher.go,
``ImportSpecToMLMDArtifact``), and the KFP launcher downloads every input artifact whole before the
component starts (a rerun's checkpoint inputs would be copied into the pod for nothing: the stage reads
them from the store itself, manifest-verified).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

POINTER_KEY = "anyflow_uri"
#: The output each stage publishes, named after the input role it feeds downstream (the keys of a
#: run's stage records; the same names as ``pipelines.rerun.STAGE_OUTPUT``).
OUTPUT_ROLE = {"prepare_data": "dataset", "train_teacher": "teacher", "train_flowmap": "flowmap",
               "distill": "generator", "finetune": "finetuned", "evaluate": "report"}


def parse_overrides(overrides_json: str) -> dict[str, Any]:
    """Parse the ``overrides_json`` component parameter (empty string or a JSON object)."""
    text = (overrides_json or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"overrides_json is not valid JSON ({exc.msg} at char {exc.pos}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"overrides_json must be a JSON object like {{\"train.steps\": 2}}, got {type(value).__name__}.")
    return value


def input_uri(artifact: Any, uri: str = "") -> str:
    """The anyflow artifact URL of one input role: ``uri`` (its ``<role>_uri`` string parameter) when
    given, else the URL behind the KFP input artifact.

    Artifact order: ``metadata["anyflow_uri"]`` (store mode), then a pointer file at the path, then the
    artifact's local path itself (artifact written directly into the KFP output).
    """
    if uri:
        return str(uri)
    if artifact is None:
        raise ValueError("input_uri: neither a URL nor an input artifact was given")
    meta = getattr(artifact, "metadata", None) or {}
    if meta.get(POINTER_KEY):
        return str(meta[POINTER_KEY])
    path = artifact.path
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                pointer = json.load(fh)
        except (OSError, ValueError, UnicodeDecodeError):
            pointer = None
        if isinstance(pointer, dict) and pointer.get(POINTER_KEY):
            return str(pointer[POINTER_KEY])
    return path


def stage_inputs(artifacts: Mapping[str, Any], uris: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role → artifact URL for ``run_stage`` from a component's input artifacts and ``<role>_uri`` strings.

    A role's string wins over its artifact (:func:`input_uri`); a role with neither is left out, so
    ``run_stage`` names the missing required roles (a bad-input error, not retried in the same run).
    """
    uris = uris or {}
    roles = [*artifacts, *(r for r in uris if r not in artifacts)]
    return {role: input_uri(artifacts.get(role), uris.get(role, "")) for role in roles
            if uris.get(role) or artifacts.get(role) is not None}


@contextlib.contextmanager
def known_failures_exit(stage: str) -> Iterator[None]:
    """A stage's own clear failure (bad input, preemption, a refused artifact: ``anyflow.errors.classify_failure``)
    ends the component with its one line and exit code, not a traceback through KFP's executor; anything else
    (a bug) still raises with its traceback. The exit code is what ``python -m anyflow.stages.<stage>`` gives."""
    from anyflow.errors import classify_failure

    try:
        yield
    except Exception as exc:
        known = classify_failure(exc)
        if known is None:
            raise
        code, line = known
        line = line.removeprefix("anyflow: ").removeprefix("error: ")
        print(f"[anyflow] {stage} failed: {line}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def run_component(stage: str, output: Any, *, preset: str, overrides_json: str, store: str,
                  artifacts: Mapping[str, Any] | None = None, uris: Mapping[str, str] | None = None,
                  metrics: Any = None, nproc_per_node: int = 1, extra_overrides_json: str = "") -> Any:
    """The body every stage component shares: resolve the inputs, run (or reuse) the stage, record the
    result on the KFP output ``output`` (:func:`record_output`), log its metrics; returns the ``StageResult``.

    ``nproc_per_node`` > 1 runs the stage as that many processes under torchrun in this pod
    (:func:`components._torchrun.run_in_pod`); 1 runs it in this process.
    """
    from anyflow.config import merge_overrides
    from components._torchrun import run_in_pod

    overrides = merge_overrides(parse_overrides(overrides_json), parse_overrides(extra_overrides_json))
    inputs = stage_inputs(artifacts or {}, uris)
    with known_failures_exit(stage):
        res = run_in_pod(stage, output, store, nproc_per_node=nproc_per_node, preset=preset, overrides=overrides,
                         inputs=inputs)
    record_output(output, res, store, stage, inputs=inputs)
    if metrics is not None:
        log_metrics(metrics, res.metrics)
    return res


def stage_target(output: Any, store: str) -> tuple[str | None, str | None]:
    """``(store, out)`` for run_stage: the store when set, else the KFP output artifact's path."""
    if store:
        return store, None
    return None, output.path


def record_output(output: Any, result: Any, store: str, stage: str, *,
                  inputs: Mapping[str, str] | None = None) -> None:
    """Record the stage result on the KFP output artifact and print a one-line summary.

    The metadata (``anyflow_uri``, ``anyflow_stage``, ``anyflow_cached``, ``anyflow_inputs``) is all the
    ``record_stage`` task needs to write the run's stage record (:func:`write_run_record`); a stage
    task itself takes no run id, so KFP's cache key stays the same across runs and a KFP cache hit
    hands the same artifact, metadata included, to the next run's ``record_stage`` task.
    """
    output.metadata[POINTER_KEY] = str(result.uri)
    output.metadata["anyflow_cached"] = bool(result.cached)
    output.metadata["anyflow_stage"] = stage
    output.metadata["anyflow_inputs"] = {str(k): str(v) for k, v in (inputs or {}).items()}
    if store:
        # A small pointer file so the KFP artifact is not empty and a reader without metadata finds it.
        os.makedirs(os.path.dirname(output.path) or ".", exist_ok=True)
        with open(output.path, "w", encoding="utf-8") as fh:
            json.dump({POINTER_KEY: str(result.uri), "stage": stage}, fh)
    state = "reused cached artifact" if result.cached else "wrote artifact"
    print(f"[anyflow] {stage}: {state} {result.uri}", flush=True)


#: Environment variable naming a file the ``record_stage`` task appends ``{"run_id", "entry", "uri"}``
#: lines to (set by :func:`pipelines.local.run_local`, so ``anyflow run`` learns the run id the local
#: runner substituted; unset on a cluster).
RECORD_LOG_ENV = "ANYFLOW_RECORD_LOG"


def stored_uri(artifact: Any) -> str | None:
    """The store URL a stage published ``artifact`` to: ``metadata["anyflow_uri"]`` or the pointer file.

    ``None`` for an artifact written into the KFP output itself (no store): there is nothing in a
    store to record. Never recomputes anything.
    """
    uri = input_uri(artifact)
    return None if uri == artifact.path else uri


def write_run_record(artifact: Any, store: str, run_id: str, entry: str = "") -> dict[str, Any] | None:
    """Write ``<store>/runs/<run_id>/<entry>.json`` for a stage output artifact (the ``record_stage`` body).

    Everything comes from the artifact as KFP hands it over, with the metadata of the task that
    produced it (also after a KFP cache hit, when that task ran in an earlier run): the store URL,
    the stage, its store-cache flag and input URLs; the manifest digest is read from the store
    (:func:`anyflow.ops.record.write_stage_record`). Returns the record, or ``None`` (with a printed
    reason) when there is no store, or the backend left the run id placeholder unresolved.
    """
    meta = getattr(artifact, "metadata", None) or {}
    stage = str(meta.get("anyflow_stage") or entry)
    entry = entry or stage
    if run_id.startswith("{{"):  # a backend that left dsl.PIPELINE_JOB_ID_PLACEHOLDER unresolved
        print(f"[anyflow] record {entry}: run id {run_id!r} was not substituted by this KFP backend; "
              f"no stage record written (rerun needs --from).", flush=True)
        return None
    if not store or not run_id:
        print(f"[anyflow] record {entry}: no store or run id, so no stage record (rerun needs --from).", flush=True)
        return None
    if stage not in OUTPUT_ROLE:
        raise ValueError(f"record_stage: artifact {artifact.uri} names no anyflow stage (metadata anyflow_stage="
                         f"{meta.get('anyflow_stage')!r}); connect the output of a stage task.")
    uri = stored_uri(artifact)
    if uri is None:
        raise ValueError(f"record_stage: the {stage} output {artifact.uri} carries no metadata['{POINTER_KEY}'] "
                         f"and no pointer file, so it was not published to a store; cannot record it in {store}.")
    from anyflow.ops.record import write_stage_record

    inputs = meta.get("anyflow_inputs") or {}
    doc = write_stage_record(store, run_id, stage=stage, output=OUTPUT_ROLE[stage], uri=uri, entry=entry,
                             cached=bool(meta.get("anyflow_cached")), inputs=dict(inputs))
    log = os.environ.get(RECORD_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"run_id": run_id, "entry": entry, "uri": uri,
                                 "cached": bool(meta.get("anyflow_cached"))}) + "\n")
    print(f"[anyflow] record {entry}: run {run_id} -> {uri}", flush=True)
    return doc


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts to ``{"a/b": float}`` keeping finite numbers only (KFP needs floats)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            flat[name] = float(value)
    return flat


def log_metrics(output: Any, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Log every numeric metric (per NFE for evaluate) to a KFP ``Output[Metrics]``."""
    flat = flatten_metrics(metrics)
    for name, value in sorted(flat.items()):
        output.log_metric(name, value)
    return flat


#: ``src``/``href`` attribute values a report may keep: inline data, in-page anchors, web pages.
_SELF_CONTAINED = ("data:", "#", "http://", "https://", "mailto:")
_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
         ".webp": "image/webp", ".svg": "image/svg+xml", ".mp4": "video/mp4", ".webm": "video/webm",
         ".css": "text/css", ".json": "application/json", ".html": "text/html"}


def inline_report(text: str, base: str) -> str:
    """``text`` (an HTML page) with every ``src=``/``href=`` that names a file beside it replaced by a
    ``data:`` URI of that file of the artifact at ``base`` (a local folder or ``s3://…``), so the
    page shows everything wherever it is opened (the KFP UI has no access to the artifact's folder).

    A link that names no file of the artifact (an absolute local path, ``file://``, ``..``) raises
    ``ValueError`` naming it: such a page would show a broken link.
    """
    import base64
    import re

    from anyflow import storage  # the only module that opens URLs (s3://…)

    def data_uri(match: re.Match) -> str:
        attr, quote, value = match.group(1), match.group(2), match.group(3)
        if value.startswith(_SELF_CONTAINED) or not value:
            return match.group(0)
        rel = value.split("#", 1)[0].split("?", 1)[0]
        if rel.startswith(("/", "file:")) or "://" in rel or ".." in rel.split("/"):
            raise ValueError(f"report.html in {base} links {value!r}, which only resolves on the machine that wrote "
                             f"it; the report must reference files beside it or inline them.")
        try:
            url = storage.file_url(base, rel)  # on S3: where the publisher staged it
        except storage.ArtifactError:
            raise ValueError(f"report.html in {base} links {value!r}, but the artifact lists no such file.") from None
        mime = _MIME.get(os.path.splitext(rel)[1].lower(), "application/octet-stream")
        return f"{attr}={quote}data:{mime};base64,{base64.b64encode(storage.read_bytes(url)).decode('ascii')}{quote}"

    return re.sub(r"""\b(src|href)=(["'])(.*?)\2""", data_uri, text, flags=re.IGNORECASE | re.DOTALL)


def copy_report(html: Any, report: str | None, uri: str, written: bytes | None = None) -> None:
    """Write ``report.html`` (a local path or a store URL) into a KFP ``Output[HTML]``, with anything it links
    beside it inlined (:func:`inline_report`): the KFP UI shows the full report, never a link to a store.
    ``written``: the report's bytes when this task wrote it (``StageResult.report_bytes``), so a report just
    published is never read back from the store; a cached one is read at ``report``.

    A report that cannot be read fails the task naming it (no placeholder page).
    """
    from anyflow import storage  # the only module that opens URLs (s3://…)

    if not report:
        raise ValueError(f"the evaluate artifact {uri} names no report.html to show in the KFP UI.")
    if written is not None:
        raw = written
    elif os.path.isfile(report):
        with open(report, "rb") as fh:
            raw = fh.read()
    elif storage.exists(report):
        raw = storage.read_bytes(report)
    else:
        raise FileNotFoundError(f"report.html of the evaluate artifact {uri} not found at {report}.")
    text = inline_report(raw.decode("utf-8"), uri)
    os.makedirs(os.path.dirname(html.path) or ".", exist_ok=True)
    with open(html.path, "w", encoding="utf-8") as fh:
        fh.write(text)
