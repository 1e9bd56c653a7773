"""Reruns and evaluate-only on a real KFP backend: locations travel as plain string parameters.

The KFP backend's importer (kubeflow/pipelines 2.17.0, backend/src/v2/component/importer_launcher.go,
vendored in tests/contracts/kfp-2.17.0/) resolves only ``artifactUri`` (a constant or a runtime parameter);
``ImportSpecToMLMDArtifact`` copies every ``metadata`` field into the artifact's custom properties through
``StructValueToMLMDValue`` as it is. So a ``{{$…}}`` placeholder or pipeline-channel reference compiled into
an importer's metadata reaches the component as that literal text -- which the local runner hides, since it
resolves it. :func:`backend_importer_violations` applies that rule to compiled IR YAML, and the rerun
pipelines must pass each ``<role>_uri`` straight from a pipeline parameter to the stage task (no importer,
no artifact inputs). The runtime tests call the component functions with those strings only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl

import components
from anyflow import storage
from anyflow.stages import stage_module
from pipelines.compile import PIPELINES, compile_pipeline

CONTRACT = Path(__file__).parent / "contracts" / "kfp-2.17.0" / "importer_launcher.go"
#: Every single-stage pipeline: the six reruns and evaluate-only (what `anyflow rerun` / `submit` compile).
RERUNS = {**{f"anyflow-rerun-{s.replace('_', '-')}": s for s in components.STAGE_NAMES},
          "anyflow-evaluate-only": "evaluate"}


def _strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def backend_importer_violations(spec: dict) -> list[str]:
    """The KFP 2.17.0 backend's importer rule on a compiled pipeline spec: an importer's ``metadata`` is used
    verbatim (never resolved), so any placeholder (``{{$…}}``) or pipeline-channel reference in it would
    reach the component unresolved. Returns one line per such value."""
    bad = []
    for label, executor in spec["deploymentSpec"]["executors"].items():
        importer = executor.get("importer")
        if importer is None:
            continue
        for where, text in _strings(importer.get("metadata") or {}):
            if "{{$" in text or "pipelinechannel--" in text:
                bad.append(f"{label}: importer metadata{where} = {text!r} reaches the component verbatim")
    return bad


def _compiled(name: str, tmp_path: Path) -> dict:
    return next(yaml.safe_load_all(compile_pipeline(name, tmp_path / f"{name}.yaml").read_text()))


def test_the_rule_is_the_vendored_backends() -> None:
    # The contract says so: only artifactUri is resolved; metadata fields are copied as they are.
    src = CONTRACT.read_text()
    assert "GetArtifactUri().GetRuntimeParameter()" in src
    assert "for k, v := range l.importer.Metadata.Fields" in src
    assert "artifact.CustomProperties[k] = value" in src
    # ... and the rule flags what a pipeline parameter in dsl.importer(metadata=...) compiles to.
    placeholder = {"deploymentSpec": {"executors": {
        "exec-importer": {"importer": {"artifactUri": {"runtimeParameter": "uri"},
                                       "metadata": {"anyflow_uri": "{{$.inputs.parameters['metadata']}}"}}},
        "exec-importer-2": {"importer": {"artifactUri": {"runtimeParameter": "uri"},
                                         "metadata": {"anyflow_uri": "s3://b/artifacts/x/k"}}}}}}
    assert backend_importer_violations(placeholder) == [
        "exec-importer: importer metadata.anyflow_uri = \"{{$.inputs.parameters['metadata']}}\" "
        "reaches the component verbatim"]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_no_importer_metadata_needs_resolving(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    assert backend_importer_violations(_compiled(name, tmp_path)) == []


@pytest.mark.parametrize("name", sorted(RERUNS))
def test_rerun_binds_each_uri_parameter_to_the_stage_task(name: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    spec = _compiled(name, tmp_path)
    stage = RERUNS[name]
    required = stage_module(stage).INPUTS  # the roles the stage itself requires (anyflow.stages)
    executors = spec["deploymentSpec"]["executors"]
    assert not [label for label, e in executors.items() if "importer" in e], f"{name}: has importers"
    tasks = spec["root"]["dag"]["tasks"]
    stage_tasks = [t for t in tasks.values() if t["componentRef"]["name"] == f"comp-{stage.replace('_', '-')}"]
    assert len(stage_tasks) == 1, list(tasks)
    task = stage_tasks[0]
    assert not task["inputs"].get("artifacts"), f"{name}: the stage task takes artifacts: {task['inputs']['artifacts']}"
    params = task["inputs"]["parameters"]
    root = spec["root"]["inputDefinitions"]["parameters"]
    declared = spec["components"][task["componentRef"]["name"]]["inputDefinitions"]["parameters"]
    uri_inputs = sorted(p for p in declared if p.endswith("_uri"))
    assert {f"{role}_uri" for role in required} <= set(uri_inputs), (name, uri_inputs)
    for param in uri_inputs:  # every <role>_uri input of the stage task comes from the pipeline's own parameter
        assert params.get(param) == {"componentInputParameter": param}, (name, param, params.get(param))
        assert root[param]["parameterType"] == "STRING"
    for role in required:  # no default: the submitter must name them
        assert "defaultValue" not in root[f"{role}_uri"], (name, role)
    # nothing to wait for but, for prepare_data, the uncached listing of its source (KFP's cache must see new
    # data: tests/test_kfp_compile.py::test_prepare_data_takes_the_uncached_source_fingerprint)
    # and the ParallelFor of its partitions (data.partition_size > 0: tests/test_pipeline_partitions.py)
    deps = task.get("dependentTasks", [])
    loops = [d for d in deps if d.startswith("for-loop")] if stage == "prepare_data" else []
    allowed = ["source-fingerprint"] if stage == "prepare_data" else []
    assert len(loops) == (stage == "prepare_data"), f"{name}: the stage waits on {deps}"
    assert sorted(set(deps) - set(loops)) == allowed, f"{name}: the stage waits on {deps}"


def test_a_multinode_rerun_launches_the_same_trainer_job(tmp_path: Path) -> None:
    # A stage the platform runs on 2 nodes is a Trainer job in the full DAG; its rerun must be that job too
    # (the same process count, so the same artifact key), with the input location as a string parameter.
    from pipelines.compile import compile_pipeline_func
    from pipelines.platform import Platform
    from pipelines.rerun import build_rerun_pipeline

    platform = Platform.from_dict({"stages": {"train_teacher": {"num_nodes": 2, "gpus": 0}}})
    out = compile_pipeline_func(build_rerun_pipeline("train_teacher", platform=platform), tmp_path / "p.yaml")
    spec = next(iter(yaml.safe_load_all(out.read_text())))
    assert not backend_importer_violations(spec)
    tasks = spec["root"]["dag"]["tasks"]
    (launch,) = [t for t in tasks.values() if t["componentRef"]["name"] == "comp-trainjob"]
    params = launch["inputs"]["parameters"]
    assert params["dataset_uri"] == {"componentInputParameter": "dataset_uri"}
    assert not launch["inputs"].get("artifacts")
    assert params["num_nodes"]["runtimeValue"]["constant"] == 2 and params["stage"]["runtimeValue"]["constant"] == "train_teacher"
    assert not [t for t in tasks.values() if t["componentRef"]["name"] == "comp-train-teacher"]


# ------------------------------------------------------------------------------------------ runtime


def _manifest_inputs(uri: str) -> dict:
    return storage.read_manifest(uri)["extra"]["inputs"]


def test_evaluate_only_reads_its_inputs_from_the_given_store_urls(tiny_chain, tmp_path: Path) -> None:
    """The evaluate component with strings only (what evaluate-only hands it on a cluster): no artifacts."""
    from pipeline_fixtures import FAST

    urls = {role: tiny_chain[role].uri for role in ("generator", "teacher", "dataset")}
    store = str(Path(urls["dataset"]).parents[2])  # <store>/artifacts/prepare_data/<key>
    func = components.stage_functions()["evaluate"]
    report = dsl.Artifact(uri=str(tmp_path / "kfp" / "report"))
    metrics, html = dsl.Metrics(uri=str(tmp_path / "kfp" / "metrics")), dsl.HTML(uri=str(tmp_path / "kfp" / "html"))
    func(report=report, metrics=metrics, html=html, preset="tiny", overrides_json=json.dumps(FAST), store=store,
         generator_uri=urls["generator"], teacher_uri=urls["teacher"], dataset_uri=urls["dataset"])
    uri = report.metadata["anyflow_uri"]
    storage.verify(uri)
    assert _manifest_inputs(uri) == urls  # the store's own record of what the stage read
    assert report.metadata["anyflow_inputs"] == urls


def test_a_uri_string_wins_over_an_input_artifact(tiny_chain, tmp_path: Path) -> None:
    """train_teacher given a decoy dataset artifact (a pointer elsewhere) and ``dataset_uri``: reads the URL."""
    from pipeline_fixtures import FAST

    url = tiny_chain["dataset"].uri
    decoy = tmp_path / "kfp" / "decoy"
    decoy.parent.mkdir(parents=True)
    decoy.write_text(json.dumps({"anyflow_uri": str(tmp_path / "no-such-artifact")}))
    store = str(tmp_path / "store")
    func = components.stage_functions()["train_teacher"]
    teacher = dsl.Model(uri=str(tmp_path / "kfp" / "teacher"))
    func(teacher=teacher, metrics=dsl.Metrics(uri=str(tmp_path / "kfp" / "m")), preset="tiny",
         overrides_json=json.dumps(FAST), store=store, dataset=dsl.Dataset(uri=str(decoy)), dataset_uri=url)
    uri = teacher.metadata["anyflow_uri"]
    assert uri.startswith(store + "/artifacts/train_teacher/")
    assert _manifest_inputs(uri) == {"dataset": url}
    (parent,) = storage.read_manifest(uri)["parents"]
    assert parent["uri"] == url  # ... with the digest of the manifest at that URL
    assert parent["manifest_sha256"] == hashlib.sha256((Path(url) / "manifest.json").read_bytes()).hexdigest()
