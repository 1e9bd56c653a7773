"""Checkpoint write/read throughput: ``anyflow.storage.publish``/``fetch`` vs raw ``s3fs`` put/get.

Both sides move the same bytes to/from the same local S3 server (a moto server started here on
127.0.0.1 unless ``--endpoint`` is given) in one run; the table shows MB/s and the ratio
anyflow / s3fs. publish/fetch include what raw put/get does not: sha256 of every byte, the manifest,
and (fetch) verification.

    python -m benchmarks.bench_storage --size-mb 128
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed(fn: Callable[..., object], *args: object, **kw: object) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def run(size_mb: int, endpoint: str | None, bucket: str, repeat: int) -> list[tuple[str, float, float]]:
    """Return rows ``(operation, s3fs MB/s, anyflow MB/s)`` (best of ``repeat``)."""
    from anyflow import storage

    work = Path(tempfile.mkdtemp(prefix="anyflow-bench-"))
    try:
        src = work / "ckpt"
        src.mkdir()
        big = src / "model.safetensors"
        with open(big, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(2**20))
        size = big.stat().st_size / 1e6
        fs, _ = storage.fs_and_path(f"s3://{bucket}/x")
        rows: dict[str, list[float]] = {"write": [], "read": [], "write_a": [], "read_a": []}
        for i in range(repeat):
            tag = uuid.uuid4().hex[:8]
            raw_key = f"{bucket}/bench-raw-{tag}/model.safetensors"
            rows["write"].append(_timed(fs.put_file, str(big), raw_key))
            rows["read"].append(_timed(fs.get_file, raw_key, str(work / f"raw-{i}.bin")))
            url = f"s3://{bucket}/bench-art-{tag}"
            rows["write_a"].append(_timed(storage.publish, src, url, kind="bench"))
            cache = work / f"cache-{i}"
            rows["read_a"].append(_timed(storage.fetch, url, cache_dir=cache))
            fs.rm(f"{bucket}/bench-raw-{tag}", recursive=True)
            fs.rm(f"{bucket}/bench-art-{tag}", recursive=True)
            for p in (work / f"raw-{i}.bin", cache):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return [("checkpoint write (put / publish)", size / min(rows["write"]), size / min(rows["write_a"])),
                ("checkpoint read (get / fetch)", size / min(rows["read"]), size / min(rows["read_a"]))]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=128, help="checkpoint size in MiB (default 128)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per operation; the best is reported")
    ap.add_argument("--endpoint", help="use this S3 endpoint instead of starting a local moto server")
    ap.add_argument("--bucket", default="anyflow-bench", help="bucket to use (created if missing)")
    args = ap.parse_args(argv)

    server = None
    if args.endpoint is None:
        sys.path.insert(0, str(REPO / "tests"))
        from s3server import FAKE_ENV, MotoServer

        server = MotoServer().start()
        os.environ.update(FAKE_ENV)
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    else:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    try:
        from anyflow import _storage_s3

        client = _storage_s3.client()
        try:
            client.head_bucket(Bucket=args.bucket)
        except Exception:
            client.create_bucket(Bucket=args.bucket)
        rows = run(args.size_mb, args.endpoint, args.bucket, args.repeat)
    finally:
        if server is not None:
            server.stop()
    where = args.endpoint or "local moto server"
    print(f"\n{args.size_mb} MiB checkpoint, {where}, best of {args.repeat}")
    print(f"{'operation':<36}{'s3fs MB/s':>12}{'anyflow MB/s':>15}{'ratio':>8}")
    for name, raw, ours in rows:
        print(f"{name:<36}{raw:>12.1f}{ours:>15.1f}{ours / raw:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
