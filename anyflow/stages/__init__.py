"""Stages: the unit KFP runs. Each module has ``run(cfg, inputs, out_dir, *, ckpt_url, progress)``,
``main(argv)``, ``KIND``, ``INPUTS`` and the preset ``SECTIONS`` it reads.

:func:`run_stage` is the one entry point the CLI and the KFP components use. Artifacts are
content-addressed: the key hashes the stage, the preset sections it reads (less the operational
``train`` fields in ``OPERATIONAL_TRAIN_FIELDS``), the input artifacts' content digests
(``storage.content_digest``: their files' names, sizes and hashes, not when they were published), the code
version and the number of processes when more than one, so a rerun with unchanged inputs is a cache
hit, and training checkpoints for a (stage, key) live at a deterministic place from which a retried pod
resumes.

Retries and bad input: KFP's retry policy retries every failure, and it cannot filter on exit codes.
So a stage that fails on bad input (config, input artifacts, data, a diverged loss -- the failures a
retry reproduces) writes ``FAILED.json`` next to its checkpoints, tagged with the KFP run
(``ANYFLOW_KFP_RUN``, which the platform layer fills from the pod's Argo workflow label). A retry in
the same run finds it and stops at once with the original error, before loading data or models;
another run (the user fixed the input in place) ignores and removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from anyflow.config import StageInputError
from anyflow.urls import role_url_argument, url_argument

STAGES = ("prepare_data", "train_teacher", "train_flowmap", "distill", "finetune", "evaluate")

#: The KFP run a stage attempt belongs to (the Argo workflow name; set by ``Platform.apply``).
RUN_ENV = "ANYFLOW_KFP_RUN"
#: Written under a stage's checkpoint folder when an attempt fails on bad input.
FAILURE_MARKER = "FAILED.json"
#: ``train`` fields that change how a run is carried out, never what it computes (logging and checkpoint
#: cadence; ZeRO-1 is bit for bit plain AdamW, tests/test_train_zero.py): left out of the cache key, so
#: changing them reuses the cached artifact and resumes the same training checkpoints.
OPERATIONAL_TRAIN_FIELDS = ("log_every", "checkpoint_every", "shard_optimizer")


@dataclass
class StageResult:
    name: str
    uri: str
    metrics: dict[str, Any]
    cached: bool
    seconds: float
    report: str | None = None
    #: the bytes of ``report`` when this call wrote it (None for a cached artifact: read it at ``report``)
    report_bytes: bytes | None = None


def stage_module(name: str) -> ModuleType:
    if name == "prepare_data":
        from anyflow.stages import prepare_data as m
    elif name == "train_teacher":
        from anyflow.stages import train_teacher as m
    elif name == "train_flowmap":
        from anyflow.stages import train_flowmap as m
    elif name == "distill":
        from anyflow.stages import distill as m
    elif name == "finetune":
        from anyflow.stages import finetune as m
    elif name == "evaluate":
        from anyflow.stages import evaluate as m
    else:
        from anyflow.config import ConfigError

        raise ConfigError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return m


def cache_key(name: str, cfg: Any, sections: Sequence[str], input_digests: Mapping[str, str],
              world_size: int = 1) -> str:
    """The content key of a stage's artifact. ``world_size``: the processes that run it.

    A training step of W processes with ``train.grad_accum`` = A draws W·A micro-batches of ``train.batch_size``
    (per rank), global micro-batch g = j·W + r reading global batch g of the loader and drawing its noise from
    (seed, step, g): what is trained depends on W·A, not on W (docs/operations.md, "Resume on another number of
    processes"; only the floating-point summation order of the gradient differs). So for a training stage the
    key holds ``grad_accum`` = W·A and no process count: 8 processes × A=1, 4 × 2 and 2 × 4 share one key, one
    artifact and one checkpoint folder (a stage preempted on 8 ranks resumes on 4 with ``grad_accum`` doubled).
    A stage without a ``train`` section keeps W in its key when W > 1. One process adds nothing, so
    single-process keys do not depend on it.

    A built-in base (``builtin:tiny``, ``builtin:demo``) adds the digest of the files it ships
    (:func:`anyflow.models.tiny.builtin_assets_digest`): a new tiny VAE or demo transformer is a new key, never
    a cache hit on latents or checkpoints made with the old one."""
    from anyflow import __version__

    config = {s: dataclasses.asdict(getattr(cfg, s)) for s in sections if s != "far" or cfg.variant == "far"}
    for section in config.values():  # the far section only matters to the causal variant (above)
        train = section.get("train", {})
        for field in OPERATIONAL_TRAIN_FIELDS:
            train.pop(field, None)
        if "deepspeed" in train:  # off: no entry (keys from before the field existed stay valid); on: its content
            spec = train.pop("deepspeed")
            if spec:
                from anyflow.train.deepspeed_zero import load_config

                train["deepspeed"] = load_config(spec)[0]
    data = config.get("data")
    if data is not None and (name != "prepare_data" or not data.get("partition_size")):
        # 0 (one partition: the layout of keys made before the field existed) or another stage (the dataset's
        # digest already says how it was prepared): no entry
        data.pop("partition_size", None)
    payload = {
        "stage": name,
        "config": config,
        "variant": cfg.variant,
        "inputs": dict(sorted(input_digests.items())),
        "version": __version__,
    }
    if world_size > 1:
        folded = False
        for section in config.values():
            train = section.get("train")
            if isinstance(train, dict) and "grad_accum" in train:
                train["grad_accum"] = int(train["grad_accum"]) * int(world_size)  # global micro-batches per step
                folded = True
        if not folded:
            payload["world_size"] = int(world_size)
    base = getattr(getattr(cfg, "model", None), "base", None)
    if isinstance(base, str):  # a built-in base is shipped files, not a name: its bytes are part of the key
        from anyflow.models.tiny import builtin_assets_digest

        assets = builtin_assets_digest(base)
        if assets:
            payload["builtin_assets"] = assets
    if name == "evaluate" and getattr(getattr(cfg, "evaluate", None), "vbench", False):
        from anyflow.eval.vbench import vbench_environment

        payload["vbench_environment"] = vbench_environment()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:20]


def run_stage(
    name: str,
    *,
    preset: str = "tiny",
    overrides: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
    store: str | None = None,
    out: str | None = None,
    force: bool = False,
    progress: bool = True,
    world_size: int | None = None,
) -> StageResult:
    """Run (or reuse) one stage and publish its artifact; see the module docstring.

    ``world_size`` (part of the key, :func:`cache_key`): the processes that run it, by default this process's
    ``WORLD_SIZE`` (torchrun sets it; 1 otherwise). A launcher that only collects what its multi-node job
    published passes the job's size."""
    from anyflow import storage
    from anyflow.config import to_dict

    module, cfg, inputs, key = _resolve(name, preset, overrides, inputs, world_size)
    if out is None:
        if not store:
            raise ValueError("run_stage needs either store (content-addressed output) or out")
        out = storage.join(store, "artifacts", name, key)
    if force and store:  # publishing over the promoted model's files would change what users are served
        refuse_if_promoted(store, out)
    t0 = time.perf_counter()
    manifest = None if force else _cached_manifest(out, key)
    ckpt_url = storage.join(store, "checkpoints", name, key) if store else None
    if manifest is not None:
        if ckpt_url and _is_rank_zero():  # left by a run killed between its publish and its checkpoint delete
            _drop_checkpoints(ckpt_url, out)
        return StageResult(name, out, manifest.get("metrics", {}), True, 0.0, _report(module, out, manifest))
    if force and ckpt_url:  # recompute means from step 0: resuming the last training checkpoint would republish it
        _remove_tree(ckpt_url)
    run_id = os.environ.get(RUN_ENV, "").strip()
    marker = storage.join(ckpt_url, FAILURE_MARKER) if ckpt_url else None
    if marker:
        _stop_if_failed_before(name, marker, run_id)
    # Every process writes into a private staging folder of its own (_staging), so no rank or concurrent writer
    # clears or overwrites another's files, and a killed run's folder is removed by the next run.
    with _staging(name, out) as staging:
        try:
            extra_args = {"store": store} if "store" in inspect.signature(module.run).parameters else {}
            metrics = module.run(cfg, inputs, staging, ckpt_url=ckpt_url, progress=progress, **extra_args)
        except _permanent_failures() as exc:
            if marker and run_id and _is_rank_zero():  # one writer under torchrun
                _record_failure(marker, run_id, name, exc)
            raise
        # the report as written, for a caller that shows it (the evaluate component): never read back from the store
        written = staging / module.REPORT if getattr(module, "REPORT", None) else None
        report_bytes = written.read_bytes() if written is not None and written.is_file() else None
        if _is_rank_zero():
            # a stage may name more parents than its inputs (prepare_data: the partition artifacts it references)
            parents = list(inputs.values()) + list(getattr(module, "artifact_parents", lambda _: [])(staging))
            manifest = storage.publish(
                staging, out, kind=module.KIND, parents=parents, config=to_dict(cfg), metrics=metrics,
                extra={"cache_key": key, "stage": name, "preset": preset, "inputs": inputs},
            )
            if ckpt_url:  # published: nothing resumes from the training checkpoints any more (a rerun is a cache hit)
                _drop_checkpoints(ckpt_url, out)
        else:  # torchrun: the trained state is the same on every rank; rank 0 (which has the log) publishes it
            manifest = {"metrics": metrics}
    return StageResult(name, out, metrics, False, time.perf_counter() - t0, _report(module, out, manifest),
                       report_bytes)


def discard(name: str, *, preset: str = "tiny", overrides: Mapping[str, Any] | None = None,
            inputs: Mapping[str, str] | None = None, store: str, world_size: int = 1) -> list[str]:
    """Remove what the store keeps of stage ``name`` for this config and these inputs -- its artifact
    (``<store>/artifacts/<name>/<key>``) and its training checkpoints -- so the next run computes it anew from
    step 0 (``anyflow rerun --force``; KFP's own cache is the caller's to disable). Returns the URLs removed.

    Nothing downstream is served stale afterwards: a stage's key holds its inputs' content digests
    (:func:`cache_key`), so a recomputed artifact whose bytes differ gives every stage run on it a new key (one
    with the same bytes keeps the key: what was computed from it still holds). The manifest goes first, so a reader never takes a half-removed artifact for
    a cached one.

    Refused (:class:`~anyflow.config.StageInputError`, nothing removed) when the artifact is the one a model of
    ``store``'s registry promotes (:func:`refuse_if_promoted`)."""
    from anyflow import storage

    _, _, _, key = _resolve(name, preset, overrides, inputs, world_size)
    refuse_if_promoted(store, storage.join(store, "artifacts", name, key))
    removed = []
    for url in (storage.join(store, "artifacts", name, key), storage.join(store, "checkpoints", name, key)):
        if _remove_tree(url):
            removed.append(url)
    return removed


def refuse_if_promoted(store: str, url: str) -> None:
    """Raise :class:`~anyflow.config.StageInputError` if ``url`` is the artifact a model of ``store``'s registry
    promotes (``<store>/models/<name>/promoted.json``, :mod:`anyflow.registry`): a forced recompute removes or
    overwrites it in place, so the served model would lose its files before a new one exists (and keep none if
    the recompute failed). The user moves the alias first, or recomputes into another store."""
    from anyflow import registry, storage
    from anyflow.config import StageInputError

    def place(u: str) -> str:
        return str(u).rstrip("/") if storage.is_remote(u) else str(storage.local_path(u).resolve())

    target = place(url)
    for model in registry.list_models(store):
        live = registry.promoted(store, model)
        if live and live.get("uri") and place(live["uri"]) == target:
            raise StageInputError(
                f"--force would delete {url}, the artifact promoted as model {model!r} "
                f"({storage.join(store, 'models', model, 'promoted.json')}), leaving the served model without "
                f"files; promote or roll back to another artifact first ('anyflow models promote|rollback "
                f"{model}'), or rerun with --force into another --store.")


def _drop_checkpoints(ckpt_url: str, out: str) -> None:
    """Best effort after a publish: the artifact is complete, so failing the stage here (S3 gave up, a delete was
    denied) would only make a finished stage look failed. A warning names what is left to delete."""
    from anyflow import storage

    try:
        _remove_tree(ckpt_url)
    except (storage.StorageError, OSError) as exc:
        print(f"[anyflow] published {out}, but could not delete its training checkpoints at {ckpt_url} ({exc}); "
              "nothing reads them any more: delete that prefix when the store is reachable", file=sys.stderr,
              flush=True)


def _remove_tree(url: str) -> bool:
    """Delete every file under ``url`` (its ``manifest.json`` first) and, locally, the folder; True if any."""
    from anyflow import storage

    files = storage.list_prefix(url)
    if not files:
        return False
    top = storage.join(url, "manifest.json")
    storage.delete([top])  # missing ones are ignored (a checkpoint folder has its manifests one level down)
    storage.delete([f for f in files if f != top])
    if not storage.is_remote(url):
        shutil.rmtree(url, ignore_errors=True)
    return True


@contextlib.contextmanager
def _staging(name: str, out: str) -> Iterator[Path]:
    """The private folder a stage writes its output files into before they are published: locked while the run
    lives, removed at its end, and removed by the next run of the stage if the process died first (SIGKILL
    included; a live writer's folder is never touched: ``storage.private_dir``). A local output's publishing
    process (rank 0) stages inside the output folder, ``<out>/.anyflow-staging/<writer>/``
    (``storage.local_staging``: the files are then renamed into place, not copied); other torchrun ranks and
    remote outputs stage under the stage's own work folder (``$ANYFLOW_WORK_DIR/<stage>``, else
    ``<temp dir>/anyflow-work-<uid>/<stage>``)."""
    from anyflow import storage

    if not storage.is_remote(out) and _is_rank_zero():
        with storage.local_staging(out) as stage:
            yield stage
        return
    from anyflow._storage_io import private_dir
    from anyflow.stages.common import _work_root

    with private_dir(_work_root(name), "stage-") as work:
        (work / "out").mkdir()
        yield work / "out"


def _resolve(name: str, preset: str, overrides: Mapping[str, Any] | None,
             inputs: Mapping[str, str] | None, world_size: int | None = None) -> tuple[ModuleType, Any, dict[str, str], str]:
    """(stage module, config, inputs, content key): validates the config and the input artifacts."""
    from anyflow import storage
    from anyflow.config import apply_overrides, get_preset
    from anyflow.stages.common import require_inputs

    module = stage_module(name)
    cfg = apply_overrides(get_preset(preset), overrides)
    inputs = dict(inputs or {})
    require_inputs(name, inputs, module.INPUTS, getattr(module, "OPTIONAL", ()))
    digests = {}
    for role, url in inputs.items():
        try:
            digests[role] = storage.content_digest(url)  # content only: re-publishing it keeps this key
        except storage.ArtifactError as exc:
            raise StageInputError(f"{name}: input {role}={url} is not a valid artifact: {exc}") from exc
    source = getattr(module, "source_digest", None)  # a stage reading a data source: what it holds now
    if source is not None and (digest := source(cfg)) is not None:
        digests["source"] = digest
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size < 1:
        raise ValueError(f"{name}: world_size must be >= 1, got {world_size}")
    return module, cfg, inputs, cache_key(name, cfg, module.SECTIONS, digests, world_size)


def _cached_manifest(out: str, key: str) -> dict[str, Any] | None:
    """The manifest of the artifact at ``out`` if it was made for ``key`` and verifies (every file's size
    each time, its sha256 once per process: ``storage.verify_cached``), else None (recompute)."""
    from anyflow import storage

    if not storage.exists(storage.join(out, "manifest.json")):
        return None
    try:
        if storage.read_manifest(out).get("extra", {}).get("cache_key") != key:
            return None
        manifest = storage.verify_cached(out)
    except storage.ArtifactError as exc:
        print(f"[anyflow] {out}: not reused as a cached artifact ({exc})", file=sys.stderr, flush=True)
        return None
    return manifest if manifest.get("extra", {}).get("cache_key") == key else None


def prelaunch_check(name: str, *, preset: str, overrides: Mapping[str, Any] | None,
                    inputs: Mapping[str, str] | None, store: str, world_size: int) -> str | None:
    """For a launcher about to start a job of ``world_size`` processes that runs stage ``name`` into ``store``.

    Raises :class:`RepeatedStageFailure` when an earlier attempt of this KFP run (``RUN_ENV``) failed on
    bad input (so a retried launcher does not schedule GPU nodes only to stop); returns the artifact URL
    when the store already holds it (no job needed), else ``None``. Config and input errors raise as
    in :func:`run_stage`.
    """
    from anyflow import storage

    _, _, _, key = _resolve(name, preset, overrides, inputs, world_size)
    out = storage.join(store, "artifacts", name, key)
    if _cached_manifest(out, key) is not None:
        return out
    _stop_if_failed_before(name, storage.join(store, "checkpoints", name, key, FAILURE_MARKER),
                           os.environ.get(RUN_ENV, "").strip())
    return None


class RepeatedStageFailure(StageInputError):
    """A retry of a stage attempt that already failed on bad input in the same KFP run."""


def _permanent_failures() -> tuple[type[BaseException], ...]:
    """Failures a retry reproduces (the ones the CLI maps to exit 2, plus a diverged loss: the resume is exact)."""
    from anyflow.config import ConfigError
    from anyflow.data.prepare import DataPrepError
    from anyflow.train.loop import TrainingDiverged

    return (ConfigError, StageInputError, FileNotFoundError, DataPrepError, TrainingDiverged)


def _record_failure(marker: str, run_id: str, name: str, exc: BaseException) -> None:
    from anyflow import storage

    record = {"run": run_id, "stage": name, "error": type(exc).__name__, "message": str(exc)[:2000],
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pod": os.environ.get("HOSTNAME", "")}
    try:
        storage.write_json_atomic(marker, record)
    except Exception as write_exc:  # never mask the stage's own error
        print(f"[anyflow] {name}: could not write {marker}: {write_exc}", file=sys.stderr, flush=True)


def _stop_if_failed_before(name: str, marker: str, run_id: str) -> None:
    from anyflow import storage

    if not storage.exists(marker):
        return
    try:
        record = storage.read_json(marker)
    except Exception:  # unreadable marker: treat as absent
        record = {}
    if run_id and isinstance(record, dict) and record.get("run") == run_id:
        raise RepeatedStageFailure(
            f"{name}: an earlier attempt of this run ({run_id}, pod {record.get('pod') or '?'}, {record.get('time')}) "
            f"failed on bad input -- {record.get('error')}: {record.get('message')} -- and a retry cannot fix that, "
            f"so this attempt stops before loading anything. Fix the input and start a new run "
            f"(other runs ignore {marker}; KFP's Retry button reuses this run: delete that file first).")
    if _is_rank_zero():  # other ranks must not delete a marker rank 0 may have just written for this run
        print(f"[anyflow] {name}: ignoring {marker} from run {record.get('run')!r} (this is a new run)", flush=True)
        storage.delete([marker])


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report(module: ModuleType, uri: str, manifest: Mapping[str, Any]) -> str | None:
    from anyflow import storage

    if getattr(module, "REPORT", None) is None:
        return None
    if "files" not in manifest:  # a torchrun rank other than 0: rank 0 published (and knows) the artifact
        return storage.join(uri, module.REPORT)
    return storage.file_url(uri, module.REPORT, manifest=dict(manifest))  # on S3: where its publisher staged it


# --------------------------------------------------------------------------------------------- CLI


def _parse_inputs(items: Sequence[str]) -> dict[str, str]:
    """``--in ROLE=URL`` items (their form already checked by ``role_url_argument``) as role → URL."""
    return dict(item.partition("=")[::2] for item in items)


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=STAGES, help="stage to run")
    p.add_argument("--preset", default="tiny", help="preset name (tiny, demo, wan2.1-t2v-1.3b, wan2.1-t2v-14b, far-tiny, far-1.3b, far-14b; "
                   "'anyflow presets' lists them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. --set distill.train.steps=10 (repeatable)")
    p.add_argument("--config", help="YAML file of overrides (applied before --set)")
    p.add_argument("--in", dest="inputs", action="append", default=[], metavar="ROLE=URL", type=role_url_argument,
                   help="input artifact, e.g. --in dataset=s3://bucket/data (repeatable)")
    p.add_argument("--out", type=url_argument, help="output artifact URL (default: content-addressed under --store)")
    p.add_argument("--store", type=url_argument, help="artifact store URL (local folder or s3://bucket/prefix)")
    p.add_argument("--force", action="store_true",
                   help="recompute even if a cached artifact exists, from step 0 (its training checkpoints are "
                   "removed); refused if the artifact is a promoted model of --store's registry")
    p.add_argument("--strict", action="store_true",
                   help="prepare_data: a bad input clip (undecodable, too short, no caption) is fatal instead of skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def stage_from_args(args: argparse.Namespace) -> int:
    from anyflow.config import load_overrides_file, parse_override_args

    overrides: dict[str, Any] = load_overrides_file(args.config) if args.config else {}
    overrides.update(parse_override_args(args.overrides))
    if args.strict:
        overrides["data.strict"] = True
    if not args.out and not args.store:
        raise SystemExit("give --out URL or --store URL")
    res = run_stage(
        args.name, preset=args.preset, overrides=overrides, inputs=_parse_inputs(args.inputs),
        store=args.store, out=args.out, force=args.force, progress=not args.no_progress,
    )
    state = "cached" if res.cached else f"done in {res.seconds:.1f}s"
    print(f"{res.name}: {state} -> {res.uri}")
    if res.report:
        print(f"report: {res.report}")
    print(json.dumps(res.metrics, indent=1, default=str))
    return 0


def stage_main(name: str, argv: Sequence[str] | None = None) -> int:
    """``python -m anyflow.stages.<name> --in ... --out ...`` (what a Trainer TrainJob runs under torchrun)."""
    p = argparse.ArgumentParser(prog=f"python -m anyflow.stages.{name}", description=stage_module(name).__doc__)
    add_stage_arguments(p)
    args = p.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    from anyflow.errors import run_with_exit_codes

    return run_with_exit_codes(stage_from_args, args)
