"""Data preparation: raw clips → VAE latents + text embeddings in shards (``anyflow.data.shards``).

``prepare()`` is the library half of the ``prepare_data`` stage: it takes already-built encoders as
plain callables and a local output folder, so the stage module only resolves the preset, builds the
models and publishes the folder with ``anyflow.storage.publish``.

Bad inputs (undecodable video, too short, wrong size, missing caption or video, bad metadata) are
skipped and counted by reason — never a crash, never a silent drop — and ``strict=True`` makes the
first one fatal. The output folder gets the shards, ``index.json``, ``negative.safetensors`` (the
negative-prompt embedding used for CFG and text dropout, docs/method.md §1.4) and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from anyflow.data.shards import NEGATIVE, NEGATIVE_KEY, ShardWriter
from anyflow.data.sources import RawClip, SkippedRecord, open_source
from anyflow.data.video import DUPLICATE_KEY, MISSING_CAPTION, ClipError, VideoSpec
from anyflow.progress import Progress

EncodeVideo = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, T, H, W) in [-1, 1] -> (B, F, C, h, w)
EncodeText = Callable[[list[str]], torch.Tensor]  # list of B captions -> (B, L, D)
_EXAMPLES_PER_REASON = 5


class DataPrepError(RuntimeError):
    """Data preparation cannot continue (strict mode hit a bad input, or nothing usable was found)."""


def prepare(
    source: Iterable[RawClip | SkippedRecord] | str,
    *,
    encode_video: EncodeVideo,
    encode_text: EncodeText,
    negative_prompt: str,
    out_dir: str | os.PathLike[str],
    frames: int,
    height: int,
    width: int,
    fps: float,
    samples_per_shard: int,
    strict: bool = False,
    progress: bool = True,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
    max_upscale: float = 2.0,
    require_samples: bool = True,
) -> dict[str, Any]:
    """Encode a clip source into a prepared dataset folder and return the summary.

    Args:
        source: records from ``anyflow.data.sources`` or a source spec string for ``open_source``.
        encode_video: VAE encoder, (B, 3, T, H, W) in [-1, 1] → latents (B, F, C, h, w) (the VAE mean).
        encode_text: text encoder, list of B captions → (B, L, D).
        negative_prompt: encoded once into ``negative.safetensors`` as (1, L, D).
        out_dir: local output folder (created; publish it with ``anyflow.storage.publish``).
        frames, height, width, fps: clip geometry every video is resampled/resized to.
        samples_per_shard: rows per shard file.
        strict: raise :class:`DataPrepError` on the first bad input instead of skipping it.
        progress: report clips read (written, skipped, ETA when the count is known) as ``[anyflow] prepare_data:``
            progress lines (:mod:`anyflow.progress`) on stderr, and print the summary line at the end.
        batch_size: clips per VAE call.
        dtype: shard storage dtype.
        limit: stop after this many records (None: all).
        max_upscale: videos smaller than (height, width) / max_upscale are skipped as ``wrong_size``.
        require_samples: raise :class:`DataPrepError` when no clip was usable; a partition of a partitioned run
            (``anyflow.data.partitions``) passes False, and the merge checks the whole dataset instead.

    Returns:
        The summary written to ``summary.json`` -- clips read/written/skipped, ``skipped`` counts by reason, a
        few example keys per reason, shapes -- plus this run's seconds and clips/s (returned, not written).
    """
    source_name = source if isinstance(source, str) else type(source).__name__
    total = limit if limit is not None else _known_length(source)
    if isinstance(source, str):
        source = open_source(source)
    spec = VideoSpec(frames=frames, fps=fps, height=height, width=width, max_upscale=max_upscale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, samples_per_shard=samples_per_shard, dtype=dtype)
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    read = 0
    seen: set[str] = set()
    pending: list[tuple[str, str, torch.Tensor]] = []
    start = time.perf_counter()
    bar = Progress("prepare_data", total, unit="clip", enabled=progress)

    def skip(key: str, reason: str, detail: str) -> None:
        if strict:
            raise DataPrepError(
                f"clip {key!r} is unusable: {reason}" + (f" ({detail})" if detail else "")
                + "; fix or remove it, or run without --strict to skip bad inputs"
            )
        skipped[reason] += 1
        if len(examples.setdefault(reason, [])) < _EXAMPLES_PER_REASON:
            examples[reason].append(f"{key}: {detail}" if detail else key)

    def flush() -> None:
        if not pending:
            return
        keys, captions, videos = zip(*pending, strict=True)
        with torch.no_grad():
            latents = encode_video(torch.stack(videos))
            text = encode_text(list(captions))
        if latents.ndim != 5 or latents.shape[0] != len(keys) or text.ndim != 3 or text.shape[0] != len(keys):
            raise ValueError(
                f"encoders returned latents {tuple(latents.shape)} and text {tuple(text.shape)} for a batch of "
                f"{len(keys)}; expected (B, F, C, h, w) and (B, L, D)"
            )
        for i, key in enumerate(keys):
            writer.add(key, latents[i], text[i], captions[i])
        pending.clear()

    try:
        for record in source:
            if limit is not None and read >= limit:
                break
            read += 1
            if isinstance(record, SkippedRecord):
                skip(record.key, record.reason, record.detail)
            elif not record.caption or not record.caption.strip():
                skip(record.key, MISSING_CAPTION, "empty caption")
            elif record.key in seen:
                skip(record.key, DUPLICATE_KEY, "an earlier record has the same key")
            else:
                seen.add(record.key)
                try:
                    pending.append((record.key, record.caption, record.load(spec)))
                except ClipError as e:
                    skip(record.key, e.reason, e.detail)
                if len(pending) >= batch_size:
                    flush()
            bar.update(1, detail=f"written {writer.num_samples + len(pending)}, skipped {sum(skipped.values())}")
        flush()
    finally:
        bar.close()
    index = writer.close()

    with torch.no_grad():
        negative = encode_text([negative_prompt])
    if negative.ndim != 3 or negative.shape[0] != 1:
        raise ValueError(f"encode_text([negative_prompt]) returned {tuple(negative.shape)}; expected (1, L, D)")
    save_file({NEGATIVE_KEY: negative.detach().to("cpu", torch.float32).contiguous()}, str(out / NEGATIVE))

    seconds = time.perf_counter() - start
    written = index["num_samples"]
    summary: dict[str, Any] = {
        "clips_read": read,
        "clips_written": written,
        "clips_skipped": sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "num_shards": len(index["shards"]),
        "latents_shape": index["latents"]["shape"],
        "text_shape": index["text"]["shape"],
        "source": source_name,
        "video": {"frames": frames, "fps": fps, "height": height, "width": width},
        "negative_prompt": negative_prompt,
    }
    # summary.json holds what the dataset is; how long this run took goes only to the returned dict (the
    # stage's metrics and progress line), so two runs over the same input write byte-identical artifacts
    # and re-encoding identical data keeps every downstream stage key (storage.content_digest)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary |= {"seconds": round(seconds, 3), "clips_per_s": round(written / seconds, 3) if seconds > 0 else None}
    if progress:
        reasons = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
        print(
            f"prepare_data: read {read}, wrote {written} in {summary['num_shards']} shards, "
            f"skipped {summary['clips_skipped']} ({reasons}), {summary['clips_per_s']} clips/s → {out}"
        )
    if written == 0 and require_samples:
        raise DataPrepError(
            f"no usable clips: read {read}, skipped {summary['clips_skipped']} ({dict(skipped)}); "
            f"see {out / 'summary.json'} for examples and check the source"
        )
    return summary


def prepare_data_section(source: Any, data: Any, *, encode_video: Any, encode_text: Any, out_dir: str | Path,
                         progress: bool = False, **kw: Any) -> dict[str, Any]:
    """:func:`prepare` with a preset's ``data`` section (clip geometry, fps, sharding, strictness) and Wan's
    negative prompt: what the prepare_data stage, each partition and the re-distillation window encode."""
    from anyflow.models.text import WAN_NEGATIVE_PROMPT

    return prepare(
        source, encode_video=encode_video, encode_text=encode_text, negative_prompt=WAN_NEGATIVE_PROMPT,
        out_dir=out_dir, frames=data.frames, height=data.height, width=data.width, fps=data.fps,
        samples_per_shard=data.samples_per_shard, strict=data.strict, progress=progress, **kw,
    )


def summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The manifest metrics of a prepared dataset: the scalar fields of its summary (counts, ``source``), without
    the nested ones (skip reasons, examples, shapes) and without booleans -- what the prepare_data stage, each
    partition artifact and the re-distillation window publish, and what a KFP component then logs (its numbers)
    to its ``Output[Metrics]`` (components/_io.py ``log_metrics``)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _known_length(source: Any) -> int | None:
    """How many records ``source`` holds when that is known before reading it (a sized iterable, or a
    ``procedural`` spec), for the progress line's total and ETA; ``None`` otherwise (the count alone)."""
    if isinstance(source, str):
        if source == "procedural" or source.startswith("procedural:"):
            from anyflow.data.sources import parse_procedural

            try:
                return parse_procedural(source)["n"]
            except ValueError:
                return None  # open_source reports the malformed spec
        return None
    try:
        return len(source)
    except TypeError:
        return None
