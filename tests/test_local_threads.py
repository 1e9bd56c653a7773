"""One torch thread per component process when ``anyflow run`` / ``anyflow rerun`` run the tiny model locally
(issue 18: ``pipelines.local.local_env``; measured in benchmarks/RESULTS.md).

No ``from __future__ import annotations`` here: KFP reads the component's annotations as real types.
"""

import dataclasses
import json
import os

import pytest

from anyflow.config import get_preset
from pipelines.local import THREADS_ENV, local_env


def test_local_env_one_thread_on_the_tiny_model_only(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert local_env(get_preset("tiny")) == {"OMP_NUM_THREADS": "1"}
    assert local_env(get_preset("demo")) == {"OMP_NUM_THREADS": "1"}  # builtin:demo: the same architecture
    big = get_preset("tiny")
    big = dataclasses.replace(big, model=dataclasses.replace(big.model, base="s3://bucket/Wan2.1-T2V-1.3B"))
    assert local_env(big) == {}  # a real model keeps torch's default threads
    monkeypatch.setenv(THREADS_ENV, "2")
    assert local_env(get_preset("tiny")) == {}  # the user's setting wins


def test_run_local_env_reaches_the_component_process(tmp_path, monkeypatch):
    """The component subprocess the local runner starts sees the variable, and torch in it runs one thread
    (torch's own count is the reference); the parent's environment is restored afterwards."""
    from kfp import dsl

    from pipelines.local import run_local

    monkeypatch.delenv(THREADS_ENV, raising=False)
    out = tmp_path / "seen.json"

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def probe(path: str):
        import json
        import os

        import torch

        with open(path, "w") as fh:
            json.dump({"env": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads()}, fh)

    @dsl.pipeline(name="threads")
    def pipeline(path: str):
        probe(path=path)

    run_local(pipeline, {"path": str(out)}, tmp_path / "w", "threads", env={THREADS_ENV: "1"})
    assert json.loads(out.read_text()) == {"env": "1", "threads": 1}
    assert THREADS_ENV not in os.environ


@pytest.mark.parametrize(("command", "extra"), [("run", []), ("rerun", ["--stage", "prepare_data"])])
def test_run_and_rerun_pass_the_thread_env(tmp_path, monkeypatch, command, extra):
    """``anyflow run`` and a local ``anyflow rerun`` hand ``local_env`` of the preset to the local runner."""
    import pipelines.local as local
    from anyflow.cli import main

    monkeypatch.delenv(THREADS_ENV, raising=False)
    seen = {}

    def fake_run_local(func, params, workdir, name, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop before the runner starts

    monkeypatch.setattr(local, "run_local", fake_run_local)
    with pytest.raises(SystemExit):
        main([command, "--workdir", str(tmp_path / "w"), *extra])
    assert seen["env"] == {"OMP_NUM_THREADS": "1"}
