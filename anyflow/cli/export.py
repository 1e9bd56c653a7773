"""``anyflow export``: a checkpoint as a diffusers folder or a LoRA file (``anyflow.export`` does the work)."""

from __future__ import annotations

import argparse
from typing import Any

from anyflow.urls import url_argument


def _handler(args: argparse.Namespace) -> int:
    from anyflow.export import export

    if args.base_output and args.format != "lora":
        from anyflow.config import StageInputError

        raise StageInputError(
            "--base-output goes with --format lora (a diffusers export holds its whole model)."
        )
    result = export(
        args.checkpoint, fmt=args.format, output=args.output, dtype=args.dtype, base_output=args.base_output
    )
    info = result.info
    print(
        f"exported {info['source']} as {result.format} ({info['pipeline']}, shift {info['shift']:g}, "
        f"guidance_scale 1, max_sequence_length {info['max_sequence_length']})"
    )
    print(result.uri)
    return 0


def add_cli(sub: Any) -> None:
    from anyflow.export import DTYPES, FORMATS

    p = sub.add_parser(
        "export",
        help="export a checkpoint as a diffusers folder or a diffusers LoRA file",
        description="Export a generator checkpoint (a train_flowmap, distill or finetune output) for use without "
        "anyflow. --format diffusers: a complete folder (the LoRA merged into the transformer, VAE, "
        "text encoder, tokenizer, FlowMap-Euler scheduler with the trained shift) for "
        "diffusers.AnyFlowPipeline.from_pretrained (AnyFlowFARPipeline for far-* checkpoints). "
        "--format lora: pytorch_lora_weights.safetensors for pipe.load_lora_weights(DIR), beside base/ "
        "(the converted AnyFlow base folder it applies to; --base-output puts it elsewhere, once) and, for far-* "
        "checkpoints, "
        "non_lora.safetensors (the fully trained compressed patch embedding). The checkpoint's manifest "
        "is verified first; the export is an artifact whose manifest names the checkpoint; config.json "
        "says how to sample it (guidance_scale 1, max_sequence_length, chunk_partition).",
    )
    p.add_argument(
        "checkpoint", type=url_argument, help="checkpoint artifact URL (local folder or s3://BUCKET/PREFIX)"
    )
    p.add_argument(
        "--format", required=True, choices=FORMATS, help="diffusers (a whole pipeline folder) or lora"
    )
    p.add_argument(
        "--output",
        required=True,
        type=url_argument,
        help="where to publish the export (local folder or s3://BUCKET/PREFIX)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="transformer and text-encoder dtype of the export (default float32; the VAE stays float32)",
    )
    p.add_argument(
        "--base-output",
        type=url_argument,
        default=None,
        help="--format lora: publish the converted base there instead of OUTPUT/base, or only name it when a base "
        "with the same settings is there already (config.json: base_url)",
    )
    p.set_defaults(func=_handler)
