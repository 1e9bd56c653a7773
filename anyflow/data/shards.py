"""Latent + text-embedding shards: the prepared-dataset format, and the training loader that streams it.

Layout of a dataset directory (an artifact once ``anyflow.storage.publish`` adds its manifest)::

    index.json                  format, counts, shapes, dtypes; per shard: sample count, header_bytes,
                                header_sha256, row_sha256 (one per row: what a ranged row read is checked against)
    shard-00000.safetensors     "latents" (N, F, C, h, w), "text" (N, L, D); metadata "keys", "captions" (JSON)
    ...
    negative.safetensors        "negative_embedding" (1, L, D)   (written by prepare())
    summary.json                what prepare() read, wrote and skipped (written by prepare())

A partitioned dataset (``data.partition_size`` > 0, :mod:`anyflow.data.partitions`) has no shard files of its
own: each ``index.json`` shard entry also names the partition ``artifact`` holding the file and that artifact's
``manifest_sha256``; the loader fetches it from there (``anyflow.storage.fetch_file``, hash-checked). An entry
with ``rows`` (and ``shard_samples``, the file's own row count) holds only those rows of the file, in that order.

Shard bytes depend only on the samples: safetensors keeps ``__metadata__`` in a hash map whose order
changes from process to process, so :func:`save_canonical` rewrites the header it produced into one
canonical JSON form (sorted keys, compact separators, padded to 8 bytes as safetensors pads it); the
tensor bytes and every field are unchanged, so readers see the same layout as before, and two writers
of the same samples produce byte-identical shards (and hashes).

Loader order (deterministic per seed and batch size, the same for every number of ranks; the shard-then-row
shuffling of docs/method.md §10 "data"): each epoch permutes the shards, then the rows inside each shard, and
concatenates them into one global order, cut into global batches of ``batch_size`` samples (``N // batch_size``
per epoch; the few samples past them, different ones each epoch, are dropped). The epochs follow each other in
one global stream of batches; the k-th batch a rank draws is global batch ``base + k · world_size + rank``, so
ranks are disjoint and, at every optimiser-step boundary, all of them have consumed the same prefix of the
stream. Position = one **global sample cursor** (``state_dict()["sample_cursor"]``): a checkpoint written by 8
ranks resumes on 4 or 16 (docs/operations.md, "Resume on another number of processes").

Reads. A rank reads rows of every shard (it does not own a contiguous ~1/world_size of the shards), so a rank
that fetched whole shard files would move the whole dataset over an epoch (~1.6 TB per rank at 10^5 clips at
the 1.3B shape). A shard of a **remote** artifact is therefore read **row by row**: a row of ``latents``
(N, F, C, h, w) or ``text`` (N, L, D) is one contiguous byte range of the file, placed by its safetensors header;
the loader fetches the header once (``header_bytes`` of the shard's ``index.json`` entry, checked against
``header_sha256``) and then each row it draws as two byte ranges (``anyflow.storage.fetch_ranges``: ranged
GETs), checked against the row's ``row_sha256`` (sha256 of its latents bytes then its text bytes, written by
:class:`ShardWriter` via :func:`shard_digests`, carried into a partitioned dataset's index by the merge).
``index.json`` itself is hash-checked against the manifest, so every byte used is still verified; a row that does
not match is refused naming the shard file and the row. A rank thus moves its ~1/world_size of the row bytes per
epoch plus every shard's header (benchmarks/bench_dataprep.py ``--rank-bytes``), in the same global order.
Verified rows are cached under their digest (``<cache>/ranges/``), so over many epochs a rank moves at most the
dataset once, as whole-file caching did. The rows of one batch are fetched together (up to 4 at a time).
Why byte ranges and not shards owned by ranks: the order must not depend on the number of ranks (the global
cursor), and a rank's rows of a shard are scattered through it; two GETs per sample cost little where rows are
large (~4 MB of latents and ~4 MB of text per row at the 1.3B shape), and the digests keep every byte checked.
Datasets whose ``index.json`` has no row digests (prepared by an older anyflow) fall back to fetching whole
shard files (hash-checked against the manifest, one note on stderr). Local datasets are memory-mapped and read
row by row from the safetensors file, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

FORMAT = "anyflow-latent-shards"
VERSION = 1
INDEX = "index.json"
NEGATIVE = "negative.safetensors"
NEGATIVE_KEY = "negative_embedding"


class DatasetError(ValueError):
    """A prepared dataset that is missing, empty or inconsistent; the message names the URL and file."""


def save_canonical(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
                   metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a canonical header: the same tensors and metadata give the same bytes
    in every process.

    safetensors serialises ``__metadata__`` from a hash map (its order differs per process, whatever order the
    dict passed in has). The header safetensors wrote is parsed and written again with sorted keys and compact
    separators, padded with spaces to a multiple of 8 bytes like safetensors' own; the data section is copied
    unchanged (tensor offsets do not depend on the header), so any safetensors reader reads the same file.
    """
    raw = memoryview(_safetensors_bytes(tensors, metadata=metadata))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(bytes(raw[8 : 8 + n]))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(raw[8 + n :])


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
ROW_TENSORS = ("latents", "text")  # a row's digest covers its bytes of these tensors, in this order


