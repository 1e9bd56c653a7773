"""Data preparation: videos + captions (folder / S3 prefix / CSV-JSONL index / webdataset tars /
``procedural``) → VAE latents (posterior mean, normalised) + text embeddings in streamable shards,
plus the negative-prompt embedding (docs/method.md §1.3–1.4, §10).

Inputs: none (the source is ``data.source``). Output: a dataset artifact (shards, index.json,
negative.safetensors, summary.json). Reads preset sections: model, data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from anyflow.config import Preset
from anyflow.stages import common

KIND = "dataset"
INPUTS: tuple[str, ...] = ()
SECTIONS = ("model", "data")


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True) -> dict:
    from anyflow.data.prepare import prepare
    from anyflow.models.text import WAN_NEGATIVE_PROMPT

    common.require_inputs("prepare_data", inputs, INPUTS)
    if not cfg.data.source:
        raise common.StageInputError(
            "data.source is empty: set it to a folder, s3:// prefix, .csv/.jsonl index, .tar shards or 'procedural:n=…'"
        )
    base = common.load_models(cfg)

    @torch.no_grad()
    def encode_video(video: torch.Tensor) -> torch.Tensor:
        return base.vae.encode(video)

    @torch.no_grad()
    def encode_text(captions: list[str]) -> torch.Tensor:
        return base.text.encode(captions)

    d = cfg.data
    summary = prepare(
        d.source, encode_video=encode_video, encode_text=encode_text, negative_prompt=WAN_NEGATIVE_PROMPT,
        out_dir=out_dir, frames=d.frames, height=d.height, width=d.width, fps=d.fps,
        samples_per_shard=d.samples_per_shard, strict=d.strict, progress=progress,
    )
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


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
