"""The re-distillation run split into pipeline tasks (what ``pipelines/redistill.py``'s components call).

Each task reads and writes small JSON files in the run's folder (``<store>/redistill/<name>/runs/<run_id>/``),
so the tasks pass one URL between them and any task can be retried: the stages behind them are
content-addressed and resumable, and ``decide`` is a compare-and-swap.

The run lease (owner = the run id) has a short TTL (``lease_ttl_s``, default 900 s) and is renewed
across pods: ``plan`` takes it, and ``plan``, ``distill``, ``evaluate`` and ``decide`` each beat it
from a heartbeat thread while they run (:class:`anyflow.ops.lease.RunLease`) — the later tasks take
back their run's lease with :meth:`~anyflow.ops.lease.RunLease.resume`, which refuses if another run
took it in between — and hand it on renewed when they finish. A task that finds the lease lost stops
with :class:`~anyflow.registry.LeaseLost` and nothing after it promotes. ``finish`` — the exit handler
around the training tasks — releases it and records a ``failed`` run when a task failed before
``decide`` wrote the record. ``plan`` releases it itself when it skips or fails (KFP allows exit
handlers only at the outermost level, and the local runner cannot evaluate a condition nested inside
one, so ``plan`` stays outside). If the pipeline dies hard, the lease expires ``lease_ttl_s`` after the
last beat.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from anyflow import registry, storage
from anyflow.ops import record as R
from anyflow.ops import redistill as RD
from anyflow.ops.lease import RunLease


def _cfg(config_json: str) -> RD.RedistillConfig:
    return RD.RedistillConfig.from_json(json.loads(config_json or "{}"))


def _guarded(lease: RunLease | None) -> contextlib.AbstractContextManager:
    return lease.guard() if lease is not None else contextlib.nullcontext()


def resume_lease(plan: Mapping[str, Any]) -> RunLease | None:
    """Take back the run's lease in a later task and start its heartbeat (``None`` without ``run_lease``).

    :class:`~anyflow.registry.LeaseLost` if another run holds or held it since this run's last beat.
    """
    cfg = RD.RedistillConfig.from_json(plan["config"])
    if not cfg.run_lease:
        return None
    lease = RunLease(plan["store"], plan["name"], plan["run_id"], cfg.lease_ttl_s)
    lease.resume()
    return lease


def plan_step(store: str, source: str, teacher: str, *, flowmap: str = "", eval_dataset: str = "",
              config_json: str = "{}", run_id: str) -> tuple[str, str]:
    """Take the run lease (if configured) and plan; returns ``(action, plan_url)`` with action run|skip."""
    cfg = _cfg(config_json)
    plan_url = storage.join(R.run_dir(store, cfg.name, run_id), "plan.json")
    lease = RunLease(store, cfg.name, run_id, cfg.lease_ttl_s, cfg.lease_wait_s) if cfg.run_lease else None
    if lease is not None and not lease.acquire():
        holder = lease.lease.holder() or {}
        plan = {"run_id": run_id, "name": cfg.name, "store": store, "source": source, "started_at": R.now(),
                "config": cfg.to_json(), "teacher": {"uri": teacher}, "teacher_changed": None, "window": None}
        RD.skip_record(plan, reason=f"another run ({holder.get('owner')}) holds the lease")
        return "skip", plan_url
    try:
        with _guarded(lease):
            plan = RD.plan_run(store, source, teacher, flowmap=flowmap or None,
                               eval_dataset=eval_dataset or None, cfg=cfg, run_id=run_id)
            if plan["action"] == "skip":
                RD.skip_record(plan)
        if lease is not None and plan["action"] == "run":
            lease.handoff()  # renewed: the distill pod has a full TTL to start
    except BaseException:
        if lease is not None:
            lease.stop()
        finish_step(store, config_json, run_id)  # record "failed", give the lease back
        raise
    if plan["action"] == "skip":
        if lease is not None:
            lease.stop()
        finish_step(store, config_json, run_id)  # the exit handler only runs after training tasks
    return plan["action"], plan_url


def _leased_task(plan: Mapping[str, Any], plan_url: str, out_name: str, work: Callable[[], Any]) -> str:
    """Run ``work()`` under the run's resumed lease (heartbeat + guard), hand the lease on renewed, and write
    the result next to the plan as ``out_name``; returns its URL."""
    lease = resume_lease(plan)
    try:
        with _guarded(lease):
            result = work()
        if lease is not None:
            lease.handoff()
    finally:
        if lease is not None:
            lease.stop()
    url = plan_url.rsplit("/", 1)[0] + "/" + out_name
    storage.write_json_atomic(url, result)
    return url


def distill_step(plan_url: str, *, nproc_per_node: int = 1) -> str:
    """Train the candidate under the run lease (heartbeat), as ``nproc_per_node`` processes; returns the URL of
    ``candidate.json``."""
    plan = storage.read_json(plan_url)
    return _leased_task(plan, plan_url, "candidate.json",
                        lambda: RD.train_candidate(plan, nproc_per_node=nproc_per_node))


def evaluate_step(plan_url: str, candidate_url: str) -> str:
    """Evaluate candidate and live model under the run lease; returns the URL of ``evals.json``."""
    plan = storage.read_json(plan_url)
    candidate = storage.read_json(candidate_url)
    return _leased_task(plan, plan_url, "evals.json", lambda: RD.evaluate_models(plan, candidate))


def decide_step(plan_url: str, candidate_url: str, evals_url: str) -> dict[str, Any]:
    """Gate, promote or reject, write record and report; returns the record.

    With ``run_lease`` it first takes back the run's lease (:class:`~anyflow.registry.LeaseLost`, and no
    promotion, if another run took it); the decision itself is not interrupted (a promotion is one
    compare-and-swap plus its history entry), ``decide`` checks the lease right before promoting.
    """
    plan = storage.read_json(plan_url)
    evals = storage.read_json(evals_url)
    candidate = storage.read_json(candidate_url)
    lease = resume_lease(plan)
    try:
        return RD.decide(plan, candidate, evals, lease=lease)
    finally:
        if lease is not None:
            lease.stop()  # released by finish (the exit handler)


def finish_step(store: str, config_json: str, run_id: str) -> str:
    """Exit handler: record a failure if the run has no record yet; release the run lease if it is ours."""
    cfg = _cfg(config_json)
    rdir = R.run_dir(store, cfg.name, run_id)
    rec = R.read_json_or_none(storage.join(rdir, "record.json"))
    lease = registry.Lease(store, cfg.name, owner=run_id, ttl_s=60.0)
    holder = lease.holder()
    if rec is None:
        plan = R.read_json_or_none(storage.join(rdir, "plan.json")) or {}
        reason = "a pipeline task failed before the decision; the alias was not touched"
        if cfg.run_lease and (holder or {}).get("owner") != run_id:
            reason += (f"; the run lease is held by {(holder or {}).get('owner')}, not this run: it was lost "
                       f"(a task stalled or started more than lease_ttl_s={cfg.lease_ttl_s:g} s after the last "
                       f"heartbeat and another run took it)")
        rec = {"run_id": run_id, "name": cfg.name, "store": store, **plan, "status": "failed",
               "reason": reason, "finished_at": R.now()}
        storage.write_json_atomic(storage.join(rdir, "record.json"), rec)
    if holder and holder.get("owner") == run_id and not holder.get("released") and lease.acquire():
        lease.release()
    return str(rec["status"])
