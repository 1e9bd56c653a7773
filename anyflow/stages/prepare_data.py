"""Data preparation: videos + captions (folder / S3 prefix / CSV-JSONL index / webdataset tars /
``procedural``) → VAE latents (posterior mean, normalised) + text embeddings in streamable shards,
plus the negative-prompt embedding (docs/method.md §1.3–1.4, §10).

Inputs: none (the source is ``data.source``). Output: a dataset artifact (shards, index.json,
negative.safetensors, summary.json). Reads preset sections: model, data.

With ``data.partition_size`` > 0 the source is encoded partition by partition into cached artifacts in the store
and the output is an index over them (:mod:`anyflow.data.partitions`; docs/interfaces.md "Partitioned data
preparation"); :func:`partition_plan` and :func:`encode_partition_item` are the pipelines' fan-out tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from anyflow.config import Preset
from anyflow.stages import common

KIND = "dataset"
INPUTS: tuple[str, ...] = ()
SECTIONS = ("model", "data")


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True,
        store: str | None = None) -> dict:
    from anyflow.data.prepare import prepare_data_section, summary_metrics

    common.require_inputs("prepare_data", inputs, INPUTS)
    if not cfg.data.source:
        raise common.StageInputError(
            "data.source is empty: set it to a folder, s3:// prefix, .csv/.jsonl index, .tar shards or 'procedural:n=…'"
        )
    d = cfg.data
    if _NO_ENCODERS:  # a partition not in the store fails in _encoders; prepare_partitioned names every one
        _require_fanout(cfg, store or "")
    if d.partition_size:  # partitions: each its own cached artifact in the store, then one index over them
        from anyflow.data.partitions import prepare_partitioned

        summary, _ = prepare_partitioned(d.source, cfg, _need_store(cfg, store), out_dir,
                                         load_encoders=lambda: _encoders(cfg), progress=progress)
    else:
        encode_video, encode_text = _encoders(cfg)
        summary = prepare_data_section(d.source, d, encode_video=encode_video, encode_text=encode_text,
                                       out_dir=out_dir, progress=progress)
    return summary_metrics(summary)


#: Set by :func:`merge_only` (the fanned-out pipeline's merge task): why this process must not load encoders.
_NO_ENCODERS: list[str] = []


@contextlib.contextmanager
def merge_only() -> Iterator[None]:
    """Within: :func:`run` only merges partitions that are already in the store, and a partition that is not
    is a :class:`~anyflow.stages.common.StageInputError` instead of an encode (the merge task of
    ``Platform.prepare_fanout`` runs on a CPU-only profile; encoding there would be the GPU work on a CPU pod)."""
    _NO_ENCODERS.append("merge")
    try:
        yield
    finally:
        _NO_ENCODERS.pop()


def _encoders(cfg: Preset) -> tuple:
    """The VAE and text encoder of the preset's model as plain callables (loaded now)."""
    if _NO_ENCODERS:  # the fan-out's merge task: a partition the loop should have published is missing
        from anyflow.data.partitions import PartitionNotPublished

        raise PartitionNotPublished(
            "this task only merges (prepare_fanout: true). The source "
            "changed after the source_fingerprint task listed its partitions, or a partition artifact was deleted "
            "since: run the pipeline again (the fingerprint task lists them anew, and the partition tasks are never "
            "taken from KFP's cache)")
    base = common.load_models(cfg)

    @torch.no_grad()
    def encode_video(video: torch.Tensor) -> torch.Tensor:
        return base.vae.encode(video)

    @torch.no_grad()
    def encode_text(captions: list[str]) -> torch.Tensor:
        return base.text.encode(captions)

    return encode_video, encode_text


def _need_store(cfg: Preset, store: str | None) -> str:
    if not store:
        raise common.StageInputError(
            f"data.partition_size={cfg.data.partition_size} needs a store (partition artifacts are cached there): "
            "pass --store, or set data.partition_size=0 for one unpartitioned run"
        )
    return store


def artifact_parents(out_dir: Path) -> list[str]:
    """The partition artifacts a partitioned dataset references (its manifest parents); none otherwise."""
    import json

    index = out_dir / "index.json"
    if not index.is_file():
        return []
    return [p["artifact"] for p in json.loads(index.read_text()).get("partitions", [])]


