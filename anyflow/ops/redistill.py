"""Periodic re-distillation: new data → warm-started distillation → evaluation gate → atomic promotion.

One run, as four steps (each a library function; the KFP pipeline ``anyflow-redistill`` runs one
per task, :func:`redistill` runs them in-process):

1. :func:`plan_run` — read the live alias of ``cfg.name``; plan the data window (new items since the
   window of the *live* model + a replay sample, :mod:`anyflow.ops.window`) and prepare only those
   items into a content-addressed dataset; decide the warm start. **Teacher changed** = the teacher
   artifact's content digest (``storage.content_digest``: its files, not when it was published) differs
   from the teacher's recorded in the live generator's manifest lineage (its nearest ancestor of kind
   ``teacher``). Unchanged teacher: the distill
   stage's ``flowmap`` (generator init) and ``critic`` inputs are the live artifact. Changed teacher
   (``on_teacher_change="flowmap"``, default): generator init from ``flowmap``, critic re-initialised
   from the new teacher; ``"generator"``: generator from the live model, critic from the new teacher.
   Nothing new and the teacher unchanged → the run is ``skipped``.
2. :func:`train_candidate` — the ``distill`` stage (content-addressed, resumable after preemption).
3. :func:`evaluate_models` — the ``evaluate`` stage for the candidate and for the live model with
   the same preset sections, i.e. the same prompts, seeds, noise and NFE sweep.
4. :func:`decide` — under the model's :class:`~anyflow.registry.Lease`: if the alias moved since
   step 3, re-evaluate the new live model; gate at **every** NFE (tolerance = ``margin`` +
   ``relative_margin``·|live value|, per metric); promote with ``expected_current`` = the model that
   was compared against, or record the rejection with the metrics that decided it; write
   ``record.json`` and ``redistill-report.html``.

Safety. Steps 1–3 write only new content-addressed artifacts and files under the run's own folder,
so a failed run changes nothing a user relies on: the alias, its history and the next run's window
are touched only by step 4. Overlapping runs: the whole run holds the lease (``run_lease``, short
TTL, renewed by a heartbeat thread in whichever process — or KFP pod — is working,
:mod:`anyflow.ops.lease`), a run that loses it stops and does not promote, the promotion is a
compare-and-swap, and KFP recurring runs use ``max_concurrency=1`` (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anyflow import registry, storage
from anyflow.ops import record as R
from anyflow.ops.lease import RunLease
from anyflow.ops.window import Window, plan_window, window_records

TEACHER_CHANGE_POLICIES = ("flowmap", "generator")


@dataclass(frozen=True)
class RedistillConfig:
    """Everything that shapes a re-distillation run (recorded in its plan)."""

    name: str = "anyflow-t2v"  # the registry model name (alias at <store>/models/<name>/promoted.json)
    preset: str = "tiny"
    overrides: Mapping[str, Any] = field(default_factory=dict)  # every stage (fix the eval protocol here)
    distill_overrides: Mapping[str, Any] = field(default_factory=dict)  # the distill stage only
    metrics: tuple[tuple[str, bool], ...] = (("coupled_mse", False),)  # (metric, higher_is_better)
    margin: float = 0.0  # absolute tolerance per metric
    relative_margin: float = 0.05  # plus this fraction of |live value|
    seed: int = 0  # replay sampling
    replay_ratio: float = 1.0  # replay items per new item
    min_replay: int = 0
    max_replay: int = 0  # 0 = no cap
    min_new_items: int = 1  # fewer new items (and the same teacher) → skip
    on_teacher_change: str = "flowmap"
    run_lease: bool = True  # hold the model's lease for the whole run
    lease_ttl_s: float = 900.0  # renewed every ttl/3 by the process working (any pod); expires after a crash
    lease_wait_s: float = 0.0  # how long a run waits for another run's lease before skipping
    promote_wait_s: float = 600.0  # without run_lease: wait for the promotion lease

    def __post_init__(self) -> None:
        if self.on_teacher_change not in TEACHER_CHANGE_POLICIES:
            raise ValueError(f"on_teacher_change={self.on_teacher_change!r}; use one of {TEACHER_CHANGE_POLICIES}.")
        if not self.metrics:
            raise ValueError("metrics is empty; give at least one (metric, higher_is_better) pair, e.g. coupled_mse:lower.")
        if not self.lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s={self.lease_ttl_s!r} must be > 0 seconds (default 900; the heartbeat "
                             f"renews it every lease_ttl_s/3).")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RedistillConfig:
        doc = dict(doc)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(doc) - set(valid))
        if unknown:
            raise ValueError(f"redistill config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}.")
        doc["metrics"] = tuple((str(m), bool(h)) for m, h in doc.get("metrics", cls.metrics))
        return cls(**doc)


# ------------------------------------------------------------------------------------------ 1. plan


def _teacher_digest_of(uri: str) -> str | None:
    """The content digest (``storage.content_digest``) of the teacher in ``uri``'s lineage (nearest ancestor of
    kind ``teacher``) as it was when ``uri``'s chain recorded it: "were the live model's teacher weights these
    bytes?", so a teacher published again with identical files (``anyflow rerun --force``) is the same teacher.
    A manifest from before parents carried their content digest gives the teacher's current content digest if
    its manifest is still the recorded one, else ``None`` (counted as changed)."""
    for item in storage.lineage(uri)[1:]:
        manifest = item.get("manifest") or {}
        if manifest.get("kind") == "teacher":
            if item.get("recorded_content_sha256"):
                return item["recorded_content_sha256"]
            return storage.content_digest(item["uri"]) if item.get("ok") else None
    return None


def _has_adapter(uri: str, adapter: str) -> bool:
    try:  # through the manifest: on S3 the file lives under its publisher's staging prefix
        meta = json.loads(storage.fetch_file(uri, "model.json").read_bytes())
    except (FileNotFoundError, ValueError, storage.ArtifactError):
        return False
    return adapter in meta.get("adapters", {})


def prepare_window(window: Window, store: str, *, preset: str, overrides: Mapping[str, Any],
                   progress: bool = False) -> str:
    """Prepare only the window's items into a dataset artifact under ``<store>/artifacts/prepare_window/<key>``.

    The key hashes the selection (items + versions), the model and data geometry and the code
    version, so a retried run reuses the dataset. With ``data.partition_size`` > 0 (in the run's overrides) it
    encodes the source's partitions that hold a selected item (:mod:`anyflow.data.partitions`: each one a cached
    artifact, so the replay items, in partitions an earlier run encoded, cost nothing) and the dataset references
    the selected rows of them.
    """
    import torch

    from anyflow import __version__
    from anyflow.config import apply_overrides, get_preset, to_dict
    from anyflow.data.prepare import prepare_data_section, summary_metrics
    from anyflow.stages import common

    cfg = apply_overrides(get_preset(preset), overrides)
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "source"}
    if not data.get("partition_size"):
        data.pop("partition_size", None)  # unpartitioned: the keys of windows prepared before the setting existed
    key = hashlib.sha256(json.dumps({"window": window.digest(), "model": dataclasses.asdict(cfg.model),
                                     "data": data, "version": __version__}, sort_keys=True).encode()).hexdigest()[:20]
    out = storage.join(store, "artifacts", "prepare_window", key)
    if storage.exists(storage.join(out, "manifest.json")):
        try:
            if storage.read_manifest(out).get("extra", {}).get("cache_key") == key:
                return out
        except storage.ArtifactError:
            pass  # torn: prepare again
    staging = Path(tempfile.mkdtemp(prefix="anyflow-window-"))
    parents: list[str] = []
    try:
        if cfg.data.partition_size:
            # the source's partitions that hold a selected item (docs/interfaces.md "Partitioned data preparation"):
            # new items land in the last ones, replay items in partitions an earlier run encoded (cache hits)
            from anyflow.data.partitions import prepare_partitioned

            def load() -> tuple:
                base = common.load_models(cfg)
                return base.vae.encode, base.text.encode

            with torch.no_grad():
                summary, parents = prepare_partitioned(window.source, cfg, store, staging, load_encoders=load,
                                                       progress=progress, select=window.selected)
        else:
            base = common.load_models(cfg)
            with torch.no_grad():
                summary = prepare_data_section(window_records(window), cfg.data, encode_video=base.vae.encode,
                                               encode_text=base.text.encode, out_dir=staging, progress=progress)
        metrics = summary_metrics(summary)
        conf = to_dict(cfg)
        conf["data"]["source"] = f"window {window.digest()[:16]} of {window.source}"
        storage.publish(staging, out, kind="dataset", config=conf, metrics=metrics, parents=parents,
                        extra={"cache_key": key, "stage": "prepare_window", "window": window.summary()})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def plan_run(store: str, source: str, teacher: str, *, flowmap: str | None = None, eval_dataset: str | None = None,
             cfg: RedistillConfig | None = None, run_id: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Step 1: window, dataset and warm start; writes ``plan.json`` and ``window.json``; returns the plan."""
    cfg = cfg or RedistillConfig()
    run_id = run_id or f"{R.now().replace(':', '').replace('-', '')}-{uuid.uuid4().hex[:6]}"
    name, rdir = cfg.name, R.run_dir(store, cfg.name, run_id)
    live = registry.promoted(store, name)
    teacher_digest = storage.content_digest(teacher)  # the same weights? (not the same publication)
    previous, live_teacher = None, None
    if live is not None:
        doc = R.read_json_or_none(R.model_record_url(store, name, live["manifest_sha256"]))
        if doc and doc.get("window_url"):
            previous = Window.from_json(storage.read_json(doc["window_url"]), doc["window_url"])
        live_teacher = _teacher_digest_of(live["uri"])
    teacher_changed = live is not None and live_teacher != teacher_digest
    window = plan_window(source, previous, seed=cfg.seed, replay_ratio=cfg.replay_ratio,
                         min_replay=cfg.min_replay, max_replay=cfg.max_replay)
    if teacher_changed and not window.new and not window.replay:  # retrain on a replay of the old data
        window = plan_window(source, previous, seed=cfg.seed, replay_ratio=0, min_replay=len(window.seen),
                             max_replay=cfg.max_replay)
    plan: dict[str, Any] = {
        "run_id": run_id, "name": name, "store": store, "source": source, "started_at": R.now(),
        "config": cfg.to_json(), "teacher": {"uri": teacher, "digest": teacher_digest},
        "teacher_changed": teacher_changed, "live_teacher_digest": live_teacher,
        "baseline": {"uri": live["uri"], "digest": live["manifest_sha256"]} if live else None,
        "eval_dataset": eval_dataset, "window": window.summary(),
        "window_url": storage.join(rdir, "window.json"),
    }
    storage.write_json_atomic(plan["window_url"], window.to_json())
    if live is not None and not teacher_changed and len(window.new) < cfg.min_new_items:
        plan.update(action="skip", reason=f"{len(window.new)} new item(s) (< min_new_items={cfg.min_new_items}) "
                                          f"and the teacher is unchanged: nothing to re-distill")
    else:
        if live is None or (teacher_changed and cfg.on_teacher_change == "flowmap"):
            if not flowmap:
                why = "no model is promoted yet" if live is None else "the teacher changed"
                raise ValueError(f"{why}: give a flowmap artifact (--flowmap URI) to initialise the generator.")
            init, critic = flowmap, None
            warm = "flowmap (first promotion)" if live is None else "flowmap; critic from the new teacher (teacher changed)"
        elif teacher_changed:
            init, critic, warm = live["uri"], None, "live generator; critic from the new teacher (teacher changed)"
        else:
            init = live["uri"]
            critic = live["uri"] if _has_adapter(live["uri"], "critic") else None
            warm = "live generator" + (" and critic" if critic else " (no critic in it: critic from the teacher)")
        dataset = prepare_window(window, store, preset=cfg.preset, overrides=cfg.overrides, progress=progress)
        inputs = {"dataset": dataset, "teacher": teacher, "flowmap": init, **({"critic": critic} if critic else {})}
        plan.update(action="run", reason="", dataset=dataset, distill_inputs=inputs, warm_start=warm)
    storage.write_json_atomic(storage.join(rdir, "plan.json"), plan)
    return plan


