"""A KFP retry of a stage that failed on bad input stops at once (issue 9).

KFP's retry policy retries every failure; it cannot filter exit codes. ``run_stage`` therefore tags a
bad-input failure with the KFP run (``ANYFLOW_KFP_RUN``, from the pod's Argo workflow label) in
``FAILED.json`` under the stage's checkpoint folder; a retry in the same run stops before loading
anything, a new run ignores and removes the marker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_fixtures import FAST

from anyflow.config import StageInputError
from anyflow.stages import FAILURE_MARKER, RUN_ENV, RepeatedStageFailure, run_stage


def _markers(store: Path) -> list[Path]:
    return sorted(store.glob(f"checkpoints/distill/*/{FAILURE_MARKER}"))


def test_retry_of_a_bad_input_failure_stops_before_loading(tiny_chain, tmp_path: Path, monkeypatch) -> None:
    from anyflow.stages import distill

    store = tmp_path / "store"
    ds, fm = tiny_chain["dataset"].uri, tiny_chain["flowmap"].uri
    bad = {"dataset": ds, "teacher": ds, "flowmap": fm}  # a dataset where the teacher belongs
    calls = []
    real_run = distill.run

    def counted(*args, **kwargs):
        calls.append(1)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(distill, "run", counted)

    def attempt():
        return run_stage("distill", store=str(store), overrides=FAST, inputs=bad, progress=False)

    # First attempt of run A: the stage's own error, and a marker tagged with run A.
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-run-a")
    with pytest.raises(StageInputError) as first:
        attempt()
    assert not isinstance(first.value, RepeatedStageFailure) and len(calls) == 1
    (marker,) = _markers(store)
    record = json.loads(marker.read_text())
    assert record["run"] == "anyflow-t2v-run-a" and record["error"] == type(first.value).__name__
    assert record["message"] == str(first.value)

    # KFP retries the task in run A: it stops without running the stage, naming the original error.
    with pytest.raises(RepeatedStageFailure, match="earlier attempt of this run") as again:
        attempt()
    assert len(calls) == 1 and str(first.value) in str(again.value)

    # A new run (the user may have fixed the input in place) gets a real attempt and its own marker.
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-run-b")
    with pytest.raises(StageInputError) as other:
        attempt()
    assert not isinstance(other.value, RepeatedStageFailure) and len(calls) == 2
    assert json.loads(marker.read_text())["run"] == "anyflow-t2v-run-b"

    # Outside KFP (no run tag, e.g. `anyflow stage`): never blocked, and nothing left behind.
    monkeypatch.delenv(RUN_ENV)
    with pytest.raises(StageInputError) as local:
        attempt()
    assert not isinstance(local.value, RepeatedStageFailure) and len(calls) == 3
    assert _markers(store) == []


def test_transient_failures_leave_no_marker(tiny_chain, tmp_path: Path, monkeypatch) -> None:
    # A failure a retry can fix (here: an error the stage does not classify as bad input) must not
    # block the retry.
    from anyflow.stages import distill

    store = tmp_path / "store"
    inputs = {"dataset": tiny_chain["dataset"].uri, "teacher": tiny_chain["teacher"].uri,
              "flowmap": tiny_chain["flowmap"].uri}
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-run-c")

    def flaky(*args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(distill, "run", flaky)
    with pytest.raises(ConnectionResetError):
        run_stage("distill", store=str(store), overrides=FAST, inputs=inputs, progress=False)
    assert _markers(store) == []
    monkeypatch.undo()
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-run-c")
    res = run_stage("distill", store=str(store), overrides=FAST, inputs=inputs, progress=False)
    assert not res.cached and (Path(res.uri) / "manifest.json").exists()


def test_prelaunch_check_for_multi_node_launchers(tiny_chain, tmp_path: Path, monkeypatch) -> None:
    # The TrainJob launcher asks before scheduling GPU nodes: cached -> the artifact, failed on bad input
    # earlier in this run -> stop, otherwise -> launch.
    from anyflow.stages import prelaunch_check

    store = tmp_path / "store"
    ds, fm = tiny_chain["dataset"].uri, tiny_chain["flowmap"].uri
    bad = {"dataset": ds, "teacher": ds, "flowmap": fm}
    args = dict(preset="tiny", overrides=FAST, store=str(store), world_size=1)
    monkeypatch.setenv(RUN_ENV, "anyflow-t2v-run-d")
    assert prelaunch_check("distill", inputs=bad, **args) is None  # nothing known yet: launch
    with pytest.raises(StageInputError):
        run_stage("distill", inputs=bad, progress=False, **args)  # what the job's workers do
    with pytest.raises(RepeatedStageFailure, match="earlier attempt of this run"):
        prelaunch_check("distill", inputs=bad, **args)
    good = {"dataset": ds, "teacher": tiny_chain["teacher"].uri, "flowmap": fm}
    res = run_stage("distill", inputs=good, progress=False, **args)
    assert prelaunch_check("distill", inputs=good, **args) == res.uri
    # a job of another size trains something else (per-rank batches and draws): not a cache hit
    assert prelaunch_check("distill", inputs=good, **{**args, "world_size": 16}) is None