def _require_fanout(cfg: Preset, store: str) -> None:
    """A pipeline compiled with ``Platform.prepare_fanout`` (partition pods encode, a CPU task merges) can only run
    a partitioned source with a store; raised before any pod of the loop starts, and again by the merge task."""
    missing = [what for what, ok in (("data.partition_size > 0 (clips per partition pod)", cfg.data.partition_size),
                                     ("a store (the pipeline's 'store' parameter)", store),
                                     ("a data.source", cfg.data.source)) if not ok]
    if missing:
        raise common.StageInputError(
            f"prepare_data: this pipeline was compiled with prepare_fanout: true in its platform (partition pods "
            f"encode, a CPU task merges), so a run needs {' and '.join(missing)}; or compile without prepare_fanout")


def partition_plan(cfg: Preset, store: str, *, fanout: bool = False) -> list[str]:
    """The partitions a pipeline's ``ParallelFor`` encodes: ``"<index>:<fingerprint>"`` of each partition whose
    artifact is not in the store yet (cached ones need no pod). Empty when ``data.partition_size`` is 0 or there is
    no store: the ``prepare_data`` task then encodes everything itself, as without partitions.

    ``fanout`` (``Platform.prepare_fanout``: the task after the loop only merges, on a CPU profile): a run that
    cannot be partitioned is a :class:`~anyflow.stages.common.StageInputError` naming what to set, raised here in
    the CPU fingerprint task before any encoding pod starts."""
    from anyflow.data.partitions import cached_partition, partition_key, partition_url, plan_partitions
    from anyflow.ops.window import WindowError

    if fanout:
        _require_fanout(cfg, store)
    if not cfg.data.partition_size or not store or not cfg.data.source:
        return []
    try:
        parts = plan_partitions(cfg.data.source, cfg.data.partition_size)
    except WindowError as exc:
        raise common.StageInputError(f"prepare_data: {exc}") from None
    return [f"{p.index}:{p.fingerprint[:16]}" for p in parts
            if not cached_partition(partition_url(store, p, cfg), partition_key(p, cfg))]


def encode_partition_item(cfg: Preset, store: str, item: str, *, progress: bool = True) -> dict:
    """Encode one partition of :func:`partition_plan` (``item`` = ``"<index>:<fingerprint>"``) into the store."""
    import os

    from anyflow import stages, storage
    from anyflow.data.partitions import PARTITION_STAGE, prepare_partitioned

    index, _, fingerprint = item.partition(":")
    if not index.isdigit() or not fingerprint.isalnum():
        raise common.StageInputError(f"partition item {item!r} is not '<index>:<fingerprint>' (partition_plan's form)")
    # A bad-input failure is final for this run: KFP's retries of the pod stop at once instead of loading the
    # encoders again (as run_stage does for a stage: FAILED.json, keyed by the KFP run).
    marker = storage.join(_need_store(cfg, store), "checkpoints", PARTITION_STAGE, f"{index}-{fingerprint}",
                          stages.FAILURE_MARKER)
    run_id = os.environ.get(stages.RUN_ENV, "").strip()
    stages._stop_if_failed_before(PARTITION_STAGE, marker, run_id)
    try:
        summary, urls = prepare_partitioned(cfg.data.source, cfg, store, Path("."),
                                            load_encoders=lambda: _encoders(cfg), progress=progress,
                                            only=[int(index)])
    except stages._permanent_failures() as exc:
        if run_id:
            stages._record_failure(marker, run_id, PARTITION_STAGE, exc)
        raise
    print(f"[anyflow] prepare_data partition {index} (planned listing {fingerprint}): {urls[0]} "
          f"({'encoded' if summary['partitions_encoded'] else 'cached'})", flush=True)
    return {"uri": urls[0], **summary}


def source_digest(cfg: Preset) -> str | None:
    """What ``data.source`` holds now, as a digest of its listing (keys with ETag or size+mtime; an index's rows),
    or ``None`` for a procedural source (made from its spec alone, which the key already has).

    Part of the stage's key (:func:`anyflow.stages.cache_key`), so new or changed videos under the same prefix
    give a new dataset instead of the cached one; the pipelines' uncached ``source_fingerprint`` task hands the
    same digest to the prepare_data task so KFP's own cache is not stale either (docs/cluster.md).
    """
    import hashlib
    import json

    from anyflow.ops.window import WindowError, list_items

    if not cfg.data.source:
        return None  # run() names the empty setting
    try:
        kind, items, _ = list_items(cfg.data.source)
    except WindowError as exc:
        raise common.StageInputError(f"prepare_data: {exc}") from None
    if kind == "procedural":
        return None
    return hashlib.sha256(json.dumps({"kind": kind, "items": items}, sort_keys=True).encode()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    from anyflow.stages import stage_main

    return stage_main("prepare_data", argv)


if __name__ == "__main__":
    raise SystemExit(main())