class _Layout:
    """Where each row of a shard file lies, parsed from its safetensors header (``head``: the file's first
    ``8 + n`` bytes): per tensor of :data:`ROW_TENSORS` the dtype, the row shape, the file offset of row 0 and
    the bytes per row (a row of a C-contiguous (N, ...) tensor is one contiguous byte range); the metadata's
    keys and captions."""

    def __init__(self, head: bytes, what: str) -> None:
        try:
            (n,) = struct.unpack("<Q", head[:8])
            if 8 + n != len(head):
                raise ValueError(f"the header is {n} bytes, not {len(head) - 8}")
            header = json.loads(head[8:])
            meta = header.get("__metadata__") or {}
            self.keys, self.captions = json.loads(meta.get("keys", "[]")), json.loads(meta.get("captions", "[]"))
            self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            rows = None
            for name in ROW_TENSORS:
                t = header[name]
                shape, (begin, end) = [int(x) for x in t["shape"]], t["data_offsets"]
                rows = shape[0] if rows is None else rows
                if shape[0] != rows or (end - begin) % max(rows, 1):
                    raise ValueError(f"{name} has shape {shape}, not {rows} rows")
                self.tensors[name] = (_DTYPES[t["dtype"]], tuple(shape[1:]), len(head) + begin,
                                      (end - begin) // max(rows, 1))
            self.rows = int(rows or 0)
        except (KeyError, ValueError, TypeError, struct.error) as e:
            raise DatasetError(f"{what}: not a latent shard's safetensors header ({type(e).__name__}: {e})") from e

    def ranges(self, row: int) -> list[tuple[int, int]]:
        """(start, length) of ``row``'s bytes of each tensor of :data:`ROW_TENSORS`, in order."""
        return [(start + row * size, size) for _, _, start, size in self.tensors.values()]

    def decode(self, data: bytes) -> tuple[torch.Tensor, ...]:
        """The row's tensors (each with a leading axis of 1) from the bytes of :meth:`ranges`, concatenated."""
        out, pos = [], 0
        for dtype, shape, _, size in self.tensors.values():
            out.append(torch.frombuffer(bytearray(data[pos : pos + size]), dtype=dtype).reshape(1, *shape))
            pos += size
        return tuple(out)


def shard_digests(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a reader needs to read single rows of the shard file ``path`` by byte range and check each one
    (written into the shard's ``index.json`` entry): ``header_bytes`` (the 8-byte length plus the JSON header),
    ``header_sha256`` and ``row_sha256`` (per row: sha256 of the row's ``latents`` bytes followed by its
    ``text`` bytes, as stored)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = struct.pack("<Q", n) + f.read(n)
        layout = _Layout(head, str(path))
        rows = []
        for r in range(layout.rows):
            h = hashlib.sha256()
            for start, size in layout.ranges(r):
                f.seek(start)
                h.update(f.read(size))
            rows.append(h.hexdigest())
    return {"header_bytes": len(head), "header_sha256": hashlib.sha256(head).hexdigest(), "row_sha256": rows}


def shard_name(i: int) -> str:
    """File name of shard ``i``."""
    return f"shard-{i:05d}.safetensors"


class ShardWriter:
    """Write samples into fixed-size safetensors shards plus ``index.json`` (see the module docstring).

    Args:
        out_dir: local directory (created).
        samples_per_shard: rows per shard (the last shard may be smaller).
        dtype: storage dtype of latents and text (fp32 default; bf16 halves the size).
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, samples_per_shard: int, dtype: torch.dtype = torch.float32):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.dtype = dtype
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []
        self._shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._closed = False

    @property
    def num_samples(self) -> int:
        """Samples added so far."""
        return sum(s["num_samples"] for s in self._shards) + len(self._pending)

    def add(self, key: str, latents: torch.Tensor, text: torch.Tensor, caption: str) -> None:
        """Add one sample: ``latents`` (F, C, h, w), ``text`` (L, D); shapes must match earlier samples."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is closed")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.out_dir}; keys must be unique")
        if latents.ndim != 4 or text.ndim != 2:
            raise ValueError(f"sample {key!r}: latents must be (F, C, h, w) and text (L, D); got {tuple(latents.shape)} and {tuple(text.shape)}")
        shapes = (tuple(latents.shape), tuple(text.shape))
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(f"sample {key!r} has latents {shapes[0]} / text {shapes[1]}, but earlier samples have {self._shapes[0]} / {self._shapes[1]}")
        self._keys.add(key)
        self._pending.append((key, latents.detach().to("cpu", self.dtype), text.detach().to("cpu", self.dtype), caption))
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = shard_name(len(self._shards))
        keys, lat, txt, caps = zip(*self._pending, strict=True)
        tensors = {"latents": torch.stack(lat).contiguous(), "text": torch.stack(txt).contiguous()}
        metadata = {"format": f"{FORMAT}/{VERSION}", "keys": json.dumps(list(keys)), "captions": json.dumps(list(caps))}
        tmp = self.out_dir / (name + ".tmp")
        save_canonical(tensors, tmp, metadata)
        tmp.replace(self.out_dir / name)
        self._shards.append({"file": name, "num_samples": len(keys), **shard_digests(self.out_dir / name)})
        self._pending = []

    def close(self) -> dict[str, Any]:
        """Write the last shard and ``index.json``; returns the index."""
        self._flush()
        self._closed = True
        lat_shape, txt_shape = self._shapes if self._shapes is not None else ((), ())
        dtype = str(self.dtype).removeprefix("torch.")
        index = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": sum(s["num_samples"] for s in self._shards),
            "samples_per_shard": self.samples_per_shard,
            "latents": {"shape": list(lat_shape), "dtype": dtype},
            "text": {"shape": list(txt_shape), "dtype": dtype},
            "shards": self._shards,
        }
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return index


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class _RowView:
    """A safetensors handle seen through a list of its rows: ``get_slice(name)[a:b]`` reads rows ``rows[a:b]``."""

    def __init__(self, handle: Any, rows: list[int]) -> None:
        self.handle, self.rows = handle, rows

    def metadata(self) -> Any:
        return self.handle.metadata()

    def get_slice(self, name: str) -> Any:
        inner, rows = self.handle.get_slice(name), self.rows

        class _Rows:
            def __getitem__(self, item: slice) -> torch.Tensor:
                return torch.cat([inner[r : r + 1] for r in rows[item]])

        return _Rows()


