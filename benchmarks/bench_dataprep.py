"""Data-preparation throughput (clips/s) for the tiny VAE and a mid-size Wan VAE, printed as a table; then a
partitioned prepare_data on 1 and P CPU workers side by side, and the analytic time for 10^5 clips at the 1.3B shape.

    python -m benchmarks.bench_dataprep                 # both VAEs, procedural + mp4 sources
    python -m benchmarks.bench_dataprep --clips 16 --vaes mid --device cuda
    python -m benchmarks.bench_dataprep --vaes tiny --workers 2 --worker-clips 16 --repeats 5
    python -m benchmarks.bench_dataprep --vaes '' --workers 0 --no-estimate --rank-bytes 1,2,4

For each VAE it runs ``anyflow.data.prepare.prepare`` end to end (source → decode/resample/resize →
VAE encode → text encode → shards) on the same clips from two sources: ``procedural`` (rendered in
memory) and ``mp4`` (the same clips written as H.264 files first, so the row includes ffmpeg
decoding), and also times the VAE encode alone on one batch, so the table shows where the time goes.
Numbers are wall-clock on whatever machine runs it; compare rows of one run, not across machines.

**Workers** (``--workers P``, 0 skips): the same procedural clips prepared with ``data.partition_size`` =
clips / P (``anyflow.data.partitions``) by 1 worker process (every partition in turn) and by P worker processes
(one partition each, as P ``prepare_partition`` pods would), each with one torch thread and its own encoders,
into a fresh store each time, then merged; the two are alternated ``--repeats`` times and the table gives
min / median clips/s and the count, of the wall time (process start, imports and merge included, as a pod's
start is) and of the slowest worker's own time (model build + encode + publish).

**Bytes per rank** (``--rank-bytes 1,2,4``, '' skips): a small bf16 dataset (64 samples of 48 KiB, 8 per shard)
published to a moto S3 server started on 127.0.0.1 and read by each rank of W in the one global order
(``anyflow.data.shards``), one cache folder per rank as each pod has: the bytes each rank receives
(``anyflow.storage.bytes_received``) over the first epoch and over four, beside the dataset's shard bytes, and the
same for an index written before the row digests (whole shard files). Only the rank bytes run:
``--vaes '' --workers 0 --no-estimate``.

**Estimate** (``--no-estimate`` skips): VAE-encoder FLOPs of one 81 x 480 x 832 clip (the 1.3B preset's shape),
counted by ``torch.utils.flop_counter`` on fake tensors of diffusers' ``AutoencoderKLWan`` with Wan2.1's
defaults, and UMT5-XXL's encoder as 2 x params x 512 tokens; the time for N clips on P GPUs is
``model load + ceil(N / P) x (decode + VAE + text)`` with the assumptions printed beside it (achieved fraction of
the H100's dense bf16 peak, CPU decode time per clip, no overlap of decode and encode inside a worker: the
prepare loop is sequential).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from anyflow.data.prepare import prepare
from anyflow.data.procedural import make_clip
from anyflow.data.video import VideoSpec, frames_to_tensor, write_video
from anyflow.models.tiny import build_tiny_text_encoder, build_tiny_vae
from anyflow.models.vae import VideoVAE

# name -> (AutoencoderKLWan kwargs or None for the tiny preset VAE, frames, height, width)
VAES: dict[str, tuple[dict | None, int, int, int]] = {
    "tiny": (None, 9, 32, 32),
    # A mid-size Wan VAE: a third of Wan2.1's width (base_dim 32 vs 96), 16 latent channels, 17 frames at 128².
    "mid": ({"base_dim": 32, "z_dim": 16, "num_res_blocks": 2}, 17, 128, 128),
}
FPS = 16


def _vae(name: str, device: str) -> VideoVAE:
    kwargs = VAES[name][0]
    if kwargs is None:
        model = build_tiny_vae(seed=0)
    else:
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan(**kwargs).eval()  # random weights: throughput does not depend on them
    return VideoVAE(model.to(device))


def _bench(name: str, clips: int, batch: int, device: str, work: Path) -> list[tuple]:
    _, frames, height, width = VAES[name]
    vae, text = _vae(name, device), build_tiny_text_encoder(seed=0).to(device)
    spec = VideoSpec(frames=frames, fps=FPS, height=height, width=width)
    mp4s = work / f"{name}-mp4"
    mp4s.mkdir()
    for i in range(clips):  # the procedural clips as files, one source frame per target frame
        clip = make_clip(0, i, frames=frames, height=height, width=width)
        write_video(mp4s / f"{i:04d}.mp4", clip.video, fps=FPS)
        (mp4s / f"{i:04d}.txt").write_text(clip.caption)

    def encode_video(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x.to(device))

    rows = []
    x = torch.stack([frames_to_tensor(make_clip(0, i, frames=frames, height=height, width=width).video, spec)
                     for i in range(batch)])
    encode_video(x)  # warm-up
    text.encode(["warm up"])
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    encode_video(x)
    if device == "cuda":
        torch.cuda.synchronize()
    vae_rate = batch / (time.perf_counter() - t)
    params = sum(p.numel() for p in vae.vae.parameters()) / 1e6
    for source in ("procedural", "mp4"):
        spec_str = f"procedural:n={clips},seed=0" if source == "procedural" else str(mp4s)
        summary = prepare(spec_str, encode_video=encode_video, encode_text=text.encode, negative_prompt="",
                          out_dir=work / f"{name}-{source}", frames=frames, height=height, width=width, fps=FPS,
                          samples_per_shard=64, progress=False, batch_size=batch)
        assert summary["clips_written"] == clips, summary
        rows.append((name, f"{params:.2f}M", f"{frames}x{height}x{width}", source, clips, summary["seconds"],
                     summary["clips_per_s"], round(vae_rate, 3)))
    return rows


# ------------------------------------------------------------------------------------------ workers


def _worker_cfg(clips: int, size: int):
    from anyflow.config import apply_overrides, get_preset

    frames, height, width = VAES["tiny"][1:]
    return apply_overrides(get_preset("tiny"), {
        "data.source": f"procedural:n={clips},seed=0", "data.partition_size": size, "data.frames": frames,
        "data.height": height, "data.width": width, "data.fps": FPS, "data.samples_per_shard": 64})


def _tiny_encoders():
    vae, text = VideoVAE(build_tiny_vae(seed=0)), build_tiny_text_encoder(seed=0)
    return vae.encode, text.encode


def _encode_partitions(clips: int, size: int, store: str, indexes: list[int]) -> tuple[int, float]:
    """One worker process: encode partitions ``indexes`` with one torch thread; returns (partitions encoded,
    seconds in this function: model build + encode + publish, without the interpreter start and imports)."""
    t = time.perf_counter()
    from anyflow.data.partitions import prepare_partitioned

    torch.set_num_threads(1)
    summary, _ = prepare_partitioned(f"procedural:n={clips},seed=0", _worker_cfg(clips, size), store, ".",
                                     load_encoders=_tiny_encoders, only=indexes)
    assert summary["partitions_encoded"] == len(indexes), summary
    return len(indexes), time.perf_counter() - t


def _partitioned_run(clips: int, workers: int, parts: int, work: Path) -> tuple[float, float]:
    """(wall seconds, slowest worker's in-function seconds) to prepare ``clips`` clips in ``parts`` partitions on
    ``workers`` processes; the wall time includes the processes' start and the merge."""
    from anyflow.data.partitions import merge_partitions, plan_partitions

    size = math.ceil(clips / parts)
    store = tempfile.mkdtemp(prefix="store-", dir=work)
    n_parts = len(plan_partitions(f"procedural:n={clips},seed=0", size))
    groups = [list(range(w, n_parts, workers)) for w in range(workers)]
    t = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_encode_partitions, [clips] * workers, [size] * workers, [store] * workers, groups))
    assert sum(n for n, _ in done) == n_parts
    from anyflow.data.partitions import partition_url

    cfg = _worker_cfg(clips, size)
    urls = [partition_url(store, p, cfg) for p in plan_partitions(cfg.data.source, size)]
    summary = merge_partitions(urls, tempfile.mkdtemp(prefix="ds-", dir=work))
    assert summary["clips_written"] == clips, summary
    return time.perf_counter() - t, max(s for _, s in done)


