"""Where runs keep their state: per-run stage records of pipeline runs, re-distillation state and report.

Layout under the store (all through :mod:`anyflow.storage`)::

    <store>/runs/<run_id>/<entry>.json                            one stage task of a pipeline run (see below)

    <store>/redistill/<name>/runs/<run_id>/plan.json              what the run decided to do (written first)
    <store>/redistill/<name>/runs/<run_id>/window.json            its data window (every item seen, new, replay)
    <store>/redistill/<name>/runs/<run_id>/record.json            the outcome (written last; absent = unfinished)
    <store>/redistill/<name>/runs/<run_id>/redistill-report.html  promotion history + candidate vs promoted curves
    <store>/redistill/<name>/models/<manifest sha256>.json        per candidate: its window, dataset, teacher, run

**Stage records.** After every stage task the pipelines run a small ``record_stage`` task
(``components/record_stage``, :mod:`pipelines.records`; CPU only, KFP caching disabled) with the
stage's output artifact and the run id (the KFP run id: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, which the
cluster resolves to the run's UUID and the local runner to a random integer). It writes one JSON object
``<store>/runs/<run_id>/<entry>.json`` (``entry`` = the stage name, or e.g. ``prepare_finetune_data``
for a second task of the same stage) with the artifact URL and its manifest digest
(:func:`write_stage_record`). The stage tasks themselves take no run id, so KFP's cache can skip them;
the record task then records the cached artifact. One object per (run id, entry), each written with
one atomic PUT, so concurrent pods never overwrite each other's entry; a retried task rewrites its
own. ``anyflow rerun --run <run id> --store URL`` resolves its inputs from them (:func:`run_artifacts`).

The per-model record is what the *next* run reads: the data window continues from the window of the
model that is live (so a rollback also rolls the window back), and nothing a failed or rejected run
wrote is ever read by a later run.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anyflow import registry, storage

#: ``format`` field of a stage record; bump when a reader must tell an incompatible layout apart.
STAGE_RECORD_FORMAT = "anyflow.stage-record/1"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunRecordError(ValueError):
    """A run's stage records are missing or unusable; the message names the store, the run and what exists."""


def check_id(value: str, what: str = "run id") -> str:
    """``value`` if it is one safe path segment (letters, digits, ``._-``), else :class:`RunRecordError`."""
    if not isinstance(value, str) or not _SAFE_ID.match(value):
        raise RunRecordError(f"{what} {value!r} is not usable in a store path; use letters, digits, '.', '_' "
                             f"or '-' (at most 128, not starting with '.' or '-'), e.g. a KFP run UUID.")
    return value


def stage_records_dir(store: str, run_id: str) -> str:
    """``<store>/runs/<run_id>``: the folder of one pipeline run's stage records."""
    return storage.join(store, "runs", check_id(run_id))


def stage_record_url(store: str, run_id: str, entry: str) -> str:
    """``<store>/runs/<run_id>/<entry>.json``."""
    return storage.join(stage_records_dir(store, run_id), f"{check_id(entry, 'record entry')}.json")