class _RangedShard:
    """A shard file of a remote artifact read one row at a time: its header (``header_bytes``, checked against
    ``header_sha256`` from ``index.json``) says where each row lies; a row is the byte ranges of its
    ``latents`` and ``text`` (:meth:`_Layout.ranges`), fetched with ``anyflow.storage.fetch_ranges`` (ranged
    GETs, cached per row) and checked against the row's ``row_sha256``."""

    def __init__(self, url: str, name: str, entry: dict[str, Any], manifest: dict, cache_dir: Any) -> None:
        from anyflow import storage

        self.url, self.name, self.manifest, self.cache_dir = url, name, manifest, cache_dir
        self.digests: list[str] = list(entry["row_sha256"])
        head = storage.fetch_ranges(url, name, [(0, int(entry["header_bytes"]))], entry["header_sha256"],
                                    manifest=manifest, cache_dir=cache_dir)
        self.layout = _Layout(head, f"{url}/{name}")
        self.rows: list[int] | None = None

    def file_row(self, r: int) -> int:
        """The file's row number of the entry's row ``r`` (an entry with ``rows`` holds some rows only)."""
        return self.rows[r] if self.rows is not None else r

    def read(self, row: int, dataset: str) -> tuple[torch.Tensor, ...]:
        from anyflow import storage

        try:
            data = storage.fetch_ranges(self.url, self.name, self.layout.ranges(row), self.digests[row],
                                        manifest=self.manifest, cache_dir=self.cache_dir)
        except (storage.ArtifactError, storage.StorageError, FileNotFoundError) as e:
            raise DatasetError(f"row {row} of {self.name} in {self.url} (dataset {dataset}) is refused: {e}") from e
        return self.layout.decode(data)


