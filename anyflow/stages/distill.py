"""Stage 2 — on-policy flow-map distillation (METHOD.md §7): generator from the flow-map EMA, frozen
real score and critic from the teacher, FMBS rollouts with random (N, k), DMD + co-trained forward loss.

Inputs: ``dataset``, ``teacher``, ``flowmap`` (optionally ``critic``: a previous distill artifact to
warm-start the critic, used by periodic re-distillation). Output: a checkpoint with the EMA
``generator`` adapter and the ``critic`` adapter (for warm starts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from anyflow.config import Preset
from anyflow.stages import common

KIND = "generator"
INPUTS = ("dataset", "teacher", "flowmap")
OPTIONAL = ("critic",)
SECTIONS = ("model", "distill")


def run(cfg: Preset, inputs: Mapping[str, str], out_dir: Path, *, ckpt_url: str | None = None, progress: bool = True) -> dict:
    from anyflow.train.methods import OnPolicyMethod

    common.require_inputs("distill", inputs, INPUTS, OPTIONAL)
    teacher = common.read_checkpoint(inputs["teacher"], cfg, role="teacher", need=("teacher",))
    flowmap = common.read_checkpoint(inputs["flowmap"], cfg, role="flowmap", need=("generator",))
    critic = None
    if "critic" in inputs:
        critic = common.read_checkpoint(inputs["critic"], cfg, role="critic", need=("critic",)).adapters["critic"]
    data = common.open_dataset(inputs["dataset"], cfg.distill.train, cfg)
    base = common.load_models(cfg)
    models = common.adapter_model(cfg, base.transformer)
    method = OnPolicyMethod(
        models, cfg.distill, data.negative_embedding(),
        teacher=teacher.adapters["teacher"], generator=flowmap.adapters["generator"], critic=critic,
    )
    result = common.train_resumable(method, cfg.distill.train, data, out_dir=out_dir, ckpt_url=ckpt_url, progress=progress)
    models.load_params("generator", result.ema)
    common.write_checkpoint(
        out_dir, cfg,
        {"generator": ("generator", models.state("generator")), "critic": ("critic", models.state("critic"))},
        kind=KIND,
    )
    return {"steps": result.steps, **{k: v for k, v in result.last_metrics.items() if k.startswith(("loss", "forward/loss"))}}


def main(argv: Sequence[str] | None = None) -> int:
    from anyflow.stages import stage_main

    return stage_main("distill", argv)


if __name__ == "__main__":
    raise SystemExit(main())