# ------------------------------------------------------------------------------- 2. train, 3. evaluate


def _config(plan: Mapping[str, Any]) -> RedistillConfig:
    return RedistillConfig.from_json(plan["config"])


def train_candidate(plan: Mapping[str, Any], *, progress: bool = False, nproc_per_node: int = 1) -> dict[str, Any]:
    """Step 2: the warm-started distill stage (in this process, or as ``nproc_per_node`` torchrun processes on
    this machine: one per GPU of a pod); records the candidate's window for later runs."""
    from anyflow.stages import run_stage
    from anyflow.stages.processes import run_processes

    cfg = _config(plan)
    args = dict(preset=cfg.preset, overrides={**cfg.overrides, **cfg.distill_overrides},
                inputs=plan["distill_inputs"], store=plan["store"])
    if nproc_per_node > 1:
        res = run_processes("distill", int(nproc_per_node), **args)
    else:
        res = run_stage("distill", progress=progress, **args)
    digest = storage.manifest_digest(res.uri)
    # Written before any promotion, so a live model always has its window; harmless if never promoted.
    storage.write_json_atomic(R.model_record_url(plan["store"], cfg.name, digest), {
        "run_id": plan["run_id"], "uri": res.uri, "window_url": plan["window_url"], "dataset": plan["dataset"],
        "teacher": plan["teacher"], "warm_start": plan["warm_start"], "distill_inputs": plan["distill_inputs"]})
    return {"uri": res.uri, "digest": digest, "cached": res.cached}


