"""Stage 1 — forward flow-map training (docs/method.md §6): the base Wan converted to AnyFlow, a fresh
generator LoRA (attn1, FFN, time and delta embedders), the forward loss with fused CFG.

Inputs: ``dataset``. Output: a checkpoint artifact with the EMA ``generator`` adapter.
The student starts from the *base* model, not the teacher (§3). With a FAR preset (``variant: far``) this is
stage 1b: the causal teacher-forced loss of §8.2-8.4 on the base converted to AnyFlow-FAR, the generator
also training the compressed patch embedding in full.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from anyflow.config import Preset
from anyflow.stages import common

KIND = "flowmap"
INPUTS = ("dataset",)
SECTIONS = ("model", "flowmap", "far")


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True) -> dict:
    common.require_inputs("train_flowmap", inputs, INPUTS)
    tr = cfg.flowmap.train
    data, models = common.training_setup(cfg, inputs["dataset"], tr)
    method = common.flowmap_method(cfg, models, cfg.flowmap, data.negative_embedding())
    return common.train_and_export(cfg, tr, data, models, method, out_dir=out_dir, ckpt_url=ckpt_url, progress=progress,
                                   kind=KIND, ema_adapter="generator", export={"generator": "generator"})


def main(argv: Sequence[str] | None = None) -> int:
    from anyflow.stages import stage_main

    return stage_main("train_flowmap", argv)


if __name__ == "__main__":
    raise SystemExit(main())
