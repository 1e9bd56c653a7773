"""The re-distillation run split into pipeline tasks (what ``pipelines/redistill.py``'s components call).

Each task reads and writes small JSON files in the run's folder (``<store>/redistill/<name>/runs/<run_id>/``),
so the tasks pass one URL between them and any task can be retried: the stages behind them are
content-addressed and resumable, and ``decide`` is a compare-and-swap. The run lease is taken by
``plan`` with ``lease_ttl_s`` (set it to the pipeline's timeout: there is no heartbeat across pods),
checked again by ``decide``, and released by ``finish`` — the exit handler around the training tasks,
which also records a ``failed`` run when a task failed before ``decide`` wrote the record. ``plan``
releases it itself when it skips or fails (KFP allows exit handlers only at the outermost level, and
the local runner cannot evaluate a condition nested inside one, so ``plan`` stays outside).
"""

from __future__ import annotations

import json
from typing import Any

from anyflow import registry, storage
from anyflow.ops import record as R
from anyflow.ops import redistill as RD


def _cfg(config_json: str) -> RD.RedistillConfig:
    return RD.RedistillConfig.from_json(json.loads(config_json or "{}"))


def plan_step(store: str, source: str, teacher: str, *, flowmap: str = "", eval_dataset: str = "",
              config_json: str = "{}", run_id: str) -> tuple[str, str]:
    """Take the run lease (if configured) and plan; returns ``(action, plan_url)`` with action run|skip."""
    cfg = _cfg(config_json)
    plan_url = storage.join(R.run_dir(store, cfg.name, run_id), "plan.json")
    if cfg.run_lease:
        lease = registry.Lease(store, cfg.name, owner=run_id, ttl_s=cfg.lease_ttl_s, wait_s=cfg.lease_wait_s)
        if not lease.acquire():
            holder = lease.holder() or {}
            plan = {"run_id": run_id, "name": cfg.name, "store": store, "source": source, "started_at": R.now(),
                    "config": cfg.to_json(), "teacher": {"uri": teacher}, "teacher_changed": None, "window": None}
            RD.skip_record(plan, reason=f"another run ({holder.get('owner')}) holds the lease")
            return "skip", plan_url
    try:
        plan = RD.plan_run(store, source, teacher, flowmap=flowmap or None, eval_dataset=eval_dataset or None,
                           cfg=cfg, run_id=run_id)
        if plan["action"] == "skip":
            RD.skip_record(plan)
    except BaseException:
        finish_step(store, config_json, run_id)  # record "failed", give the lease back
        raise
    if plan["action"] == "skip":
        finish_step(store, config_json, run_id)  # the exit handler only runs after training tasks
    return plan["action"], plan_url


def distill_step(plan_url: str) -> str:
    """Train the candidate; returns the URL of ``candidate.json``."""
    plan = storage.read_json(plan_url)
    url = plan_url.rsplit("/", 1)[0] + "/candidate.json"
    storage.write_json_atomic(url, RD.train_candidate(plan))
    return url


def evaluate_step(plan_url: str, candidate_url: str) -> str:
    """Evaluate candidate and live model; returns the URL of ``evals.json``."""
    plan = storage.read_json(plan_url)
    evals = RD.evaluate_models(plan, storage.read_json(candidate_url))
    url = plan_url.rsplit("/", 1)[0] + "/evals.json"
    storage.write_json_atomic(url, evals)
    return url


def decide_step(plan_url: str, candidate_url: str, evals_url: str) -> dict[str, Any]:
    """Gate, promote or reject, write record and report; returns the record."""
    plan = storage.read_json(plan_url)
    evals = storage.read_json(evals_url)
    return RD.decide(plan, storage.read_json(candidate_url), evals)


def finish_step(store: str, config_json: str, run_id: str) -> str:
    """Exit handler: record a failure if the run has no record yet; release the run lease if it is ours."""
    cfg = _cfg(config_json)
    rdir = R.run_dir(store, cfg.name, run_id)
    rec = R.read_json_or_none(storage.join(rdir, "record.json"))
    if rec is None:
        plan = R.read_json_or_none(storage.join(rdir, "plan.json")) or {}
        rec = {"run_id": run_id, "name": cfg.name, "store": store, **plan, "status": "failed",
               "reason": "a pipeline task failed before the decision; the alias was not touched", "finished_at": R.now()}
        storage.write_json_atomic(storage.join(rdir, "record.json"), rec)
    lease = registry.Lease(store, cfg.name, owner=run_id, ttl_s=60.0)
    holder = lease.holder()
    if holder and holder.get("owner") == run_id and not holder.get("released") and lease.acquire():
        lease.release()
    return str(rec["status"])
