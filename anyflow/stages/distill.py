"""Stage 2 — on-policy flow-map distillation (docs/method.md §7): generator from the flow-map EMA, frozen
real score and critic from the teacher, FMBS rollouts with random (N, k), DMD + co-trained forward loss.

Inputs: ``dataset``, ``teacher``, ``flowmap`` (optionally ``critic``: a previous distill artifact to
warm-start the critic, used by periodic re-distillation). Output: a checkpoint with the EMA
``generator`` adapter and the ``critic`` adapter (for warm starts). With a FAR preset this is stage 2b
(§8.6): chunk-wise FMBS with a KV cache of the generator's own chunks, scored by the bidirectional teacher
and critic, which share the FAR base as adapters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from anyflow.config import Preset
from anyflow.stages import common

KIND = "generator"
INPUTS = ("dataset", "teacher", "flowmap")
OPTIONAL = ("critic",)
SECTIONS = ("model", "distill", "far")


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True) -> dict:
    common.require_inputs("distill", inputs, INPUTS, OPTIONAL)
    teacher = common.read_checkpoint(inputs["teacher"], cfg, role="teacher", need=("teacher",))
    flowmap = common.read_checkpoint(inputs["flowmap"], cfg, role="flowmap", need=("generator",))
    critic = None
    if "critic" in inputs:
        critic = common.read_checkpoint(inputs["critic"], cfg, role="critic", need=("critic",)).adapters["critic"]
    tr = cfg.distill.train
    data, models = common.training_setup(cfg, inputs["dataset"], tr)
    method = common.onpolicy_method(
        cfg, models, cfg.distill, data.negative_embedding(),
        teacher=teacher.adapters["teacher"], generator=flowmap.adapters["generator"], critic=critic,
    )
    # the generator is exported as its EMA; the critic as trained (a warm start for re-distillation)
    return common.train_and_export(cfg, tr, data, models, method, out_dir=out_dir, ckpt_url=ckpt_url, progress=progress,
                                   kind=KIND, ema_adapter="generator", export={"generator": "generator", "critic": "critic"})


def main(argv: Sequence[str] | None = None) -> int:
    from anyflow.stages import stage_main

    return stage_main("distill", argv)


if __name__ == "__main__":
    raise SystemExit(main())
