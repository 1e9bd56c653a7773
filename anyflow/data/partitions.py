"""Partitioned, incremental data preparation: the source listing cut into partitions, each encoded into its own
content-addressed artifact, and one dataset index over them (docs/interfaces.md "Partitioned data preparation").

* **Partitions** (:func:`plan_partitions`): the source's items (:func:`anyflow.ops.window.list_items`: a clip
  for folders / S3 prefixes / procedural sets, a row's ``video`` for CSV/JSONL indexes, a ``.tar`` for
  webdataset shards) in *arrival order* -- an index's row order; every other source's keys sorted (a folder's
  by stem, as ``folder_source`` reads them) -- cut into runs of ``data.partition_size`` items. Clips that
  arrive at the end of the order (appended index rows, higher procedural indices, names that sort later such as
  dated or numbered uploads) touch only the last partition and new ones; a key that sorts into the middle
  shifts the runs after it, which re-encodes those (the run reports the count). Not a hash of the key: with P
  hash partitions, k >= P new clips would touch nearly all of them.
* **Partition artifact** (:func:`encode_partition`): ``<store>/artifacts/prepare_partition/<key>``, an ordinary
  prepared-dataset folder (``anyflow.data.prepare``) plus ``keys.json`` (each shard's row keys and the listing
  item each row came from), keyed by the partition's listing fingerprint (items and their versions: ETag,
  size+mtime or the row's digest) plus the encoder config (model section, clip geometry, shard size, strictness,
  code version). A listing that did not change is a cache hit.
* **Merge** (:func:`merge_partitions`): the dataset folder holds ``index.json`` whose shards name the partition
  artifact they live in (``artifact`` + that artifact's ``manifest_sha256``): referenced, not copied; the
  reader (:class:`anyflow.data.shards.LatentDataset`) fetches them through ``anyflow.storage.fetch_file`` and
  checks the recorded manifest digest. ``summary.json`` sums the partitions' counts (skipped clips by reason
  too); the published dataset lists the partition artifacts as its manifest parents. With a selection of items
  (``select``: a re-distillation window's new + replay items) only the partitions holding one are encoded and
  the index keeps just their rows (``rows`` in a shard entry).

Samples keep the order of the unpartitioned run (partition order, then each partition's record order), so a
dataset prepared with 3 partitions reads sample for sample like the 1-partition one (tests/test_data_partitions.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from anyflow.config import StageInputError
from anyflow.data.prepare import DataPrepError, EncodeText, EncodeVideo, prepare_data_section, summary_metrics
from anyflow.data.shards import FORMAT, INDEX, NEGATIVE, VERSION

#: Where partition artifacts live under a store: ``<store>/artifacts/prepare_partition/<key>``.
PARTITION_STAGE = "prepare_partition"
PARTITION_KIND = "dataset_partition"
SUMMARY = "summary.json"
KEYS = "keys.json"  # in a partition artifact: each shard's row keys and the listing item each row came from
#: Encoders built on first use: a merge whose partitions are all cached loads no model.
LoadEncoders = Callable[[], tuple[EncodeVideo, EncodeText]]


class PartitionsFailed(RuntimeError):
    """Some partitions failed to encode (transient failures: storage, out of memory, ...); the others are cached."""


class PartitionsBadInput(DataPrepError):
    """Some partitions failed on bad input (strict mode, an unusable source); the others are cached."""


class PartitionNotPublished(StageInputError):
    """Raised by a ``load_encoders`` that must not encode (the fan-out's CPU merge task): the partition is not in
    the store. :func:`prepare_partitioned` names every such partition in one error of this class."""


@dataclass(frozen=True)
class Partition:
    """One run of the source listing: ``items`` are ``(key, version)`` in arrival order."""

    index: int
    kind: str
    base: str  # what item keys are relative to (folder / prefix / index folder; "procedural")
    items: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def fingerprint(self) -> str:
        """sha256 of the partition's listing (source kind and base, items and their versions, in order)."""
        doc = {"kind": self.kind, "base": self.base, "items": [list(i) for i in self.items]}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        first, last = self.items[0][0], self.items[-1][0]
        return f"{self.name} ({len(self.items)} items, {first} .. {last})"


def _base(source: str, kind: str) -> str:
    if kind == "procedural":
        return "procedural"  # keys carry the seed; the content is a function of (seed, index) alone
    if kind == "index" or source.lower().rstrip("/").endswith(".tar"):
        return source.rsplit("/", 1)[0] if "/" in source else "."
    return source.rstrip("/")


def plan_partitions(source: str, partition_size: int) -> list[Partition]:
    """The source's partitions now (see the module docstring); ``partition_size`` 0: one partition of everything.

    A source that cannot be listed raises :class:`anyflow.ops.window.WindowError` / ``SourceError`` naming it.
    """
    from anyflow.ops.window import WindowError, list_items

    kind, items, _ = list_items(source)
    if not items:
        raise WindowError(
            f"data.source={source}: no clips found (nothing to partition); check the path/prefix"
        )
    if kind == "index":
        order = list(items)  # row order: appended rows land in the last partitions
    elif kind == "folder":  # folder_source reads clips sorted by stem (path without its extension)
        order = sorted(items, key=lambda k: (k[: -len(PurePosixPath(k).suffix)], k))
    else:
        order = sorted(items)
    size = partition_size if partition_size > 0 else len(order)
    base = _base(source, kind)
    return [
        Partition(i // size, kind, base, tuple((k, items[k]) for k in order[i : i + size]))
        for i in range(0, len(order), size)
    ]


def partition_records(source: str, part: Partition, item_of: dict[str, str] | None = None) -> Iterator[Any]:
    """The raw records of ``part`` (``anyflow.data.sources`` records, in the source's own order).

    ``item_of`` (filled while reading): record key -> the listing item it came from (the record's own key; for
    webdataset shards, the ``.tar`` holding it), so that a dataset can later keep only some items' rows.
    """
    from anyflow.data import sources as S
    from anyflow.ops.window import Window, window_records

    item_of = {} if item_of is None else item_of
    if part.kind == "shards":  # one tar at a time, to know which tar each sample came from
        single = source.lower().rstrip("/").endswith(".tar")
        for tar, _ in part.items:
            for record in S.webdataset_source([source if single else source.rstrip("/") + "/" + tar]):
                item_of.setdefault(record.key, tar)
                yield record
        return
    seen = dict(part.items)
    for record in window_records(Window(source, part.kind, 0, 0, seen, sorted(seen), [])):
        item_of.setdefault(record.key, record.key.strip())
        yield record


def _write_keys(staging: Path, item_of: dict[str, str]) -> None:
    """``keys.json``: per shard file, ``[key, item]`` of each row (what a selection-restricted merge reads)."""
    from safetensors import safe_open

    index = json.loads((staging / INDEX).read_text())
    out = {}
    for shard in index["shards"]:
        with safe_open(str(staging / shard["file"]), framework="pt") as f:
            keys = json.loads((f.metadata() or {}).get("keys", "[]"))
        out[shard["file"]] = [[k, item_of.get(k, k)] for k in keys]
    (staging / KEYS).write_text(json.dumps({"shards": out}) + "\n")


def encoder_config(cfg: Any) -> dict[str, Any]:
    """What the encoded tensors depend on besides the clips: model section, clip geometry, shard layout."""
    from anyflow import __version__

    data = {
        k: v
        for k, v in dataclasses.asdict(cfg.data).items()
        if k not in ("source", "partition_size", "heldout_fraction")
    }
    return {"model": dataclasses.asdict(cfg.model), "data": data, "version": __version__}


def partition_key(part: Partition, cfg: Any) -> str:
    """Content key of a partition artifact: its listing fingerprint + :func:`encoder_config`."""
    doc = {"partition": part.fingerprint, "encoder": encoder_config(cfg)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()[:20]


def partition_url(store: str, part: Partition, cfg: Any) -> str:
    from anyflow import storage

    return storage.join(store, "artifacts", PARTITION_STAGE, partition_key(part, cfg))


def cached_partition(url: str, key: str) -> bool:
    """True when ``url`` holds a complete partition artifact made for ``key``: its manifest and every listed file at
    its listed size (:func:`anyflow.storage.verify_sizes`). No content is hashed here: the fingerprint and merge
    tasks check every partition on every run, and hashing would read the whole dataset each time (~1.6 TB at 10^5
    clips of the 1.3B shape); the readers check every byte they use (a ranged row against its ``row_sha256``, a
    whole file against the manifest), so a corrupted partition is still refused, naming the file."""
    from anyflow import storage

    if not storage.exists(storage.join(url, "manifest.json")):
        return False
    try:
        return storage.verify_sizes(url).get("extra", {}).get("cache_key") == key
    except storage.ArtifactError as exc:
        print(f"[anyflow] {url}: not reused as a cached partition ({exc})", file=sys.stderr, flush=True)
        return False


def encode_partition(
    source: str, part: Partition, cfg: Any, store: str, *, load_encoders: LoadEncoders, progress: bool = False
) -> tuple[str, bool]:
    """Encode ``part`` into its artifact (or find it cached); returns ``(url, cached)``."""
    from anyflow import storage
    from anyflow.config import to_dict

    key = partition_key(part, cfg)
    url = storage.join(store, "artifacts", PARTITION_STAGE, key)
    if cached_partition(url, key):
        return url, True
    encode_video, encode_text = load_encoders()
    d = cfg.data
    with _staging() as staging:
        item_of: dict[str, str] = {}
        summary = prepare_data_section(
            partition_records(source, part, item_of), d, encode_video=encode_video, encode_text=encode_text,
            out_dir=staging, progress=progress, require_samples=False,
        )
        _write_keys(staging, item_of)
        conf = to_dict(cfg)
        conf["data"]["source"] = f"{part.name} of {source}"
        storage.publish(
            staging,
            url,
            kind=PARTITION_KIND,
            config=conf,
            metrics=summary_metrics(summary),
            extra={
                "cache_key": key,
                "stage": PARTITION_STAGE,
                "partition": {
                    "index": part.index,
                    "fingerprint": part.fingerprint,
                    "items": len(part.items),
                    "first": part.items[0][0],
                    "last": part.items[-1][0],
                    "source": source,
                },
            },
        )
    return url, False


@contextlib.contextmanager
def _staging() -> Iterator[Path]:
    """The private folder one partition is encoded into before it is published: ``partition-<random>`` under
    the ``prepare_partition`` work folder (``$ANYFLOW_WORK_DIR/prepare_partition``, else
    ``<temp dir>/anyflow-work-<uid>/prepare_partition``), locked while the encoder lives and removed at its end;
    the folders of encoders that died first (SIGKILL, OOM kill, a preempted pod on a kept volume) are removed
    when the next encoder starts (``anyflow._storage_io.private_dir``, the protocol of every stage's staging)."""
    from anyflow._storage_io import private_dir
    from anyflow.stages.common import _work_root

    with private_dir(_work_root(PARTITION_STAGE), "partition-") as work:
        (work / "out").mkdir()  # the artifact's files only (the folder itself holds the lock)
        yield work / "out"


def _memo(load: LoadEncoders) -> LoadEncoders:
    box: list[tuple[EncodeVideo, EncodeText]] = []

    def once() -> tuple[EncodeVideo, EncodeText]:
        if not box:
            box.append(load())
        return box[0]

    return once


def prepare_partitioned(
    source: str,
    cfg: Any,
    store: str,
    out_dir: str | Path,
    *,
    load_encoders: LoadEncoders,
    progress: bool = False,
    only: Sequence[int] | None = None,
    select: Collection[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Encode every partition of ``source`` that is not cached yet, then merge them into ``out_dir``.

    A failing partition does not stop the others (they are published, hence cached for the rerun); after the
    loop one error names every failed partition. ``only``: encode just these partition indexes and skip the merge
    (a pipeline's per-partition task). ``select``: listing items (a re-distillation window's new + replay items,
    anyflow/ops/window.py): only the partitions holding one are encoded (whole: a partition is the cached unit),
    and the dataset keeps only those items' rows. Returns ``(summary, partition artifact URLs)``.
    """
    parts = plan_partitions(source, cfg.data.partition_size)
    load = _memo(load_encoders)
    if only is not None:
        unknown = sorted(set(only) - {p.index for p in parts})
        if unknown:
            raise StageInputError(
                f"data.source={source} has {len(parts)} partitions now; no partition {unknown[0]} "
                "(the source shrank since the plan: rerun the pipeline)"
            )
    urls: list[str] = []
    encoded: list[str] = []
    failures: list[tuple[Partition, BaseException]] = []
    keep = None if select is None else set(select)
    if keep is not None:
        parts = [p for p in parts if any(k in keep for k, _ in p.items)]
    for part in parts:
        if only is not None and part.index not in only:
            continue
        try:
            url, cached = encode_partition(source, part, cfg, store, load_encoders=load, progress=progress)
        except Exception as exc:  # every partition gets its chance; the error names them all below
            why = "not in the store" if isinstance(exc, PartitionNotPublished) else f"{type(exc).__name__}: {exc}"
            print(f"[anyflow] prepare_data: {part.describe()} failed: {why}", file=sys.stderr, flush=True)
            failures.append((part, exc))
            continue
        urls.append(url)
        if not cached:
            encoded.append(part.name)
    if progress:
        print(
            f"[anyflow] prepare_data: {len(parts)} partitions of {source}: {len(encoded)} encoded "
            f"({', '.join(encoded) or 'none'}), {len(urls) - len(encoded)} cached, {len(failures)} failed",
            flush=True,
        )
    absent = [(p, e) for p, e in failures if isinstance(e, PartitionNotPublished)]
    if absent:  # a retry cannot publish them (only the loop's pods encode): bad input, whatever else failed
        others = "; ".join(f"{p.describe()}: {type(e).__name__}: {e}" for p, e in failures
                           if not isinstance(e, PartitionNotPublished))
        raise PartitionNotPublished(
            f"prepare_data: {len(absent)} of {len(parts)} partitions of {source} are not in the store {store} -- "
            + "; ".join(f"{p.index}:{p.fingerprint[:16]} = {p.describe()}" for p, _ in absent)
            + (f" (and failed: {others})" if others else "")
            + f". {absent[0][1]}"
        ) from None
    if failures:
        bad_input = all(
            isinstance(e, (DataPrepError, StageInputError, FileNotFoundError)) for _, e in failures
        )
        names = "; ".join(f"{p.describe()}: {type(e).__name__}: {e}" for p, e in failures)
        cls = PartitionsBadInput if bad_input else PartitionsFailed
        raise cls(
            f"prepare_data: {len(failures)} of {len(parts)} partitions failed -- {names}. The other "
            f"{len(urls)} are cached in the store; a rerun encodes only the failed ones"
        ) from failures[0][1]
    if only is not None:
        return {"partitions": len(parts), "partitions_encoded": len(encoded), "encoded": encoded}, urls
    summary = merge_partitions(urls, out_dir, source=source, keep=keep)
    # how this run got there (encoded vs cached) is returned for the progress line and the metrics, but kept
    # out of summary.json: the dataset's bytes, and so every downstream key, depend on its content only
    summary.update(
        partitions=len(parts), partitions_encoded=len(encoded), partitions_cached=len(urls) - len(encoded)
    )
    return summary, urls


def merge_partitions(
    urls: Sequence[str], out_dir: str | Path, *, source: str = "", keep: Collection[str] | None = None
) -> dict[str, Any]:
    """Write the dataset folder over the partition artifacts ``urls`` (in order): ``index.json`` referencing
    their shards, ``negative.safetensors`` (the first partition's, a few KB to MB), ``summary.json`` (sums).

    ``keep``: listing items whose rows the dataset holds (the others' rows are left out: a shard entry then
    lists its ``rows``); ``None``: every row. Reads only the partitions' manifests, ``index.json``,
    ``summary.json`` and ``keys.json`` (CPU, no model). Raises :class:`DataPrepError` when no partition holds a
    usable clip or when partitions disagree on shapes. Skipped-clip counts are those of the whole partitions.
    """
    from anyflow import storage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    partitions: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    totals = Counter[str]()
    shapes: dict[str, Any] | None = None
    negative_from = None
    for url in urls:
        digest = storage.manifest_digest(url)
        index = json.loads(storage.fetch_file(url, INDEX).read_bytes())
        summary = json.loads(storage.fetch_file(url, SUMMARY).read_bytes())
        partitions.append({"artifact": url, "manifest_sha256": digest, "num_samples": index["num_samples"]})
        for key in ("clips_read", "clips_written", "clips_skipped"):
            totals[key] += int(summary.get(key, 0))
        skipped.update(summary.get("skipped", {}))
        for reason, ex in summary.get("skipped_examples", {}).items():
            examples.setdefault(reason, []).extend(ex[: max(0, 5 - len(examples.get(reason, [])))])
        if index["num_samples"] == 0:
            continue
        mine = {"latents": index["latents"], "text": index["text"]}
        if shapes is None:
            shapes, negative_from = mine, url
        elif mine != shapes:
            raise DataPrepError(
                f"partition {url} holds latents/text {mine} but earlier partitions hold {shapes}; "
                "all partitions of a dataset must come from one encoder config"
            )
        rows_of = json.loads(storage.fetch_file(url, KEYS).read_bytes())["shards"] if keep is not None else {}
        for s in index["shards"]:
            entry = {
                "file": s["file"],
                "num_samples": s["num_samples"],
                "artifact": url,
                "manifest_sha256": digest,
                # where each row lies and its digest, for readers that fetch single rows (anyflow/data/shards.py)
                **{k: s[k] for k in ("header_bytes", "header_sha256", "row_sha256") if k in s},
            }
            if keep is not None:
                rows = [i for i, (_, item) in enumerate(rows_of[s["file"]]) if item in keep]
                if not rows:
                    continue
                if len(rows) < s["num_samples"]:
                    entry.update(num_samples=len(rows), rows=rows, shard_samples=s["num_samples"])
            shards.append(entry)
    if keep is not None:
        totals["clips_selected"] = sum(s["num_samples"] for s in shards)
    if shapes is None or negative_from is None or not shards:
        raise DataPrepError(
            f"no usable clips in {len(urls)} partitions of {source or 'the source'}: read "
            f"{totals['clips_read']}, skipped {totals['clips_skipped']} ({dict(skipped)}); see the "
            "partitions' summary.json for examples and check the source"
        )
    shutil.copyfile(storage.fetch_file(negative_from, NEGATIVE), out / NEGATIVE)
    index = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": sum(s["num_samples"] for s in shards),
        "samples_per_shard": max(s["num_samples"] for s in shards),
        **shapes,
        "shards": shards,
        "partitions": partitions,
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    summary = {
        **dict(totals),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "num_shards": len(shards),
        "latents_shape": shapes["latents"]["shape"],
        "text_shape": shapes["text"]["shape"],
        "source": source,
        "partitions": len(urls),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
