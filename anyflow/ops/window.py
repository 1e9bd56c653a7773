"""The data window of a re-distillation run: which source items are new since the live model was
trained, plus a deterministic replay sample of older items.

An *item* is the unit a source grows by, with a *version* that changes when its content does:

========================  ==========================================  =====================================
source spec               item key                                    version
========================  ==========================================  =====================================
``procedural:n=…,seed=…`` ``procedural-<seed>-<index>``               constant (content is a pure function)
folder / S3 prefix        video path (relative), sidecars grouped     S3 ETag / local size+mtime of its files
``.tar`` / prefix of tars shard path (relative): a *new shard list*   S3 ETag / local size+mtime of the shard
``.csv`` / ``.jsonl``     the row's ``video`` field                   sha256 of the row
========================  ==========================================  =====================================

A window remembers every item it saw (``seen``: key → version). The next window lists the source
again; items whose key is absent from the previous ``seen`` map, or whose version changed, are
**new**. Matching by key + version (ETag / mtime) rather than by an mtime watermark is robust to
clock skew and to late uploads carrying old timestamps. The replay sample is drawn from unchanged
older items with ``random.Random(f"{seed}:{generation}")``: deterministic for a given previous
window and seed (a retried run selects the same items, so its dataset is a cache hit), yet a
different sample each generation. The latest modification time seen is kept as ``watermark`` for
people; it is not used for selection.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from anyflow import storage
from anyflow.data import sources as S


class WindowError(ValueError):
    """The source cannot be listed or a recorded window is unusable; the message says what to do."""


@dataclass
class Window:
    """One run's data window (JSON-serialisable with :meth:`to_json` / :meth:`from_json`)."""

    source: str
    kind: str  # procedural | folder | shards | index
    generation: int
    seed: int
    seen: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    replay: list[str] = field(default_factory=list)
    watermark: str = ""
    previous: str = ""  # digest of the window this one continues ("" for the first)

    @property
    def selected(self) -> list[str]:
        """Items the run prepares: new + replay, sorted."""
        return sorted({*self.new, *self.replay})

    def digest(self) -> str:
        """Content id of the selection (source, items and their versions)."""
        payload = {"source": self.source, "kind": self.kind, "items": {k: self.seen[k] for k in self.selected}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Small description for run records and reports (no item lists)."""
        return {"source": self.source, "kind": self.kind, "generation": self.generation, "seed": self.seed,
                "items_seen": len(self.seen), "new": len(self.new), "replay": len(self.replay),
                "watermark": self.watermark, "digest": self.digest(), "previous": self.previous}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "window") -> Window:
        try:
            return cls(**{k: doc[k] for k in ("source", "kind", "generation", "seed", "seen", "new", "replay")},
                       watermark=doc.get("watermark", ""), previous=doc.get("previous", ""))
        except (KeyError, TypeError) as exc:
            raise WindowError(f"{where} is not a data window record ({exc}); delete it to start a fresh window.") from exc


# ------------------------------------------------------------------------------------------ listing


def source_kind(source: str) -> str:
    """``procedural``, ``index``, ``shards`` or ``folder`` for a source spec (as ``open_source`` reads it)."""
    if source == "procedural" or source.startswith("procedural:"):
        return "procedural"
    lower = source.lower().rstrip("/")
    if lower.endswith((".csv", ".jsonl")):
        return "index"
    if lower.endswith(".tar"):
        return "shards"
    files = _listing(source)
    tars = [f for f in files if f.lower().endswith(".tar")]
    videos = [f for f in files if PurePosixPath(f).suffix.lower() in S.VIDEO_EXTS]
    return "shards" if tars and not videos else "folder"


def _listing(url: str) -> dict[str, dict[str, str]]:
    """Relative path → {"version", "mtime"} for every file under a folder / S3 prefix (via anyflow.storage)."""
    fs, root = storage.fs_and_path(url)
    if not storage.is_remote(url):
        root = os.path.abspath(root)  # fsspec's local listing returns absolute paths
    try:
        found = fs.find(root, detail=True)
    except (FileNotFoundError, OSError) as exc:
        raise WindowError(f"data source {url} cannot be listed ({exc}); check the path/prefix and credentials.") from exc
    if not found:
        raise WindowError(f"data source {url} is empty or does not exist; check the path/prefix.")
    out = {}
    base = root.rstrip("/") + "/"
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = path[len(base):] if path.startswith(base) else PurePosixPath(path).name
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        mtime = info.get("LastModified") or info.get("mtime") or ""
        if hasattr(mtime, "isoformat"):
            mtime = mtime.isoformat()
        version = etag or f"{info.get('size')}-{info.get('mtime')}"
        out[rel] = {"version": version, "mtime": str(mtime)}
    return out


def list_items(source: str) -> tuple[str, dict[str, str], str]:
    """``(kind, {item key: version}, watermark)`` of the source now."""
    kind = source_kind(source)
    if kind == "procedural":
        spec = S.parse_procedural(source)
        return kind, {f"procedural-{spec['seed']}-{i:06d}": "v1" for i in range(spec["n"])}, ""
    if kind == "index":
        items = {}
        for line in _index_rows(source):
            video = line.get("video")
            if isinstance(video, str) and video.strip():
                items[video.strip()] = hashlib.sha256(json.dumps(line, sort_keys=True).encode()).hexdigest()[:16]
        return kind, items, ""
    if source.lower().rstrip("/").endswith(".tar"):  # a single shard
        files = _listing(source.rsplit("/", 1)[0] if "/" in source else ".")
        name = source.rstrip("/").rsplit("/", 1)[-1]
        if name not in files:
            raise WindowError(f"data source {source} does not exist; check the path.")
        return kind, {name: files[name]["version"]}, files[name]["mtime"]
    files = _listing(source)
    watermark = max((f["mtime"] for f in files.values()), default="")
    if kind == "shards":
        return kind, {k: v["version"] for k, v in files.items() if k.lower().endswith(".tar")}, watermark
    groups: dict[str, list[str]] = {}
    for rel in files:
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix in S.VIDEO_EXTS or suffix in S.CAPTION_EXTS:
            groups.setdefault(rel[: -len(suffix)], []).append(rel)
    items = {}
    for rels in groups.values():
        videos = [r for r in rels if PurePosixPath(r).suffix.lower() in S.VIDEO_EXTS]
        if videos:  # the item key is the video path, as folder_source names its clips
            items[sorted(videos)[0]] = "+".join(files[r]["version"] for r in sorted(rels))
    return kind, items, watermark


def _index_rows(source: str) -> list[dict[str, Any]]:
    import csv
    import io

    text = S.read_index_text(source)  # one reader of index files: empty or non-UTF-8 is a SourceError naming it
    if source.lower().endswith(".csv"):
        return [dict(r) for r in csv.DictReader(io.StringIO(text))]
    rows = []
    for line in text.splitlines():
        try:
            obj = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


# ------------------------------------------------------------------------------------------ planning


def plan_window(source: str, previous: Window | None, *, seed: int = 0, replay_ratio: float = 1.0,
                min_replay: int = 0, max_replay: int = 0) -> Window:
    """The next window after ``previous`` (``None``: the first run, every item is new).

    Replay count = ``clamp(ceil(replay_ratio · #new), min_replay, max_replay or ∞)``, at most the
    number of unchanged older items.
    """
    if replay_ratio < 0 or min_replay < 0 or max_replay < 0:
        raise WindowError(f"replay settings must be >= 0 (replay_ratio={replay_ratio}, min_replay={min_replay}, "
                          f"max_replay={max_replay}).")
    kind, items, watermark = list_items(source)
    if previous is None:
        return Window(source, kind, 1, seed, items, sorted(items), [], watermark, "")
    # A changed source spec (e.g. a grown procedural set) is fine: items are matched by key + version.
    new = sorted(k for k, v in items.items() if previous.seen.get(k) != v)
    old = sorted(k for k, v in items.items() if previous.seen.get(k) == v)
    want = math.ceil(replay_ratio * len(new))
    want = max(want, min_replay)
    if max_replay:
        want = min(want, max_replay)
    generation = previous.generation + 1
    rng = random.Random(f"{seed}:{generation}")
    replay = sorted(rng.sample(old, min(want, len(old))))
    return Window(source, kind, generation, seed, items, new, replay, watermark, previous.digest())


# ------------------------------------------------------------------------------------------ records


def window_records(window: Window) -> Iterator[S.RawClip | S.SkippedRecord]:
    """The raw clips of the selected items, in a deterministic order, for ``anyflow.data.prepare``."""
    keep = set(window.selected)
    src = window.source
    if window.kind == "procedural":
        return (r for r in S.procedural_source(**S.parse_procedural(src)) if r.key in keep)
    if window.kind == "index":
        return (r for r in S.index_source(src) if r.key.strip() in keep)
    if window.kind == "shards":
        if src.lower().rstrip("/").endswith(".tar"):
            return S.webdataset_source([src] if keep else [])
        return S.webdataset_source([src.rstrip("/") + "/" + k for k in sorted(keep)])
    stems = {k[: -len(PurePosixPath(k).suffix)] for k in keep}
    chosen = [rel for rel in _listing(src) if rel[: -len(PurePosixPath(rel).suffix)] in stems]
    return S.folder_source(src, files=sorted(chosen))
