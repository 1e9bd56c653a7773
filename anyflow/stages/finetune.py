"""Downstream fine-tuning of a distilled any-step generator on a new dataset with the forward
flow-map loss, so it stays any-step (the instantaneous field is preserved, docs/method.md §12 Fig. 9).

Inputs: ``dataset`` (the new domain), ``generator`` (a distill artifact); with ``finetune.onpolicy``
also ``teacher`` to keep the on-policy terms. Output: a checkpoint with the EMA ``generator`` adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from anyflow.config import FlowMapStage, Preset
from anyflow.stages import common

KIND = "generator"
INPUTS = ("dataset", "generator")
OPTIONAL = ("teacher",)
SECTIONS = ("model", "finetune", "far")


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True) -> dict:
    common.require_inputs("finetune", inputs, INPUTS, OPTIONAL)
    gen = common.read_checkpoint(inputs["generator"], cfg, role="generator", need=("generator",))
    ft = cfg.finetune
    data, models = common.training_setup(cfg, inputs["dataset"], ft.train)
    if ft.onpolicy:
        if "teacher" not in inputs:
            raise common.StageInputError("finetune.onpolicy=true needs a 'teacher' input")
        teacher = common.read_checkpoint(inputs["teacher"], cfg, role="teacher", need=("teacher",))
        distill_cfg = dataclasses.replace(cfg.distill, train=ft.train, generator_optim=ft.optim, loss=ft.loss)
        # the critic restarts from the teacher: the new domain is what it must learn to score
        method = common.onpolicy_method(cfg, models, distill_cfg, data.negative_embedding(),
                                        teacher=teacher.adapters["teacher"], generator=gen.adapters["generator"])
    else:
        method = common.flowmap_method(cfg, models, FlowMapStage(train=ft.train, optim=ft.optim, loss=ft.loss),
                                       data.negative_embedding(), init=gen.adapters["generator"], name="finetune")
    return common.train_and_export(cfg, ft.train, data, models, method, out_dir=out_dir, ckpt_url=ckpt_url,
                                   progress=progress, kind=KIND, ema_adapter="generator", export={"generator": "generator"})


def main(argv: Sequence[str] | None = None) -> int:
    from anyflow.stages import stage_main

    return stage_main("finetune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
