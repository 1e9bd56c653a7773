"""Session fixtures that run the real stages on the tiny preset once and share the artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

FAST = {"teacher.train.steps": 2, "flowmap.train.steps": 2, "distill.train.steps": 2, "finetune.train.steps": 2,
        "evaluate.nfes": "1,2,4", "evaluate.reference_steps": 16, "evaluate.num_prompts": 2}


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def tiny_chain(tiny_store: Path) -> dict:
    """prepare_data → train_teacher → train_flowmap → distill on the tiny preset (2 steps each)."""
    from anyflow.stages import run_stage

    store = str(tiny_store)
    out = {}
    out["dataset"] = run_stage("prepare_data", store=store, overrides=FAST, progress=False)
    ds = out["dataset"].uri
    out["teacher"] = run_stage("train_teacher", store=store, overrides=FAST, inputs={"dataset": ds}, progress=False)
    out["flowmap"] = run_stage("train_flowmap", store=store, overrides=FAST, inputs={"dataset": ds}, progress=False)
    out["generator"] = run_stage(
        "distill", store=store, overrides=FAST, progress=False,
        inputs={"dataset": ds, "teacher": out["teacher"].uri, "flowmap": out["flowmap"].uri},
    )
    return out
