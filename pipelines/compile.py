"""Compile AnyFlow pipelines to KFP YAML; ``python -m pipelines.compile`` refreshes the goldens.

Output is deterministic (KFP writes no timestamps; the image defaults to the release tag), so the
committed files in ``pipelines/compiled/`` are compared byte-for-byte with a fresh compile in tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pipelines.anyflow_far import PIPELINE_NAME as FAR
from pipelines.anyflow_far import build_far_pipeline
from pipelines.anyflow_t2v import PIPELINE_NAME as T2V
from pipelines.anyflow_t2v import build_t2v_pipeline
from pipelines.evaluate_only import PIPELINE_NAME as EVAL_ONLY
from pipelines.evaluate_only import build_evaluate_only_pipeline
from pipelines.platform import Platform
from pipelines.redistill import PIPELINE_NAME as REDISTILL
from pipelines.redistill import build_redistill_pipeline
from pipelines.rerun import STAGE_INPUTS, build_rerun_pipeline, rerun_pipeline_name

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"


def _rerun_builder(stage: str) -> Callable:
    def build(platform: Platform | None = None, image: str | None = None):
        return build_rerun_pipeline(stage, None, platform=platform, image=image)

    return build


#: Pipeline name → builder(platform, image).
PIPELINES: dict[str, Callable] = {
    T2V: build_t2v_pipeline,
    FAR: build_far_pipeline,
    EVAL_ONLY: build_evaluate_only_pipeline,
    REDISTILL: build_redistill_pipeline,
    **{rerun_pipeline_name(stage): _rerun_builder(stage) for stage in STAGE_INPUTS},
}


class CompileError(ValueError):
    """Unknown pipeline name."""


def build(name: str, platform: Platform | None = None, image: str | None = None):
    """The pipeline function called ``name`` (errors list the known names)."""
    if name not in PIPELINES:
        raise CompileError(f"unknown pipeline {name!r}; known pipelines: {', '.join(PIPELINES)}.")
    from pipelines import _kfp_speed

    _kfp_speed.install()  # pipelines/_kfp_speed.py: KFP's task setters read the source of every stack frame
    return PIPELINES[name](platform=platform, image=image)


def compile_pipeline_func(pipeline_func, path: str | Path,
                          params: Mapping[str, object] | None = None) -> Path:
    """Compile a pipeline function to ``path`` (optionally overriding parameter defaults)."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func, str(path), pipeline_parameters=dict(params) if params else None)
    return path


def compile_pipeline(name: str, path: str | Path, platform: Platform | None = None,
                     image: str | None = None) -> Path:
    """Compile the pipeline ``name`` to ``path``."""
    return compile_pipeline_func(build(name, platform, image), path)


def compile_all(out_dir: str | Path = COMPILED_DIR, platform: Platform | None = None,
                image: str | None = None) -> list[Path]:
    """Compile every pipeline into ``out_dir/<name>.yaml`` (the goldens by default)."""
    return [compile_pipeline(name, Path(out_dir) / f"{name}.yaml", platform, image) for name in PIPELINES]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.compile [--out DIR]``: regenerate the compiled goldens."""
    parser = argparse.ArgumentParser(description="Compile every AnyFlow pipeline to YAML.")
    parser.add_argument("--out", default=str(COMPILED_DIR), help="output folder (default: pipelines/compiled)")
    args = parser.parse_args(argv)
    for path in compile_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
