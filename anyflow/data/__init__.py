"""Datasets: raw clip sources → prepared latent/text shards → the training loader.

Modules (import them directly; this package imports nothing heavy):

* ``procedural`` — built-in captioned moving-shape videos and ``measure_attributes`` (prompt adherence).
* ``video`` — mp4 decoding (imageio-ffmpeg), fps resampling, resize, ``ClipError`` skip reasons.
* ``sources`` — folders / S3 prefixes with sidecar captions, CSV/JSONL indexes, webdataset tars, procedural.
* ``prepare`` — ``prepare()``: encode a source into shards + ``negative.safetensors`` + ``summary.json``.
* ``shards`` — ``ShardWriter`` and ``LatentDataset`` (streams local or S3 shards; seeded, rank-sharded, resumable).
"""