def write_stage_record(store: str, run_id: str, *, stage: str, output: str, uri: str, entry: str = "",
                       cached: bool = False, inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Record that stage task ``entry`` (default: ``stage``) of run ``run_id`` produced artifact ``uri``.

    The document holds the artifact URL, its manifest sha256, content sha256 (:func:`anyflow.storage.content_digest`)
    and kind (read back from ``uri``, so only a published artifact can be recorded), the output name (the input role it feeds: dataset,
    teacher, …) and the task's input URLs. One atomic write of its own object; returns the document.
    """
    entry = entry or stage
    manifest, manifest_sha256, content_sha256 = storage.manifest_with_digests(uri)
    doc = {"format": STAGE_RECORD_FORMAT, "run_id": run_id, "entry": entry, "stage": stage, "output": output,
           "uri": str(uri), "manifest_sha256": manifest_sha256, "kind": manifest.get("kind"),
           "content_sha256": content_sha256,
           "cached": bool(cached), "inputs": dict(inputs or {}), "recorded_at": now()}
    storage.write_json_atomic(stage_record_url(store, run_id, entry), doc)
    return doc


def read_stage_records(store: str, run_id: str) -> dict[str, dict[str, Any]]:
    """Every stage record of run ``run_id`` in ``store``, by entry name (``{}`` if there are none)."""
    base = stage_records_dir(store, run_id)
    out: dict[str, dict[str, Any]] = {}
    for url in storage.list_prefix(base):
        rel = url[len(base):].lstrip("/\\")
        if "/" in rel or "\\" in rel or not rel.endswith(".json"):
            continue  # only the run's own top-level records
        doc = storage.read_json(url)
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt != STAGE_RECORD_FORMAT:
            raise RunRecordError(f"{url} is not an anyflow stage record (format {fmt!r}, expected "
                                 f"{STAGE_RECORD_FORMAT!r}); delete it or rerun that stage.")
        out[doc["entry"]] = doc
    return out


def run_artifacts(store: str, run_id: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """``({output role: artifact URL}, records)`` of run ``run_id``: the roles come from the entries
    named after their stage (``dataset`` from ``prepare_data``, ``teacher`` from ``train_teacher``, …;
    extra entries such as ``prepare_finetune_data`` are in ``records`` but give no role).

    :class:`RunRecordError` naming the store and the run when nothing was recorded for it.
    """
    records = read_stage_records(store, run_id)
    if not records:
        raise RunRecordError(
            f"no stage records for run {run_id!r} in store {store} (looked under "
            f"{stage_records_dir(store, run_id)}/): no stages recorded. Pass the store the run wrote to "
            f"(--store), check the run id ('anyflow runs --host …'), or give the inputs with --from ROLE=URI.")
    roles = {doc["output"]: doc["uri"] for entry, doc in sorted(records.items()) if entry == doc["stage"]}
    return roles, records


def run_dir(store: str, name: str, run_id: str) -> str:
    return storage.join(store, "redistill", name, "runs", run_id)


def model_record_url(store: str, name: str, digest: str) -> str:
    return storage.join(store, "redistill", name, "models", f"{digest}.json")


def read_json_or_none(url: str) -> Any:
    try:
        return storage.read_json(url)
    except FileNotFoundError:
        return None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def list_runs(store: str, name: str) -> list[dict]:
    """Every finished run record of ``name`` (oldest first by start time)."""
    base = storage.join(store, "redistill", name, "runs")
    out = [storage.read_json(u) for u in storage.list_prefix(base) if u.endswith("/record.json") or u.endswith("record.json")]
    return sorted(out, key=lambda r: (r.get("started_at", ""), r.get("run_id", "")))


def label(digest: str | None) -> str:
    """Short model name used in reports: ``gen-<first 8 hex of the manifest sha256>``."""
    return f"gen-{(digest or 'none')[:8]}"


def nested_metrics(flat: Mapping[str, Any], model: str = "generator") -> dict[int, dict[str, float]]:
    """Evaluate-stage metrics ``{"<model>/nfe<N>/<metric>": v}`` → ``{N: {metric: v}}``."""
    out: dict[int, dict[str, float]] = {}
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == model and parts[1].startswith("nfe") and isinstance(value, (int, float)):
            out.setdefault(int(parts[1][3:]), {})[parts[2]] = float(value)
    return dict(sorted(out.items()))


def flat_gate_metrics(metrics: Mapping[Any, Mapping[str, float]], names: list[str], prefix: str = "") -> dict[str, float]:
    """``{N: {metric: v}}`` → ``{"<prefix>nfe<N>/<metric>": v}`` for the gate metrics only."""
    return {f"{prefix}nfe{n}/{m}": float(row[m]) for n, row in metrics.items() for m in names if m in row}


def _cell(value: Any) -> str:
    return f"{float(value):.6g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def markdown_summary(record: Mapping[str, Any]) -> str:
    """The decision of one re-distillation run as Markdown (the decide task's KFP Markdown artifact).

    The outcome and its reasons, then one row per NFE and metric: candidate, promoted (the model live when the
    gate ran) and the difference; every metric both models have at that NFE, the gate metrics first.
    """
    cand, base = record.get("candidate") or {}, record.get("baseline") or {}
    gate = record.get("gate") or {}
    cfg = record.get("config") or {}
    gated = [str(m[0]) for m in cfg.get("metrics", [])] if isinstance(cfg, Mapping) else []
    lines = [f"## Re-distillation {record.get('run_id')} — {record.get('name')}: **{record.get('status')}**", ""]
    for why in ([record["reason"]] if record.get("reason") else []) + list(gate.get("reasons") or []):
        lines.append(f"- {why}")
    lines += ["", f"candidate: `{label(cand.get('digest'))}` {cand.get('uri', 'none')}",
              "promoted (compared against): " + (f"`{label(base.get('digest'))}` {base.get('uri')}" if base
                                                   else "nothing (first promotion)"), ""]
    cm, bm = cand.get("metrics") or {}, base.get("metrics") or {}
    if cm:
        lines += ["| NFE | metric | candidate | promoted | candidate − promoted |", "|---|---|---|---|---|"]
        for n in sorted(cm, key=lambda k: int(k)):
            row, brow = cm[n], next((bm[k] for k in (n, str(n), int(n)) if k in bm), {})  # JSON keys are str
            names = [m for m in gated if m in row] + sorted(m for m in row if m not in gated)
            for m in names:
                diff = (_cell(float(row[m]) - float(brow[m]))
                        if isinstance(row.get(m), (int, float)) and isinstance(brow.get(m), (int, float)) else "—")
                star = " (gate)" if m in gated else ""
                lines.append(f"| {n} | {m}{star} | {_cell(row.get(m))} | {_cell(brow.get(m))} | {diff} |")
    return "\n".join(lines) + "\n"


def write_report(store: str, name: str, record: Mapping[str, Any]) -> str:
    """Write ``redistill-report.html`` next to the run record with :func:`anyflow.eval.report.build_report`."""
    from anyflow.eval.report import build_report

    cand, base = record.get("candidate") or {}, record.get("baseline") or {}
    metrics = {}  # quality columns only ("calls" is the NFE cost, the x axis already)
    for entry in (cand, base):
        if entry.get("metrics"):
            metrics[label(entry.get("digest"))] = {n: {k: v for k, v in row.items() if k != "calls"}
                                                   for n, row in entry["metrics"].items()}
    live = registry.promoted(store, name)
    live_label = label(live["manifest_sha256"]) if live else None
    history = []
    for event in registry.history(store, name):
        tag = "" if event["event"] in ("promote", "rollback") else f" [{event['event']}]"
        history.append({"model": label(event.get("manifest_sha256")) + tag, "since": event.get("at", ""),
                        "uri": event.get("uri", ""),
                        "metrics": {k: v for k, v in (event.get("metrics") or {}).items()
                                    if not k.startswith("baseline/") and isinstance(v, (int, float))}})
    candidate_label = label(cand.get("digest")) if cand and label(cand.get("digest")) != live_label else None
    window = record.get("window") or {}
    summary = {
        "run": record.get("run_id"), "model name": name, "outcome": record.get("status"),
        "started / finished": f"{record.get('started_at', '')} / {record.get('finished_at', '')}",
        "live now": f"{live_label} {live['uri']} (since {live['since']})" if live else "nothing promoted",
        "candidate": f"{label(cand.get('digest'))} {cand.get('uri')}" if cand else "none (skipped)",
        "compared against": f"{label(base.get('digest'))} {base.get('uri')}" if base else "nothing (first promotion)",
        "data window": f"{window.get('new', 0)} new + {window.get('replay', 0)} replay of {window.get('items_seen', 0)}"
                       f" items ({window.get('source', '')})",
        "teacher changed": record.get("teacher_changed"), "warm start": record.get("warm_start"),
    }
    notes = [f"gate: {r}" for r in (record.get("gate") or {}).get("reasons", [])]
    if record.get("reason"):
        notes.insert(0, str(record["reason"]))
    data = {"title": f"Re-distillation {record.get('run_id')} — {name}: {record.get('status')}",
            "summary": summary, "metrics": metrics, "notes": notes,
            "promotions": {"live": live_label, "candidate": candidate_label, "history": history}}
    url = storage.join(run_dir(store, name, record["run_id"]), "redistill-report.html")
    with tempfile.TemporaryDirectory(prefix="anyflow-redistill-report-") as tmp:
        path = build_report(data, Path(tmp) / "redistill-report.html")
        storage.write_bytes(url, path.read_bytes())
    return url
