"""pipelines/_kfp_speed.py: KFP's setters no longer read the source of every stack frame, and nothing else changes.

References are KFP's own: the real ``inspect.stack`` for the frame records, KFP's own error for a setter on a
pipeline-as-component task, and the YAML KFP compiles with its module untouched.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from kfp import dsl
from kfp.dsl import pipeline_task

from pipelines import _kfp_speed
from pipelines.compile import compile_pipeline


@pytest.fixture
def real_inspect(monkeypatch: pytest.MonkeyPatch):
    """KFP's module with the real ``inspect`` while the test runs (restored after, installed or not)."""
    monkeypatch.setattr(pipeline_task, "inspect", inspect)
    return pipeline_task


def test_the_records_are_inspect_stacks_without_source(real_inspect) -> None:
    _kfp_speed.install()
    fast = real_inspect.inspect
    assert fast is not inspect

    def inner():
        return fast.stack(), inspect.stack(0)

    def outer():
        return inner()

    mine, theirs = outer()
    assert [(r.filename, r.lineno, r.function) for r in mine] == [(r.filename, r.lineno + 0, r.function)
                                                                  for r in theirs][: len(mine)]
    assert len(mine) == len(theirs) and mine[0].function == "inner" and mine[1].function == "outer"
    assert all(r.code_context is None and r.index is None for r in mine)
    assert fast.signature is inspect.signature  # every other name is the real module's


def test_kfp_still_names_the_setter_in_its_error(real_inspect) -> None:
    _kfp_speed.install()

    @dsl.component
    def leaf():  # no return annotation: KFP reads them (strings here)
        pass

    @dsl.pipeline
    def inner_pipeline():
        leaf()

    with pytest.raises(ValueError, match=r"^set_cpu_limit can only be used on single-step components"):

        @dsl.pipeline
        def outer_pipeline():
            inner_pipeline().set_cpu_limit("1")


def test_the_compiled_yaml_is_what_kfp_compiles_without_it(real_inspect, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    monkeypatch.setattr(_kfp_speed, "install", lambda: None)  # KFP's module keeps the real inspect
    plain = compile_pipeline("anyflow-redistill", tmp_path / "plain.yaml").read_text()
    assert real_inspect.inspect is inspect
    monkeypatch.undo()
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    fast = compile_pipeline("anyflow-redistill", tmp_path / "fast.yaml").read_text()
    assert pipeline_task.inspect is not inspect  # installed by compile's build()
    assert fast == plain
