"""A training stage's component on a pod with G GPUs runs G processes (torchrun in the pod; gloo ranks on CPU).

Called through the component's own Python function (what the KFP executor calls) with small stand-in
artifacts, as tests/test_kfp_components.py does. Checked against the store, not the component: the
published artifact is found under the key of 2 processes and not of 1 (``anyflow.stages.prelaunch_check``),
the training checkpoint rank 0 published holds both ranks' data positions (gathered from every rank), and the
output metadata points at that artifact. A failing rank fails the component with its exit code (75:
preempted) and the end of its output.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from kfp import dsl

import components
from anyflow import storage
from anyflow.stages import prelaunch_check
from anyflow.stages.processes import RankFailed


def _overrides() -> dict:
    from pipeline_fixtures import FAST

    return {**FAST, "flowmap.train.steps": 2, "flowmap.train.batch_size": 1, "flowmap.train.checkpoint_every": 2}


def _call(tmp_path: Path, dataset_uri: str, store: str, nproc: int) -> tuple[dsl.Model, dsl.Metrics]:
    func = components.stage_functions()["train_flowmap"]
    flowmap, metrics = dsl.Model(uri=str(tmp_path / "kfp" / "flowmap")), dsl.Metrics(uri=str(tmp_path / "kfp" / "m"))
    func(flowmap=flowmap, metrics=metrics, preset="tiny", overrides_json=json.dumps(_overrides()), store=store,
         dataset=dsl.Dataset(uri=str(tmp_path / "kfp" / "unused")), dataset_uri=dataset_uri, nproc_per_node=nproc)
    return flowmap, metrics


@pytest.mark.slow
def test_two_processes_publish_one_artifact_under_the_two_process_key(tiny_chain, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ds = tiny_chain["dataset"].uri
    store = str(tmp_path / "store")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    flowmap, metrics = _call(tmp_path, ds, store, nproc=2)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # torch's agent handlers put back

    uri = flowmap.metadata["anyflow_uri"]
    manifest = storage.verify(uri)  # re-hashes every file
    assert manifest["extra"]["stage"] == "train_flowmap" and flowmap.metadata["anyflow_cached"] is False
    assert json.loads(Path(flowmap.path).read_text())["anyflow_uri"] == uri  # the pointer file
    args = dict(preset="tiny", overrides=_overrides(), inputs={"dataset": ds}, store=store)
    assert prelaunch_check("train_flowmap", world_size=2, **args) == uri  # the key of 2 processes ...
    assert prelaunch_check("train_flowmap", world_size=1, **args) is None  # ... not of one
    log = [json.loads(line) for line in (Path(uri) / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2, log
    assert metrics.metadata and all(isinstance(v, float) for v in metrics.metadata.values())

    # both ranks ran: the published metrics say 2 processes, and the global data cursor counts the batches of
    # both ranks (2 steps x grad_accum micro-batches of batch_size, on each of 2 ranks); the training checkpoints
    # themselves are deleted once the artifact is published
    from anyflow.config import apply_overrides, get_preset

    tr = apply_overrides(get_preset("tiny"), _overrides()).flowmap.train
    published = manifest["metrics"]
    assert published["processes"] == 2, published
    assert published["samples"] == 2 * tr.grad_accum * tr.batch_size * 2, published
    assert not Path(store, "checkpoints", "train_flowmap", Path(uri).name).exists()

    # a second call finds it in the store: no processes, same artifact
    again, _ = _call(tmp_path / "again", ds, store, nproc=2)
    assert again.metadata["anyflow_uri"] == uri and again.metadata["anyflow_cached"] is True

    # no store: the ranks publish into a private store in the pod's temp folder and rank 0's artifact is
    # moved into the KFP output itself (decided over an error: store="" keeps working with every GPU)
    direct, _ = _call(tmp_path / "direct", ds, "", nproc=2)
    assert direct.metadata["anyflow_uri"] == direct.path
    assert storage.verify(direct.path)["extra"]["cache_key"] == Path(uri).name  # the same 2-process key


@pytest.mark.parametrize("code", [75, 3])
def test_a_failing_rank_fails_the_component_with_its_exit_code_and_output(
        code: int, tiny_chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 1 dies at interpreter start (a sitecustomize only the ranks import: this process has started).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('RANK') == '1':\n"
        "    print('rank one was here', flush=True)\n"
        "    sys.stderr.write('rank one: simulated failure\\n'); sys.stderr.flush()\n"
        f"    os._exit({code})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit) as info:
        _call(tmp_path, tiny_chain["dataset"].uri, str(tmp_path / "store"), nproc=2)
    err = info.value
    assert err.code == code  # the process exit code of the KFP executor
    assert isinstance(err, RankFailed) and err.rank == 1
    assert "rank one: simulated failure" in err.message and "rank one was here" in err.message
    assert not list(Path(tmp_path / "store").glob("artifacts/train_flowmap/*/manifest.json"))  # nothing published


@pytest.mark.slow
def test_redistill_distill_runs_one_process_per_gpu(tiny_chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The anyflow-redistill distill task gets the distill pod's GPU count (test_redistill: 8 by default) and
    # runs that many processes: here 2 gloo ranks through the task's own step function on a local store.
    from anyflow.ops import steps
    from anyflow.ops.redistill import RedistillConfig

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = str(tmp_path / "store")
    overrides = {**_overrides(), "distill.train.steps": 1, "distill.train.batch_size": 1}
    cfg = RedistillConfig(name="t2v", overrides=overrides, run_lease=False)
    action, plan_url = steps.plan_step(store, "procedural:n=4,seed=0", tiny_chain["teacher"].uri,
                                       flowmap=tiny_chain["flowmap"].uri, config_json=json.dumps(cfg.to_json()),
                                       run_id="run-2p")
    assert action == "run"
    candidate = storage.read_json(steps.distill_step(plan_url, nproc_per_node=2))
    plan = storage.read_json(plan_url)
    args = dict(preset=cfg.preset, overrides=overrides, inputs=plan["distill_inputs"], store=store)
    assert prelaunch_check("distill", world_size=2, **args) == candidate["uri"]  # the key of 2 processes
    assert prelaunch_check("distill", world_size=1, **args) is None
    assert storage.read_manifest(candidate["uri"])["metrics"]["processes"] == 2  # its checkpoints are deleted