def bench_workers(clips: int, workers: int, repeats: int, work: Path) -> list[tuple]:
    """1 worker vs ``workers`` workers on the same ``workers`` partitions, alternated ``repeats`` times: clips/s
    of the wall time (process start and merge included) and of the slowest worker's own time."""
    wall: dict[int, list[float]] = {1: [], workers: []}
    inner: dict[int, list[float]] = {1: [], workers: []}
    for r in range(repeats):
        order = (1, workers) if r % 2 == 0 else (workers, 1)
        for w in order:
            total, slowest = _partitioned_run(clips, w, workers, work)
            wall[w].append(clips / total)
            inner[w].append(clips / slowest)
    med = statistics.median
    return [(w, workers, clips, round(min(wall[w]), 3), round(med(wall[w]), 3), round(min(inner[w]), 3),
             round(med(inner[w]), 3), len(wall[w]), round(med(inner[w]) / med(inner[1]), 2)) for w in wall]


# ----------------------------------------------------------------------------------------- estimate

#: Wan2.1 1.3B preset clip (frames x height x width) and UMT5-XXL encoder (params, tokens)
CLIP_1_3B = (81, 480, 832)
UMT5_XXL_ENCODER_PARAMS = 5.7e9  # google/umt5-xxl's encoder half (the text encoder Wan2.1 uses)
TEXT_TOKENS = 512
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 peak (NVIDIA datasheet)


