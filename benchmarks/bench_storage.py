"""Checkpoint write/read throughput: ``anyflow.storage.publish``/``fetch`` vs the same transfer done plainly.

* write: ``storage.publish`` of a one-file checkpoint vs boto3's TransferManager upload of the same file
  (``boto3.s3.transfer`` through ``client.upload_file``, with the client and ``TransferConfig`` the storage layer
  itself uses: ``anyflow._storage_s3.client(transfer=True)``, ``transfer_config()``). publish also hashes the
  file (sha256, for the manifest), writes the manifest with a conditional PUT and lists the prefix.
* read: ``storage.fetch`` into an empty cache vs one plain streamed ``get_object`` written to a local file with
  sha256 computed while reading (the work fetch has to do). fetch also reads and parses the manifest and
  verifies size and hash.

Both sides move the same bytes to/from the same S3 endpoint (a moto server started here on 127.0.0.1 unless
``--endpoint`` is given; the endpoint is printed). The default size, 256 MiB, is above the layer's multipart
threshold (``ANYFLOW_S3_MULTIPART_THRESHOLD``, 64 MiB), so uploads are multipart and concurrent on both sides.
Each round runs both sides once, the order reversed every other round (both orders); the table prints MB/s
(median) and anyflow / plain throughput as min / median of the per-round ratios with the number of pairs
(≥ 1: the layer is as fast as the plain transfer).

    python -m benchmarks.bench_storage                        # 256 MiB, 4 rounds
    python -m benchmarks.bench_storage --size-mb 72 --rounds 2   # the --quick smoke (still above 64 MiB)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path


def plain_upload(path: Path, url: str) -> None:
    """boto3's TransferManager upload with the storage layer's own client and transfer config, no retries
    wrapper, no hashing."""
    from anyflow import _storage_s3 as s3

    bucket, key = s3.split(url)
    s3.client(transfer=True).upload_file(str(path), bucket, key, Config=s3.transfer_config())


def plain_get(url: str, dest: Path, chunk: int = 1 << 20) -> str:
    """One streamed ``get_object`` into ``dest``, sha256 computed while reading; returns the hex digest."""
    from anyflow import _storage_s3 as s3

    bucket, key = s3.split(url)
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"]
    h = hashlib.sha256()
    with open(dest, "wb") as f:
        while data := body.read(chunk):
            f.write(data)
            h.update(data)
    return h.hexdigest()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(size_mb: int, bucket: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of ``write_plain``, ``write_anyflow``, ``read_plain``, ``read_anyflow``."""
    from anyflow import storage

    work = Path(tempfile.mkdtemp(prefix="anyflow-bench-"))
    try:
        src = work / "ckpt"
        src.mkdir()
        big = src / "model.safetensors"
        with open(big, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(2**20))
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        times: dict[str, list[float]] = {
            "write_plain": [],
            "write_anyflow": [],
            "read_plain": [],
            "read_anyflow": [],
        }
        for i in range(rounds):
            tag = uuid.uuid4().hex[:8]
            raw_url, art_url = (
                f"s3://{bucket}/bench-raw-{tag}/model.safetensors",
                f"s3://{bucket}/bench-art-{tag}",
            )
            cache, raw_dest = work / f"cache-{i}", work / f"raw-{i}.bin"
            writes = [
                ("write_plain", lambda u=raw_url: plain_upload(big, u)),
                ("write_anyflow", lambda u=art_url: storage.publish(src, u, kind="bench")),
            ]
            got: dict[str, str] = {}
            reads = [
                ("read_plain", lambda u=raw_url, d=raw_dest, g=got: g.__setitem__("plain", plain_get(u, d))),
                (
                    "read_anyflow",
                    lambda u=art_url, c=cache, g=got: g.__setitem__(
                        "anyflow", str(storage.fetch(u, cache_dir=c))
                    ),
                ),
            ]
            if i % 2:  # both orders
                writes.reverse()
                reads.reverse()
            for name, fn in [*writes, *reads]:
                times[name].append(_timed(fn))
            if got["plain"] != digest or not (Path(got["anyflow"]) / big.name).is_file():
                raise RuntimeError("bench_storage: a read returned other bytes than were written")
            storage.delete([raw_url])
            from anyflow import _storage_s3 as s3

            storage.delete([storage.join(art_url, o["key"]) for o in s3.list_objects(art_url)])
            shutil.rmtree(cache, ignore_errors=True)
            raw_dest.unlink(missing_ok=True)
        return times
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size-mb",
        type=int,
        default=256,
        help="checkpoint size in MiB (default 256; above the 64 MiB multipart threshold)",
    )
    ap.add_argument("--rounds", type=int, default=4, help="rounds, each running both sides once (default 4)")
    ap.add_argument("--endpoint", help="use this S3 endpoint instead of starting a local moto server")
    ap.add_argument("--bucket", default="anyflow-bench", help="bucket to use (created if missing)")
    args = ap.parse_args(argv)
    if args.size_mb < 1 or args.rounds < 1:
        ap.error(f"--size-mb and --rounds must be at least 1, got {args.size_mb} and {args.rounds}")

    from benchmarks._s3 import s3_endpoint

    with s3_endpoint(args.endpoint, args.bucket) as where:
        times = run(args.size_mb, args.bucket, args.rounds)
    from anyflow import _storage_s3

    threshold = _storage_s3.transfer_config().multipart_threshold / 2**20
    print(
        f"\n{args.size_mb} MiB checkpoint ({'above' if args.size_mb > threshold else 'NOT above'} the {threshold:g} MiB"
        f" multipart threshold), {where}; {args.rounds} rounds, both orders"
    )
    size = args.size_mb * 2**20 / 1e6
    print(
        f"{'operation':<52}{'plain MB/s':>12}{'anyflow MB/s':>14}{'anyflow/plain min':>19}{'median':>8}{'pairs':>7}"
    )
    for op, plain in (
        ("write: publish vs TransferManager upload", "write"),
        ("read: fetch vs streamed GET + sha256", "read"),
    ):
        p, a = times[f"{plain}_plain"], times[f"{plain}_anyflow"]
        ratios = [pp / aa for pp, aa in zip(p, a, strict=True)]  # throughput ratio = time ratio inverted
        print(
            f"{op:<52}{size / statistics.median(p):>12.1f}{size / statistics.median(a):>14.1f}"
            f"{min(ratios):>19.2f}{statistics.median(ratios):>8.2f}{len(ratios):>7}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