def evaluate_model(plan: Mapping[str, Any], generator: str, *, progress: bool = False) -> dict[str, Any]:
    """The evaluate stage for one generator under the run's fixed protocol (same config, teacher, data)."""
    from anyflow.stages import run_stage

    cfg = _config(plan)
    inputs = {"generator": generator, "teacher": plan["teacher"]["uri"]}
    if plan.get("eval_dataset"):
        inputs["dataset"] = plan["eval_dataset"]
    res = run_stage("evaluate", preset=cfg.preset, overrides=cfg.overrides, inputs=inputs, store=plan["store"],
                    progress=progress)
    return {"uri": generator, "digest": storage.manifest_digest(generator), "eval": res.uri,
            "report": res.report, "metrics": R.nested_metrics(res.metrics)}


def evaluate_models(plan: Mapping[str, Any], candidate: Mapping[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """Step 3: candidate and live model on the same prompts, seeds and NFE sweep."""
    base = plan.get("baseline")
    return {"candidate": evaluate_model(plan, candidate["uri"], progress=progress),
            "baseline": evaluate_model(plan, base["uri"], progress=progress) if base else None}


# ------------------------------------------------------------------------------------------ 4. decide


def gate_all_nfes(candidate: Mapping[Any, Mapping[str, float]], live: Mapping[Any, Mapping[str, float]] | None,
                  cfg: RedistillConfig) -> tuple[bool, list[str]]:
    """:func:`anyflow.registry.gate` at every NFE of the live model, tolerance = margin + relative·|live|."""
    metrics = list(cfg.metrics)
    if not live:
        return registry.gate(candidate, None, metrics=metrics, margin=cfg.margin)
    cand = {str(k): v for k, v in candidate.items()}
    ok, reasons, checked = True, [], []
    for nfe, row in sorted(((str(k), v) for k, v in live.items()), key=lambda kv: int(kv[0])):
        tol = {m: cfg.margin + cfg.relative_margin * abs(float(row.get(m, 0.0))) for m, _ in metrics}
        good, why = registry.gate({nfe: cand.get(nfe, {})}, {nfe: row}, metrics=metrics, margin=tol)
        checked.append(nfe)
        if not good:
            ok = False
            reasons += why
    if ok:
        names = ", ".join(m for m, _ in metrics)
        reasons = [f"{names} within margin {cfg.margin:g} + {cfg.relative_margin:g}·|live| at every NFE ({', '.join(checked)})"]
    return ok, reasons


def decide(plan: Mapping[str, Any], candidate: Mapping[str, Any], evals: Mapping[str, Any], *,
           lease: RunLease | None = None, progress: bool = False) -> dict[str, Any]:
    """Step 4: gate and promote (or record the rejection) under the lease; write record and report."""
    cfg, store, name = _config(plan), plan["store"], plan["name"]
    own = lease is None
    if own:  # a KFP task: take the lease now (ours already if the plan task took it for the run)
        lease = RunLease(store, name, plan["run_id"], cfg.lease_ttl_s, cfg.promote_wait_s)
        if not lease.acquire(heartbeat=False):
            raise registry.LeaseHeld(f"{lease.lease.url}: another run holds the lease; this run's candidate "
                                     f"{candidate['uri']} was not promoted — rerun the decide step later.")
    try:
        lease.check()
        base = evals.get("baseline")
        for _ in range(3):  # the alias moved since step 3: compare against the model that is live now
            live = registry.promoted(store, name)
            if (live and live["manifest_sha256"]) == (base and base["digest"]):
                break
            base = evaluate_model(plan, live["uri"], progress=progress) if live else None
        live_digest = base["digest"] if base else registry.NO_ALIAS
        cand_metrics = evals["candidate"]["metrics"]
        names = [m for m, _ in cfg.metrics]
        flat = {**R.flat_gate_metrics(cand_metrics, names),
                **(R.flat_gate_metrics(base["metrics"], names, "baseline/") if base else {})}
        if candidate["digest"] == live_digest:
            status, reasons = "unchanged", ["the candidate is already the live model"]
        else:
            ok, reasons = gate_all_nfes(cand_metrics, base["metrics"] if base else None, cfg)
            reason = f"redistill {plan['run_id']}: " + "; ".join(reasons)
            if ok:
                try:
                    lease.check()
                    registry.promote(store, name, candidate["uri"], metrics=flat, reason=reason,
                                     expected_current=live_digest)
                    status = "promoted"
                except registry.AliasConflict as exc:  # recorded in the history by registry.promote
                    status, reasons = "conflict", [*reasons, str(exc)]
            else:
                registry.record_rejection(store, name, candidate["uri"], metrics=flat, reason=reason)
                status = "rejected"
    finally:
        if own:
            lease.release()
    rec = {**{k: plan[k] for k in ("run_id", "name", "store", "source", "started_at", "teacher", "teacher_changed",
                                   "window", "window_url", "dataset", "warm_start", "config")},
           "status": status, "reason": "", "finished_at": R.now(), "candidate": {**evals["candidate"], **candidate},
           "baseline": base, "gate": {"reasons": reasons, "metrics": flat}}
    return finish(store, name, rec)


def finish(store: str, name: str, rec: dict[str, Any]) -> dict[str, Any]:
    """Write the run's ``redistill-report.html`` and (last) its ``record.json``."""
    rdir = R.run_dir(store, name, rec["run_id"])
    rec["report"] = R.write_report(store, name, rec)
    storage.write_json_atomic(storage.join(rdir, "record.json"), rec)
    return rec


def skip_record(plan: Mapping[str, Any], status: str = "skipped", reason: str | None = None) -> dict[str, Any]:
    """Record for a run that trained nothing (nothing new, or another run holds the lease)."""
    rec = {**plan, "status": status, "reason": reason or plan.get("reason", ""), "finished_at": R.now(),
           "candidate": None, "baseline": plan.get("baseline"), "gate": None}
    return finish(plan["store"], plan["name"], rec)


# ------------------------------------------------------------------------------------------ the run


def redistill(store: str, source: str, teacher: str, *, flowmap: str | None = None, eval_dataset: str | None = None,
              cfg: RedistillConfig | None = None, run_id: str | None = None, progress: bool = False) -> dict[str, Any]:
    """One re-distillation run, in-process (see the module docstring); returns the run record.

    ``status`` is ``promoted``, ``rejected``, ``unchanged``, ``skipped`` (nothing new, or another run
    holds the lease), or ``conflict`` (lost a promotion race). Exceptions propagate after a
    ``failed`` record is written; the alias is never touched by a failed run.
    """
    cfg = cfg or RedistillConfig()
    run_id = run_id or f"{R.now().replace(':', '').replace('-', '')}-{uuid.uuid4().hex[:6]}"
    lease = RunLease(store, cfg.name, run_id, cfg.lease_ttl_s, cfg.lease_wait_s)
    if cfg.run_lease and not lease.acquire():
        holder = lease.lease.holder() or {}
        plan = {"run_id": run_id, "name": cfg.name, "store": store, "source": source, "started_at": R.now(),
                "config": cfg.to_json(), "teacher": {"uri": teacher}, "teacher_changed": None, "window": None}
        return skip_record(plan, reason=f"another run ({holder.get('owner')}) holds the lease; "
                                        f"this run did nothing (the next scheduled run picks up the data)")
    plan: dict[str, Any] = {}
    try:
        # the heartbeat stops the work with LeaseLost if another run takes the lease (not the decision:
        # it checks the lease right before its compare-and-swap instead)
        with lease.guard() if cfg.run_lease else contextlib.nullcontext():
            plan = plan_run(store, source, teacher, flowmap=flowmap, eval_dataset=eval_dataset, cfg=cfg,
                            run_id=run_id, progress=progress)
            if plan["action"] == "skip":
                return skip_record(plan)
            candidate = train_candidate(plan, progress=progress)
            evals = evaluate_models(plan, candidate, progress=progress)
        if not cfg.run_lease:
            lease = None
        return decide(plan, candidate, evals, lease=lease, progress=progress)
    except BaseException as exc:
        _record_failure(store, cfg.name, run_id, plan, exc)
        raise
    finally:
        if cfg.run_lease:
            lease.release()


def _record_failure(store: str, name: str, run_id: str, plan: Mapping[str, Any], exc: BaseException) -> None:
    rec = {"run_id": run_id, "name": name, "store": store, **dict(plan), "status": "failed",
           "reason": f"{type(exc).__name__}: {exc}", "finished_at": R.now()}
    try:
        storage.write_json_atomic(storage.join(R.run_dir(store, name, run_id), "record.json"), rec)
    except Exception:  # never mask the run's own error with a bookkeeping error
        pass


__all__ = ["RedistillConfig", "decide", "evaluate_models", "gate_all_nfes", "plan_run",
           "prepare_window", "redistill", "train_candidate"]
