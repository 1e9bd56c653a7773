"""Raw clip sources for data preparation: folders, S3 prefixes, CSV/JSONL indexes, webdataset tars, procedural.

Every source yields, in a deterministic order, either a :class:`RawClip` (a caption plus a ``load(spec)``
that decodes the video, raising :class:`ClipError` for a bad one) or a :class:`SkippedRecord` for a
record that is unusable before decoding (no caption, no video, unreadable metadata). Nothing is
dropped silently: ``prepare`` counts every skip by reason.

Spec strings accepted by :func:`open_source`:

* ``procedural:n=32,seed=0`` — the built-in moving-shapes generator (``anyflow.data.procedural``);
  ``…,simple=1`` draws from its small class set (the ``demo`` preset).
* ``path/or/s3://bucket/index.csv`` / ``.jsonl`` — an index with ``video`` and ``caption`` (JSONL may
  give ``captions``: a list, the first is used); relative ``video`` paths are relative to the index.
* ``…/shard-000.tar`` or a folder/prefix holding only ``.tar`` files — webdataset shards: ``<key>.mp4``
  + ``<key>.json`` (``captions`` list, first caption; or ``caption``) or ``<key>.txt``.
* any other folder or S3 prefix — videos with sidecar captions: ``x.mp4`` + ``x.txt`` or ``x.json``.

Local paths are read directly; every ``scheme://`` URL goes through ``anyflow.storage`` (the only module
that opens URLs).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch

from anyflow._storage_s3 import StorageError
from anyflow.config import StageInputError
from anyflow.data.procedural import describe, make_clip
from anyflow.data.video import (
    BAD_METADATA,
    MISSING_CAPTION,
    MISSING_VIDEO,
    ClipError,
    VideoSpec,
    decode_video,
    frames_to_tensor,
)

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi")
CAPTION_EXTS = (".json", ".txt")


@dataclass(frozen=True)
class RawClip:
    """A clip with its caption; ``load(spec)`` decodes it to float32 (3, T, H, W) in [-1, 1]."""

    key: str
    caption: str
    loader: Callable[[VideoSpec], torch.Tensor] = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def load(self, spec: VideoSpec) -> torch.Tensor:
        """Decode the clip; raises :class:`ClipError` naming this clip's key for a bad input."""
        try:
            return self.loader(spec)
        except ClipError as e:
            raise e.with_key(self.key) from None


@dataclass(frozen=True)
class SkippedRecord:
    """A record that could not become a clip: ``reason`` is one of ``anyflow.data.video.REASONS``."""

    key: str
    reason: str
    detail: str = ""


Record = RawClip | SkippedRecord


class SourceError(StageInputError):
    """The data source as a whole is unusable (a malformed ``procedural:`` spec, an index without a header,
    not UTF-8, or empty): bad input, which a retry reproduces. The message names ``data.source`` and the file."""


# ---------------------------------------------------------------------------------------------- I/O


def is_remote(url: str) -> bool:
    """True for ``scheme://…`` URLs other than ``file://`` (those go through anyflow.storage)."""
    return "://" in url and not url.startswith("file://")