def vae_encode_flops(frames: int, height: int, width: int) -> float:
    """FLOPs of diffusers' AutoencoderKLWan (Wan2.1 defaults) encoding one clip, counted on fake tensors."""
    from diffusers import AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(), torch.no_grad():
        vae = AutoencoderKLWan()
        with FlopCounterMode(display=False) as counter:
            vae.encode(torch.empty(1, 3, frames, height, width))
    return float(counter.get_total_flops())


def estimate_rows(n_clips: int, gpus: tuple[int, ...], vae_flops: float, *, utilisations=(0.15, 0.35),
                  decode_s: float = 0.2, load_s: float = 120.0, merge_s: float = 60.0) -> list[tuple]:
    """Hours for ``n_clips`` on P GPUs, for each assumed fraction of the bf16 peak."""
    text_flops = 2 * UMT5_XXL_ENCODER_PARAMS * TEXT_TOKENS
    rows = []
    for u in utilisations:
        per_clip = decode_s + (vae_flops + text_flops) / (H100_BF16_DENSE * u)
        for p in gpus:
            hours = (load_s + math.ceil(n_clips / p) * per_clip + merge_s) / 3600
            rows.append((p, u, round(per_clip, 3), round(hours, 2)))
    return rows


def rank_bytes_rows(world_sizes: tuple[int, ...], work: Path, *, bucket: str, n: int = 64, per_shard: int = 8,
                    batch: int = 2, epochs: int = 4) -> tuple[dict[str, int], list[tuple]]:
    """Bytes each rank of W fetches from S3 (``anyflow.storage.bytes_received``) reading a small prepared dataset
    (``n`` samples of bf16 latents (4, 16, 16, 16) and text (64, 128), ``per_shard`` per shard) in the one global
    order, ``batch`` samples per rank and step: over the first epoch and over ``epochs`` epochs (each rank with
    its own cache folder, as each pod has), with the row digests of index.json (ranged row reads) and with an
    index written before them (whole shard files). The S3 endpoint comes from the environment; returns the
    dataset's sizes and one row per (W, rank)."""
    from anyflow import storage
    from anyflow.data.shards import NEGATIVE, NEGATIVE_KEY, LatentDataset, ShardWriter

    root = work / "dataset"
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(root, samples_per_shard=per_shard, dtype=torch.bfloat16)
    for i in range(n):
        writer.add(f"clip-{i:05d}", torch.randn(4, 16, 16, 16, generator=g), torch.randn(64, 128, generator=g),
                   f"caption {i}")
    index = writer.close()
    from safetensors.torch import save_file

    save_file({NEGATIVE_KEY: torch.zeros(1, 64, 128, dtype=torch.bfloat16)}, str(root / NEGATIVE))
    old = work / "old-index"
    shutil.copytree(root, old)
    plain = {**index, "shards": [{"file": s["file"], "num_samples": s["num_samples"]} for s in index["shards"]]}
    (old / "index.json").write_text(json.dumps(plain, indent=2) + "\n")
    run = uuid.uuid4().hex[:8]
    urls = {"rows": f"s3://{bucket}/rank-bytes-{run}/rows", "whole": f"s3://{bucket}/rank-bytes-{run}/whole"}
    storage.publish(root, urls["rows"], kind="dataset")
    storage.publish(old, urls["whole"], kind="dataset")
    sizes = {"shards": sum((root / s["file"]).stat().st_size for s in index["shards"]),
             "index": (root / "index.json").stat().st_size, "old_index": (old / "index.json").stat().st_size}
    rows = []
    for w in world_sizes:
        per_rank: dict[str, list[int]] = {}
        for how, url in urls.items():
            for rank in range(w):
                cache = work / f"cache-{how}-{w}-{rank}"
                before = storage.bytes_received()
                ds = LatentDataset(url, batch_size=batch, seed=0, rank=rank, world_size=w, cache_dir=cache)
                if ds.batches_per_epoch % w:
                    raise ValueError(f"{ds.batches_per_epoch} batches per epoch do not split over {w} ranks")
                counts = []
                with contextlib.redirect_stderr(io.StringIO()):  # the old index's note, once per rank
                    for _ in range(epochs):
                        for _ in range(ds.batches_per_epoch // w):
                            next(ds)
                        counts.append(storage.bytes_received() - before)
                per_rank.setdefault(how, []).append(counts[0])
                per_rank.setdefault(how + "_all", []).append(counts[-1])
        for rank in range(w):
            rows.append((w, rank, per_rank["rows"][rank], f"{per_rank['rows'][rank] / sizes['shards']:.3f}",
                         per_rank["rows_all"][rank], f"{per_rank['rows_all'][rank] / sizes['shards']:.3f}",
                         per_rank["whole"][rank], per_rank["whole_all"][rank]))
    return sizes, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4, help="clips per run (default 4)")
    parser.add_argument("--batch", type=int, default=4, help="clips per VAE call (default 4)")
    parser.add_argument("--vaes", default="tiny,mid", help="comma-separated subset of: " + ", ".join(VAES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2,
                        help="partitioned run: P worker processes vs 1, on the CPU (default 2; 0 skips)")
    parser.add_argument("--worker-clips", type=int, default=8, help="clips of the partitioned run (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated repeats of 1 and P workers (default 3)")
    parser.add_argument("--rank-bytes", default="1,2,4",
                        help="world sizes W for the bytes-per-rank table of an S3 dataset on a local moto server "
                             "(default 1,2,4; '' skips)")
    parser.add_argument("--no-estimate", action="store_true",
                        help="skip the analytic 10^5-clip estimate (it counts the VAE's FLOPs: ~20 s on 2 cores)")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.worker_clips < max(1, args.workers) or args.repeats < 1:
        parser.error(f"--workers {args.workers} must be >= 0, --worker-clips {args.worker_clips} >= --workers, and "
                     f"--repeats {args.repeats} >= 1")
    names = [n.strip() for n in args.vaes.split(",") if n.strip()]
    unknown = [n for n in names if n not in VAES]
    if unknown:
        parser.error(f"unknown VAE {unknown}; choose from {list(VAES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dataprep-") as tmp:
        for name in names:
            rows += _bench(name, args.clips, args.batch, args.device, Path(tmp))
    header = ("vae", "params", "T x H x W", "source", "clips", "seconds", "clips/s", "vae-only clips/s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"device={args.device} torch threads={torch.get_num_threads()}")
    for r in [header, *rows] if rows else []:  # --vaes '' skips the encode table
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))
    if args.workers:
        with tempfile.TemporaryDirectory(prefix="bench-partitions-") as tmp:
            wrows = bench_workers(args.worker_clips, args.workers, args.repeats, Path(tmp))
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\npartitioned prepare_data (tiny VAE, {VAES['tiny'][1]}x{VAES['tiny'][2]}x{VAES['tiny'][3]}, CPU, one "
              f"torch thread per worker, {args.workers} partitions, alternated; {os.cpu_count()} CPUs, load average "
              f"{load}):")
        _table(("workers", "partitions", "clips", "wall min clips/s", "wall median", "worker min clips/s",
                "worker median", "count", "worker x 1"), wrows)
    if args.rank_bytes.strip():
        _print_rank_bytes(tuple(int(w) for w in args.rank_bytes.split(",") if w.strip()))
    if not args.no_estimate:
        flops = vae_encode_flops(*CLIP_1_3B)
        print(f"\nestimate: 10^5 clips at {CLIP_1_3B[0]}x{CLIP_1_3B[1]}x{CLIP_1_3B[2]} (1.3B preset) on P H100s; VAE "
              f"encode {flops / 1e12:.1f} TFLOP/clip (counted), UMT5-XXL {2 * UMT5_XXL_ENCODER_PARAMS * TEXT_TOKENS / 1e12:.1f}"
              f" TFLOP/caption (2 x params x {TEXT_TOKENS}); assumed: decode 0.2 s/clip on the pod's CPUs, not overlapped"
              "; 120 s model load per pod, 60 s merge; u = achieved fraction of 989 TFLOP/s dense bf16:")
        _table(("GPUs", "u", "s/clip/GPU", "hours"), estimate_rows(100_000, (1, 8, 32, 64), flops))
    return 0