class LatentDataset:
    """Infinite, resumable, rank-sharded iterator over batches of a prepared dataset (local dir or URL).

    Yields ``{"latents": (B,F,C,h,w) fp32, "text": (B,L,D) fp32, "captions": list[str], "keys": list[str]}``.

    Args:
        url: dataset directory or artifact URL (``s3://bucket/prefix``).
        batch_size: samples per batch (per rank).
        seed: shuffling seed (same seed → same order).
        rank, world_size: this process's rank and the number of ranks.
        shuffle: shard-level + within-shard shuffling per epoch; False keeps the written order.
        drop_last: drop each epoch's final partial batch.
        cache_dir: local cache for shards fetched from remote URLs (``anyflow.storage.fetch_file``).
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        max_open_shards: int = 4,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = url.rstrip("/") if not _is_local(url) else url
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last, self.cache_dir = shuffle, drop_last, cache_dir
        self.index = json.loads(self._path(INDEX).read_text())
        if self.index.get("format") != FORMAT:
            raise DatasetError(f"{self.url}/{INDEX} is not an {FORMAT} index (format={self.index.get('format')!r})")
        self._counts = [int(s["num_samples"]) for s in self.index["shards"]]
        self.len_samples = sum(self._counts)
        if self.len_samples == 0:
            raise DatasetError(f"dataset {self.url} is empty (0 samples in {INDEX}); check the prepare_data summary.json")
        full, rest = divmod(self.len_samples, batch_size)
        #: global batches per epoch, over all ranks (independent of ``world_size``)
        self.batches_per_epoch = full + (0 if drop_last or rest == 0 else 1)
        if self.batches_per_epoch == 0:
            raise DatasetError(f"dataset {self.url} has {self.len_samples} samples: too few for batch_size {batch_size}")
        self._epoch_len = full * batch_size if drop_last else self.len_samples
        # position: this rank's k-th batch is global batch base + k * world_size + rank
        self._base, self._calls = 0, 0
        self.epoch = 0
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._open: OrderedDict[int, tuple[Any, list[str], list[str]]] = OrderedDict()
        self._checked: set[str] = set()  # referenced partition artifacts whose manifest digest was checked
        self._max_open = max(1, max_open_shards)
        self._manifests: dict[str, dict] = {}  # remote artifact URL -> its manifest (where the shard objects lie)
        self._ranged: dict[int, _RangedShard] = {}  # remote shards read row by row (headers are small: all kept)
        self._whole_noted = False

    # -------------------------------------------------------------------------------------- files
    def _path(self, rel: str) -> Path:
        """A verified local path of ``rel``: through the manifest for artifacts (local or remote); a plain
        folder (no manifest, e.g. prepare_data's own output before publishing) only checks the name."""
        from anyflow import storage

        root = Path(self.url.removeprefix("file://")) if _is_local(self.url) else None
        if root is not None and not (root / "manifest.json").is_file():
            path = root / storage.check_name(self.url, rel, what="dataset file")
            if not path.is_file():
                what = "folder does not exist" if not root.is_dir() else f"{rel} is missing"
                raise DatasetError(f"no prepared dataset at {self.url}: {what}; run prepare_data to create it")
            return path
        try:
            return Path(storage.fetch_file(self.url, rel, cache_dir=self.cache_dir))
        except (storage.ArtifactError, FileNotFoundError, KeyError) as e:
            raise DatasetError(f"cannot read {rel} of the prepared dataset {self.url}: {e}") from e

    def _shard_path(self, i: int) -> Path:
        """A verified local path of shard ``i``: a file of this dataset, or of the partition artifact the index
        names for it (a partitioned prepare_data, anyflow/data/partitions.py: shards are referenced, not copied).
        A reference is followed only to the manifest it recorded (``manifest_sha256``), and the file is then
        checked against that manifest by ``storage.fetch_file``."""
        from anyflow import storage

        entry = self.index["shards"][i]
        ref = entry.get("artifact")
        if ref is None:
            return self._path(entry["file"])
        try:
            self._check_ref(ref, entry)
            return Path(storage.fetch_file(ref, entry["file"], cache_dir=self.cache_dir))
        except (storage.ArtifactError, storage.StorageError, FileNotFoundError, KeyError) as e:
            raise DatasetError(f"cannot read {entry['file']} of the partition artifact {ref} that the dataset "
                               f"{self.url} references: {e}") from e

    def _check_ref(self, ref: str, entry: dict[str, Any]) -> None:
        """Follow a partition reference only to the manifest the dataset recorded (``manifest_sha256``)."""
        from anyflow import storage

        if ref not in self._checked:
            got, want = storage.manifest_digest(ref), entry.get("manifest_sha256")
            if not want or got != want:
                raise DatasetError(f"partition artifact {ref} has manifest sha256 {got}, but the dataset "
                                   f"{self.url} was built over {want}; prepare the dataset again")
            self._checked.add(ref)

    def _is_ranged(self, i: int) -> bool:
        """Shard ``i`` is read row by row with ranged reads: it lies in a remote artifact and its index entry
        carries the row digests (datasets prepared before them fetch whole files: one note on stderr)."""
        if i in self._ranged:
            return True
        entry = self.index["shards"][i]
        if _is_local(entry.get("artifact", self.url)):
            return False
        if all(k in entry for k in ("header_bytes", "header_sha256", "row_sha256")):
            return True
        if not self._whole_noted:
            self._whole_noted = True
            print(f"[anyflow] {self.url}: {INDEX} has no per-row digests (prepared by an older anyflow), so every rank "
                  "fetches whole shard files; encode it again to fetch only the rows each rank reads (the same inputs "
                  "are a cache hit: `anyflow rerun --stage prepare_data --force`)",
                  file=sys.stderr, flush=True)
        return False

    def _ranged_shard(self, i: int) -> _RangedShard:
        """Shard ``i`` of a remote artifact as a :class:`_RangedShard` (its header fetched and checked once)."""
        from anyflow import storage

        if i in self._ranged:
            return self._ranged[i]
        entry = self.index["shards"][i]
        ref, name = entry.get("artifact", self.url), entry["file"]
        try:
            if "artifact" in entry:
                self._check_ref(ref, entry)
            if ref not in self._manifests:
                self._manifests[ref] = storage.read_manifest(ref)
            shard = _RangedShard(ref, name, entry, self._manifests[ref], self.cache_dir)
        except (storage.ArtifactError, storage.StorageError, FileNotFoundError, KeyError) as e:
            raise DatasetError(f"cannot read {name} (shard {i} of the dataset {self.url}) from {ref}: {e}") from e
        rows = entry.get("rows")
        stored = int(entry.get("shard_samples", self._counts[i])) if rows is not None else self._counts[i]
        if (shard.layout.rows != stored or len(shard.digests) != stored or len(shard.layout.keys) != stored
                or len(shard.layout.captions) != stored):
            raise DatasetError(f"{ref}/{name} holds {shard.layout.rows} rows and {len(shard.digests)} row digests, "
                               f"but {INDEX} says {stored} samples")
        if rows is not None and (len(rows) != self._counts[i]
                                 or not all(isinstance(r, int) and 0 <= r < stored for r in rows)):
            raise DatasetError(f"{self.url}/{INDEX}: the rows of shard {i} ({name}) are not {self._counts[i]} "
                               f"row numbers below {stored}")
        shard.rows = rows
        self._ranged[i] = shard
        return shard

    def _shard(self, i: int) -> tuple[Any, list[str], list[str]]:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        name = self.index["shards"][i]["file"]
        handle = safe_open(str(self._shard_path(i)), framework="pt")
        meta = handle.metadata() or {}
        keys, caps = json.loads(meta.get("keys", "[]")), json.loads(meta.get("captions", "[]"))
        entry = self.index["shards"][i]
        rows = entry.get("rows")  # a subset of a referenced shard's rows (a re-distillation window's items)
        stored = int(entry.get("shard_samples", self._counts[i])) if rows is not None else self._counts[i]
        if len(keys) != stored or len(caps) != stored:
            raise DatasetError(f"{self.url}/{name} holds {len(keys)} keys but {INDEX} says {stored} samples")
        if rows is not None:
            if len(rows) != self._counts[i] or not all(isinstance(r, int) and 0 <= r < stored for r in rows):
                raise DatasetError(f"{self.url}/{INDEX}: the rows of shard {i} ({name}) are not {self._counts[i]} "
                                   f"row numbers below {stored}")
            handle = _RowView(handle, rows)
            keys, caps = [keys[r] for r in rows], [caps[r] for r in rows]
        self._open[i] = (handle, keys, caps)
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return self._open[i]

    def negative_embedding(self) -> torch.Tensor:
        """The negative-prompt embedding (1, L, D) fp32 from ``negative.safetensors``."""
        with safe_open(str(self._path(NEGATIVE)), framework="pt") as f:
            if NEGATIVE_KEY not in f.keys():
                raise DatasetError(f"{self.url}/{NEGATIVE} has no tensor {NEGATIVE_KEY!r}")
            neg = f.get_tensor(NEGATIVE_KEY).float()
        return neg if neg.ndim == 3 else neg.unsqueeze(0)

    # -------------------------------------------------------------------------------------- order
    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, rows) of ``epoch``'s global order (all ranks), in order."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1], self._order[2]
        shard_ids, rows = [], []
        if self.shuffle:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            perm = torch.randperm(len(self._counts), generator=g).tolist()
        else:
            perm = list(range(len(self._counts)))
        for s in perm:
            n = self._counts[s]
            r = torch.randperm(n, generator=g).numpy() if self.shuffle else np.arange(n)
            shard_ids.append(np.full(n, s, dtype=np.int64))
            rows.append(r.astype(np.int64))
        sid, row = np.concatenate(shard_ids), np.concatenate(rows)
        self._order = (epoch, sid, row)
        return sid, row

    # ------------------------------------------------------------------------------------ iterate
    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        block = self._base + self._calls * self.world_size + self.rank  # the global batch this rank reads now
        self.epoch, j = divmod(block, self.batches_per_epoch)
        sid, row = self.epoch_order(self.epoch)
        start = j * self.batch_size
        end = min(start + self.batch_size, self._epoch_len)
        lat, txt, caps, keys = [], [], [], []
        ranged: list[tuple[int, _RangedShard, int]] = []
        for s, r in zip(sid[start:end].tolist(), row[start:end].tolist(), strict=True):
            if self._is_ranged(s):  # a remote shard: fetch only this row (below, the batch's rows together)
                shard = self._ranged_shard(s)
                ranged.append((len(lat), shard, shard.file_row(r)))
                lat.append(None)
                txt.append(None)
                keys.append(shard.layout.keys[ranged[-1][2]])
                caps.append(shard.layout.captions[ranged[-1][2]])
                continue
            handle, skeys, scaps = self._shard(s)
            lat.append(handle.get_slice("latents")[r : r + 1])
            txt.append(handle.get_slice("text")[r : r + 1])
            keys.append(skeys[r])
            caps.append(scaps[r])
        if ranged:
            def read(item: tuple[int, _RangedShard, int]) -> tuple[torch.Tensor, ...]:
                return item[1].read(item[2], self.url)

            if len(ranged) == 1:
                got = [read(ranged[0])]
            else:
                with ThreadPoolExecutor(min(4, len(ranged))) as pool:
                    got = list(pool.map(read, ranged))
            for (k, _, _), (row_lat, row_txt) in zip(ranged, got, strict=True):
                lat[k], txt[k] = row_lat, row_txt
        self._calls += 1
        return {
            "latents": torch.cat(lat).float(),
            "text": torch.cat(txt).float(),
            "captions": caps,
            "keys": keys,
        }

    def state_dict(self) -> dict[str, Any]:
        """The global sample cursor (samples of the global stream consumed by all ranks together, valid at a
        step boundary, where every rank has drawn as many batches) plus what it is only valid for (seed,
        shuffling, batch size, data). ``rank`` / ``world_size`` are informational: any layout may resume it."""
        blocks = self._base + self._calls * self.world_size
        return {
            "sample_cursor": blocks * self.batch_size,
            "epoch": blocks // self.batches_per_epoch,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.len_samples,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s global sample cursor, with any rank and world size; refuses a state from another
        seed, shuffling, batch size or dataset, and the per-rank positions of older loaders."""
        if "sample_cursor" not in state:
            raise ValueError(f"loader state {sorted(state)} holds per-rank positions (an older anyflow's loader), not "
                             f"a global sample cursor; this loader of {self.url} cannot resume it")
        for name in ("seed", "shuffle", "num_samples", "batch_size"):
            mine = self.state_dict()[name]
            if state.get(name) != mine:
                raise ValueError(f"loader state has {name}={state.get(name)!r} but this loader of {self.url} has {name}={mine!r}")
        cursor = int(state["sample_cursor"])
        if cursor < 0 or cursor % self.batch_size:
            raise ValueError(f"loader state sample_cursor {cursor} is not a whole number of batches of {self.batch_size}")
        self._base, self._calls = cursor // self.batch_size, 0
        self.epoch = self._base // self.batches_per_epoch