def _local(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def _join(base: str, rel: str) -> str:
    """``rel`` resolved against the folder/prefix ``base`` (absolute paths and URLs pass through)."""
    if "://" in rel or rel.startswith("/"):
        return rel
    return base.rstrip("/") + "/" + rel


def _row_video(index_url: str, base: str, video: str) -> str:
    """Where an index row's ``video`` is read from: only a file under the index's own folder/prefix, in the
    index's own scheme -- a relative path, or a path/URL that starts with that folder. Anything else (another
    scheme or host: ``http://…``, ``file:///…`` from an S3 index; another bucket or prefix; an absolute path
    outside the folder; a ``..`` segment) raises :class:`ClipError` (bad metadata): it is never fetched."""
    v = video.strip()
    if is_remote(index_url):
        root = base.rstrip("/") + "/"
        rel = v[len(root) :] if v.startswith(root) else None if "://" in v or v.startswith("/") else v
    else:
        path = v[len("file://") :] if v.startswith("file://") else v
        root = os.path.abspath(_local(base)).rstrip("/") + "/"
        rel = None if "://" in path else path[len(root) :] if path.startswith(root) else None if path.startswith("/") else path
    parts = [p for p in (rel or "").split("/") if p != "."]
    if rel is None or not parts or ".." in parts or "\x00" in rel:
        raise ClipError(BAD_METADATA, f"video {v!r} is not a file under the index's folder {base}; an index may "
                        "only name videos beside or below it (relative paths or URLs under that folder)")
    return _join(base, "/".join(parts))


def _open(url: str) -> IO[bytes]:
    if is_remote(url):
        from anyflow import storage

        return storage.open_url(url, "rb")
    return open(_local(url), "rb")


def _read_bytes(url: str) -> bytes:
    with _open(url) as f:
        return f.read()


def _list_files(url: str) -> list[str]:
    """Paths of all files under a folder/prefix, relative to it, sorted ('/'-separated)."""
    if is_remote(url):
        from anyflow import storage

        base = url.rstrip("/") + "/"
        out = []
        for item in storage.list_prefix(url):
            name = str(item)
            if name.startswith(base):
                name = name[len(base) :]
            elif "://" in name:  # a URL under a differently spelled base: keep the part after the prefix
                name = name.split(url.split("://", 1)[1].rstrip("/") + "/", 1)[-1]
            out.append(name.lstrip("/"))
        return sorted(out)
    root = _local(url)
    if not root.is_dir():
        raise FileNotFoundError(f"data source {url} is not a folder; pass a folder, an index (.csv/.jsonl), a .tar or 'procedural:n=…'")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _video_loader(url: str) -> Callable[[VideoSpec], torch.Tensor]:
    def load(spec: VideoSpec) -> torch.Tensor:
        if is_remote(url):
            try:
                data = _read_bytes(url)
            except FileNotFoundError:
                raise ClipError(MISSING_VIDEO, f"no object at {url}") from None
            return decode_video(data, spec)
        return decode_video(_local(url), spec)

    return load


def _bytes_loader(data: bytes) -> Callable[[VideoSpec], torch.Tensor]:
    return lambda spec: decode_video(data, spec)


def _caption_from_json(data: bytes, where: str) -> str | None:
    """``caption`` (str) or the first of ``captions`` (list); ClipError(bad_metadata) for bad JSON."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClipError(BAD_METADATA, f"{where} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ClipError(BAD_METADATA, f"{where} holds a JSON {type(obj).__name__}, expected an object with 'caption' or 'captions'")
    return _caption_from_fields(obj)


def _caption_from_fields(obj: dict[str, Any]) -> str | None:
    cap = obj.get("caption")
    if cap is None and isinstance(obj.get("captions"), list) and obj["captions"]:
        cap = obj["captions"][0]
    if not isinstance(cap, str) or not cap.strip():
        return None
    return cap.strip()


# ------------------------------------------------------------------------------------------ sources


def procedural_source(n: int, seed: int = 0, simple: int = 0) -> Iterator[Record]:
    """Clips ``0 .. n-1`` of the procedural dataset ``seed`` (``simple``: its small class set, keys
    ``procedural-simple-<seed>-<index>``); rendered at the spec's size on load."""

    def loader(index: int) -> Callable[[VideoSpec], torch.Tensor]:
        def load(spec: VideoSpec) -> torch.Tensor:
            clip = make_clip(seed, index, frames=spec.frames, height=spec.height, width=spec.width,
                             simple=bool(simple))
            return frames_to_tensor(clip.video, spec)

        return load

    prefix = "procedural-simple" if simple else "procedural"
    for index in range(n):
        caption, attributes = describe(seed, index, simple=bool(simple))
        yield RawClip(f"{prefix}-{seed}-{index:06d}", caption, loader(index), meta=attributes)


def folder_source(url: str, files: list[str] | None = None) -> Iterator[Record]:
    """Videos under a folder/prefix with sidecar captions ``x.txt`` or ``x.json`` (recursive, sorted).

    ``files`` (relative paths) skips listing the folder again when the caller already has it.
    """
    groups: dict[str, dict[str, str]] = {}
    for rel in files if files is not None else _list_files(url):
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix in VIDEO_EXTS or suffix in CAPTION_EXTS:
            groups.setdefault(rel[: -len(suffix)], {})[suffix] = rel
    for stem in sorted(groups):
        files = groups[stem]
        videos = [files[e] for e in VIDEO_EXTS if e in files]
        if not videos:
            yield SkippedRecord(stem, MISSING_VIDEO, f"caption file {next(iter(files.values()))} has no video beside it")
            continue
        try:
            caption = None
            if ".json" in files:
                caption = _caption_from_json(_read_bytes(_join(url, files[".json"])), files[".json"])
            if caption is None and ".txt" in files:
                caption = _read_bytes(_join(url, files[".txt"])).decode("utf-8", errors="replace").strip() or None
        except ClipError as e:
            yield SkippedRecord(videos[0], e.reason, e.detail)
            continue
        if caption is None:
            yield SkippedRecord(videos[0], MISSING_CAPTION, f"no {stem}.txt or {stem}.json with a caption")
            continue
        yield RawClip(videos[0], caption, _video_loader(_join(url, videos[0])))


def index_source(url: str) -> Iterator[Record]:
    """Rows of a CSV (header with ``video``, ``caption``) or JSONL index; paths relative to the index."""
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    text = read_index_text(url)
    rows: Iterable[tuple[str, dict[str, Any] | None, str]]
    if url.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise SourceError(f"data.source={url}: the CSV header row is malformed ({e})") from None
        if header is None or "video" not in header:
            found = f"columns {', '.join(map(repr, header))}" if header else "no header row"
            raise SourceError(
                f"data.source={url}: a CSV index needs a header row with columns 'video' and 'caption'; found {found}"
            )
        rows = ((f"row {i + 2}", dict(r), "") for i, r in enumerate(reader))
    else:
        rows = (_jsonl_row(i, line) for i, line in enumerate(text.splitlines()) if line.strip())
    for where, row, error in rows:
        if row is None:
            yield SkippedRecord(where, BAD_METADATA, f"{url} {where}: {error}")
            continue
        video = row.get("video")
        if not isinstance(video, str) or not video.strip():
            yield SkippedRecord(where, BAD_METADATA, f"{url} {where} has no 'video' field")
            continue
        caption = _caption_from_fields(row)
        if caption is None:
            yield SkippedRecord(video, MISSING_CAPTION, f"{url} {where} has no 'caption'")
            continue
        try:
            where_url = _row_video(url, base, video)
        except ClipError as e:
            yield SkippedRecord(video, e.reason, f"{url} {where}: {e.detail}")
            continue
        yield RawClip(video, caption, _video_loader(where_url))


def read_index_text(url: str) -> str:
    """The text of a CSV/JSONL index: :class:`SourceError` naming the file when it is empty or not UTF-8."""
    data = _read_bytes(url)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(
            f"data.source={url}: the index is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    if not text.strip():
        raise SourceError(f"data.source={url}: the index is empty; it needs a header row 'video,caption' and one row per clip")
    return text


def _jsonl_row(i: int, line: str) -> tuple[str, dict[str, Any] | None, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return f"line {i + 1}", None, f"invalid JSON ({e})"
    if not isinstance(obj, dict):
        return f"line {i + 1}", None, "not a JSON object"
    return f"line {i + 1}", obj, ""


def webdataset_source(urls: Iterable[str]) -> Iterator[Record]:
    """Samples of webdataset tar shards, streamed: ``<key>.mp4`` + ``<key>.json``/``<key>.txt``."""
    for url in urls:
        with _open(url) as f:
            try:
                tar = tarfile.open(fileobj=f, mode="r|*")
            except tarfile.TarError as e:
                yield SkippedRecord(url, BAD_METADATA, f"{url} is not a readable tar file: {e}")
                continue
            yield from _tar_samples(tar, url)


def _tar_samples(tar: tarfile.TarFile, url: str) -> Iterator[Record]:
    current: str | None = None
    sample: dict[str, bytes] = {}
    try:
        for member in tar:
            if not member.isfile():
                continue
            path = PurePosixPath(member.name)
            key = str(path.parent / path.name.split(".", 1)[0])
            ext = "." + path.name.split(".", 1)[1].lower() if "." in path.name else ""
            if key != current and current is not None:
                yield _wds_record(current, sample)
                sample = {}
            current = key
            fobj = tar.extractfile(member)
            sample[ext] = fobj.read() if fobj is not None else b""
    except (StorageError, ConnectionError, TimeoutError):
        raise  # the store or network failed, not the shard: a retry may succeed (not "bad input")
    except (tarfile.TarError, OSError, EOFError) as e:
        yield SkippedRecord(url, BAD_METADATA, f"{url} is truncated or corrupt after {current!r}: {e}")
        return
    if current is not None:
        yield _wds_record(current, sample)


def _wds_record(key: str, sample: dict[str, bytes]) -> Record:
    videos = [e for e in VIDEO_EXTS if e in sample]
    if not videos:
        return SkippedRecord(key, MISSING_VIDEO, f"sample has {sorted(sample)} but no video")
    try:
        caption = _caption_from_json(sample[".json"], f"{key}.json") if ".json" in sample else None
    except ClipError as e:
        return SkippedRecord(key, e.reason, e.detail)
    if caption is None and ".txt" in sample:
        caption = sample[".txt"].decode("utf-8", errors="replace").strip() or None
    if caption is None:
        return SkippedRecord(key, MISSING_CAPTION, "sample has no .json 'captions'/'caption' or .txt")
    return RawClip(key, caption, _bytes_loader(sample[videos[0]]))


def parse_procedural(spec: str) -> dict[str, int]:
    """``procedural:n=32,seed=0`` → ``{"n": 32, "seed": 0}``; ``…,simple=1`` adds ``"simple": 1`` (the small
    class set of :mod:`anyflow.data.procedural`); unknown or malformed keys are errors."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    out = {"n": 32, "seed": 0}
    for part in filter(None, (p.strip() for p in body.split(","))):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in ("n", "seed", "simple"):
            raise SourceError(f"data.source={spec!r}: unknown option {name!r}; use e.g. 'procedural:n=32,seed=0' "
                              "(options n, seed and simple)")
        if not value.isdigit():
            raise SourceError(f"data.source={spec!r}: {name}={value!r} must be a whole number >= 0; "
                              "use e.g. 'procedural:n=32,seed=0'")
        if name == "simple" and value not in ("0", "1"):
            raise SourceError(f"data.source={spec!r}: simple={value!r} must be 0 or 1")
        out[name] = int(value)
    if not 1 <= out["n"] <= 10_000_000:
        raise SourceError(f"data.source={spec!r}: n={out['n']} clips must be in [1, 10000000]")
    return out


def open_source(spec: str) -> Iterator[Record]:
    """Records of the source named by ``spec`` (see the module docstring for the accepted forms)."""
    if spec == "procedural" or spec.startswith("procedural:"):
        return procedural_source(**parse_procedural(spec))
    lower = spec.lower().rstrip("/")
    if lower.endswith((".csv", ".jsonl")):
        return index_source(spec)
    if lower.endswith(".tar"):
        return webdataset_source([spec])
    files = _list_files(spec)
    if not files:
        raise FileNotFoundError(f"data source {spec} is empty or does not exist; check the path/prefix")
    tars = [f for f in files if f.lower().endswith(".tar")]
    has_videos = any(PurePosixPath(f).suffix.lower() in VIDEO_EXTS for f in files)
    if tars and not has_videos:
        return webdataset_source([_join(spec, t) for t in tars])
    return folder_source(spec, files)
