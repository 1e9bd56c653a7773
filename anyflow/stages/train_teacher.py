"""Stage 0 — teacher fine-tune: LoRA flow matching of the base model on the data (docs/method.md §4).

Inputs: ``dataset``. Output: a checkpoint artifact with the EMA ``teacher`` adapter.
Reads preset sections: model, teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from anyflow.config import Preset
from anyflow.stages import common

KIND = "teacher"
INPUTS = ("dataset",)
SECTIONS = ("model", "teacher")


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True) -> dict:
    from anyflow.train.methods import TeacherMethod

    common.require_inputs("train_teacher", inputs, INPUTS)
    tr = cfg.teacher.train
    data, models = common.training_setup(cfg, inputs["dataset"], tr)
    method = TeacherMethod(models, cfg.teacher, data.negative_embedding())
    return common.train_and_export(cfg, tr, data, models, method, out_dir=out_dir, ckpt_url=ckpt_url, progress=progress,
                                   kind=KIND, ema_adapter="teacher", export={"teacher": "teacher"})


def main(argv: Sequence[str] | None = None) -> int:
    from anyflow.stages import stage_main

    return stage_main("train_teacher", argv)


if __name__ == "__main__":
    raise SystemExit(main())
