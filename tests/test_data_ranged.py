"""Ranked reads of an S3 dataset move only the rows each rank reads (issue 23; anyflow/data/shards.py docstring).

The global order is world-size independent (rank r draws global batches r, r + W, ...), so every rank reads rows
of every shard. A remote shard is therefore read row by row: its header and each row are byte ranges
(``anyflow.storage.fetch_ranges``: ranged GETs) checked against the ``header_sha256`` / ``row_sha256`` written
into ``index.json``. The bytes are counted by ``storage.bytes_received`` (every S3 body byte this process
receives), the samples are compared with a local memory-mapped read of the same files, and the digests with
sha256 over the tensors that safetensors' own reader returns.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from anyflow import storage
from anyflow.data.shards import NEGATIVE, NEGATIVE_KEY, DatasetError, LatentDataset, ShardWriter, shard_name

LAT, TXT = (4, 8, 8, 8), (16, 64)  # 8 KiB + 4 KiB per fp32 row: rows outweigh the index and the headers
N, PER_SHARD, BATCH = 16, 4, 2


def _write(root: Path, dtype: torch.dtype = torch.float32, first: int = 0, n: int = N) -> Path:
    g = torch.Generator().manual_seed(first)
    w = ShardWriter(root, samples_per_shard=PER_SHARD, dtype=dtype)
    for i in range(first, first + n):
        w.add(f"clip-{i:03d}", torch.randn(LAT, generator=g), torch.randn(TXT, generator=g), f"caption {i}")
    w.close()
    save_file({NEGATIVE_KEY: torch.ones(1, *TXT)}, str(root / NEGATIVE))
    (root / "summary.json").write_text(json.dumps({"clips_read": n, "clips_written": n, "clips_skipped": 0}))
    return root


def test_row_digests_are_the_stored_bytes(tmp_path: Path) -> None:
    """Each shard entry's row digest is sha256 over the row's latents bytes then its text bytes, as
    safetensors' own reader returns them; the header digest covers the file's first ``header_bytes``."""
    root = _write(tmp_path / "ds", dtype=torch.bfloat16)
    index = json.loads((root / "index.json").read_text())
    for entry in index["shards"]:
        raw = (root / entry["file"]).read_bytes()
        assert entry["header_bytes"] == 8 + int.from_bytes(raw[:8], "little")
        assert entry["header_sha256"] == hashlib.sha256(raw[: entry["header_bytes"]]).hexdigest()
        with safe_open(str(root / entry["file"]), framework="pt") as f:
            lat, txt = f.get_tensor("latents"), f.get_tensor("text")
        want = [
            hashlib.sha256(
                lat[r].contiguous().view(torch.uint8).numpy().tobytes()
                + txt[r].contiguous().view(torch.uint8).numpy().tobytes()
            ).hexdigest()
            for r in range(entry["num_samples"])
        ]
        assert entry["row_sha256"] == want


def _partitioned(tmp_path: Path, prefix: str) -> tuple[Path, str]:
    """Two partition artifacts on S3 (bf16 rows) merged into one dataset that references them, published too."""
    from anyflow.data.partitions import PARTITION_KIND, merge_partitions

    urls = []
    for p in range(2):
        local = _write(tmp_path / f"part{p}", dtype=torch.bfloat16, first=p * N // 2, n=N // 2)
        urls.append(f"{prefix}-part{p}")
        storage.publish(local, urls[-1], kind=PARTITION_KIND)
    merged = tmp_path / "merged"
    merge_partitions(urls, merged)
    storage.publish(merged, prefix, kind="dataset")
    # the same samples as one local folder: the reference read
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "index.json").write_text(
        json.dumps(
            {
                **json.loads((merged / "index.json").read_text()),
                "shards": [
                    {"file": f"p{p}-{s['file']}", "num_samples": s["num_samples"]}
                    for p in range(2)
                    for s in json.loads((tmp_path / f"part{p}" / "index.json").read_text())["shards"]
                ],
            }
        )
    )
    for p in range(2):
        for f in (tmp_path / f"part{p}").glob("shard-*"):
            (ref / f"p{p}-{f.name}").write_bytes(f.read_bytes())
    (ref / NEGATIVE).write_bytes((merged / NEGATIVE).read_bytes())
    return ref, prefix


@pytest.mark.s3
@pytest.mark.parametrize("layout", ["plain", "partitioned"])
def test_each_rank_fetches_its_share(layout: str, s3_server, s3_prefix: str, tmp_path: Path) -> None:
    if layout == "plain":
        ref = _write(tmp_path / "ds")
        storage.publish(ref, s3_prefix, kind="dataset")
    else:
        ref, _ = _partitioned(tmp_path, s3_prefix)
    index = json.loads((ref / "index.json").read_text())
    shard_bytes = sum((ref / s["file"]).stat().st_size for s in index["shards"])
    row_bytes = (torch.Size(LAT).numel() + torch.Size(TXT).numel()) * (2 if layout == "partitioned" else 4)
    kw = dict(batch_size=BATCH, seed=5)
    local = LatentDataset(str(ref), **kw)
    epoch = local.batches_per_epoch
    reference = [next(local) for _ in range(epoch)]
    headers = 0
    for s in index["shards"]:
        raw = (ref / s["file"]).read_bytes()
        headers += 8 + int.from_bytes(raw[:8], "little")
    fetched = []
    for rank in range(2):
        before = storage.bytes_received()
        ds = LatentDataset(s3_prefix, rank=rank, world_size=2, cache_dir=tmp_path / f"cache{rank}", **kw)
        got = [next(ds) for _ in range(epoch // 2)]
        fetched.append(storage.bytes_received() - before)
        for k, b in enumerate(got):  # rank r's k-th batch is global batch 2k + r
            a = reference[2 * k + rank]
            assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
            assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
        # what it read: its half of the rows, every shard's header, and the small files (index, manifests)
        rows = epoch // 2 * BATCH * row_bytes
        small = len(storage.read_bytes(storage.join(s3_prefix, "manifest.json"))) * 4 + sum(
            len(storage.read_bytes(storage.file_url(s3_prefix, n))) for n in ("index.json",)
        )
        if layout == "partitioned":
            small += 2 * len(storage.read_bytes(storage.join(f"{s3_prefix}-part0", "manifest.json"))) * 3
        assert rows + headers <= fetched[-1] <= rows + headers + small, (fetched, rows, headers, small)
        assert fetched[-1] < 0.6 * shard_bytes + small
        # a second pass over the same batches is served from the row cache: no transfer
        before = storage.bytes_received()
        again = LatentDataset(s3_prefix, rank=rank, world_size=2, cache_dir=tmp_path / f"cache{rank}", **kw)
        assert [next(again)["keys"] for _ in range(epoch // 2)] == [b["keys"] for b in got]
        assert storage.bytes_received() - before <= small
    assert rows * 2 == N * row_bytes  # together the two ranks fetched every row once


@pytest.mark.s3
def test_a_tampered_row_is_refused(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    root = _write(tmp_path / "ds")
    storage.publish(root, s3_prefix, kind="dataset")
    entry = json.loads((root / "index.json").read_text())["shards"][2]
    raw = bytearray((root / shard_name(2)).read_bytes())
    raw[entry["header_bytes"] + 3 * (torch.Size(LAT).numel() * 4) + 5] ^= 0x01  # one bit of row 3's latents
    bucket, key = storage.file_url(s3_prefix, shard_name(2)).split("://", 1)[1].split("/", 1)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    ds = LatentDataset(s3_prefix, batch_size=1, seed=0, shuffle=False, cache_dir=tmp_path / "cache")
    for _ in range(2 * PER_SHARD + 3):  # shards 0 and 1, then rows 0..2 of shard 2 read fine
        next(ds)
    with pytest.raises(DatasetError, match=rf"row 3 of {shard_name(2)} in {s3_prefix}.*sha256"):
        next(ds)
    # a corrupt cached row is fetched again, not trusted
    ok = LatentDataset(s3_prefix, batch_size=1, seed=0, shuffle=False, cache_dir=tmp_path / "cache")
    first = next(ok)
    cached = list((tmp_path / "cache" / "ranges").rglob("*"))
    for f in cached:
        if f.is_file():
            f.write_bytes(b"x" + f.read_bytes()[1:])
    again = LatentDataset(s3_prefix, batch_size=1, seed=0, shuffle=False, cache_dir=tmp_path / "cache")
    assert torch.equal(next(again)["latents"], first["latents"])


@pytest.mark.s3
def test_an_index_without_row_digests_fetches_whole_files(
    s3_server, s3_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset prepared before the row digests still reads (whole shard files, hash-checked), with a note."""
    root = _write(tmp_path / "ds")
    index = json.loads((root / "index.json").read_text())
    for s in index["shards"]:
        for k in ("header_bytes", "header_sha256", "row_sha256"):
            del s[k]
    (root / "index.json").write_text(json.dumps(index))
    storage.publish(root, s3_prefix, kind="dataset")
    before = storage.bytes_received()
    ds = LatentDataset(s3_prefix, batch_size=BATCH, seed=5, rank=1, world_size=2, cache_dir=tmp_path / "c")
    local = LatentDataset(str(root), batch_size=BATCH, seed=5, rank=1, world_size=2)
    for _ in range(ds.batches_per_epoch // 2):
        assert torch.equal(next(ds)["latents"], next(local)["latents"])
    assert storage.bytes_received() - before >= sum(
        (root / s["file"]).stat().st_size for s in index["shards"]
    )
    assert "no per-row digests" in capsys.readouterr().err


@pytest.mark.s3
def test_a_selection_of_rows_reads_like_the_local_one(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    """A re-distillation window's dataset keeps some rows of each referenced shard (``rows``): read from S3 row
    by row it yields what the same merge over local partition artifacts yields (memory-mapped)."""
    from anyflow.data.partitions import KEYS, PARTITION_KIND, merge_partitions

    keep = {f"clip-{i:03d}" for i in (0, 2, 3, 5, 9, 10, 12, 15)}
    remote, local = [], []
    for p in range(2):
        root = _write(tmp_path / f"part{p}", first=p * N // 2, n=N // 2)
        index = json.loads((root / "index.json").read_text())
        rows = {}
        for s in index["shards"]:
            with safe_open(str(root / s["file"]), framework="pt") as f:
                rows[s["file"]] = [[k, k] for k in json.loads(f.metadata()["keys"])]
        (root / KEYS).write_text(json.dumps({"shards": rows}))
        remote.append(f"{s3_prefix}-part{p}")
        storage.publish(root, remote[-1], kind=PARTITION_KIND)
        local.append(str(tmp_path / f"local-part{p}"))
        storage.publish(root, local[-1], kind=PARTITION_KIND)
    merge_partitions(remote, tmp_path / "merged-s3", keep=keep)
    merge_partitions(local, tmp_path / "merged-local", keep=keep)
    assert any("rows" in s for s in json.loads((tmp_path / "merged-s3" / "index.json").read_text())["shards"])
    storage.publish(tmp_path / "merged-s3", s3_prefix, kind="dataset")
    kw = dict(batch_size=2, seed=1)
    want = LatentDataset(str(tmp_path / "merged-local"), **kw)
    got = LatentDataset(s3_prefix, cache_dir=tmp_path / "cache", **kw)
    seen = []
    for _ in range(want.batches_per_epoch):
        a, b = next(want), next(got)
        assert (
            a["keys"] == b["keys"]
            and torch.equal(a["latents"], b["latents"])
            and torch.equal(a["text"], b["text"])
        )
        seen += b["keys"]
    assert set(seen) == keep


def test_fetch_ranges_checks_the_digest_and_the_bounds(tmp_path: Path) -> None:
    """storage.fetch_ranges on a local artifact: the bytes of the ranges, concatenated, when their sha256 is the
    one given; an ArtifactError naming the file otherwise, and for a range past the listed size."""
    root = tmp_path / "art"
    root.mkdir()
    data = bytes(range(256)) * 4
    (root / "blob.bin").write_bytes(data)
    storage.publish(root, root, kind="test")
    want = data[10:20] + data[500:504]
    digest = hashlib.sha256(want).hexdigest()
    assert storage.fetch_ranges(root, "blob.bin", [(10, 10), (500, 4)], digest) == want
    with pytest.raises(storage.ArtifactError, match=r"blob.bin: bytes 10-19, 500-503 have sha256"):
        storage.fetch_ranges(root, "blob.bin", [(10, 10), (500, 4)], hashlib.sha256(b"x").hexdigest())
    with pytest.raises(storage.ArtifactError, match=r"bytes 1020-1029 lie outside the file \(1024 bytes"):
        storage.fetch_ranges(root, "blob.bin", [(1020, 10)], digest)


@pytest.mark.s3
def test_an_object_shorter_than_its_index_is_a_dataset_error(s3_server, s3_prefix: str, tmp_path: Path) -> None:
    """A shard replaced by its header alone: S3 answers the row's range with 416 InvalidRange, which must come
    out as the loader's one-sentence error naming shard and row, not botocore's ClientError."""
    root = _write(tmp_path / "ds")
    storage.publish(root, s3_prefix, kind="dataset")
    entry = json.loads((root / "index.json").read_text())["shards"][0]
    raw = (root / shard_name(0)).read_bytes()
    bucket, key = storage.file_url(s3_prefix, shard_name(0)).split("://", 1)[1].split("/", 1)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=raw[: entry["header_bytes"]])
    ds = LatentDataset(s3_prefix, batch_size=1, seed=0, shuffle=False, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match=rf"{shard_name(0)}.*shorter than the manifest says"):
        next(ds)


@pytest.mark.s3
def test_a_row_cache_that_cannot_be_written_does_not_stop_reading(s3_server, s3_prefix: str, tmp_path: Path,
                                                                 capsys) -> None:
    """The row cache is best effort (the rows are checked before it): a cache folder that is a file (as a full
    disk or a read-only mount would) gives one warning and the same samples as a local read."""
    root = _write(tmp_path / "ds")
    storage.publish(root, s3_prefix, kind="dataset")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ranges").write_text("not a folder")
    remote = LatentDataset(s3_prefix, batch_size=1, seed=0, shuffle=False, cache_dir=cache)
    local = LatentDataset(str(root), batch_size=1, seed=0, shuffle=False)
    for _ in range(PER_SHARD + 1):
        a, b = next(remote), next(local)
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
    err = capsys.readouterr().err
    assert err.count("cannot keep fetched rows") == 1, err
