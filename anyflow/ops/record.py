"""Where re-distillation keeps its state, and the run report.

Layout under the store (all through :mod:`anyflow.storage`)::

    <store>/redistill/<name>/runs/<run_id>/plan.json              what the run decided to do (written first)
    <store>/redistill/<name>/runs/<run_id>/window.json            its data window (every item seen, new, replay)
    <store>/redistill/<name>/runs/<run_id>/record.json            the outcome (written last; absent = unfinished)
    <store>/redistill/<name>/runs/<run_id>/redistill-report.html  promotion history + candidate vs promoted curves
    <store>/redistill/<name>/models/<manifest sha256>.json        per candidate: its window, dataset, teacher, run

The per-model record is what the *next* run reads: the data window continues from the window of the
model that is live (so a rollback also rolls the window back), and nothing a failed or rejected run
wrote is ever read by a later run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anyflow import registry, storage


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