def _print_rank_bytes(world_sizes: tuple[int, ...], epochs: int = 4) -> None:
    """Start a moto S3 server on 127.0.0.1 (tests/s3server.py), run :func:`rank_bytes_rows`, print the table."""
    import sys

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    from s3server import FAKE_ENV, MotoServer

    server = MotoServer().start()
    saved = {k: os.environ.get(k) for k in [*FAKE_ENV, "AWS_ENDPOINT_URL", "ANYFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3"]}
    try:
        os.environ.update({**FAKE_ENV, "AWS_ENDPOINT_URL": server.endpoint})
        for k in ("ANYFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(k, None)
        from anyflow import _storage_s3

        _storage_s3.client().create_bucket(Bucket="anyflow-bench")
        with tempfile.TemporaryDirectory(prefix="bench-rank-bytes-") as tmp:
            sizes, rows = rank_bytes_rows(world_sizes, Path(tmp), bucket="anyflow-bench", epochs=epochs)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"\nbytes fetched from S3 per rank (moto on loopback; storage.bytes_received), one global order, 64 "
          f"samples of 48 KiB (bf16), 8 per shard, 2 per rank and step: dataset shard files {sizes['shards']} bytes, "
          f"index.json {sizes['index']} bytes with row digests ({sizes['old_index']} without); 'whole files' = the "
          f"same dataset with an index written before the row digests:")
    _table(("W", "rank", "epoch 1 bytes", "/ dataset", f"epochs 1-{epochs}", "/ dataset", "whole files epoch 1",
            f"whole files 1-{epochs}"), rows)


def _table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    raise SystemExit(main())
